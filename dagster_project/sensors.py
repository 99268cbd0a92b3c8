"""Sensors per product.

- release sensor: registers the product's current source as a release partition when it changes
  (the nightly train, or a person, launches it).
- audit sensor: audits every production change not yet in the audit trail. It requires the
  guardrail token: without it (or with a wrong one) it requests nothing and says why.
- reconcile sensor: the reconciler in the daemon (core/reconcile.py): production traffic a dead
  release left behind goes back to the last ready stable, the change is recorded (and audited
  when the token is at hand), the dead run is marked failed and orphan processes are reaped.
"""

import dagster as dg

from dagster_project.core import changes, guardrail
from dagster_project.core.spec import ProductSpec
from dagster_project.core.versioning import default_release_version
from dagster_project.jobs import audit_job_name
from dagster_project.partitions import releases_partitions
from dagster_project.resources import ApprovalResource, AuditResource

AUDIT_PAGE = 100  # production changes looked at per tick: bounded, never a rescan of history


def release_sensors(spec: ProductSpec) -> list[dg.SensorDefinition]:
    partitions_def = releases_partitions(spec.product)
    slug = spec.product.replace("-", "_")

    @dg.sensor(
        name=f"release_sensor_{slug}",
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Registers the product's current source as a release partition.",
    )
    def release_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        version = default_release_version(spec)
        if context.cursor == version or context.instance.has_dynamic_partition(
            partitions_def.name, version
        ):
            return dg.SkipReason(f"source unchanged: release {version} already registered")
        return dg.SensorResult(
            dynamic_partitions_requests=[partitions_def.build_add_request([version])],
            cursor=version,
        )

    @dg.sensor(
        name=f"audit_sensor_{slug}",
        job_name=audit_job_name(spec.product),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Audits every production change; requires the guardrail token.",
    )
    def audit_sensor(
        context: dg.SensorEvaluationContext, approval: ApprovalResource, audit_trail: AuditResource
    ) -> dg.SensorResult | dg.SkipReason:
        try:
            approval.approve(spec)
        except guardrail.ApprovalRefused as refused:
            return dg.SkipReason(f"audit sensor needs the guardrail token: {refused}")
        after = int(context.cursor or 0)
        page = changes.since(after, limit=AUDIT_PAGE)
        mine = [c for c in page if c.product == spec.product]
        requests = [
            dg.RunRequest(
                partition_key=c.release, run_key=c.change_id, tags={"release/change": c.change_id}
            )
            for c in mine
            if audit_trail.find(c.change_id) is None
        ]
        cursor = str(page[-1].id) if page else str(after)
        if not requests:
            return dg.SensorResult(
                skip_reason=f"no unaudited production change after #{after}", cursor=cursor
            )
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    @dg.sensor(
        name=f"reconcile_sensor_{slug}",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Returns production to its last ready stable when the release that owned "
        "it died; records and audits the change.",
    )
    def reconcile_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        from dagster_project.production import reconcile_product

        lines = reconcile_product(spec.product, context.instance).lines()
        for line in lines:
            context.log.warning(line)
        return dg.SkipReason("; ".join(lines) if lines else "production is owned or settled")

    return [release_sensor, audit_sensor, reconcile_sensor]
