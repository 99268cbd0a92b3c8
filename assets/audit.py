"""Stage 6: the audit entry for every production change of this release.

Appends to the hash-chained audit trail one entry per production change (a promotion, or a
canary that was aborted after production carried its traffic): timestamp, identity, artifact
SHA, target environment and the guardrail token (the trail is the one place the token is
recorded), plus run id, verdicts and monitoring snapshots. Idempotent: re-running the audit for
a release, or a backfill of audits, returns the existing entries. Gate: `compliance`.
"""

import dagster as dg

from assets.common import group_name, stage_key, table
from dagster_project.core import changes
from dagster_project.core.contracts import AuditEntryRef, AuditReport
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import ApprovalResource, AuditResource


def audit_asset(spec: ProductSpec, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "audit"),
        deps=[stage_key(spec, "promotion")],
        partitions_def=partitions_def,
        group_name=group_name(spec),
        description="One audit-trail entry per production change of this release.",
    )
    def audit(
        context: dg.AssetExecutionContext, approval: ApprovalResource, audit_trail: AuditResource
    ) -> dg.Output[AuditReport]:
        release = context.partition_key
        found = changes.for_release(spec.product, release)
        if not found:
            raise dg.Failure(
                description=f"no production change recorded for {spec.product} {release}: "
                "nothing to audit (was the release promoted or its canary started?)"
            )
        approved = approval.approve(spec)  # the trail must carry the presented token
        entries = []
        for change in found:
            entry = audit_trail.append(
                change.change_id,
                changes.audit_payload(change, audited_by=approved.approver, token=approved.token),
            )
            entries.append(
                AuditEntryRef(
                    seq=entry.seq,
                    change_id=change.change_id,
                    outcome=change.outcome,  # type: ignore[arg-type]
                    entry_hash=entry.entry_hash,
                    created=entry.created,
                )
            )
        context.log.info(f"audit trail: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
        return dg.Output(
            AuditReport(release=release, entries=entries),
            metadata={"entries": table(entries), "count": len(entries)},
        )

    return audit
