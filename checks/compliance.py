"""Gate on `audit`: the compliance checklist of the architecture note's footnote, for every
production change of the release (`core/checklist.py` has the items and which apply to which
outcome): (1) the artifact SHA recomputed from the registry's bytes; (2) the Dagster run that
made the change completed its stages and every stage is materialised for the partition, read
from this instance; (3) the recorded token matches the spec's fingerprint; (4) sign-off: the
post-deploy smoke and the SLO verdict passed, every snapshot present with its hash, and the
signed checkpoint covering the entry verifies.
"""

from typing import Any

import dagster as dg

from assets.common import run_facts, stage_key, table
from dagster_project.core import checklist
from dagster_project.core.contracts import AuditPayload, AuditReport, ChecklistItem, RunFacts
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import AuditResource, RegistryResource

CHECKLIST_COLUMNS = ["change_id", "item", "passed", "detail"]


def compliance_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "audit"),
        name="compliance",
        blocking=True,
        partitions_def=partitions_def,
        description="Footnote checklist: SHA recomputed from the registry, deploy run completed "
        "its stages, token matches the fingerprint, sign-off (smoke, SLO, snapshots, checkpoint).",
    )
    def compliance(
        context: dg.AssetCheckExecutionContext,
        audit: AuditReport,
        audit_trail: AuditResource,
        registry: RegistryResource,
    ) -> dg.AssetCheckResult:
        try:
            current = context.run.run_id
        except dg.DagsterError:  # invoked directly, outside a run
            current = None
        facts = instance_run_facts(context.instance, spec, current_run_id=current)
        return judge_compliance(audit, audit_trail, registry, spec, facts)

    return compliance


def instance_run_facts(
    instance: dg.DagsterInstance, spec: ProductSpec, current_run_id: str | None = None
) -> checklist.RunFactsSource:
    """Item 2's facts for a payload, read from the instance (never from the payload)."""

    def facts(payload: AuditPayload) -> RunFacts:
        return run_facts(
            instance,
            spec,
            release=payload.release,
            run_id=payload.run_id,
            artifact_sha256=payload.artifact_sha256,
            current_run_id=current_run_id,
        )

    return facts


def entry_checklist(
    change_id: str,
    entry: Any,
    audit_trail: Any,
    registry: Any,
    spec: ProductSpec,
    facts: checklist.RunFactsSource,
) -> list[ChecklistItem]:
    return checklist.checklist(
        change_id,
        entry,
        token_sha256=spec.guardrail.token_sha256,
        verify_artifact=registry.verify,
        run_facts=facts,
        covering=audit_trail.covering,
    )


def judge_compliance(
    audit: AuditReport,
    audit_trail: Any,
    registry: Any,
    spec: ProductSpec,
    facts: checklist.RunFactsSource,
) -> dg.AssetCheckResult:
    rows: list[ChecklistItem] = []
    for item in audit.entries:
        entry = audit_trail.find(item.change_id)
        rows += entry_checklist(item.change_id, entry, audit_trail, registry, spec, facts)
    ok = checklist.passed(rows)
    failed = checklist.failed(rows)
    if ok:
        description = "compliance checklist complete"
    elif rows:
        description = "compliance checklist incomplete: " + ", ".join(
            f"{r.item} ({r.change_id}): {r.detail}"[:300] for r in failed
        )
    else:
        description = "no audit entry to check: inconclusive"
    return dg.AssetCheckResult(
        passed=ok,
        description=description,
        metadata={
            "checklist": table(rows, CHECKLIST_COLUMNS),
            "not_applicable": len([r for r in rows if r.passed is None]),
        },
    )
