-- The owner of each environment per product (core/ownership.py).
CREATE SCHEMA IF NOT EXISTS platform;
CREATE TABLE IF NOT EXISTS platform.owners (
    product                  text        NOT NULL,
    env                      text        NOT NULL,
    run_id                   text        NOT NULL,
    release                  text        NOT NULL,
    artifact_sha256          text        NOT NULL,
    previous_artifact_sha256 text,
    phase                    text        NOT NULL,
    host                     text        NOT NULL,
    pid                      integer     NOT NULL,
    pid_started              double precision NOT NULL,
    acquired_at              timestamptz NOT NULL DEFAULT now(),
    heartbeat_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product, env)
);
