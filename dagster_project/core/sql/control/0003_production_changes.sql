-- Every promotion, aborted canary and rollback of production (core/changes.py).
CREATE SCHEMA IF NOT EXISTS platform;
CREATE TABLE IF NOT EXISTS platform.production_changes (
    id bigserial PRIMARY KEY,
    change_id text NOT NULL UNIQUE,
    product text NOT NULL,
    release text NOT NULL,
    outcome text NOT NULL,
    artifact_sha256 text NOT NULL,
    previous_artifact_sha256 text,
    run_id text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    details jsonb NOT NULL DEFAULT '{}'::jsonb
);
ALTER TABLE platform.production_changes DROP CONSTRAINT IF EXISTS production_changes_outcome_check;
ALTER TABLE platform.production_changes ADD CONSTRAINT production_changes_outcome_check
    CHECK (outcome IN ('promoted', 'aborted', 'rolled_back'));
