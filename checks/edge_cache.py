"""Gate on staging: what the origin declares obeys the spec's cache policy per TTL class
(the description names the endpoint and the rule it breaks), the edge caches and expires as
declared (HIT with 0 < Age <= TTL, MISS after the TTL, never a HIT for an authenticated
request), purges by URL and surrogate key, and refuses purges without the environment's key
(the note's "validate edge cache TTLs and purge rules")."""

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
        description="TTL policy per endpoint class, HIT/MISS and Age, expiry, no HIT for an "
        "authenticated request, purge by URL and key.",
    )
    def edge_cache(staging_smoke: StagingSmokeReport) -> dg.AssetCheckResult:
        rows = section_rows(staging_smoke.smoke, "edge_cache")
        return rows_result(rows, what="edge cache", details=True)

    return edge_cache
