"""The code location: Definitions assembled from the product folders.

Every folder with a product.yaml under `$RELEASE_PRODUCTS_DIR` (default `products/`) is one
product: one asset group, its own partitions, jobs, sensors and schedules. A folder whose spec
or contract does not load becomes one asset naming each problem's file, line and field
(assets/product_error.py); the others load as usual.

Kept light on purpose: loading this module imports dagster, pydantic and yaml, never
great_expectations, scipy, sqlfluff, matplotlib or jsonschema (those load inside the steps that
use them), and starts nothing (Postgres and the platform start when a step needs them).
"""

import warnings

import dagster as dg

from assets import release_assets
from checks import blocking_check_keys_before_promotion, release_checks
from dagster_project.core.settings import list_products
from dagster_project.core.spec import SpecError, load_spec
from dagster_project.jobs import release_jobs
from dagster_project.partitions import releases_partitions
from dagster_project.resources import resources_for_deployment
from dagster_project.schedules import release_schedules
from dagster_project.sensors import release_sensors

# Release checks are partitioned on purpose (results per release must not overwrite each other);
# Dagster marks partitioned check specs as preview.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def product_definitions(product_id: str) -> dg.Definitions:
    try:
        spec = load_spec(product_id)
    except SpecError as error:  # never takes the other products down
        from assets.product_error import invalid_product_asset

        return dg.Definitions(assets=[invalid_product_asset(product_id, error)])
    partitions_def = releases_partitions(spec.product)
    checks = release_checks(spec, partitions_def)
    assets = release_assets(spec, partitions_def, blocking_check_keys_before_promotion(checks))
    jobs = release_jobs(spec, partitions_def)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=release_schedules(spec),
        sensors=release_sensors(spec),
    )


def build_definitions() -> dg.Definitions:
    # In-process by default: a UI launch from the asset graph (Dagster's implicit asset job), a
    # backfill or a re-execution runs its stages in one process, like the product's own jobs.
    return dg.Definitions.merge(
        *(product_definitions(product) for product in list_products()),
        dg.Definitions(resources=resources_for_deployment(), executor=dg.in_process_executor),
    )


defs = build_definitions()
