"""Small helpers shared by the stage modules: keys, metadata tables, the gate on promotion."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dagster as dg

from dagster_project.core.spec import ProductSpec

STAGES = (
    "build",
    "schema_migration_check",
    "staging_smoke",
    "canary",
    "promotion",
    "audit",
)


def stage_key(spec: ProductSpec, stage: str) -> dg.AssetKey:
    assert stage in STAGES, stage
    return dg.AssetKey([spec.product, stage])


def group_name(spec: ProductSpec) -> str:
    return "release_" + spec.product.replace("-", "_")


def stage_input(spec: ProductSpec, stage: str) -> dg.AssetIn:
    return dg.AssetIn(key=stage_key(spec, stage))


def md_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> dg.MetadataValue:
    """A markdown table for the UI; an empty table says so instead of rendering nothing."""
    if not rows:
        return dg.MetadataValue.md("_(no rows)_")
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def run_actor(context: dg.AssetExecutionContext) -> str:
    return f"dagster-run:{context.run.run_id}"


def behind_production(context: dg.AssetExecutionContext, live_version: str | None) -> bool:
    """True when this release was registered before the one live in production.

    Backfills re-run old partitions; production must never move backwards through them. A
    release registered later (even with a lower version number) is a deliberate new intent.
    """
    partitions_def = context.assets_def.partitions_def
    if not live_version or live_version == context.partition_key:
        return False
    assert isinstance(partitions_def, dg.DynamicPartitionsDefinition)
    keys = context.instance.get_dynamic_partitions(partitions_def.name)
    if live_version not in keys or context.partition_key not in keys:
        return False
    return keys.index(context.partition_key) < keys.index(live_version)


class GateNotPassed(dg.Failure):
    """A stage refuses to act because a blocking check upstream did not pass for its partition."""


def require_checks_passed(
    context: dg.AssetExecutionContext, check_keys: Iterable[dg.AssetCheckKey]
) -> list[dict[str, str]]:
    """Refuse unless every given check's latest evaluation for this partition passed.

    Blocking checks stop downstream steps only inside the same run; a UI launch of one asset or
    a backfill would walk past an earlier failure, so the gate is enforced here as well. No
    evaluation at all (never ran, only planned) is not a pass.
    """
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus,
    )

    keys = list(check_keys)
    partition = context.partition_key
    latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(
        keys, partition_filter=PartitionKeyFilter(key=partition)
    )
    rows, not_passed = [], []
    for key in keys:
        record = latest.get(key)
        status = record.status.value if record else "NEVER_EVALUATED"
        passed = record is not None and record.status == AssetCheckExecutionRecordStatus.SUCCEEDED
        rows.append({"check": key.to_user_string(), "status": status})
        if not passed:
            not_passed.append(f"{key.to_user_string()} ({status})")
    if not_passed:
        raise GateNotPassed(
            description=(
                f"refusing to act for release {partition}: blocking checks upstream did not "
                f"pass: {', '.join(not_passed)}"
            ),
            metadata={"gate": md_table(rows)},
        )
    return rows
