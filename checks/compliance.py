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
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import AuditResource, RegistryResource


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
        audit: dict[str, Any], audit_trail: AuditResource, registry: RegistryResource
    ) -> dg.AssetCheckResult:
        rows: list[dict[str, Any]] = []
        for item in audit.get("entries", []):
            entry = audit_trail.find(item["change_id"])
            rows.extend(checklist(entry, registry))
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
            metadata={"checklist": table(rows, ["change", "item", "passed", "detail"])},
        )

    return compliance


def checklist(entry: Any, registry: RegistryResource) -> list[dict[str, Any]]:
    payload = entry.payload
    change = payload.get("change_id", "?")
    promoted = payload.get("outcome") == "promoted"
    sha = payload.get("artifact_sha256", "")
    snapshots = payload.get("snapshots") or []
    snapshots_ok = bool(snapshots) and all(_hash_matches(s) for s in snapshots)

    def row(item: str, passed: bool, detail: str) -> dict[str, Any]:
        return {"change": change, "item": item, "passed": passed, "detail": detail}

    rows = [
        row("1 artifact SHA verified in registry", bool(sha) and registry.verify(sha), sha[:16]),
        row(
            "2 deploy completed",
            promoted,
            f"outcome {payload.get('outcome')} (run {payload.get('run_id')})",
        ),
        row(
            "3 guardrail token in audit entry",
            bool(payload.get("guardrail_token")),
            "present (masked)",
        ),
    ]
    if promoted:
        rows += [
            row(
                "4a post-deploy smoke passed",
                payload.get("smoke_verdict") == "passed",
                str(payload.get("smoke_verdict")),
            ),
            row(
                "4b metrics within SLO",
                payload.get("slo_verdict") == "pass",
                str(payload.get("slo_verdict")),
            ),
            row(
                "4c snapshots attached, hashes match", snapshots_ok, f"{len(snapshots)} snapshot(s)"
            ),
        ]
    return rows


def _hash_matches(snapshot: dict[str, Any]) -> bool:
    path = Path(snapshot.get("path", ""))
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == snapshot.get(
        "sha256"
    )
