"""The release stages as software-defined assets, one module per stage.

`release_assets(spec, partitions_def)` builds the chain for one product:
build -> schema_migration_check -> staging_smoke -> canary -> promotion -> audit.

Every stage that touches staging or production runs in the product's concurrency pool
(`release_pool`), whatever launched it: the instance (dagster.yaml `concurrency: pools:`) gives
each pool one slot, claimed per step by the executor and checked by the run queue.
"""

from collections.abc import Sequence

import dagster as dg

from assets.audit import audit_asset
from assets.build import build_asset
from assets.canary import canary_asset
from assets.promotion import promotion_asset
from assets.schema_migration import schema_migration_asset
from assets.staging_smoke import staging_smoke_asset
from dagster_project.core.spec import ProductSpec

# Stages that touch an environment (staging or production); build and audit touch neither.
POOLED_STAGES = ("schema_migration_check", "staging_smoke", "canary", "promotion")


def release_pool(product_id: str) -> str:
    """The product's concurrency pool: one environment-touching step of the product at a time."""
    return f"release-{product_id}"


def with_pool(assets_def: dg.AssetsDefinition, pool: str) -> dg.AssetsDefinition:
    """The same asset (or asset check) with its op in `pool`; a no-op if its decorator already
    set that pool.

    Dagster 1.13 has no public way to set the pool of a built asset (`with_attributes` and
    `map_asset_specs` take none), so the op is copied the way `OpDefinition.
    with_replaced_properties` copies it, with the pool set, and the definition rebuilt around it
    the way `with_attributes` (assets) and `AssetChecksDefinition.create` (checks) build them.
    `@dg.asset(pool=release_pool(spec.product))` in the stage module makes this a no-op.
    """
    op = assets_def.op
    if op.pool == pool:
        return assets_def
    if op.pool:
        raise ValueError(f"op {op.name} is already in pool {op.pool!r}, not {pool!r}")
    pooled = dg.OpDefinition.dagster_internal_init(
        compute_fn=op.compute_fn,
        name=op.name,
        ins={d.name: dg.In.from_definition(d) for d in op.input_defs},
        outs={d.name: dg.Out.from_definition(d) for d in op.output_defs},
        description=op.description,
        config_schema=op.config_schema,
        required_resource_keys=op.required_resource_keys,
        tags=op.tags,
        version=None,
        retry_policy=op.retry_policy,
        code_version=op._version,  # what with_replaced_properties passes (`version` is deprecated)
        pool=pool,
    )
    if isinstance(assets_def, dg.AssetChecksDefinition):
        return dg.AssetChecksDefinition.create(
            keys_by_input_name=assets_def.node_keys_by_input_name,
            node_def=pooled,
            check_specs_by_output_name=assets_def.node_check_specs_by_output_name,
            can_subset=assets_def.can_subset,
            resource_defs=assets_def.resource_defs,
        )
    attributes = {**assets_def.get_attributes_dict(), "node_def": pooled}
    return assets_def.__class__.dagster_internal_init(**attributes)


def release_assets(
    spec: ProductSpec,
    partitions_def: dg.DynamicPartitionsDefinition,
    upstream_blocking_checks: Sequence[dg.AssetCheckKey],
) -> list[dg.AssetsDefinition]:
    """The stages in order; promotion re-checks `upstream_blocking_checks` for its partition.
    Stages in POOLED_STAGES run in the product's pool."""
    stages = [
        build_asset(spec, partitions_def),
        schema_migration_asset(spec, partitions_def),
        staging_smoke_asset(spec, partitions_def),
        canary_asset(spec, partitions_def, upstream_blocking_checks),
        promotion_asset(spec, partitions_def, upstream_blocking_checks),
        audit_asset(spec, partitions_def),
    ]
    pool = release_pool(spec.product)
    return [
        with_pool(stage, pool) if stage.key.path[-1] in POOLED_STAGES else stage for stage in stages
    ]
