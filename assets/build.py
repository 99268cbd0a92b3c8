"""Stage 1: package the product source and the release's manifest into an artifact, compute its
SHA-256 and push it to the staging registry (content-addressed)."""

import time
from typing import Any

import dagster as dg
import yaml

from assets.common import group_name, stage_key
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import RegistryResource


class BuildConfig(dg.Config):
    # Knobs carried in the artifact manifest (error_rate, extra_latency_ms, fail_jobs_matching).
    settings: dict[str, str] = {}


def parse_setting(value: str) -> Any:
    """'0.05' -> 0.05, '150' -> 150, anything else stays a string."""
    parsed = yaml.safe_load(value) if value.strip() else value
    return (
        parsed if isinstance(parsed, int | float | str) and not isinstance(parsed, bool) else value
    )


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
    ) -> dg.Output[dict[str, Any]]:
        started = time.monotonic()
        settings = {key: parse_setting(value) for key, value in config.settings.items()}
        artifact = registry.build_and_push(spec, context.partition_key, settings)
        value = {
            "product": artifact.product,
            "version": artifact.version,
            "sha256": artifact.sha256,
            "path": str(artifact.path),
            "settings": settings,
        }
        context.log.info(f"built {spec.product} {artifact.version}: sha256 {artifact.sha256}")
        return dg.Output(
            value,
            metadata={
                "version": artifact.version,
                "sha256": artifact.sha256,
                "artifact": dg.MetadataValue.path(str(artifact.path)),
                "size_bytes": artifact.path.stat().st_size,
                "settings": dg.MetadataValue.json(settings),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    return build
