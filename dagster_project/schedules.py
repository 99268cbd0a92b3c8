"""Schedules per product, written by hand because `build_schedule_from_partitioned_job` does not
accept dynamic partitions.

- nightly release train: releases the newest registered release that is not in production. It
  requires the guardrail token: without it (or with a wrong one) it skips before any work and
  says why, like the audit sensor.
- post-deploy verification: re-runs the smoke suite against production every hour, in the
  product's pool (never during another step that touches an environment) and under its tag.
"""

from typing import Any

import dagster as dg

from assets.common import live_track, release_pool, table
from dagster_project.core import guardrail
from dagster_project.core.contracts import SmokeReport, TrackRef
from dagster_project.core.spec import ProductSpec
from dagster_project.jobs import PRODUCT_TAG, release_job_name
from dagster_project.partitions import releases_partitions
from dagster_project.resources import ApprovalResource, PlatformResource


def live_in_production(platform: Any) -> TrackRef | None:
    """The stable release serving production, or None. A fresh install has no platform state
    yet (no control database): that is "nothing deployed", not an error."""
    from dagster_project.core import database

    database.ensure_database(database.CONTROL_DB)
    return live_track(platform.current("production"))


def release_schedules(spec: ProductSpec) -> list[dg.ScheduleDefinition]:
    partitions_def = releases_partitions(spec.product)
    slug = spec.product.replace("-", "_")

    @dg.schedule(
        name=f"nightly_release_train_{slug}",
        cron_schedule="0 2 * * *",
        job_name=release_job_name(spec.product),
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Releases the newest registered release not yet in production.",
    )
    def nightly_release_train(
        context: dg.ScheduleEvaluationContext,
        platform: PlatformResource,
        approval: ApprovalResource,
    ) -> dg.RunRequest | dg.SkipReason:
        try:
            approval.approve(spec)  # first: no work at all without the right token
        except guardrail.ApprovalRefused as refused:
            return dg.SkipReason(f"nightly release train needs the guardrail token: {refused}")
        releases = context.instance.get_dynamic_partitions(partitions_def.name)
        if not releases:
            return dg.SkipReason("no release registered")
        newest = releases[-1]
        live = live_in_production(platform.for_product(spec.product))
        if live is not None and live.version == newest:
            return dg.SkipReason(f"newest release {newest} is already in production")
        return dg.RunRequest(
            partition_key=newest,
            run_key=f"train-{newest}-{context.scheduled_execution_time:%Y%m%d}",
        )

    @dg.op(name=f"verify_production_{slug}", pool=release_pool(spec.product))
    def verify_production(
        context: dg.OpExecutionContext, platform: PlatformResource
    ) -> SmokeReport:
        from dagster_project.core.smoke import post_deploy_smoke

        local = platform.for_product(spec.product)
        live = live_in_production(local)
        if not live:
            raise dg.Failure(description="nothing is deployed to production: nothing to verify")
        report = post_deploy_smoke(spec, local, live.version)
        if not report.passed("smoke"):
            raise dg.Failure(
                description=f"post-deploy verification failed on production {live.version}",
                metadata={"failed": table(report.failures() or report.rows)},
            )
        context.log.info(f"production {live.version} verified: {len(report.rows)} checks")
        return report

    @dg.job(name=f"verify_production_job_{slug}", tags={PRODUCT_TAG: spec.product})
    def verify_production_job() -> None:
        verify_production()

    verification = dg.ScheduleDefinition(
        name=f"post_deploy_verification_{slug}",
        cron_schedule="0 * * * *",
        job=verify_production_job,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Hourly smoke of production after deploys.",
    )
    return [nightly_release_train, verification]
