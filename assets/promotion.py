"""Stage 5: promotion to 100%.

Refuses unless every blocking check upstream passed for this release and its artifact (the
gate holds for UI launches of this asset alone, backfills and re-executions too), and unless
the guardrail token is presented. The run that parked the canary still owns production; any
other release waits for it or is refused. Then: shifts 100% to the new version, retires the
old one, purges the edge selectively where the contract changed, runs the post-deploy smoke on
production and records the production change for the audit. A refusal changes nothing; an
error after the switch still records the promotion, an error before it returns production to
stable and records the abort, so every production change reaches the audit once.
Gate: `post_deploy_smoke` (judged by the audit's compliance sign-off).
"""

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import dagster as dg

from assets.canary import describe_event, metric_rows, step_problems
from assets.common import (
    GATE_COLUMNS,
    StageRefused,
    facts_before_production,
    group_name,
    live_track,
    own_production,
    refuse,
    release_environment,
    release_pool,
    stage_input,
    stage_key,
    table,
)
from dagster_project.core import changes, decisions
from dagster_project.core.contracts import (
    ArtifactRecord,
    CanaryStageReport,
    ChangeEvidence,
    PromotionReport,
    PurgedEndpoint,
    WatchReport,
)
from dagster_project.core.decisions import ReleaseFacts, decide_promotion
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import ApprovalResource, MetricsResource, PlatformResource

ENV = "production"


def promotion_asset(
    spec: ProductSpec,
    partitions_def: dg.PartitionsDefinition,
    upstream_blocking_checks: Sequence[dg.AssetCheckKey],
) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "promotion"),
        ins={"artifact": stage_input(spec, "build"), "canary": stage_input(spec, "canary")},
        partitions_def=partitions_def,
        group_name=group_name(spec),
        pool=release_pool(spec.product),
        description="The release at 100% in production, the old version retired.",
    )
    def promotion(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        canary: CanaryStageReport,
        platform: PlatformResource,
        approval: ApprovalResource,
        metrics: MetricsResource,
    ) -> dg.Output[PromotionReport]:
        started = time.monotonic()
        approver, facts = facts_before_production(
            context, spec, approval, upstream_blocking_checks, artifact.sha256
        )
        entry = decide_promotion(facts)  # gates and token before production is looked at
        if entry.refused and entry.rule in ("gates", "approval"):
            refuse(entry)
        local = platform.for_product(spec.product)
        facts = replace(facts, live=live_track(local.current(ENV)))
        # Re-entrant for the run whose canary is parked; any other release waits or is refused.
        own_production(context, spec, artifact.sha256, facts.live, "promoting")
        # "watched": traffic moved to the new version; "switching": the platform's switch began
        progress = {"watched": False, "switching": False}
        try:
            report = _promote(context, artifact, canary, facts, local, metrics, approver, progress)
        except BaseException as exc:
            try:
                if _settle_after_error(context, artifact, canary, facts, local, exc, progress):
                    release_environment(context, spec, ENV)
            except Exception as cleanup:  # Postgres gone: the ownership stays for the reconciler
                context.log.error(
                    f"settling production after the promotion's error failed "
                    f"({type(cleanup).__name__}: {cleanup}); the reconciler will finish it"
                )
            raise
        release_environment(context, spec, ENV)
        report = report.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
        context.log.info(f"{spec.product} {artifact.version}: {report.outcome}")
        smoke_rows = report.post_deploy_smoke.rows if report.post_deploy_smoke else []
        return dg.Output(
            report,
            metadata={
                "outcome": report.outcome,
                "version": artifact.version,
                "artifact_sha256": artifact.sha256,
                "approver": approver,
                "previous_version": report.previous.version if report.previous else "(none)",
                "gate": table(report.gate, GATE_COLUMNS),
                "purged": table(report.purged, ["path", "surrogate_keys"]),
                "post_deploy_smoke": table(smoke_rows, ["section", "name", "passed", "detail"]),
                "edge_url": dg.MetadataValue.url(local.edge_url(ENV)),
                "seconds": report.seconds,
            },
        )

    def _promote(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        canary: CanaryStageReport,
        facts: ReleaseFacts,
        local: Any,
        metrics: MetricsResource,
        approver: str,
        progress: dict[str, bool],
    ) -> PromotionReport:
        from dagster_project.core import ownership
        from dagster_project.core.contract import changed_between
        from dagster_project.core.smoke import post_deploy_smoke

        current = local.current(ENV)  # re-read now that this run owns production
        facts = replace(facts, live=live_track(current))
        waiting = live_track(current, "canary")
        canary_artifact = waiting.artifact_sha256 if waiting else None
        decision = decide_promotion(facts, canary_artifact=canary_artifact)
        report = PromotionReport(
            version=artifact.version,
            artifact_sha256=artifact.sha256,
            approver=approver,
            previous=facts.live,
            outcome="already_live",
            gate=list(facts.gates),
        )
        if decision.refused:
            refuse(decision)
        if decision.outcome == "already_live":
            smoke = post_deploy_smoke(spec, local, artifact.version)
            return report.model_copy(update={"post_deploy_smoke": smoke})

        # The endpoints whose contract (status, content type, JSON Schema) changed between the
        # live release and this one: their surrogate keys are purged after the switch.
        changed = [
            PurgedEndpoint.model_validate(item)
            for item in (
                changed_between(spec, facts.live.artifact_sha256, artifact.sha256)
                if facts.live
                else []
            )
        ]
        progress["watched"] = True
        watch = _watch(context, artifact, local, metrics)
        decision = decide_promotion(
            facts,
            canary_artifact=canary_artifact,
            watch_passed=watch.passed,
            watch_reason=watch.reason,
        )
        if decision.outcome == "rolled_back":
            # Production is back on the previous version (kept running through the watch).
            change_id = _record_watch_rollback(context, artifact, facts, decision.reason, watch)
            return report.model_copy(
                update={
                    "outcome": "rolled_back",
                    "watch": watch,
                    "post_deploy_smoke": watch.smoke,
                    "change_id": change_id,
                }
            )
        # Still ours, still this artifact: a run that lost production never promotes.
        owner = ownership.current(spec.product, ENV)
        serving = live_track(local.current(ENV), "canary")
        decision = decide_promotion(
            facts,
            canary_artifact=canary_artifact,
            watch_passed=True,
            watch_reason=watch.reason,
            still_owner=owner is not None and owner.run_id == context.run.run_id,
            serving_artifact=serving.artifact_sha256 if serving else None,
        )
        if decision.refused:
            refuse(decision)
        # Decided: a run that dies from here on has its switch finished by the reconciler (the
        # platform may already have stopped the old stable, which carries no traffic now).
        if not ownership.set_phase(spec.product, ENV, context.run.run_id, "switching"):
            raise StageRefused(
                description=f"production of {spec.product} is no longer owned by this run: "
                "another release or the reconciler took it over; nothing was switched"
            )
        progress["switching"] = True
        local.promote(ENV)
        for item in changed:
            for key in item.surrogate_keys:
                local.purge(ENV, surrogate_key=key)
        smoke = post_deploy_smoke(spec, local, artifact.version)
        change_id = _record(
            context,
            artifact,
            facts,
            "promoted",
            ChangeEvidence(
                reason=decision.reason,
                approver=approver,
                smoke_verdict="passed" if smoke.passed("smoke") else "failed",
                slo_verdict=canary.verdict,
                slo_steps=canary.steps,
                snapshots=canary.snapshots,
                staging_checks=list(facts.gates),
                purged=changed,
                # Safety rules waived for the migrations this release applied.
                waivers=canary.migrations.waivers if canary.migrations else [],
                watch=watch.model_copy(update={"smoke": None}),
            ),
        )
        return report.model_copy(
            update={
                "outcome": "promoted",
                "purged": changed,
                "watch": watch,
                "post_deploy_smoke": smoke,
                "change_id": change_id,
            }
        )

    def _watch(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        local: Any,
        metrics: MetricsResource,
    ) -> WatchReport:
        """The new version at 100% for the spec's watch window, the previous one still running
        at 0%: judged on the absolute SLOs (a step of the canary mechanism, which returns
        traffic to the previous version on a fail) and on the post-deploy smoke."""
        from dagster_project.core.canary.analysis import run_canary
        from dagster_project.core.reconcile import return_to_stable
        from dagster_project.core.smoke import post_deploy_smoke

        # Never scaled (RELEASE_BAKE_SCALE is for the canary's bakes): the watch is the only
        # window at 100%, and a shorter one judges p99 on too few requests.
        watch_seconds = spec.production.watch_seconds
        context.log.info(f"watch: {artifact.version} at 100% for {watch_seconds}s")
        result = run_canary(
            local,
            spec,
            env=ENV,
            metrics=metrics.source(local.api_urls(ENV), platform=local, env=ENV),
            baseline=False,
            single_step_seconds=watch_seconds,
            on_event=lambda event: context.log.info(f"watch: {describe_event(event)}"),
            step_guard=lambda since: step_problems(spec, local, since),
        )
        smoke = post_deploy_smoke(spec, local, artifact.version) if result.passed else None
        smoke_passed = smoke is not None and smoke.passed("smoke")
        if result.passed and not smoke_passed:
            return_to_stable(local, ENV)  # the smoke failed at 100%: back to the previous one
        reason = (
            result.reason
            if not result.passed
            else "post-deploy smoke failed during the watch"
            if not smoke_passed
            else f"absolute SLOs and post-deploy smoke held for {watch_seconds:.0f}s"
        )
        return WatchReport(
            passed=bool(result.passed and smoke_passed),
            smoke_passed=smoke_passed,
            verdict=result.verdict.value,
            reason=reason,
            seconds=round(watch_seconds, 3),
            steps=metric_rows(result),
            smoke=smoke,
        )

    def _record_watch_rollback(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        facts: ReleaseFacts,
        reason: str,
        watch: WatchReport | None = None,
    ) -> str:
        """The new version took 100% and production went back to the previous one. Recorded
        under this release (its run made the change); the entry names what serves now."""
        return _record(
            context,
            artifact,
            facts,
            "rolled_back",
            ChangeEvidence(
                reason=reason,
                from_release=artifact.version,
                restored_release=facts.live.version if facts.live else None,
                restored_artifact_sha256=facts.live.artifact_sha256 if facts.live else None,
                slo_verdict=watch.verdict if watch else "not judged",
                slo_steps=watch.steps if watch else [],
                smoke_verdict="passed" if watch and watch.smoke_passed else "failed or not run",
            ),
        )

    def _settle_after_error(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        canary: CanaryStageReport,
        facts: ReleaseFacts,
        local: Any,
        exc: BaseException,
        progress: dict[str, bool],
    ) -> bool:
        """Whatever failed, production ends on one ready version with its change recorded
        (`decisions.settle_after_error`): promoted if the switch happened, else back to stable
        and the canary's abort (or the watch's rollback) recorded. False: the switch was left
        half done on the new version's canary, and the ownership must stay for the reconciler
        to finish it."""
        from dagster_project.core.reconcile import return_to_stable

        current = local.current(ENV)
        stable_now = live_track(current)
        canary_now = live_track(current, "canary")
        settlement = decisions.settle_after_error(
            # A refusal inside the stage: before the watch nothing moved; after it, production
            # is another run's (lost ownership) and must not be touched by this one.
            refused=isinstance(exc, StageRefused),
            artifact_sha256=artifact.sha256,
            stable_before=facts.live.artifact_sha256 if facts.live else None,
            stable_now=stable_now.artifact_sha256 if stable_now else None,
            traffic_moved=progress["watched"] or canary.passed,
            switching=progress["switching"],
            canary_now=canary_now.artifact_sha256 if canary_now else None,
        )
        reason = f"promotion failed: {type(exc).__name__}: {str(exc)[:300]}"
        if settlement == "nothing":
            return True  # refused before touching anything
        if settlement == "leave_to_reconciler":
            context.log.error(
                f"{reason}; production stays on {artifact.version} at 100% (no stable could be "
                "started): the reconciler finishes the promotion (`release status` runs it)"
            )
            return False
        if settlement == "record_promoted":
            _record(
                context,
                artifact,
                facts,
                "promoted",
                ChangeEvidence(
                    reason=reason,
                    approver=canary.approver or None,
                    smoke_verdict="not run",
                    slo_verdict=canary.verdict,
                    snapshots=canary.snapshots,
                ),
            )
            return True
        return_to_stable(local, ENV)
        if settlement == "rollback_only":
            return True
        if progress["watched"]:  # the new version had taken 100% before the error
            _record_watch_rollback(context, artifact, facts, reason)
        else:  # its parked canary had carried traffic
            _record(
                context,
                artifact,
                facts,
                "aborted",
                ChangeEvidence(
                    reason=reason, slo_verdict=canary.verdict, snapshots=canary.snapshots
                ),
            )
        return True

    def _record(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        facts: ReleaseFacts,
        outcome: str,
        evidence: ChangeEvidence,
    ) -> str:
        return changes.record(
            product=spec.product,
            release=artifact.version,
            outcome=outcome,
            artifact_sha256=artifact.sha256,
            previous_artifact_sha256=facts.live.artifact_sha256 if facts.live else None,
            run_id=context.run.run_id,
            details=evidence,
        ).change_id

    return promotion
