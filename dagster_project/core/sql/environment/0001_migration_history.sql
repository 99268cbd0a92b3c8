-- Which product migrations an environment applied (core/migrations/history.py).
CREATE SCHEMA IF NOT EXISTS release_meta;
CREATE TABLE IF NOT EXISTS release_meta.migration_history (
    id bigserial PRIMARY KEY,
    version text NOT NULL,
    filename text NOT NULL,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('applied', 'failed')),
    duration_ms integer NOT NULL DEFAULT 0,
    error text
);
CREATE UNIQUE INDEX IF NOT EXISTS migration_history_applied_version
    ON release_meta.migration_history (version) WHERE outcome = 'applied';
