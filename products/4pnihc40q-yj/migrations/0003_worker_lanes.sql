-- Workers in the canary: which track took a job (its lane), which version processed it, one
-- row per attempt (for backoff timing and per-version metrics) and each worker's heartbeat
-- (a lane whose worker stopped beating is drained by the others). Additive only: a release
-- that does not know these columns keeps working (lane NULL means any worker).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE jobs ADD COLUMN IF NOT EXISTS lane TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS processed_version TEXT;

-- Written in the attempt's own transaction: a worker killed mid-job leaves no row.
CREATE TABLE IF NOT EXISTS job_attempts (
    id BIGINT GENERATED ALWAYS AS IDENTITY,
    job_key TEXT NOT NULL,
    attempt_number BIGINT NOT NULL CHECK (attempt_number >= 1),
    settled_as TEXT NOT NULL CHECK (settled_as IN ('done', 'retry', 'dead')),
    worker_track TEXT NOT NULL,
    worker_version TEXT NOT NULL,
    failure_reason TEXT,
    attempt_began_at TIMESTAMPTZ NOT NULL,
    attempt_ended_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- job_key first: the gate reads one job's attempts (a replay adds attempts from 1 again)
    PRIMARY KEY (job_key, id)
);

CREATE TABLE IF NOT EXISTS worker_heartbeats (
    worker_track TEXT PRIMARY KEY,
    worker_version TEXT NOT NULL,
    worker_pid BIGINT NOT NULL,
    beat_at TIMESTAMPTZ NOT NULL
);
