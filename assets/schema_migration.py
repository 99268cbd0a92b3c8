"""Stage 2: the schema-migration check on staging.

Lints the release's migrations (sqlfluff), checks the pending ones for unsafe operations
(squawk and our own rules) and for backward compatibility with the running version, checks the
history (checksums, ordering), and only when all of that is clean applies the pending
migrations to staging (`core/migrations/gate.py`). The gates (`migration_lint`,
`migration_safety`, `schema_drift`) are asset checks in `checks/migrations.py`; this stage
records what they judge.
"""

import dagster as dg

from assets.common import (
    group_name,
    own_staging,
    release_pool,
    run_actor,
    stage_input,
    stage_key,
    table,
)
from dagster_project.core.contracts import ArtifactRecord, MigrationGateReport
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import RegistryResource

ENV = "staging"


def schema_migration_asset(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "schema_migration_check"),
        ins={"artifact": stage_input(spec, "build")},
        partitions_def=partitions_def,
        group_name=group_name(spec),
        kinds={"postgres", "sqlfluff"},
        pool=release_pool(spec.product),
        description="Lint, safety and history of the migrations; pending ones applied to staging.",
    )
    def schema_migration_check(
        context: dg.AssetExecutionContext, artifact: ArtifactRecord, registry: RegistryResource
    ) -> dg.Output[MigrationGateReport]:
        from dagster_project.core.database import environment_database
        from dagster_project.core.migrations.gate import migration_gate_report

        own_staging(context, spec, artifact.sha256)
        migrations_dir = registry.unpacked(artifact.sha256) / spec.migrations_dir
        db = environment_database(spec.product, ENV)  # the product's own staging database
        report = migration_gate_report(db, migrations_dir, run_actor(context), apply=True)
        if report.blocked_by:
            context.log.warning(f"migrations not applied to {ENV}: blocked by {report.blocked_by}")
        else:
            context.log.info(f"applied to {ENV}: {report.applied or 'nothing pending'}")
        return dg.Output(
            report,
            metadata={
                "environment": ENV,
                "artifact_sha256": artifact.sha256,
                "applied": table([{"file": f} for f in report.applied], ["file"]),
                "pending_before": table([{"file": f} for f in report.pending_before], ["file"]),
                "blocked_by": ", ".join(report.blocked_by) or "nothing",
                "seconds": report.seconds,
            },
        )

    return schema_migration_check
