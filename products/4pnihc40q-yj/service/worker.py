"""The product's background worker (worker-f76v7exz5): consumes the `jobs` queue.

    python <artifact>/service/worker.py        (same environment variables as the API)

Exactly-once processing: a job is claimed with SELECT ... FOR UPDATE SKIP LOCKED and, in the
same transaction, its result is written (INSERT ... ON CONFLICT DO NOTHING) and the job marked
done. A crash before the commit rolls everything back and the job is simply claimed again.
The high queue is always drained before the low one. A failed attempt is recorded with an
exponential backoff from the spec's queue policy; after max_attempts the job moves to the
dead-letter table. Every settled attempt is a row of `job_attempts` (same transaction).

Lanes (the canary): a job carries the track of the API that took it. A worker takes jobs of
its own lane, of no lane, and of a lane whose worker has stopped beating (a rolled-back or
promoted canary's leftovers), so the canary's workers process the canary's share of jobs.

Metrics (`SERVICE_METRICS_PORT`, Prometheus text on /metrics): attempts by outcome, the time
from enqueue to done, and dead-letter additions, labelled with version and track; counted
only after the transaction commits. Logs to stdout; stops gracefully on SIGTERM/SIGINT after
the current job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from service_config import ConfigError, QueuePolicy, ServiceConfig, load_config

log = logging.getLogger("worker")

IDLE_POLL_SECONDS = 0.075
RECONNECT_SECONDS = 1.0
HEARTBEAT_SECONDS = 1.0
LANE_STALE_SECONDS = 3.0  # a lane whose worker was silent this long is drained by the others
QUEUE_ORDER = ("high", "low")  # strict priority: low is only looked at when high has nothing due

# Seconds from enqueue to done; dense enough for the canary judge's rank test on bucket deltas.
LATENCY_BUCKETS_MS = (
    5, 10, 15, 20, 30, 40, 50, 75, 100, 125, 150, 200, 250, 300, 400, 500, 750, 1000, 1500,
    2500, 5000, 10000,
)  # fmt: skip
METRICS = CollectorRegistry()
ATTEMPTS = Counter(
    "worker_job_attempts",  # exposed as worker_job_attempts_total
    "Settled job attempts by outcome (done, retry, dead).",
    ("version", "track", "queue", "outcome"),
    registry=METRICS,
)
LATENCY = Histogram(
    "worker_job_latency_seconds",
    "Time from enqueue to done of each job done.",
    ("version", "track", "queue"),
    buckets=tuple(ms / 1000 for ms in LATENCY_BUCKETS_MS),
    registry=METRICS,
)
DEAD_LETTERS = Counter(
    "worker_dead_letters",  # exposed as worker_dead_letters_total
    "Jobs this worker moved to the dead-letter table.",
    ("version", "track", "queue"),
    registry=METRICS,
)


class JobFailed(Exception):
    """The job cannot be processed (this attempt); the message is stored as last_error."""


@dataclass(frozen=True)
class Job:
    key: str
    queue: str
    payload: dict[str, Any]
    attempts: int  # attempts made before this one
    started_at: Any = None  # the database clock when this attempt began


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to, counted in the metrics once its transaction committed."""

    job: Job
    outcome: str  # done | retry | dead
    latency_seconds: float | None = None  # enqueue to done


def process(job: Job, config: ServiceConfig) -> dict[str, Any]:
    """The job's work: a small aggregate of `payload.values`. Raises JobFailed on bad input.

    Payload fields: `values` (list of numbers), `poison` (true: always fails, for DLQ drills),
    `fail_attempts` (n: the first n attempts fail, for retry drills), `sleep_ms` (the job
    takes this long, for crash drills).
    """
    if config.knobs.job_latency_ms > 0:
        time.sleep(config.knobs.job_latency_ms / 1000)
    sleep_ms = job.payload.get("sleep_ms", 0)
    if isinstance(sleep_ms, int | float) and not isinstance(sleep_ms, bool) and sleep_ms > 0:
        time.sleep(min(float(sleep_ms), 60_000.0) / 1000)
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


CLAIM_SQL = f"""
    SELECT job_key, queue, payload, attempts, clock_timestamp()
    FROM jobs
    WHERE status = 'queued' AND queue = %(queue)s AND next_attempt_at <= now()
      AND (lane IS NULL OR lane = %(track)s OR lane NOT IN (
          SELECT worker_track FROM worker_heartbeats
          WHERE beat_at > now() - interval '{LANE_STALE_SECONDS} seconds'))
    ORDER BY next_attempt_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
"""


def claim(cur: psycopg2.extensions.cursor, track: str) -> Job | None:
    for queue in QUEUE_ORDER:
        cur.execute(CLAIM_SQL, {"queue": queue, "track": track})
        row = cur.fetchone()
        if row is not None:
            return Job(row[0], row[1], row[2] or {}, attempts=row[3], started_at=row[4])
    return None


def record_attempt(
    cur: psycopg2.extensions.cursor,
    job: Job,
    outcome: str,
    config: ServiceConfig,
    error: str | None = None,
) -> None:
    cur.execute(
        "INSERT INTO job_attempts (job_key, attempt_number, settled_as, worker_track, "
        "worker_version, failure_reason, attempt_began_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (job.key, job.attempts + 1, outcome, config.track, config.version, error, job.started_at),
    )


def record_success(
    cur: psycopg2.extensions.cursor, job: Job, result: dict[str, Any], config: ServiceConfig
) -> float:
    """Write the result once and mark the job done; returns seconds from enqueue to done."""
    cur.execute(
        "INSERT INTO job_results (job_key, result) VALUES (%s, %s::JSONB) "
        "ON CONFLICT (job_key) DO NOTHING",
        (job.key, json.dumps(result)),
    )
    cur.execute(
        "UPDATE jobs SET status = 'done', attempts = attempts + 1, last_error = NULL, "
        "processed_version = %s, updated_at = now() WHERE job_key = %s "
        "RETURNING extract(epoch FROM clock_timestamp() - created_at)",
        (config.version, job.key),
    )
    row = cur.fetchone()
    record_attempt(cur, job, "done", config)
    return float(row[0]) if row else 0.0


def record_failure(
    cur: psycopg2.extensions.cursor,
    job: Job,
    error: str,
    policy: QueuePolicy,
    config: ServiceConfig,
) -> bool:
    """Count the failed attempt; returns True if the job went to the dead-letter table."""
    attempts = job.attempts + 1
    record_attempt(cur, job, "dead" if attempts >= policy.max_attempts else "retry", config, error)
    if attempts >= policy.max_attempts:
        cur.execute(
            "INSERT INTO dead_letter (job_key, queue, payload, attempts, last_error) "
            "VALUES (%s, %s, %s::JSONB, %s, %s) ON CONFLICT (job_key) DO NOTHING",
            (job.key, job.queue, json.dumps(job.payload), attempts, error),
        )
        cur.execute(
            "UPDATE jobs SET status = 'dead', attempts = %s, last_error = %s, "
            "processed_version = %s, updated_at = now() WHERE job_key = %s",
            (attempts, error, config.version, job.key),
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
    outcome = _settle_one(conn, config)
    if outcome is None:
        return False
    count(outcome, config)  # after the commit: a crash before it counted nothing
    return True


def _settle_one(conn: psycopg2.extensions.connection, config: ServiceConfig) -> Outcome | None:
    with conn, conn.cursor() as cur:
        job = claim(cur, config.track)
        if job is None:
            return None
        try:
            result = process(job, config)
        except Exception as exc:  # any error in the job's own work is a failed attempt
            error = str(exc) if isinstance(exc, JobFailed) else f"{type(exc).__name__}: {exc}"
            dead = record_failure(cur, job, error, config.queues[job.queue], config)
            log.warning(
                "job %s (%s) attempt %d failed: %s%s",
                job.key, job.queue, job.attempts + 1, exc, " -> dead letter" if dead else "",
            )  # fmt: skip
            return Outcome(job, "dead" if dead else "retry")
        latency = record_success(cur, job, result, config)
    log.info("job %s (%s) done on attempt %d", job.key, job.queue, job.attempts + 1)
    return Outcome(job, "done", latency)


def count(outcome: Outcome, config: ServiceConfig) -> None:
    labels = {"version": config.version, "track": config.track, "queue": outcome.job.queue}
    ATTEMPTS.labels(outcome=outcome.outcome, **labels).inc()
    if outcome.outcome == "dead":
        DEAD_LETTERS.labels(**labels).inc()
    if outcome.latency_seconds is not None:
        LATENCY.labels(**labels).observe(outcome.latency_seconds)


def heartbeat(conn: psycopg2.extensions.connection, config: ServiceConfig) -> None:
    """This worker's lane is alive (see the module docstring)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO worker_heartbeats (worker_track, worker_version, worker_pid, beat_at) "
            "VALUES (%s, %s, %s, now()) ON CONFLICT (worker_track) DO UPDATE SET "
            "worker_version = EXCLUDED.worker_version, worker_pid = EXCLUDED.worker_pid, "
            "beat_at = now()",
            (config.track, config.version, os.getpid()),
        )


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
    last_beat = 0.0
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = connect(config)
            if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                heartbeat(conn, config)
                last_beat = time.monotonic()
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
    port = os.environ.get("SERVICE_METRICS_PORT", "")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            print(f"worker: SERVICE_METRICS_PORT: not a port number: {port!r}", file=sys.stderr)
            return 2
        # Every series exists from the start, so "no series" means "never scraped", not 0.
        for queue in config.queues:
            labels = {"version": config.version, "track": config.track, "queue": queue}
            for outcome in ("done", "retry", "dead"):
                ATTEMPTS.labels(outcome=outcome, **labels)
            DEAD_LETTERS.labels(**labels)
            LATENCY.labels(**labels)
        start_http_server(int(port), addr="127.0.0.1", registry=METRICS)
    run(config, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
