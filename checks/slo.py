"""Gate on the canary: canary judged against the stable baseline at every step (error rate,
latency, absolute SLOs). Inconclusive is never a pass; an earlier failed step is never erased."""

import dagster as dg

from assets.common import stage_key, table
from dagster_project.core.contracts import CanaryStageReport
from dagster_project.core.spec import ProductSpec


def slo_regression_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "canary"),
        name="slo_regression",
        blocking=True,
        partitions_def=partitions_def,
        description="Canary vs stable per step: error rate, latency (Mann-Whitney), absolute SLOs.",
    )
    def slo_regression(canary: CanaryStageReport) -> dg.AssetCheckResult:
        return judge_slo(canary)

    return slo_regression


def judge_slo(canary: CanaryStageReport) -> dg.AssetCheckResult:
    if canary.outcome == "already_live":
        return dg.AssetCheckResult(passed=True, description="release already live at 100%")
    passed = canary.passed and bool(canary.steps)
    return dg.AssetCheckResult(
        passed=passed,
        description=(
            f"canary passed {len({s.step for s in canary.steps})} step(s)"
            if passed
            else f"canary {canary.outcome}: {canary.reason or 'no steps judged'}"
        ),
        metadata={
            "verdict": canary.verdict if canary.deployed else canary.outcome,
            "steps": table(canary.steps),
            "snapshots": table(canary.snapshots, ["name", "path", "sha256"]),
        },
    )
