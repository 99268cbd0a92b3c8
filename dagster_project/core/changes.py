"""The record of production changes: every promotion and every aborted canary.

One row per change that touched production traffic; the audit trail gets exactly one entry per
row (keyed by `change_id`), whether the release ran from the CLI, the UI or a backfill. The audit
sensor reads this table with an id cursor, so it never rescans history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dagster_project.core import database

_DDL = """
CREATE SCHEMA IF NOT EXISTS platform;
CREATE TABLE IF NOT EXISTS platform.production_changes (
    id bigserial PRIMARY KEY,
    change_id text NOT NULL UNIQUE,
    product text NOT NULL,
    release text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('promoted', 'aborted')),
    artifact_sha256 text NOT NULL,
    previous_artifact_sha256 text,
    run_id text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    details jsonb NOT NULL DEFAULT '{}'::jsonb
);
"""


@dataclass(frozen=True)
class ProductionChange:
    id: int
    change_id: str
    product: str
    release: str
    outcome: str
    artifact_sha256: str
    previous_artifact_sha256: str | None
    run_id: str
    recorded_at: datetime
    details: dict[str, Any] = field(default_factory=dict)


_COLUMNS = (
    "id, change_id, product, release, outcome, artifact_sha256, previous_artifact_sha256, "
    "run_id, recorded_at, details"
)


_ensured: set[str] = set()  # servers whose table is known to exist (DDL once per process)


def ensure_schema() -> None:
    key = database.server().dsn(database.CONTROL_DB)
    if key in _ensured:
        return
    database.ensure_database(database.CONTROL_DB)
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('platform.production_changes'))")
        cur.execute(_DDL)
    _ensured.add(key)


def change_id_for(product: str, release: str, outcome: str, run_id: str) -> str:
    return f"{product}/{release}/{outcome}/{run_id}"


def record(
    *,
    product: str,
    release: str,
    outcome: str,
    artifact_sha256: str,
    previous_artifact_sha256: str | None,
    run_id: str,
    details: dict[str, Any],
) -> ProductionChange:
    """Record a production change; recording the same change twice returns the first row."""
    ensure_schema()
    change_id = change_id_for(product, release, outcome, run_id)
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO platform.production_changes (change_id, product, release, outcome, "
            "artifact_sha256, previous_artifact_sha256, run_id, details) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (change_id) DO NOTHING",
            (
                change_id,
                product,
                release,
                outcome,
                artifact_sha256,
                previous_artifact_sha256,
                run_id,
                json.dumps(details, default=str),
            ),
        )
    found = get(change_id)
    assert found is not None
    return found


def get(change_id: str) -> ProductionChange | None:
    ensure_schema()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT {_COLUMNS} FROM platform.production_changes WHERE change_id = %s",
            (change_id,),
        )
        row = cur.fetchone()
    return ProductionChange(*row) if row else None


def for_release(product: str, release: str) -> list[ProductionChange]:
    ensure_schema()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT {_COLUMNS} FROM platform.production_changes "
            "WHERE product = %s AND release = %s ORDER BY id",
            (product, release),
        )
        return [ProductionChange(*row) for row in cur.fetchall()]


def since(after_id: int, *, limit: int) -> list[ProductionChange]:
    """Changes with id > after_id, oldest first, at most `limit` (the audit sensor's page)."""
    ensure_schema()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT {_COLUMNS} FROM platform.production_changes WHERE id > %s "
            "ORDER BY id LIMIT %s",
            (after_id, limit),
        )
        return [ProductionChange(*row) for row in cur.fetchall()]
