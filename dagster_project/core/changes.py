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

from dagster_project.core import control_schema, database

# What a production change can be: a release promoted to 100%; a canary aborted after it carried
# traffic (by its gate, an error, a dead run found by the reconciler, or displaced while parked);
# production returned to an earlier release (`release rollback`, or the watch after promotion).
OUTCOMES = ("promoted", "aborted", "rolled_back")


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


def ensure_schema() -> None:
    control_schema.ensure()  # sql/control/0003_production_changes.sql


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
    if outcome not in OUTCOMES:
        raise ValueError(f"production change outcome {outcome!r} is not one of {OUTCOMES}")
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


def history(product: str) -> list[ProductionChange]:
    """Every production change of the product, oldest first."""
    ensure_schema()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT {_COLUMNS} FROM platform.production_changes WHERE product = %s ORDER BY id",
            (product,),
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


def unaudited(product: str) -> list[ProductionChange]:
    """The product's changes with no entry in the audit trail yet, oldest first (one query:
    the reconcile sensor asks every few seconds). Needs the audit schema to exist."""
    ensure_schema()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT {_COLUMNS} FROM platform.production_changes c WHERE product = %s "
            "AND NOT EXISTS (SELECT 1 FROM audit.entries e WHERE e.change_id = c.change_id) "
            "ORDER BY id",
            (product,),
        )
        return [ProductionChange(*row) for row in cur.fetchall()]


def audit_payload(change: ProductionChange, *, audited_by: str, token: str) -> dict[str, Any]:
    """The audit entry of a production change: the five fields the architecture note requires
    (timestamp, identity, artifact SHA, environment, guardrail token) plus the auditor's
    context. The one place this shape is defined."""
    details = change.details
    approver = details.get("approver") or audited_by
    return {
        "timestamp": change.recorded_at.isoformat(),
        "identity": approver,
        "artifact_sha256": change.artifact_sha256,
        "environment": "production",
        "guardrail_token": token,
        "product": change.product,
        "release": change.release,
        "run_id": change.run_id,
        "change_id": change.change_id,
        "outcome": change.outcome,
        "approver": approver,
        "audited_by": audited_by,
        "previous_artifact_sha256": change.previous_artifact_sha256,
        "smoke_verdict": details.get("smoke_verdict", "not run (canary aborted)"),
        "slo_verdict": details.get("slo_verdict"),
        "slo_steps": details.get("slo_steps") or details.get("steps"),
        "snapshots": details.get("snapshots", []),
        "waivers": details.get("waivers", []),
        "reason": details.get("reason"),
    }
