"""Jobs per product: the whole release, and the audit alone (for aborted canaries and the audit
sensor). Both run in-process: one release is one process. Both carry the product tag, which the
run queue limits to one run per product; the product's concurrency pool (assets/__init__.py,
dagster.yaml) holds every launch path, tagged or not, to one environment-touching step at a time."""

from typing import Any

import dagster as dg

from assets.common import STAGES, stage_key
from dagster_project.core.spec import ProductSpec

PRODUCT_TAG = "release/product"


def release_job_name(product_id: str) -> str:
    return "release_" + product_id.replace("-", "_")


def audit_job_name(product_id: str) -> str:
    return "audit_" + product_id.replace("-", "_")


def release_jobs(spec: ProductSpec, partitions_def: dg.PartitionsDefinition) -> list[Any]:
    group = [stage_key(spec, stage) for stage in STAGES]
    tags = {PRODUCT_TAG: spec.product}
    return [
        dg.define_asset_job(
            release_job_name(spec.product),
            selection=dg.AssetSelection.assets(*group),
            partitions_def=partitions_def,
            executor_def=dg.in_process_executor,
            tags=tags,
            description=f"Release {spec.product}: build, migrations, staging smoke, canary, "
            "promotion, audit.",
        ),
        dg.define_asset_job(
            audit_job_name(spec.product),
            selection=dg.AssetSelection.assets(stage_key(spec, "audit")),
            partitions_def=partitions_def,
            executor_def=dg.in_process_executor,
            tags=tags,
            description=f"Audit the production changes of one {spec.product} release (idempotent).",
        ),
    ]
