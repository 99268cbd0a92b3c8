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

from assets.common import (
    behind_production,
    group_name,
    md_table,
    own_environment,
    release_environment,
    require_checks_passed,
    stage_input,
    stage_key,
)
from dagster_project.core import changes
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import ApprovalResource, PlatformResource

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
        description="The release at 100% in production, the old version retired.",
    )
    def promotion(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        canary: dict[str, Any],
        platform: PlatformResource,
        approval: ApprovalResource,
    ) -> dg.Output[dict[str, Any]]:
        started = time.monotonic()
        gate_rows = require_checks_passed(context, upstream_blocking_checks, artifact["sha256"])
        approver = approval.approve(spec).approver
        local = platform.for_product(spec.product)
        stable = local.current(ENV).get("stable")
        # Re-entrant for the run whose canary is parked; any other release waits or is refused.
        own_environment(
            context,
            spec,
            ENV,
            artifact_sha256=artifact["sha256"],
            previous_artifact_sha256=(stable or {}).get("artifact_sha"),
            phase="promoting",
        )
        try:
            report = _promote(context, artifact, canary, local, approver, gate_rows)
        except BaseException as exc:
            # If settling fails too (Postgres gone), the ownership stays for the reconciler.
            _settle_after_error(context, artifact, canary, local, stable, approver, exc)
            release_environment(context, spec, ENV)
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
                "gate": md_table(gate_rows),
                "purged": md_table(report["purged"]),
                "post_deploy_smoke": md_table(report["post_deploy_smoke"].get("rows", [])),
                "edge_url": dg.MetadataValue.url(local.edge_url(ENV)),
                "seconds": report["seconds"],
            },
        )

    def _promote(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        canary: dict[str, Any],
        local: Any,
        approver: str,
        gate_rows: list[dict[str, str]],
    ) -> dict[str, Any]:
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
                },
            )
        return report

    def _settle_after_error(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        canary: dict[str, Any],
        local: Any,
        stable_before: Any,
        approver: str,
        exc: BaseException,
    ) -> None:
        """Whatever failed, production ends on one ready version with its change recorded:
        promoted if the switch happened, else back to stable and the canary's abort."""
        if isinstance(exc, PromotionRefused):
            return  # refused before touching anything
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
