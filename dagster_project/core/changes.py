"""The record of production changes: every promotion and every aborted canary.

One row per change that touched production traffic; the audit trail gets exactly one entry per
row (keyed by `change_id`), whether the release ran from the CLI, the UI or a backfill. The audit
sensor reads this table with an id cursor, so it never rescans history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from dagster_project.core import control_schema, database
from dagster_project.core.contracts import AuditPayload, ChangeEvidence

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
    details: ChangeEvidence = field(default_factory=ChangeEvidence)

    def __post_init__(self) -> None:
        # Rows come back from jsonb as dicts: parsed once, here, into the contract.
        if not isinstance(self.details, ChangeEvidence):
            object.__setattr__(self, "details", ChangeEvidence.parse(self.details or {}))


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
    details: ChangeEvidence,
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
                details.model_dump_json(exclude_defaults=True),
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


def audit_payload(change: ProductionChange, *, audited_by: str, token: str) -> AuditPayload:
    """The audit entry of a production change (`contracts.AuditPayload`): the five fields the
    architecture note requires plus the evidence the change recorded."""
    evidence = change.details
    approver = evidence.approver or audited_by
    return AuditPayload(
        timestamp=change.recorded_at.isoformat(),
        identity=approver,
        artifact_sha256=change.artifact_sha256,
        environment="production",
        guardrail_token=token,
        product=change.product,
        release=change.release,
        run_id=change.run_id,
        change_id=change.change_id,
        outcome=change.outcome,  # type: ignore[arg-type]
        approver=approver,
        audited_by=audited_by,
        previous_artifact_sha256=change.previous_artifact_sha256,
        smoke_verdict=evidence.smoke_verdict or "not run (canary aborted)",
        slo_verdict=evidence.slo_verdict,
        slo_steps=evidence.slo_steps,
        snapshots=evidence.snapshots,
        waivers=evidence.waivers,
        reason=evidence.reason,
        gates=evidence.staging_checks,
        restored_release=evidence.restored_release,
        purged=evidence.purged,
    )
