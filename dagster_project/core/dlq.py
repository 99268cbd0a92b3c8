"""The dead-letter queue of one product environment: list the jobs its workers gave up on,
and replay them (`release dlq list|replay`).

Nothing here knows a product's tables: the dead-letter table is `queues.dead_letter` of the
spec, its key column `worker.dead_letter_key_column` of the contract, and everything else
(its queue, attempts, error and failed-at columns; the jobs table, its key, status, attempts,
due and error columns and the queued/dead status values) the contract's `worker.replay`
section (`core/spec.py` `ReplayContract`).

A replay runs in one transaction. Per job, the job's row is locked first (`FOR UPDATE`, the
order the workers lock in: job, then dead-letter row), then its dead-letter row; only a job
whose status is the dead value *and* that has a dead-letter row is replayed: status back to
queued, attempts 0, due now, error cleared, and its dead-letter row deleted (the worker
writes a new one if it dies again). A second replay of the same job, even a concurrent one,
waits for the first's row lock, then sees the job queued and no dead-letter row, and skips
it naming the key: a job is never queued twice by replays, and its result is written back
once (the results table's key makes a second write a no-op anyway). `dry_run` takes the same
path and rolls back. `before_commit` runs inside the transaction (production: the audit
entry), so a replay that could not be audited is not committed.

Plain Python: no dagster import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from dagster_project.core import database as db
from dagster_project.core.spec import ProductSpec, ReplayContract

ENVIRONMENTS: tuple[str, ...] = ("staging", "production")
LOCK_TIMEOUT = "10s"  # a replay never waits long behind a worker's transaction


class DlqInputError(ValueError):
    """Bad input (exit 2): unknown environment or job key, or no `worker.replay` section in
    the contract. The message names the argument or field."""


class DlqRefused(RuntimeError):
    """The named job cannot be replayed (exit 3): it is not dead, or was already replayed."""


@dataclass(frozen=True)
class DeadJob:
    key: str
    queue: str
    attempts: int
    latest_error: str
    dead_since: datetime
    age_seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "queue": self.queue,
            "attempts": self.attempts,
            "latest_error": self.latest_error,
            "age_seconds": round(self.age_seconds, 1),
            "dead_since": self.dead_since.isoformat(),
        }


@dataclass(frozen=True)
class Depth:
    depth: int
    oldest_age_seconds: float | None  # None when the table is empty

    def as_json(self) -> dict[str, Any]:
        oldest = self.oldest_age_seconds
        return {
            "depth": self.depth,
            "oldest_age_seconds": None if oldest is None else round(oldest, 1),
        }


@dataclass
class ReplayResult:
    product: str
    env: str
    database: str
    dry_run: bool
    replayed: list[str] = field(default_factory=list)  # would be, with dry_run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, why)

    def lines(self) -> list[str]:
        verb = "would replay" if self.dry_run else "replayed"
        out = [f"{verb} {key}" for key in self.replayed]
        out += [f"skipped {key}: {why}" for key, why in self.skipped]
        return out


def check_env(env: str) -> str:
    if env not in ENVIRONMENTS:
        raise DlqInputError(f"--env {env!r}: expected one of {', '.join(ENVIRONMENTS)}")
    return env


def replay_contract(spec: ProductSpec) -> ReplayContract:
    contract = spec.contract.worker.replay
    if contract is None:
        raise DlqInputError(
            f"{spec.contract_path}: field 'worker.replay' is missing: declare the dead-letter "
            "table's columns and the jobs table (see the scaffold's contract.yaml.tmpl)"
        )
    return contract


def environment_database(spec: ProductSpec, env: str) -> str:
    return db.environment_database(spec.product, check_env(env))


def _connect(spec: ProductSpec, env: str, *, autocommit: bool) -> psycopg2.extensions.connection:
    """The environment's database; DatabaseUnavailable (named) when it cannot be reached or
    does not exist yet."""
    name = environment_database(spec, env)
    try:
        return db.connect(name, autocommit=autocommit)
    except db.DatabaseUnavailable as exc:
        raise db.DatabaseUnavailable(
            f"the {env} database of {spec.product} is not reachable (nothing deployed there "
            f"yet, or Postgres is down): {exc}"
        ) from None


def _missing_table(spec: ProductSpec, env: str, exc: psycopg2.Error) -> DlqInputError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DlqInputError(
        f"the {env} database of {spec.product} lacks a table or column the contract's "
        f"worker.replay names (migrations not applied?): {first}"
    )


def list_dead(spec: ProductSpec, env: str) -> list[DeadJob]:
    """Every row of the environment's dead-letter table, oldest first."""
    contract = replay_contract(spec)
    dl = contract.dead_letter
    query = sql.SQL(
        "SELECT {key}::text, {queue}::text, {attempts}, {error}::text, {since}, "
        "extract(epoch FROM now() - {since}) FROM {table} ORDER BY {since}, {key}"
    ).format(
        key=sql.Identifier(spec.contract.worker.dead_letter_key_column),
        queue=sql.Identifier(dl.queue_column),
        attempts=sql.Identifier(dl.attempts_column),
        error=sql.Identifier(dl.error_column),
        since=sql.Identifier(dl.dead_since_column),
        table=sql.Identifier(spec.queues.dead_letter),
    )
    conn = _connect(spec, env, autocommit=True)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(query)
            except (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedColumn) as exc:
                raise _missing_table(spec, env, exc) from None
            rows = cur.fetchall()
    finally:
        conn.close()
    return [
        DeadJob(str(r[0]), str(r[1]), int(r[2]), str(r[3] or ""), r[4], float(r[5] or 0.0))
        for r in rows
    ]


def depth(spec: ProductSpec, env: str) -> Depth:
    """How many jobs the dead-letter table holds and the oldest one's age in seconds."""
    contract = replay_contract(spec)
    since = sql.Identifier(contract.dead_letter.dead_since_column)
    query = sql.SQL("SELECT count(*), extract(epoch FROM now() - min({f})) FROM {t}").format(
        f=since, t=sql.Identifier(spec.queues.dead_letter)
    )
    conn = _connect(spec, env, autocommit=True)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(query)
            except (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedColumn) as exc:
                raise _missing_table(spec, env, exc) from None
            count, oldest = cur.fetchone() or (0, None)
    finally:
        conn.close()
    return Depth(int(count), None if oldest is None else float(oldest))


def replay(
    spec: ProductSpec,
    env: str,
    keys: Sequence[str] | None,
    *,
    dry_run: bool = False,
    before_commit: Callable[[ReplayResult], None] | None = None,
) -> ReplayResult:
    """Replay the named jobs (`keys`), or every job of the dead-letter table (`keys=None`),
    in one transaction (see the module doc). A named key the jobs table does not know is
    DlqInputError; a named key that is not dead (or already replayed) is DlqRefused. With
    `keys=None` such jobs (a concurrent replay got them first) are skipped and listed."""
    contract = replay_contract(spec)
    jobs, dl = contract.jobs_table, contract.dead_letter
    ident = sql.Identifier
    dl_table, dl_key = (
        ident(spec.queues.dead_letter),
        ident(spec.contract.worker.dead_letter_key_column),
    )
    lock_job = sql.SQL("SELECT {status}::text FROM {t} WHERE {k} = %s FOR UPDATE").format(
        status=ident(jobs.status_column), t=ident(jobs.table), k=ident(jobs.key_column)
    )
    lock_dead = sql.SQL("SELECT 1 FROM {t} WHERE {k} = %s FOR UPDATE").format(t=dl_table, k=dl_key)
    cleared = (
        sql.SQL(", {e} = NULL").format(e=ident(jobs.error_column))
        if jobs.error_column
        else sql.SQL("")
    )
    requeue = sql.SQL(
        "UPDATE {t} SET {status} = %s, {attempts} = 0, {due} = now(){cleared} "
        "WHERE {k} = %s AND {status} = %s"
    ).format(
        t=ident(jobs.table),
        status=ident(jobs.status_column),
        attempts=ident(jobs.attempts_column),
        due=ident(jobs.due_column),
        cleared=cleared,
        k=ident(jobs.key_column),
    )
    remove = sql.SQL("DELETE FROM {t} WHERE {k} = %s").format(t=dl_table, k=dl_key)
    every = sql.SQL("SELECT {k}::text FROM {t} ORDER BY {f}, {k}").format(
        k=dl_key, t=dl_table, f=ident(dl.dead_since_column)
    )

    result = ReplayResult(spec.product, env, environment_database(spec, env), dry_run)
    conn = _connect(spec, env, autocommit=False)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT))
                )
                if keys is None:
                    cur.execute(every)
                    candidates = [row[0] for row in cur.fetchall()]
                else:
                    candidates = list(dict.fromkeys(keys))
                for key in candidates:
                    cur.execute(lock_job, (key,))
                    row = cur.fetchone()
                    cur.execute(lock_dead, (key,))
                    in_dead_letter = cur.fetchone() is not None
                    status = None if row is None else row[0]
                    why = _not_replayable(spec, env, key, status, in_dead_letter, jobs.dead)
                    if why is None:
                        if not dry_run:
                            cur.execute(requeue, (jobs.queued, key, jobs.dead))
                            cur.execute(remove, (key,))
                        result.replayed.append(key)
                        continue
                    if keys is not None and row is None and not in_dead_letter:
                        raise DlqInputError(f"--job {key!r}: {why}")
                    if keys is not None:
                        raise DlqRefused(f"--job {key!r}: {why}")
                    result.skipped.append((key, why))
                if dry_run or not result.replayed:
                    conn.rollback()
                    return result
                if before_commit is not None:
                    before_commit(result)
                conn.commit()
            except (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedColumn) as exc:
                raise _missing_table(spec, env, exc) from None
            except psycopg2.errors.LockNotAvailable:
                raise DlqRefused(
                    f"a job of {spec.product} {env} stayed locked for {LOCK_TIMEOUT} (a worker "
                    "or another replay holds it): nothing was replayed, try again"
                ) from None
    finally:
        if not conn.closed:
            conn.rollback()  # anything not committed above is undone
            conn.close()
    return result


def _not_replayable(
    spec: ProductSpec, env: str, key: str, status: str | None, in_dead_letter: bool, dead: str
) -> str | None:
    """Why a job cannot be replayed, or None when it can."""
    table = spec.queues.dead_letter
    if status is None and not in_dead_letter:
        return f"no such job in {spec.product} {env}"
    if status is None:
        return f"in the dead-letter table {table} but not in the jobs table: left alone"
    if not in_dead_letter:
        return (
            f"not in the dead-letter table {table} (status {status!r}): already replayed, "
            "or never dead"
        )
    if status != dead:
        return (
            f"in the dead-letter table {table} but its status is {status!r}, not {dead!r}: "
            "left alone"
        )
    return None


def replay_production(
    spec: ProductSpec,
    keys: Sequence[str] | None,
    *,
    token: str | None,
    actor: str,
) -> tuple[ReplayResult, int | None]:
    """A replay in production: the guardrail token is verified (ApprovalRefused, exit 4) and
    the checkpoint key checked before anything is touched; the audit entry is appended inside
    the replay's transaction, so there is exactly one entry per replay that changed something
    (none when nothing was replayed). Returns the result and the entry's seq."""
    import uuid
    from datetime import UTC

    from dagster_project.core import audit, checkpoints, guardrail

    token = guardrail.verify(token, spec.guardrail.token_sha256)
    checkpoints.signer()  # an unusable or untrusted signing key refuses before any work
    serving = _serving(spec.product)
    seqs: list[int] = []

    def audited(result: ReplayResult) -> None:
        change_id = f"{spec.product}:dlq-replay:{uuid.uuid4().hex}"
        payload: dict[str, Any] = {
            "timestamp": datetime.now(UTC).isoformat(),
            "identity": actor,
            "approver": actor,
            "audited_by": actor,
            "artifact_sha256": serving.get("artifact_sha") or "none (nothing serving)",
            "environment": "production",
            "guardrail_token": token,
            "product": spec.product,
            "change_id": change_id,
            "kind": "dlq_replay",
            "serving_release": serving.get("version"),
            "dead_letter_table": spec.queues.dead_letter,
            "replayed": list(result.replayed),
            "skipped": [{"key": key, "reason": why} for key, why in result.skipped],
            "reason": f"dead-letter replay of {len(result.replayed)} job(s) by an operator",
        }
        seqs.append(audit.append(change_id, payload).seq)

    result = replay(spec, "production", keys, before_commit=audited)
    return result, (seqs[0] if seqs else None)


def _serving(product: str) -> dict[str, str | None]:
    """What production's stable track serves (for the audit entry); empty when unknown."""
    try:
        from dagster_project.core.platform.local import LocalPlatform

        return dict(LocalPlatform(product).current("production").get("stable") or {})
    except Exception:  # the entry says "none": a replay does not need the platform running
        return {}
