"""Stage 6: the audit entry for every production change of this release.

Appends to the hash-chained audit trail one entry per production change (a promotion, or a
canary that was aborted after production carried its traffic): timestamp, identity, artifact
SHA, target environment and the guardrail token (the trail is the one place the token is
recorded), plus run id, verdicts and monitoring snapshots. Idempotent: re-running the audit for
a release, or a backfill of audits, returns the existing entries. For every change it writes the
audit ticket (core/ticket.py: HTML with the snapshots embedded, and Markdown) into the evidence
store and links it in its metadata; the ticket's SHA-256 is in the entry's `sign_off`.
Gate: `compliance`.
"""

import dagster as dg

from assets.common import group_name, run_facts, stage_key, table
from dagster_project.core import changes, checklist, ticket
from dagster_project.core.contracts import AuditEntryRef, AuditReport, SignOff
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import ApprovalResource, AuditResource, RegistryResource


def audit_asset(spec: ProductSpec, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "audit"),
        deps=[stage_key(spec, "promotion")],
        partitions_def=partitions_def,
        group_name=group_name(spec),
        description="One audit-trail entry per production change of this release.",
    )
    def audit(
        context: dg.AssetExecutionContext,
        approval: ApprovalResource,
        audit_trail: AuditResource,
        registry: RegistryResource,
    ) -> dg.Output[AuditReport]:
        release = context.partition_key
        found = changes.for_release(spec.product, release)
        if not found:
            raise dg.Failure(
                description=f"no production change recorded for {spec.product} {release}: "
                "nothing to audit (was the release promoted or its canary started?)"
            )
        approved = approval.approve(spec)  # the trail must carry the presented token
        entries, links = [], {}
        for change in found:
            entry = audit_trail.append(
                change.change_id,
                changes.audit_payload(change, audited_by=approved.approver, token=approved.token),
            )
            sign_off = _sign_off(context, entry, change, audit_trail, registry)
            links[f"ticket_seq_{entry.seq}"] = dg.MetadataValue.path(sign_off.ticket_html)
            entries.append(
                AuditEntryRef(
                    seq=entry.seq,
                    change_id=change.change_id,
                    outcome=change.outcome,  # type: ignore[arg-type]
                    entry_hash=entry.entry_hash,
                    created=entry.created,
                    sign_off=sign_off,
                )
            )
        context.log.info(f"audit trail: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
        _observe_dead_letters(context)
        return dg.Output(
            AuditReport(release=release, entries=entries),
            metadata={"entries": table([_row(e) for e in entries]), "count": len(entries), **links},
        )

    def _observe_dead_letters(context: dg.AssetExecutionContext) -> None:
        """After each release: the dead-letter depth and oldest age per environment, as an
        observation of this asset (`release dlq list` shows the jobs). Never fails the audit."""
        import psycopg2

        from dagster_project.core import dlq
        from dagster_project.core.database import DatabaseUnavailable

        metadata: dict[str, dg.RawMetadataValue] = {}
        for env in dlq.ENVIRONMENTS:
            try:
                depth = dlq.depth(spec, env)
            except (dlq.DlqInputError, DatabaseUnavailable, psycopg2.Error) as exc:
                metadata[f"dlq_{env}_error"] = str(exc).splitlines()[0]
                continue
            metadata[f"dlq_{env}_depth"] = depth.depth
            metadata[f"dlq_{env}_oldest_age_seconds"] = depth.as_json()["oldest_age_seconds"]
        context.log_event(
            dg.AssetObservation(
                asset_key=context.asset_key, partition=context.partition_key, metadata=metadata
            )
        )

    def _sign_off(
        context: dg.AssetExecutionContext,
        entry: object,
        change: changes.ProductionChange,
        audit_trail: AuditResource,
        registry: RegistryResource,
    ) -> SignOff:
        """The checklist as it stands now and the ticket (stored by content hash)."""
        facts = run_facts(
            context.instance,
            spec,
            release=change.release,
            run_id=change.run_id,
            artifact_sha256=change.artifact_sha256,
            current_run_id=context.run.run_id,
        )
        rows = checklist.checklist(
            change.change_id,
            entry,
            token_sha256=spec.guardrail.token_sha256,
            verify_artifact=registry.verify,
            run_facts=lambda payload: facts,
            covering=audit_trail.covering,
        )
        checkpoint, _ = audit_trail.covering(entry.seq, entry.entry_hash)  # type: ignore[attr-defined]
        return ticket.write(entry, rows, checkpoint, facts)  # type: ignore[arg-type]

    return audit


def _row(ref: AuditEntryRef) -> dict[str, object]:
    sign_off = ref.sign_off
    return {
        "seq": ref.seq,
        "change_id": ref.change_id,
        "outcome": ref.outcome,
        "entry_hash": ref.entry_hash,
        "created": ref.created,
        "checklist_passed": sign_off.checklist_passed if sign_off else None,
        "ticket_sha256": sign_off.ticket_html_sha256 if sign_off else None,
        "checkpoint_seq": sign_off.checkpoint.seq if sign_off and sign_off.checkpoint else None,
    }
