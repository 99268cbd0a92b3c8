"""Gate on staging: the product's Great Expectations suite (named by its contract) against the
tables of the product's staging database, written back by the workers during the smoke run. GE
is imported only when the check runs."""

import dagster as dg

from assets.common import stage_key, table
from dagster_project.core.spec import ProductSpec


def data_quality_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "staging_smoke"),
        name="data_quality",
        blocking=True,
        partitions_def=partitions_def,
        description="Great Expectations suite on the staging tables written back by the workers.",
    )
    def data_quality(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        from dagster_project.core.data_quality import validate_in_child
        from dagster_project.core.database import environment_database

        suite = spec.suite_path
        # In another process (the platform's validator, or one started by the staging stage
        # of this run): Great Expectations never stays in the run's memory.
        report = validate_in_child(
            context.run.run_id,
            environment_database(spec.product, "staging"),
            suite,
            product=spec.product,
        )
        failed = [r for r in report.results if not r["success"]]
        return dg.AssetCheckResult(
            passed=bool(report.success and report.evaluated),
            description=(
                f"{report.evaluated - len(failed)}/{report.evaluated} expectations met"
                + (f"; failed: {', '.join(r['expectation'] for r in failed[:5])}" if failed else "")
                + ("" if report.evaluated else " (nothing evaluated: inconclusive)")
            ),
            metadata={"results": table(report.results), "suite": str(suite)},
        )

    return data_quality
