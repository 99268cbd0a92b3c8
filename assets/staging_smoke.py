"""Stage 3: deploy the artifact to staging and run the smoke suite through the staging edge:
health and readiness, the contract of each endpoint, edge TTLs and purge, worker retries and
dead-letter handling. Gates: `smoke`, `edge_cache`, `worker_dlq`, `data_quality`."""

import time

import dagster as dg

from assets.common import (
    group_name,
    own_staging,
    release_pool,
    stage_input,
    stage_key,
    table,
)
from dagster_project.core.contracts import ArtifactRecord, StagingSmokeReport
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import PlatformResource, RegistryResource

ENV = "staging"


def staging_smoke_asset(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "staging_smoke"),
        ins={"artifact": stage_input(spec, "build")},
        deps=[stage_key(spec, "schema_migration_check")],
        partitions_def=partitions_def,
        group_name=group_name(spec),
        kinds={"httpx"},
        pool=release_pool(spec.product),
        description="The release deployed to staging and smoke-tested through the staging edge.",
    )
    def staging_smoke(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        platform: PlatformResource,
        registry: RegistryResource,
    ) -> dg.Output[StagingSmokeReport]:
        from dagster_project.core import data_quality
        from dagster_project.core.smoke import run_smoke

        own_staging(context, spec, artifact.sha256)
        started = time.monotonic()
        local = platform.for_product(spec.product)
        local.up()
        local.deploy(ENV, "stable", registry.fetch(artifact.sha256))
        context.log.info(f"deployed {artifact.version} to {ENV}; running the smoke suite")
        # Without the platform's validator (data_quality.serve_platform), the data_quality
        # gate's process (niced) imports Great Expectations, ~3.5 s of CPU, while the rest of
        # the smoke mostly waits; the gate finds it by run id. Not before the worker's
        # retry-timing rows: on a busy host the import took their CPU.
        smoke = run_smoke(
            spec,
            local,
            ENV,
            artifact.version,
            after_retry_timing=lambda: data_quality.start_validator(context.run_id, spec.product),
        )
        value = StagingSmokeReport(
            version=artifact.version,
            artifact_sha256=artifact.sha256,
            edge_url=local.edge_url(ENV),
            smoke=smoke,
            seconds=round(time.monotonic() - started, 3),
        )
        return dg.Output(
            value,
            metadata={
                "environment": ENV,
                "edge_url": dg.MetadataValue.url(value.edge_url),
                "version": artifact.version,
                "artifact_sha256": artifact.sha256,
                "results": table(smoke.rows, ["section", "name", "passed", "detail"]),
                "seconds": value.seconds,
            },
        )

    return staging_smoke
