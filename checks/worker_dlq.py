"""Gate on staging: worker retries with backoff, poison messages in the dead-letter queue after
exactly N attempts, idempotent processing (the note's "verify background worker retries and DLQ
handling")."""

import dagster as dg

from assets.common import stage_key
from checks.common import rows_result, section_rows
from dagster_project.core.contracts import StagingSmokeReport
from dagster_project.core.spec import ProductSpec


def worker_dlq_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "staging_smoke"),
        name="worker_dlq",
        blocking=True,
        partitions_def=partitions_def,
        description="Worker retries, dead-letter queue after max attempts, exactly-once results.",
    )
    def worker_dlq(staging_smoke: StagingSmokeReport) -> dg.AssetCheckResult:
        return rows_result(section_rows(staging_smoke.smoke, "worker_dlq"), what="worker/DLQ")

    return worker_dlq
