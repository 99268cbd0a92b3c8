"""Gate on staging: worker retries with backoff (every gap between attempts within the queue's
backoff and tolerance), poison messages in the dead-letter queue after exactly N attempts, a
retried job written back once, a job processed exactly once across a SIGKILL of its worker, a
high-priority job done within its bound behind a flood of low ones, idempotent processing (the
note's "verify background worker retries and DLQ handling")."""

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
        description=(
            "Worker retries (backoff gaps within the spec's bounds), dead-letter queue after max "
            "attempts, exactly-once results (also across a SIGKILL mid-job), priority in a flood."
        ),
    )
    def worker_dlq(staging_smoke: StagingSmokeReport) -> dg.AssetCheckResult:
        # The failed rows' details name the job, the measure and its bound (e.g. a backoff gap).
        rows = section_rows(staging_smoke.smoke, "worker_dlq")
        return rows_result(rows, what="worker/DLQ", details=True)

    return worker_dlq
