"""The release stages as software-defined assets, one module per stage.

`release_assets(spec, partitions_def)` builds the chain for one product:
build -> schema_migration_check -> staging_smoke -> canary -> promotion -> audit.

Every stage that touches staging or production (POOLED_STAGES) sets the product's concurrency
pool on its `@dg.asset` (`release_pool`); with `granularity: run` (dagster.yaml) a run's pools
are those of any of its steps, so the run queue starts one run of the product's pool at a time.
"""

from collections.abc import Sequence

import dagster as dg

from assets.audit import audit_asset
from assets.build import build_asset
from assets.canary import canary_asset
from assets.common import release_pool
from assets.promotion import promotion_asset
from assets.schema_migration import schema_migration_asset
from assets.staging_smoke import staging_smoke_asset
from dagster_project.core.spec import ProductSpec

__all__ = ["POOLED_STAGES", "release_assets", "release_pool"]

# Stages that touch an environment (staging or production); build and audit touch neither.
POOLED_STAGES = ("schema_migration_check", "staging_smoke", "canary", "promotion")


def release_assets(
    spec: ProductSpec,
    partitions_def: dg.DynamicPartitionsDefinition,
    upstream_blocking_checks: Sequence[dg.AssetCheckKey],
) -> list[dg.AssetsDefinition]:
    """The stages in order; promotion re-checks `upstream_blocking_checks` for its partition."""
    return [
        build_asset(spec, partitions_def),
        schema_migration_asset(spec, partitions_def),
        staging_smoke_asset(spec, partitions_def),
        canary_asset(spec, partitions_def, upstream_blocking_checks),
        promotion_asset(spec, partitions_def, upstream_blocking_checks),
        audit_asset(spec, partitions_def),
    ]
