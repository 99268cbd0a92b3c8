-- Baseline schema of product 4pnihc40q-yj: the catalogue served by the API tier, the job
-- queue consumed by the workers, their idempotent write-back table and the dead-letter queue.
-- Timeouts first: a migration never waits long for a lock held by live traffic.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- `name` is a keyword to sqlfluff (RF04) but it is the API's field name, hence the noqa.
CREATE TABLE IF NOT EXISTS items (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL,  -- noqa: RF04
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per job key: enqueueing the same key twice is a no-op (idempotent producers).
-- Status 'running' is reserved for workers that hold a job outside a transaction; the sample
-- worker processes each job inside one transaction, so a crash never strands a job there.
CREATE TABLE IF NOT EXISTS jobs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_key TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL CHECK (queue IN ('high', 'low')),
    payload JSONB NOT NULL DEFAULT '{}'::JSONB,
    status TEXT NOT NULL DEFAULT 'queued'
    CHECK (status IN ('queued', 'running', 'done', 'dead')),
    attempts BIGINT NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Dequeue: the oldest due job of one queue; only queued jobs are ever looked up this way.
CREATE INDEX IF NOT EXISTS jobs_dequeue_idx ON jobs (queue, next_attempt_at, id)
WHERE status = 'queued';

-- The workers' write-back: the primary key makes a second write of the same job a no-op.
CREATE TABLE IF NOT EXISTS job_results (
    job_key TEXT PRIMARY KEY,
    result JSONB NOT NULL,
    written_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Jobs that failed max_attempts times (poison messages), kept for inspection and replay.
CREATE TABLE IF NOT EXISTS dead_letter (
    job_key TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    payload JSONB NOT NULL,
    attempts BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
