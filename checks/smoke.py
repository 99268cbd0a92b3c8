"""Gates from the smoke suite: `smoke` on staging (blocking) and `post_deploy_smoke` on
production after promotion (judged again by the audit's compliance sign-off)."""

from typing import Any

import dagster as dg

from assets.common import stage_key, table
from checks.common import rows_result
from dagster_project.core.spec import ProductSpec

COLUMNS = ["name", "passed", "detail"]


def section_rows(report: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [row for row in report.get("rows", []) if row.get("section") == section]


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
    def smoke(staging_smoke: dict[str, Any]) -> dg.AssetCheckResult:
        return rows_result(
            section_rows(staging_smoke, "smoke"),
            what="staging smoke",
            columns=COLUMNS,
            extra={"retried_after_5xx": dg.MetadataValue.json(staging_smoke.get("retries", []))},
        )

    return smoke


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
    def post_deploy_smoke(promotion: dict[str, Any]) -> dg.AssetCheckResult:
        report = promotion.get("post_deploy_smoke", {})
        watch = promotion.get("watch") or {}
        if promotion.get("outcome") == "rolled_back":
            return dg.AssetCheckResult(
                passed=False,
                description=f"watch after promotion failed, production rolled back to the "
                f"previous version: {watch.get('reason', '')}",
                metadata={"verdict": "fail", "watch": table(watch.get("steps", []))},
            )
        return rows_result(
            section_rows(report, "smoke"),
            what="post-deploy smoke",
            columns=COLUMNS,
            extra={"watch": watch.get("reason", "not run (already live)")},
        )

    return post_deploy_smoke
