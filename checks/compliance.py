"""Gate on `audit`: the compliance checklist of the architecture note's footnote.

(1) the artifact SHA verified by recomputing it from the registry; (2) the deploy run completed
its stages; (3) the guardrail token present in the audit entry; (4) sign-off: post-deploy smoke
passed, metrics within SLO, monitoring snapshots attached with matching hashes.
"""

import hashlib
from pathlib import Path
from typing import Any

import dagster as dg

from assets.common import stage_key, table
from dagster_project.core.contracts import AuditPayload, AuditReport, ContractError, Snapshot
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import AuditResource, RegistryResource

CHECKLIST_COLUMNS = ["change", "item", "passed", "detail"]


def compliance_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "audit"),
        name="compliance",
        blocking=True,
        partitions_def=partitions_def,
        description="Footnote checklist: SHA in registry, deploy done, token in entry, sign-off.",
    )
    def compliance(
        audit: AuditReport, audit_trail: AuditResource, registry: RegistryResource
    ) -> dg.AssetCheckResult:
        return judge_compliance(audit, audit_trail, registry)

    return compliance


def judge_compliance(audit: AuditReport, audit_trail: Any, registry: Any) -> dg.AssetCheckResult:
    rows: list[dict[str, Any]] = []
    for item in audit.entries:
        entry = audit_trail.find(item.change_id)
        rows.extend(checklist(item.change_id, entry, registry))
    passed = bool(rows) and all(r["passed"] for r in rows)
    return dg.AssetCheckResult(
        passed=passed,
        description=(
            "compliance checklist complete"
            if passed
            else "compliance checklist incomplete: "
            + ", ".join(r["item"] for r in rows if not r["passed"])
            if rows
            else "no audit entry to check: inconclusive"
        ),
        metadata={"checklist": table(rows, CHECKLIST_COLUMNS)},
    )


def checklist(change_id: str, entry: Any, registry: Any) -> list[dict[str, Any]]:
    """The footnote's items for one audit entry; an entry missing or not matching the
    contract fails item 0 (never a pass)."""

    def row(item: str, passed: bool, detail: str) -> dict[str, Any]:
        return {"change": change_id, "item": item, "passed": passed, "detail": detail}

    if entry is None:
        return [row("0 audit entry present", False, "no entry in the audit trail")]
    try:
        payload: AuditPayload = AuditPayload.parse(entry.payload)
    except ContractError as exc:
        return [row("0 audit entry readable", False, str(exc)[:300])]
    promoted = payload.outcome == "promoted"
    sha = payload.artifact_sha256
    snapshots = payload.snapshots
    snapshots_ok = bool(snapshots) and all(_hash_matches(s) for s in snapshots)
    rows = [
        row("1 artifact SHA verified in registry", bool(sha) and registry.verify(sha), sha[:16]),
        row("2 deploy completed", promoted, f"outcome {payload.outcome} (run {payload.run_id})"),
        row("3 guardrail token in audit entry", bool(payload.guardrail_token), "present (masked)"),
    ]
    if promoted:
        rows += [
            row(
                "4a post-deploy smoke passed",
                payload.smoke_verdict == "passed",
                str(payload.smoke_verdict),
            ),
            row("4b metrics within SLO", payload.slo_verdict == "pass", str(payload.slo_verdict)),
            row(
                "4c snapshots attached, hashes match", snapshots_ok, f"{len(snapshots)} snapshot(s)"
            ),
        ]
    return rows


def _hash_matches(snapshot: Snapshot) -> bool:
    path = Path(snapshot.path)
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == snapshot.sha256
