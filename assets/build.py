"""Stage 1: package the product source and the release's manifest into an artifact, compute its
SHA-256 and push it to the staging registry (content-addressed)."""

import time

import dagster as dg

from assets.common import group_name, stage_key
from dagster_project.core import knobs
from dagster_project.core.contracts import ArtifactRecord
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import RegistryResource


class BuildConfig(dg.Config):
    # Knobs carried in the artifact manifest (error_rate, extra_latency_ms, fail_jobs_matching).
    settings: dict[str, str] = {}


def parse_settings(settings: dict[str, str]) -> dict[str, knobs.SettingValue]:
    """Run-config text -> canonical knob values, by each knob's type (core/knobs.py), never
    YAML. Raises knobs.KnobError naming the key (the CLI checks the same before the run)."""
    return knobs.validate(settings)


def build_asset(spec: ProductSpec, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "build"),
        partitions_def=partitions_def,
        group_name=group_name(spec),
        kinds={"python"},
        description="The product source at this release, packaged and pushed to the registry.",
    )
    def build(
        context: dg.AssetExecutionContext, config: BuildConfig, registry: RegistryResource
    ) -> dg.Output[ArtifactRecord]:
        started = time.monotonic()
        try:
            settings = parse_settings(config.settings)
        except knobs.KnobError as exc:
            # The message names the key and what is expected; no traceback of this asset.
            raise dg.Failure(description=str(exc)) from None
        artifact = registry.build_and_push(spec, context.partition_key, settings)
        value = ArtifactRecord(
            product=artifact.product,
            version=artifact.version,
            sha256=artifact.sha256,
            path=str(artifact.path),
            size_bytes=artifact.path.stat().st_size,
            settings=settings,
            seconds=round(time.monotonic() - started, 3),
        )
        context.log.info(f"built {spec.product} {artifact.version}: sha256 {artifact.sha256}")
        return dg.Output(
            value,
            metadata={
                "version": artifact.version,
                "sha256": artifact.sha256,
                "artifact": dg.MetadataValue.path(str(artifact.path)),
                "size_bytes": value.size_bytes,
                "settings": dg.MetadataValue.json(settings),
                "seconds": value.seconds,
            },
        )

    return build
