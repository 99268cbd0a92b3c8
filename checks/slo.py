"""Gate on the canary: canary judged against the stable baseline at every step (error rate,
latency, absolute SLOs). Inconclusive is never a pass; an earlier failed step is never erased."""

from typing import Any

import dagster as dg

from assets.common import stage_key, table
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
    def slo_regression(canary: dict[str, Any]) -> dg.AssetCheckResult:
        outcome = canary.get("outcome")
        if outcome == "already_live":
            return dg.AssetCheckResult(passed=True, description="release already live at 100%")
        steps = canary.get("steps", [])
        passed = outcome == "passed" and bool(steps)
        return dg.AssetCheckResult(
            passed=passed,
            description=(
                f"canary passed {len({s.get('step') for s in steps})} step(s)"
                if passed
                else f"canary {outcome or 'not run'}: {canary.get('reason') or 'no steps judged'}"
            ),
            metadata={
                "verdict": canary.get("verdict", outcome or "inconclusive"),
                "steps": table(steps),
                "snapshots": table(canary.get("snapshots", [])),
            },
        )

    return slo_regression
