-- The artifact index (core/registry.py).
CREATE SCHEMA IF NOT EXISTS registry;
CREATE TABLE IF NOT EXISTS registry.artifacts (
    sha256 TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    manifest JSONB NOT NULL,
    size_bytes BIGINT NOT NULL,
    pushed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
