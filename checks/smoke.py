"""Gates from the smoke suite: `smoke` on staging (blocking) and `post_deploy_smoke` on
production after promotion (judged again by the audit's compliance sign-off)."""

import dagster as dg

from assets.common import stage_key, table
from checks.common import rows_result, section_rows
from dagster_project.core.contracts import PromotionReport, StagingSmokeReport
from dagster_project.core.spec import ProductSpec


def smoke_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "staging_smoke"),
        name="smoke",
        blocking=True,
        partitions_def=partitions_def,
        description="Health, readiness and every endpoint's contract through the staging edge.",
    )
    def smoke(staging_smoke: StagingSmokeReport) -> dg.AssetCheckResult:
        return judge_smoke(staging_smoke)

    return smoke


def judge_smoke(staging_smoke: StagingSmokeReport) -> dg.AssetCheckResult:
    return rows_result(
        section_rows(staging_smoke.smoke, "smoke"),
        what="staging smoke",
        extra={"retried_after_5xx": dg.MetadataValue.json(staging_smoke.smoke.retries)},
    )


def post_deploy_smoke_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "promotion"),
        name="post_deploy_smoke",
        blocking=True,
        partitions_def=partitions_def,
        description="The watch after promotion (absolute SLOs at 100%) and the smoke suite on "
        "production; a failed watch has returned production to the previous version.",
    )
    def post_deploy_smoke(promotion: PromotionReport) -> dg.AssetCheckResult:
        return judge_post_deploy(promotion)

    return post_deploy_smoke


def judge_post_deploy(promotion: PromotionReport) -> dg.AssetCheckResult:
    watch = promotion.watch
    if promotion.outcome == "rolled_back":
        return dg.AssetCheckResult(
            passed=False,
            description="watch after promotion failed, production rolled back to the "
            f"previous version: {watch.reason if watch else '(no watch recorded)'}",
            metadata={"verdict": "fail", "watch": table(watch.steps if watch else [])},
        )
    return rows_result(
        section_rows(promotion.post_deploy_smoke, "smoke"),
        what="post-deploy smoke",
        extra={"watch": watch.reason if watch else "not run (already live)"},
    )
