"""The gates as asset checks, one module per gate family, all partitioned by release.

`release_checks(spec, partitions_def)` returns every check for one product. Gates fail closed:
no data, too little data or an error is never a pass. Checks set no concurrency pool: with
`granularity: run` (dagster.yaml) a run's pools are those of any of its steps, and the stage they
check (assets/__init__.py) carries the product's pool.
"""

import dagster as dg

from checks.artifact import artifact_integrity_check
from checks.compliance import compliance_check
from checks.data_quality import data_quality_check
from checks.edge_cache import edge_cache_check
from checks.edge_vcl import edge_vcl_check
from checks.migrations import migration_checks
from checks.slo import slo_regression_check
from checks.smoke import post_deploy_smoke_check, smoke_check
from checks.worker_dlq import worker_dlq_check
from dagster_project.core.spec import ProductSpec

# Stages whose blocking checks must have passed before promotion may act.
GATED_BEFORE_PROMOTION = ("build", "schema_migration_check", "staging_smoke", "canary")


def release_checks(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> list[dg.AssetChecksDefinition]:
    return [
        artifact_integrity_check(spec, partitions_def),
        *migration_checks(spec, partitions_def),
        edge_vcl_check(spec, partitions_def),
        smoke_check(spec, partitions_def),
        edge_cache_check(spec, partitions_def),
        worker_dlq_check(spec, partitions_def),
        data_quality_check(spec, partitions_def),
        slo_regression_check(spec, partitions_def),
        post_deploy_smoke_check(spec, partitions_def),
        compliance_check(spec, partitions_def),
    ]


def blocking_check_keys_before_promotion(
    checks: list[dg.AssetChecksDefinition],
) -> list[dg.AssetCheckKey]:
    keys = []
    for definition in checks:
        for spec in definition.check_specs:
            if spec.blocking and spec.asset_key.path[-1] in GATED_BEFORE_PROMOTION:
                keys.append(spec.key)
    return keys
