"""Gate on `build`: the artifact in the registry is the one that was built."""

import dagster as dg

from assets.common import stage_key
from dagster_project.core.contracts import ArtifactRecord
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import RegistryResource


def artifact_integrity_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "build"),
        name="artifact_integrity",
        blocking=True,
        partitions_def=partitions_def,
        description="The registry's copy hashes to the SHA-256 recorded at build time.",
    )
    def artifact_integrity(
        build: ArtifactRecord, registry: RegistryResource
    ) -> dg.AssetCheckResult:
        sha = build.sha256
        ok = registry.verify(sha)
        return dg.AssetCheckResult(
            passed=ok,
            description=f"registry copy {'matches' if ok else 'does NOT match'} sha256 {sha}",
            metadata={"sha256": sha, "path": dg.MetadataValue.path(build.path)},
        )

    return artifact_integrity
