"""One owner of an environment per product: the release run that may change it right now.

Production is owned from the canary's first weight change until promotion, rollback or
abort; staging from the migrations applied there until the canary starts. The owner is a row
in `release_control.platform.owners` (product, env) naming the run, the release and artifact,
the process that acts for it and a heartbeat. Another release waits for the owner within a
bound and is then refused (`ProductionOwned`); an owner whose run died (process gone,
heartbeat stale, or its Dagster run no longer in progress) is taken over by the reconciler
(`core/reconcile.py`), which puts the environment back in order first.

Liveness is decided by `judge_owner` (pure, tested as a table); this module only gathers the
facts. Plain Python: no Dagster import.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import psutil

from dagster_project.core import control_schema, database

HEARTBEAT_INTERVAL_SECONDS = 2.0


class ProductionOwned(RuntimeError):
    """Another live release owns the environment; it was waited for within the bound."""


@dataclass(frozen=True)
class Owner:
    product: str
    env: str
    run_id: str
    release: str
    artifact_sha256: str
    previous_artifact_sha256: str | None
    phase: str  # staging | canary | parked | promoting | switching | rollback
    host: str
    pid: int
    pid_started: float
    acquired_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float

    @property
    def label(self) -> str:
        return f"release {self.release} (run {self.run_id[:8]}, {self.phase})"


@dataclass(frozen=True)
class OwnerFacts:
    """What is known about an owner when it is judged."""

    heartbeat_age_seconds: float
    on_this_host: bool
    process_alive: bool | None  # None: cannot tell (another host)
    run_in_progress: bool | None  # None: not known (no Dagster instance at hand)


@dataclass(frozen=True)
class OwnerVerdict:
    alive: bool
    reason: str


def judge_owner(facts: OwnerFacts, *, stale_after_seconds: float) -> OwnerVerdict:
    """Alive only while its process runs, its heartbeat is fresh and its run is in progress.

    Any one sign of death is enough: a killed process leaves a fresh heartbeat for a moment,
    a hung one a live pid, and a run marked finished may leave its process printing a summary.
    """
    if facts.on_this_host and facts.process_alive is False:
        return OwnerVerdict(False, "its process is gone")
    if facts.run_in_progress is False:
        return OwnerVerdict(False, "its Dagster run is no longer in progress")
    if facts.heartbeat_age_seconds > stale_after_seconds:
        return OwnerVerdict(
            False,
            f"its heartbeat is {facts.heartbeat_age_seconds:.0f}s old "
            f"(the bound is {stale_after_seconds:.0f}s)",
        )
    return OwnerVerdict(True, "alive")


def facts_for(owner: Owner, run_in_progress: bool | None) -> OwnerFacts:
    here = owner.host == socket.gethostname()
    return OwnerFacts(
        heartbeat_age_seconds=owner.heartbeat_age_seconds,
        on_this_host=here,
        process_alive=process_alive(owner.pid, owner.pid_started) if here else None,
        run_in_progress=run_in_progress,
    )


def process_alive(pid: int, started: float) -> bool:
    """True while `pid` runs and is the process that started at `started` (not a reuse)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False


def this_process() -> tuple[str, int, float]:
    """(host, pid, start time) of this process: what an owner or a run is known by."""
    return socket.gethostname(), os.getpid(), psutil.Process(os.getpid()).create_time()


# -- storage -------------------------------------------------------------------------------


def ensure_schema() -> None:
    control_schema.ensure()  # platform.owners: sql/control/0002_owners.sql


_SELECT = """
SELECT product, env, run_id, release, artifact_sha256, previous_artifact_sha256, phase, host,
       pid, pid_started, acquired_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8
  FROM platform.owners
"""


def current(product: str, env: str) -> Owner | None:
    ensure_schema()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(_SELECT + " WHERE product = %s AND env = %s", (product, env))
        row = cur.fetchone()
    return Owner(*row) if row else None


def _try_insert(
    product: str,
    env: str,
    run_id: str,
    release: str,
    artifact_sha256: str,
    previous_artifact_sha256: str | None,
    phase: str,
) -> tuple[bool, Owner | None]:
    """(True, None) when `run_id` now owns env (new or re-entrant); else (False, the owner)."""
    host, pid, started = this_process()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO platform.owners (product, env, run_id, release, artifact_sha256,
                previous_artifact_sha256, phase, host, pid, pid_started)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (product, env) DO UPDATE
               SET phase = EXCLUDED.phase, host = EXCLUDED.host, pid = EXCLUDED.pid,
                   pid_started = EXCLUDED.pid_started, heartbeat_at = now(),
                   release = EXCLUDED.release, artifact_sha256 = EXCLUDED.artifact_sha256,
                   previous_artifact_sha256 = EXCLUDED.previous_artifact_sha256
             WHERE platform.owners.run_id = EXCLUDED.run_id
            RETURNING run_id
            """,
            (
                product,
                env,
                run_id,
                release,
                artifact_sha256,
                previous_artifact_sha256,
                phase,
                host,
                pid,
                started,
            ),
        )
        if cur.fetchone():
            return True, None
    return False, current(product, env)


def acquire(
    product: str,
    env: str,
    *,
    run_id: str,
    release: str,
    artifact_sha256: str,
    previous_artifact_sha256: str | None,
    phase: str,
    wait_seconds: float,
    stale_after_seconds: float,
    run_in_progress: Callable[[str], bool | None],
    take_over: Callable[[Owner, str], None],
    on_wait: Callable[[Owner], None] | None = None,
) -> Owner:
    """Own `env` for `run_id` (re-entrant), waiting up to `wait_seconds` for a live owner.

    A dead owner is handed to `take_over(owner, why)` (the reconciler), which puts the
    environment in order and releases it; then acquiring is tried again. One it could not
    settle (it keeps the ownership to retry) is waited for like a live owner.
    """
    ensure_schema()
    deadline = time.monotonic() + wait_seconds
    waited = False
    while True:
        won, holder = _try_insert(
            product, env, run_id, release, artifact_sha256, previous_artifact_sha256, phase
        )
        if won:
            owner = current(product, env)
            assert owner is not None
            return owner
        if holder is None:  # released between the insert and the read: try again
            time.sleep(0.1)
            continue
        verdict = judge_owner(
            facts_for(holder, run_in_progress(holder.run_id)),
            stale_after_seconds=stale_after_seconds,
        )
        if not verdict.alive:
            take_over(holder, verdict.reason)
            still = current(product, env)
            if still is None or still.run_id != holder.run_id:
                continue
            # Kept: the reconciler could not settle it yet (it says why); wait as for a live one.
        if time.monotonic() >= deadline:
            raise ProductionOwned(
                f"{env} of {product} is owned by {holder.label} since "
                f"{holder.acquired_at:%H:%M:%S}; waited {wait_seconds:.0f}s "
                f"(spec: production.owner_wait_seconds). It is released when that release is "
                "promoted, rolled back or aborted; try again then"
            )
        if not waited and on_wait is not None:
            on_wait(holder)
        waited = True
        time.sleep(1.0)


def set_phase(product: str, env: str, run_id: str, phase: str) -> bool:
    """Record what the owner is doing now (decides what the reconciler records if it dies)."""
    ensure_schema()
    return _touch(product, env, run_id, phase)


def heartbeat(product: str, env: str, run_id: str) -> bool:
    """Refresh the heartbeat; False when `run_id` no longer owns env (it was taken over)."""
    return _touch(product, env, run_id, None)


def _touch(product: str, env: str, run_id: str, phase: str | None) -> bool:
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE platform.owners SET heartbeat_at = now(), phase = coalesce(%s, phase) "
            "WHERE product = %s AND env = %s AND run_id = %s",
            (phase, product, env, run_id),
        )
        return bool(cur.rowcount)


def release(product: str, env: str, run_id: str) -> bool:
    """Give up ownership (only the owner's own run can); True if it owned env."""
    stop_heartbeat(product, env)
    ensure_schema()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            "DELETE FROM platform.owners WHERE product = %s AND env = %s AND run_id = %s",
            (product, env, run_id),
        )
        return bool(cur.rowcount)


# -- heartbeat -----------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Refreshes the owner's heartbeat while this process acts for it.

    `lost` says why the owner must stop: its row is gone (taken over), or no beat has gone
    through for `lost_after` seconds (Postgres unreachable: the reconciler may soon judge the
    owner dead). A single failed beat is not a loss; the next good one clears it."""

    def __init__(self, product: str, env: str, run_id: str, lost_after: float) -> None:
        super().__init__(daemon=True, name=f"owner-heartbeat-{product}-{env}")
        self.product, self.env, self.run_id = product, env, run_id
        self.lost_after = lost_after
        self._stop = threading.Event()
        self._taken_over = False
        self._last_ok = time.monotonic()
        self._last_error = ""

    @property
    def lost(self) -> str | None:
        if self._taken_over:
            return "ownership was taken over by the reconciler"
        silent = time.monotonic() - self._last_ok
        if silent > self.lost_after:
            return f"no heartbeat went through for {silent:.0f}s ({self._last_error})"
        return None

    def run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_SECONDS):
            try:
                if not heartbeat(self.product, self.env, self.run_id):
                    self._taken_over = True
                    return
                self._last_ok = time.monotonic()
            except Exception as exc:  # Postgres down: tolerated for `lost_after` seconds
                self._last_error = f"{type(exc).__name__}: {str(exc)[:120]}"

    def stop(self) -> None:
        self._stop.set()


_heartbeats: dict[tuple[str, str], Heartbeat] = {}
_heartbeats_lock = threading.Lock()


def start_heartbeat(product: str, env: str, run_id: str, *, lost_after: float = 15.0) -> Heartbeat:
    """One heartbeat per (product, env) in this process; kept across the stages of a run.
    `lost_after` should stay below the spec's heartbeat timeout (callers pass half of it)."""
    with _heartbeats_lock:
        beat = _heartbeats.get((product, env))
        if beat is not None and beat.run_id == run_id and beat.is_alive():
            return beat
        if beat is not None:
            beat.stop()
        beat = Heartbeat(product, env, run_id, lost_after)
        beat.start()
        _heartbeats[(product, env)] = beat
        return beat


def stop_heartbeat(product: str, env: str) -> None:
    with _heartbeats_lock:
        beat = _heartbeats.pop((product, env), None)
    if beat is not None:
        beat.stop()


def lost(product: str, env: str) -> str | None:
    """Why this process lost its ownership of env, or None."""
    beat = _heartbeats.get((product, env))
    return beat.lost if beat is not None else None


@contextlib.contextmanager
def heartbeat_while(
    product: str, env: str, run_id: str, *, lost_after: float = 15.0
) -> Iterator[Heartbeat]:
    beat = start_heartbeat(product, env, run_id, lost_after=lost_after)
    try:
        yield beat
    finally:
        stop_heartbeat(product, env)
