"""Gate on staging: the edge applies the spec's TTLs and purges by URL and surrogate key, and
refuses purges without the environment's key (the note's "validate edge cache TTLs and purge
rules")."""

import dagster as dg

from assets.common import stage_key
from checks.common import rows_result, section_rows
from dagster_project.core.contracts import StagingSmokeReport
from dagster_project.core.spec import ProductSpec


def edge_cache_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "staging_smoke"),
        name="edge_cache",
        blocking=True,
        partitions_def=partitions_def,
        description="Edge TTL per endpoint class, HIT/MISS and Age, purge by URL and key.",
    )
    def edge_cache(staging_smoke: StagingSmokeReport) -> dg.AssetCheckResult:
        return rows_result(section_rows(staging_smoke.smoke, "edge_cache"), what="edge cache")

    return edge_cache
