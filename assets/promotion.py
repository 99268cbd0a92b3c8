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
from typing import Any

import dagster as dg

from assets.canary import bake_scale, describe_event, step_problems
from assets.common import (
    GATE_COLUMNS,
    behind_production,
    group_name,
    own_production,
    release_environment,
    release_pool,
    require_checks_passed,
    stage_input,
    stage_key,
    table,
)
from dagster_project.core import changes
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import ApprovalResource, MetricsResource, PlatformResource

ENV = "production"


class PromotionRefused(dg.Failure):
    """Promotion cannot proceed; production is unchanged."""


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
        artifact: dict[str, Any],
        canary: dict[str, Any],
        platform: PlatformResource,
        approval: ApprovalResource,
        metrics: MetricsResource,
    ) -> dg.Output[dict[str, Any]]:
        started = time.monotonic()
        gate_rows = require_checks_passed(context, upstream_blocking_checks, artifact["sha256"])
        approver = approval.approve(spec).approver
        local = platform.for_product(spec.product)
        stable = local.current(ENV).get("stable")
        # Re-entrant for the run whose canary is parked; any other release waits or is refused.
        own_production(context, spec, artifact["sha256"], stable, "promoting")
        progress = {"watched": False}  # set once traffic moved to the new version
        try:
            report = _promote(
                context, artifact, canary, local, metrics, approver, gate_rows, progress
            )
        except BaseException as exc:
            try:
                _settle_after_error(
                    context, artifact, canary, local, stable, approver, exc, progress["watched"]
                )
                release_environment(context, spec, ENV)
            except Exception as cleanup:  # Postgres gone: the ownership stays for the reconciler
                context.log.error(
                    f"settling production after the promotion's error failed "
                    f"({type(cleanup).__name__}: {cleanup}); the reconciler will finish it"
                )
            raise
        release_environment(context, spec, ENV)
        report["seconds"] = round(time.monotonic() - started, 3)
        context.log.info(f"{spec.product} {artifact['version']}: {report['outcome']}")
        return dg.Output(
            report,
            metadata={
                "outcome": report["outcome"],
                "version": artifact["version"],
                "artifact_sha256": artifact["sha256"],
                "approver": approver,
                "previous_version": (report["previous"] or {}).get("version", "(none)"),
                "gate": table(gate_rows, GATE_COLUMNS),
                "purged": table(report["purged"]),
                "post_deploy_smoke": table(report["post_deploy_smoke"].get("rows", [])),
                "edge_url": dg.MetadataValue.url(local.edge_url(ENV)),
                "seconds": report["seconds"],
            },
        )

    def _promote(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        canary: dict[str, Any],
        local: Any,
        metrics: MetricsResource,
        approver: str,
        gate_rows: list[dict[str, str]],
        progress: dict[str, bool],
    ) -> dict[str, Any]:
        from dagster_project.core import ownership
        from dagster_project.core.contract import changed_surrogate_keys
        from dagster_project.core.smoke import post_deploy_smoke

        current = local.current(ENV)  # re-read now that this run owns production
        stable, waiting = current.get("stable"), current.get("canary")
        report: dict[str, Any] = {
            "version": artifact["version"],
            "artifact_sha256": artifact["sha256"],
            "approver": approver,
            "gate": gate_rows,
            "previous": stable,
            "purged": [],
        }
        changed: list[dict[str, Any]] = []
        if stable and stable.get("artifact_sha") == artifact["sha256"]:
            report["outcome"] = "already_live"
        elif behind_production(context, stable["version"] if stable else None):
            raise PromotionRefused(
                description=(
                    f"refusing to promote {artifact['version']}: {stable['version']} is "
                    "newer and live; production is never moved backwards (unchanged)"
                )
            )
        else:
            if not waiting or waiting.get("artifact_sha") != artifact["sha256"]:
                raise PromotionRefused(
                    description=(
                        f"refusing to promote {artifact['version']}: its canary is not "
                        "running in production (a canary is promoted in the run that judged "
                        "it; materialize canary and promotion together); production is "
                        "unchanged"
                    )
                )
            urls = local.api_urls(ENV)
            changed = changed_surrogate_keys(spec, urls["stable"], urls["canary"]) if stable else []
            progress["watched"] = True
            watch = _watch(context, artifact, local, metrics)
            report["watch"] = watch
            if not watch["passed"]:
                # Production is back on the previous version (kept running through the watch).
                report["outcome"] = "rolled_back"
                report["post_deploy_smoke"] = watch["smoke"]
                report["change_id"] = _record_watch_rollback(
                    context, artifact, stable, watch["reason"], watch
                )
                return report
            # Still ours, still this artifact: a run that lost production never promotes.
            owner = ownership.current(spec.product, ENV)
            serving = local.current(ENV).get("canary") or {}
            if owner is None or owner.run_id != context.run.run_id:
                raise PromotionRefused(description="this run lost production during the watch")
            if serving.get("artifact_sha") != artifact["sha256"]:
                raise PromotionRefused(description="the canary serving is not this release's")
            local.promote(ENV)
            for item in changed:
                for key in item["surrogate_keys"]:
                    local.purge(ENV, surrogate_key=key)
            report["purged"] = changed
            report["outcome"] = "promoted"
        smoke_report = post_deploy_smoke(spec, local, artifact["version"])
        report["post_deploy_smoke"] = smoke_report.to_dict()
        if report["outcome"] == "promoted":
            report["change_id"] = _record(
                context,
                artifact,
                stable,
                "promoted",
                {
                    "approver": approver,
                    "smoke_verdict": "passed" if smoke_report.passed("smoke") else "failed",
                    "slo_verdict": canary.get("verdict"),
                    "slo_steps": canary.get("steps"),
                    "snapshots": canary.get("snapshots", []),
                    "staging_checks": gate_rows,
                    "purged": changed,
                    # Safety rules waived for the migrations this release applied.
                    "waivers": canary.get("migrations", {}).get("safety", {}).get("waivers", []),
                    "watch": {k: v for k, v in report.get("watch", {}).items() if k != "smoke"},
                },
            )
        return report

    def _watch(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        local: Any,
        metrics: MetricsResource,
    ) -> dict[str, Any]:
        """The new version at 100% for the spec's watch window, the previous one still running
        at 0%: judged on the absolute SLOs (a step of the canary mechanism, which returns
        traffic to the previous version on a fail) and on the post-deploy smoke."""
        from dagster_project.core.canary.analysis import run_canary
        from dagster_project.core.smoke import post_deploy_smoke

        watch_seconds = spec.production.watch_seconds * bake_scale()
        context.log.info(f"watch: {artifact['version']} at 100% for {watch_seconds:.0f}s")
        result = run_canary(
            local,
            spec,
            env=ENV,
            metrics=metrics.source(local.api_urls(ENV)),
            bake_scale=bake_scale(),
            baseline=False,
            single_step_seconds=spec.production.watch_seconds,
            on_event=lambda event: context.log.info(f"watch: {describe_event(event)}"),
            step_guard=lambda since: step_problems(spec, local, since),
        )
        smoke = post_deploy_smoke(spec, local, artifact["version"]) if result.passed else None
        smoke_passed = smoke is not None and smoke.passed("smoke")
        if result.passed and not smoke_passed:
            local.rollback(ENV)  # the smoke failed at 100%: back to the previous version
        reason = (
            result.reason
            if not result.passed
            else "post-deploy smoke failed during the watch"
            if not smoke_passed
            else f"absolute SLOs and post-deploy smoke held for {watch_seconds:.0f}s"
        )
        return {
            "passed": bool(result.passed and smoke_passed),
            "smoke_passed": smoke_passed,
            "verdict": result.verdict.value,
            "reason": reason,
            "seconds": round(watch_seconds, 3),
            "steps": result.to_dict()["rows"],
            "smoke": smoke.to_dict() if smoke is not None else {"rows": []},
        }

    def _record_watch_rollback(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        stable: Any,
        reason: str,
        watch: dict[str, Any] | None = None,
    ) -> str:
        """The new version took 100% and production went back to the previous one. Recorded
        under this release (its run made the change); the entry names what serves now."""
        watch = watch or {}
        return changes.record(
            product=spec.product,
            release=artifact["version"],
            outcome="rolled_back",
            artifact_sha256=artifact["sha256"],
            previous_artifact_sha256=(stable or {}).get("artifact_sha"),
            run_id=context.run.run_id,
            details={
                "reason": f"watch after promoting {artifact['version']} failed: {reason}",
                "from_release": artifact["version"],
                "restored_release": (stable or {}).get("version"),
                "restored_artifact_sha256": (stable or {}).get("artifact_sha"),
                "slo_verdict": watch.get("verdict", "not judged"),
                "slo_steps": watch.get("steps", []),
                "smoke_verdict": "passed" if watch.get("smoke_passed") else "failed or not run",
            },
        ).change_id

    def _settle_after_error(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        canary: dict[str, Any],
        local: Any,
        stable_before: Any,
        approver: str,
        exc: BaseException,
        watched: bool,
    ) -> None:
        """Whatever failed, production ends on one ready version with its change recorded:
        promoted if the switch happened, else back to stable and the canary's abort."""
        if isinstance(exc, PromotionRefused):
            return  # refused before touching anything, or production is another run's now
        now_stable = (local.current(ENV).get("stable") or {}).get("artifact_sha")
        before = (stable_before or {}).get("artifact_sha")
        reason = f"promotion failed: {type(exc).__name__}: {str(exc)[:300]}"
        if now_stable == artifact["sha256"] and before != artifact["sha256"]:
            _record(
                context,
                artifact,
                stable_before,
                "promoted",
                {
                    "approver": approver,
                    "smoke_verdict": "not run",
                    "reason": reason,
                    "slo_verdict": canary.get("verdict"),
                    "snapshots": canary.get("snapshots", []),
                },
            )
            return
        if "canary" in local.current(ENV):
            local.rollback(ENV)
        if watched:  # the new version had taken 100% before the error sent it back
            _record_watch_rollback(context, artifact, stable_before, reason)
        elif canary.get("outcome") == "passed":  # its canary had carried traffic
            _record(
                context,
                artifact,
                stable_before,
                "aborted",
                {
                    "reason": reason,
                    "slo_verdict": canary.get("verdict"),
                    "snapshots": canary.get("snapshots", []),
                },
            )

    def _record(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        stable: Any,
        outcome: str,
        details: dict[str, Any],
    ) -> str:
        return changes.record(
            product=spec.product,
            release=artifact["version"],
            outcome=outcome,
            artifact_sha256=artifact["sha256"],
            previous_artifact_sha256=(stable or {}).get("artifact_sha"),
            run_id=context.run.run_id,
            details=details,
        ).change_id

    return promotion
