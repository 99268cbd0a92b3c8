-- Platform state (core/platform/state.py): what runs where, weights, purge keys.
CREATE SCHEMA IF NOT EXISTS platform;
CREATE TABLE IF NOT EXISTS platform.environments (
    product           text        NOT NULL,
    env               text        NOT NULL,
    edge_port         integer,
    purge_key         text        NOT NULL,
    weights           jsonb       NOT NULL,
    routes_generation bigint      NOT NULL DEFAULT 1,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product, env)
);
CREATE TABLE IF NOT EXISTS platform.processes (
    id               bigserial   PRIMARY KEY,
    product          text        NOT NULL,
    env              text        NOT NULL,
    track            text        CHECK (track IN ('stable', 'canary')),
    role             text        NOT NULL CHECK (role IN ('api', 'worker', 'edge')),
    status           text        NOT NULL CHECK (status IN ('starting', 'serving', 'retiring')),
    program          text,
    -- start time of the process seen ready; a later start is a restart by supervisord
    ready_start      double precision,
    port             integer,
    version          text,
    artifact_sha     text,
    deploy_dir       text,
    log_path         text        NOT NULL,
    command          text        NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now()
);
-- Tables from before supervision recorded pids; those rows keep no program (status reports
-- them, `down` forgets them).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'platform'
               AND table_name = 'processes' AND column_name = 'pid') THEN
        ALTER TABLE platform.processes DROP COLUMN pid, DROP COLUMN create_time,
            ADD COLUMN IF NOT EXISTS program text,
            ADD COLUMN IF NOT EXISTS ready_start double precision;
        ALTER TABLE platform.environments DROP COLUMN IF EXISTS edge_pid;
    END IF;
END $$;
