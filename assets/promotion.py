"""Stage 5: promotion to 100%.

Refuses unless every blocking check upstream passed for this release (the gate holds for UI
launches of this asset alone and for backfills too), and unless the guardrail token is
presented. Then, under the production lock: shifts 100% to the new version, retires the old
one, purges the edge selectively where the contract changed, runs the post-deploy smoke on
production and records the production change for the audit. A refusal changes nothing.
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
    require_checks_passed,
    stage_input,
    stage_key,
)
from dagster_project.core import changes
from dagster_project.core.locks import production_lock
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
        from dagster_project.core.contract import changed_surrogate_keys
        from dagster_project.core.smoke import post_deploy_smoke

        started = time.monotonic()
        gate_rows = require_checks_passed(context, upstream_blocking_checks)
        approver = approval.approve(spec).approver
        local = platform.for_product(spec.product)
        with production_lock(spec.product, context.run.run_id):
            current = local.current(ENV)
            stable, waiting = current.get("stable"), current.get("canary")
            report: dict[str, Any] = {
                "version": artifact["version"],
                "artifact_sha256": artifact["sha256"],
                "approver": approver,
                "gate": gate_rows,
                "previous": stable,
                "purged": [],
            }
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
                            "running in production (re-materialize the canary first); "
                            "production is unchanged"
                        )
                    )
                urls = local.api_urls(ENV)
                changed = (
                    changed_surrogate_keys(spec, urls["stable"], urls["canary"]) if stable else []
                )
                local.promote(ENV)
                for item in changed:
                    for key in item["surrogate_keys"]:
                        local.purge(ENV, surrogate_key=key)
                report["purged"] = changed
                report["outcome"] = "promoted"
            smoke_report = post_deploy_smoke(spec, local, artifact["version"])
            smoke = smoke_report.to_dict()
            report["post_deploy_smoke"] = smoke
            if report["outcome"] == "promoted":
                change = changes.record(
                    product=spec.product,
                    release=artifact["version"],
                    outcome="promoted",
                    artifact_sha256=artifact["sha256"],
                    previous_artifact_sha256=(stable or {}).get("artifact_sha"),
                    run_id=context.run.run_id,
                    details={
                        "approver": approver,
                        "smoke_verdict": "passed" if smoke_report.passed("smoke") else "failed",
                        "slo_verdict": canary.get("verdict"),
                        "slo_steps": canary.get("steps"),
                        "snapshots": canary.get("snapshots", []),
                        "staging_checks": gate_rows,
                        "purged": changed,
                        # Safety rules waived for the migrations this release applied.
                        "waivers": canary.get("migrations", {})
                        .get("safety", {})
                        .get("waivers", []),
                    },
                )
                report["change_id"] = change.change_id
        report["seconds"] = round(time.monotonic() - started, 3)
        context.log.info(f"{spec.product} {artifact['version']}: {report['outcome']}")
        return dg.Output(
            report,
            metadata={
                "outcome": report["outcome"],
                "version": artifact["version"],
                "artifact_sha256": artifact["sha256"],
                "approver": approver,
                "previous_version": (stable or {}).get("version", "(none)"),
                "gate": md_table(gate_rows),
                "purged": md_table(report["purged"]),
                "post_deploy_smoke": md_table(smoke.get("rows", [])),
                "edge_url": dg.MetadataValue.url(local.edge_url(ENV)),
                "seconds": report["seconds"],
            },
        )

    return promotion
