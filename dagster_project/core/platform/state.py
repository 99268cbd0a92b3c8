"""Platform state in Postgres (`release_control`, schema `platform`), so every process (CLI,
Dagster run workers, the edges themselves) sees which process runs where.

`environments`: one row per (product, env): the edge's port, the purge key, the traffic
weights and a routes generation (bumped on every routing change, so an edge never applies an
older route table over a newer one it was pushed).
`processes`: one row per supervised program (edge, api, worker): what runs where (program
name, port, version, artifact). `status` is `starting` while a deploy waits for readiness,
`serving` once it takes traffic, `retiring` while replaced. Pids and liveness are not stored:
they come from supervisord (supervision.py), filled in by the `live` callback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import psycopg2.extras

from dagster_project.core import control_schema, database

if TYPE_CHECKING:
    from dagster_project.core.platform.supervision import ProgramInfo

ENVIRONMENTS = ("staging", "production")
TRACKS = ("stable", "canary")
Role = Literal["api", "worker", "edge"]
ProcessStatus = Literal["starting", "serving", "retiring"]

# The header carrying the environment's purge key to the edge's admin endpoints.
PURGE_KEY_HEADER = "X-Purge-Key"

DEFAULT_WEIGHTS: dict[str, int] = {"stable": 100, "canary": 0}

# The tables: sql/control/0001_platform.sql (core/control_schema.py creates them).


class UnknownEnvironment(ValueError):
    """An environment or track name the platform does not know."""


def check_env(env: str) -> str:
    if env not in ENVIRONMENTS:
        raise UnknownEnvironment(
            f"unknown environment {env!r}: expected one of {', '.join(ENVIRONMENTS)}"
        )
    return env


def check_track(track: str) -> str:
    if track not in TRACKS:
        raise UnknownEnvironment(f"unknown track {track!r}: expected one of {', '.join(TRACKS)}")
    return track


@dataclass(frozen=True)
class ProcessRecord:
    id: int
    product: str
    env: str
    track: str | None
    role: str
    status: str
    program: str | None
    ready_start: float | None
    port: int | None
    version: str | None
    artifact_sha: str | None
    deploy_dir: str | None
    log_path: str
    command: str
    started_at: str
    # Live, from supervisord (None/"ABSENT" when read without it or when it does not know
    # the program).
    pid: int | None = None
    create_time: float | None = None
    state: str = "ABSENT"
    info: ProgramInfo | None = None

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    @property
    def label(self) -> str:
        where = f"{self.env}/{self.track}" if self.track else self.env
        pid = f"pid {self.pid}" if self.pid else self.state.lower()
        return f"{self.role} of {where} ({self.program or 'unsupervised'}, {pid})"


@dataclass(frozen=True)
class EnvironmentRecord:
    product: str
    env: str
    edge_port: int | None
    purge_key: str
    weights: dict[str, int]
    routes_generation: int

    @property
    def edge_url(self) -> str | None:
        return f"http://127.0.0.1:{self.edge_port}" if self.edge_port else None


class PlatformState:
    """Reads and writes `release_control.platform.*` for one product. With `live` (the
    supervisor's `all_info`), process records carry their current pid and state."""

    def __init__(
        self, product: str, *, live: Callable[[], Mapping[str, ProgramInfo]] | None = None
    ) -> None:
        self.product = product
        self._live = live

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg2.extras.RealDictCursor]:
        control_schema.ensure()  # once per process
        with (
            database.connection(database.CONTROL_DB) as conn,
            conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur,
        ):
            yield cur

    def ensure_schema(self) -> None:
        control_schema.ensure()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise platform operations on this product across processes (session lock)."""
        with database.advisory_lock(f"platform:{self.product}"):
            yield

    # -- environments --------------------------------------------------------------------

    def environment(self, env: str) -> EnvironmentRecord | None:
        with self._cursor() as cur:
            cur.execute(
                "SELECT * FROM platform.environments WHERE product = %s AND env = %s",
                (self.product, env),
            )
            row = cur.fetchone()
        return _environment(row) if row else None

    def upsert_environment(self, env: str, *, edge_port: int, purge_key: str) -> EnvironmentRecord:
        with self._cursor() as cur:
            cur.execute(
                """
                INSERT INTO platform.environments (product, env, edge_port, purge_key, weights)
                VALUES (%s, %s, %s, %s, %s)
                ON CONFLICT (product, env) DO UPDATE
                   SET edge_port = EXCLUDED.edge_port, purge_key = EXCLUDED.purge_key,
                       updated_at = now()
                RETURNING *
                """,
                (self.product, env, edge_port, purge_key, json.dumps(DEFAULT_WEIGHTS)),
            )
            row = cur.fetchone()
        assert row is not None
        return _environment(row)

    def set_weights(self, env: str, weights: dict[str, int]) -> int:
        """Store the weights; returns the new routes generation."""
        with self._cursor() as cur:
            cur.execute(
                """
                UPDATE platform.environments
                   SET weights = %s, routes_generation = routes_generation + 1, updated_at = now()
                 WHERE product = %s AND env = %s
                RETURNING routes_generation
                """,
                (json.dumps(weights), self.product, env),
            )
            row = cur.fetchone()
        if row is None:
            raise UnknownEnvironment(
                f"environment {env!r} of {self.product} is not up: run `release platform up`"
            )
        return int(row["routes_generation"])

    def bump_generation(self, env: str) -> int:
        with self._cursor() as cur:
            cur.execute(
                """
                UPDATE platform.environments
                   SET routes_generation = routes_generation + 1, updated_at = now()
                 WHERE product = %s AND env = %s
                RETURNING routes_generation
                """,
                (self.product, env),
            )
            row = cur.fetchone()
        return int(row["routes_generation"]) if row else 0

    def delete_environments(self) -> None:
        with self._cursor() as cur:
            cur.execute("DELETE FROM platform.environments WHERE product = %s", (self.product,))

    # -- processes -----------------------------------------------------------------------

    def add_process(
        self,
        *,
        env: str,
        track: str | None,
        role: Role,
        status: ProcessStatus,
        program: str,
        port: int | None,
        log_path: str,
        command: str,
        version: str | None = None,
        artifact_sha: str | None = None,
        deploy_dir: str | None = None,
    ) -> ProcessRecord:
        with self._cursor() as cur:
            cur.execute(
                """
                INSERT INTO platform.processes (product, env, track, role, status, program,
                    port, version, artifact_sha, deploy_dir, log_path, command)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                RETURNING *
                """,
                (
                    self.product,
                    env,
                    track,
                    role,
                    status,
                    program,
                    port,
                    version,
                    artifact_sha,
                    deploy_dir,
                    log_path,
                    command,
                ),
            )
            row = cur.fetchone()
        assert row is not None
        return _process(row)

    def processes(
        self,
        env: str | None = None,
        *,
        track: str | None = None,
        role: str | None = None,
        status: str | None = None,
    ) -> list[ProcessRecord]:
        clauses, params = ["product = %s"], [self.product]
        for column, value in (("env", env), ("track", track), ("role", role), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value)
        with self._cursor() as cur:
            cur.execute(
                f"SELECT * FROM platform.processes WHERE {' AND '.join(clauses)} ORDER BY id",
                params,
            )
            records = [_process(row) for row in cur.fetchall()]
        if self._live is None or not records:
            return records
        live = self._live()
        return [_with_live(record, live.get(record.program or "")) for record in records]

    def switch_serving(self, env: str, track: str, new_ids: list[int]) -> int:
        """Atomically: the track's serving processes become `retiring`, `new_ids` become
        `serving`, and the routes generation is bumped. Returns the new generation."""
        with (
            database.connection(database.CONTROL_DB, autocommit=False) as conn,
            conn,
            conn.cursor() as cur,
        ):
            cur.execute(
                """
                    UPDATE platform.processes SET status = 'retiring'
                     WHERE product = %s AND env = %s AND track = %s AND status = 'serving'
                       AND NOT (id = ANY(%s))
                    """,
                (self.product, env, track, new_ids),
            )
            cur.execute(
                "UPDATE platform.processes SET status = 'serving' WHERE id = ANY(%s)",
                (new_ids,),
            )
            cur.execute(
                """
                    UPDATE platform.environments
                       SET routes_generation = routes_generation + 1, updated_at = now()
                     WHERE product = %s AND env = %s
                    RETURNING routes_generation
                    """,
                (self.product, env),
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def set_ready_start(self, starts: Mapping[int, float]) -> None:
        """Record the start time of each process (by record id) as it was seen ready."""
        with self._cursor() as cur:
            for record_id, start in starts.items():
                cur.execute(
                    "UPDATE platform.processes SET ready_start = %s WHERE id = %s",
                    (start, record_id),
                )

    def mark_retiring(self, ids: list[int]) -> None:
        with self._cursor() as cur:
            cur.execute(
                "UPDATE platform.processes SET status = 'retiring' WHERE id = ANY(%s)", (ids,)
            )

    def remove_processes(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._cursor() as cur:
            cur.execute("DELETE FROM platform.processes WHERE id = ANY(%s)", (ids,))

    # -- routes: what an edge needs ------------------------------------------------------

    def routes(self, env: str) -> dict[str, Any]:
        """The edge's route table: weights, serving upstream per track, generation."""
        record = self.environment(env)
        upstreams: dict[str, dict[str, Any]] = {}
        for proc in self.processes(env, role="api", status="serving"):
            assert proc.track is not None
            upstreams[proc.track] = {
                "url": proc.url,
                "version": proc.version,
                "artifact_sha": proc.artifact_sha,
            }
        return {
            "env": env,
            "generation": record.routes_generation if record else 0,
            "weights": record.weights if record else dict(DEFAULT_WEIGHTS),
            "upstreams": upstreams,
        }


def _environment(row: dict[str, Any]) -> EnvironmentRecord:
    return EnvironmentRecord(
        product=row["product"],
        env=row["env"],
        edge_port=row["edge_port"],
        purge_key=row["purge_key"],
        weights={str(k): int(v) for k, v in row["weights"].items()},
        routes_generation=int(row["routes_generation"]),
    )


def _process(row: dict[str, Any]) -> ProcessRecord:
    return ProcessRecord(**{**row, "started_at": row["started_at"].isoformat()})


def _with_live(record: ProcessRecord, info: ProgramInfo | None) -> ProcessRecord:
    if info is None:
        return record
    return replace(record, pid=info.pid, create_time=info.create_time, state=info.state, info=info)
