"""The product's background worker (worker-f76v7exz5): consumes the `jobs` queue.

    python <artifact>/service/worker.py        (same environment variables as the API)

Exactly-once processing: a job is claimed with SELECT ... FOR UPDATE SKIP LOCKED and, in the
same transaction, its result is written (INSERT ... ON CONFLICT DO NOTHING) and the job marked
done. A crash before the commit rolls everything back and the job is simply claimed again.
The high queue is always drained before the low one. A failed attempt is recorded with an
exponential backoff from the spec's queue policy; after max_attempts the job moves to the
dead-letter table. Logs to stdout; stops gracefully on SIGTERM/SIGINT after the current job.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from service_config import ConfigError, QueuePolicy, ServiceConfig, load_config

log = logging.getLogger("worker")

IDLE_POLL_SECONDS = 0.075
RECONNECT_SECONDS = 1.0
QUEUE_ORDER = ("high", "low")  # strict priority: low is only looked at when high has nothing due


class JobFailed(Exception):
    """The job cannot be processed (this attempt); the message is stored as last_error."""


@dataclass(frozen=True)
class Job:
    key: str
    queue: str
    payload: dict[str, Any]
    attempts: int  # attempts made before this one


def process(job: Job, config: ServiceConfig) -> dict[str, Any]:
    """The job's work: a small aggregate of `payload.values`. Raises JobFailed on bad input.

    Payload fields: `values` (list of numbers), `poison` (true: always fails, for DLQ drills),
    `fail_attempts` (n: the first n attempts fail, for retry drills).
    """
    pattern = config.knobs.fail_jobs_matching
    if pattern is not None and pattern.search(job.key):
        raise JobFailed(f"job key matches the release's fail_jobs_matching {pattern.pattern!r}")
    payload = job.payload
    if payload.get("poison"):
        raise JobFailed("poison payload: refused by design")
    fail_attempts = payload.get("fail_attempts", 0)
    if not isinstance(fail_attempts, int) or isinstance(fail_attempts, bool):
        raise JobFailed("payload field 'fail_attempts' must be an integer")
    attempt = job.attempts + 1
    if attempt <= fail_attempts:
        raise JobFailed(f"transient failure requested for attempt {attempt} of {fail_attempts}")
    values = payload.get("values", [])
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise JobFailed("payload field 'values' must be a list of numbers")
    total = sum(values)
    return {
        "count": len(values),
        "sum": total,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "mean": total / len(values) if values else None,
        "processed_by": f"{config.worker_tier}@{config.version}",
        "attempt": attempt,
    }


CLAIM_SQL = """
    SELECT job_key, queue, payload, attempts
    FROM jobs
    WHERE status = 'queued' AND queue = %s AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
"""


def claim(cur: psycopg2.extensions.cursor) -> Job | None:
    for queue in QUEUE_ORDER:
        cur.execute(CLAIM_SQL, (queue,))
        row = cur.fetchone()
        if row is not None:
            return Job(key=row[0], queue=row[1], payload=row[2] or {}, attempts=row[3])
    return None


def record_success(cur: psycopg2.extensions.cursor, job: Job, result: dict[str, Any]) -> None:
    cur.execute(
        "INSERT INTO job_results (job_key, result) VALUES (%s, %s::JSONB) "
        "ON CONFLICT (job_key) DO NOTHING",
        (job.key, json.dumps(result)),
    )
    cur.execute(
        "UPDATE jobs SET status = 'done', attempts = attempts + 1, last_error = NULL, "
        "updated_at = now() WHERE job_key = %s",
        (job.key,),
    )


def record_failure(
    cur: psycopg2.extensions.cursor, job: Job, error: str, policy: QueuePolicy
) -> bool:
    """Count the failed attempt; returns True if the job went to the dead-letter table."""
    attempts = job.attempts + 1
    if attempts >= policy.max_attempts:
        cur.execute(
            "INSERT INTO dead_letter (job_key, queue, payload, attempts, last_error) "
            "VALUES (%s, %s, %s::JSONB, %s, %s) ON CONFLICT (job_key) DO NOTHING",
            (job.key, job.queue, json.dumps(job.payload), attempts, error),
        )
        cur.execute(
            "UPDATE jobs SET status = 'dead', attempts = %s, last_error = %s, "
            "updated_at = now() WHERE job_key = %s",
            (attempts, error, job.key),
        )
        return True
    cur.execute(
        "UPDATE jobs SET attempts = %s, last_error = %s, updated_at = now(), "
        "next_attempt_at = clock_timestamp() + make_interval(secs => %s) WHERE job_key = %s",
        (attempts, error, policy.backoff_ms(attempts) / 1000, job.key),
    )
    return False


def work_once(conn: psycopg2.extensions.connection, config: ServiceConfig) -> bool:
    """Claim and settle at most one job in one transaction; False when nothing was due."""
    with conn, conn.cursor() as cur:
        job = claim(cur)
        if job is None:
            return False
        try:
            result = process(job, config)
        except Exception as exc:  # any error in the job's own work is a failed attempt
            error = str(exc) if isinstance(exc, JobFailed) else f"{type(exc).__name__}: {exc}"
            dead = record_failure(cur, job, error, config.queues[job.queue])
            log.warning(
                "job %s (%s) attempt %d failed: %s%s",
                job.key, job.queue, job.attempts + 1, exc, " -> dead letter" if dead else "",
            )  # fmt: skip
            return True
        record_success(cur, job, result)
    log.info("job %s (%s) done on attempt %d", job.key, job.queue, job.attempts + 1)
    return True


def connect(config: ServiceConfig) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(
        config.database_url,
        connect_timeout=5,
        application_name=f"{config.worker_tier}-{config.track}",
    )
    psycopg2.extras.register_default_jsonb(conn)
    return conn


def run(config: ServiceConfig, stop: threading.Event) -> None:
    log.info(
        "%s %s (%s) consuming %s from %s",
        config.worker_tier, config.version, config.track, "/".join(QUEUE_ORDER),
        config.display_database(),
    )  # fmt: skip
    conn: psycopg2.extensions.connection | None = None
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = connect(config)
            if not work_once(conn, config):
                stop.wait(IDLE_POLL_SECONDS)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            # The database went away: retry the connection, never exit on our own.
            log.warning("database %s unavailable: %s", config.display_database(), exc)
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(RECONNECT_SECONDS)
    if conn is not None:
        conn.close()
    log.info("stopped")


def main() -> int:
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run(config, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
