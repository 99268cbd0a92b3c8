"""Small helpers shared by the stage modules: keys, metadata tables, the gate on promotion."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import dagster as dg
from pydantic import BaseModel

from dagster_project.core.contracts import GateResult, RunFacts, StageMaterialization, TrackRef
from dagster_project.core.decisions import Decision, ReleaseFacts
from dagster_project.core.guardrail import ApprovalRefused
from dagster_project.core.spec import ProductSpec

STAGES = (
    "build",
    "schema_migration_check",
    "staging_smoke",
    "canary",
    "promotion",
    "audit",
)


def release_pool(product_id: str) -> str:
    """The product's concurrency pool, set on every stage that touches staging or production;
    with `granularity: run` (dagster.yaml) the run queue starts one run with it at a time."""
    return f"release-{product_id}"


def stage_key(spec: ProductSpec, stage: str) -> dg.AssetKey:
    assert stage in STAGES, stage
    return dg.AssetKey([spec.product, stage])


def group_name(spec: ProductSpec) -> str:
    return "release_" + spec.product.replace("-", "_")


def stage_input(spec: ProductSpec, stage: str) -> dg.AssetIn:
    return dg.AssetIn(key=stage_key(spec, stage))


def table(
    rows: Sequence[Mapping[str, Any] | BaseModel], columns: Sequence[str] | None = None
) -> dg.MetadataValue:
    """A sortable table for the UI, from contracts or mappings. Columns are `columns`, else
    every field in order of first appearance; an empty table keeps its columns. Values other
    than str/int/float/bool/None are stringified (a TableRecord holds nothing else)."""
    rows = [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in rows]
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    types = {c: _column_type([row.get(c) for row in rows]) for c in cols}
    records = [dg.TableRecord({c: _cell(row.get(c), types[c]) for c in cols}) for row in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, types[c]) for c in cols])
    return dg.MetadataValue.table(records=records, schema=schema)


def _column_type(values: Sequence[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    # Non-finite floats (NaN, inf) are shown as text: metadata is stored as JSON.
    if present and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in present
    ):
        return "float"
    return "string"


def _cell(value: Any, column_type: str) -> str | int | float | bool | None:
    if value is None:
        return None
    if column_type == "float":
        return float(value)
    if column_type in ("int", "bool"):
        return value
    return value if isinstance(value, str) else str(value)


def run_actor(context: dg.AssetExecutionContext) -> str:
    return f"dagster-run:{context.run.run_id}"


class GateNotPassed(dg.Failure):
    """A stage refuses to act because a blocking check upstream did not pass for its partition
    and artifact."""


class StageRefused(dg.Failure):
    """A release rule stops the stage before it changes production; production is unchanged."""


GATE_COLUMNS = ("check", "status")


def gate_results(
    context: dg.AssetExecutionContext,
    check_keys: Iterable[dg.AssetCheckKey],
    artifact_sha256: str,
) -> list[GateResult]:
    """The latest evaluation of each given blocking check for this partition, PASSED only when
    it passed on a materialization of this very artifact.

    Blocking checks stop downstream steps only inside the same run; a UI launch of one asset,
    a backfill or a re-execution would walk past an earlier failure, so every stage that
    touches production reads them itself (and `core/decisions.py` refuses on anything but
    PASSED). No evaluation at all (never ran, only planned) is not a pass, and neither is a pass
    on another build of the release: the evaluated materialization must carry this artifact's
    SHA-256.
    """
    return gate_rows(context.instance, list(check_keys), context.partition_key, artifact_sha256)


def release_facts(
    context: dg.AssetExecutionContext,
    *,
    artifact_sha256: str,
    live: TrackRef | None,
    gates: Sequence[GateResult],
    approval_refused: str | None,
) -> ReleaseFacts:
    """The facts `core/decisions.py` decides on, as this run sees them."""
    partitions_def = context.assets_def.partitions_def
    assert isinstance(partitions_def, dg.DynamicPartitionsDefinition)
    return ReleaseFacts(
        release=context.partition_key,
        artifact_sha256=artifact_sha256,
        live=live,
        registered=tuple(context.instance.get_dynamic_partitions(partitions_def.name)),
        gates=tuple(gates),
        approval_refused=approval_refused,
    )


def refuse(decision: Decision) -> NoReturn:
    """Apply a refusal: raise what the CLI maps to its exit code (approval 4, the rest 3)."""
    if decision.rule == "approval":
        raise ApprovalRefused(decision.reason)
    if decision.rule == "gates":
        raise GateNotPassed(
            description=decision.reason,
            metadata={"gate": table(list(decision.not_passed), GATE_COLUMNS)},
        )
    raise StageRefused(description=decision.reason)


def facts_before_production(
    context: dg.AssetExecutionContext,
    spec: ProductSpec,
    approval: Any,
    check_keys: Iterable[dg.AssetCheckKey],
    artifact_sha256: str,
) -> tuple[str, ReleaseFacts]:
    """The approver and the facts a stage decides on before it looks at production: the
    approval (the approver is "" when the token was refused) and the upstream gates."""
    try:
        approver, refused = approval.approve(spec).approver, None
    except ApprovalRefused as exc:
        approver, refused = "", str(exc)
    return approver, release_facts(
        context,
        artifact_sha256=artifact_sha256,
        live=None,
        gates=gate_results(context, check_keys, artifact_sha256),
        approval_refused=refused,
    )


def live_track(
    current: Mapping[str, Mapping[str, str | None]], track: str = "stable"
) -> TrackRef | None:
    """A track of `LocalPlatform.current(env)` as a contract (None when nothing serves on it)."""
    found = current.get(track)
    if not found or not found.get("version") or not found.get("artifact_sha"):
        return None
    return TrackRef(version=str(found["version"]), artifact_sha256=str(found["artifact_sha"]))


def gate_rows(
    instance: dg.DagsterInstance,
    keys: Sequence[dg.AssetCheckKey],
    partition: str,
    artifact_sha256: str,
) -> list[GateResult]:
    """One result per check: PASSED, or why not (the one place a private Dagster API is read)."""
    # The layer contract's one allowed private import (tests/test_layers.py pins it).
    from dagster._core.event_api import PartitionKeyFilter  # noqa: TID251
    from dagster._core.storage.asset_check_execution_record import (  # noqa: TID251
        AssetCheckExecutionRecordStatus,
    )

    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        keys, partition_filter=PartitionKeyFilter(key=partition)
    )
    rows = []
    for key in keys:
        record = latest.get(key)
        if record is None:
            status = "NEVER_EVALUATED"
        elif record.status != AssetCheckExecutionRecordStatus.SUCCEEDED:
            status = record.status.value
        else:
            evaluated = _evaluated_artifact(instance, record)
            status = (
                "PASSED"
                if evaluated == artifact_sha256
                else f"PASSED_ON_OTHER_ARTIFACT {str(evaluated)[:12]}"
            )
        rows.append(GateResult(check=key.to_user_string(), status=status))
    return rows


def _evaluated_artifact(instance: dg.DagsterInstance, record: Any) -> str | None:
    """The artifact SHA-256 of the materialization a check evaluation judged, if known."""
    event = record.event.dagster_event if record.event else None
    evaluation = event.event_specific_data if event else None
    target = getattr(evaluation, "target_materialization_data", None)
    if target is None:
        return None
    found = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=record.key.asset_key, storage_ids=[target.storage_id]),
        limit=1,
    ).records
    if not found or found[0].asset_materialization is None:
        return None
    return _materialized_artifact(found[0].asset_materialization)


def _materialized_artifact(materialization: Any) -> str | None:
    metadata = materialization.metadata if materialization is not None else {}
    value = metadata.get("artifact_sha256") or metadata.get("sha256")
    return str(getattr(value, "value", value)) if value is not None else None


def run_facts(
    instance: dg.DagsterInstance,
    spec: ProductSpec,
    *,
    release: str,
    run_id: str,
    artifact_sha256: str,
    current_run_id: str | None = None,
) -> RunFacts:
    """What the instance says about the run that made a production change (compliance item 2):
    its status, its release-stage steps that did not succeed (the audit's own steps aside),
    and for each stage up to promotion a materialization of the partition - the run's own, else
    one with the artifact, else the latest."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return RunFacts(run_id=run_id, status=None)
    audit_step = stage_key(spec, "audit").to_python_identifier()
    failed = [
        s.step_key
        for s in instance.get_run_step_stats(run_id)
        if not s.step_key.startswith(audit_step) and s.status.value != "SUCCESS"
    ]
    stages = []
    for stage in STAGES[:-1]:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=stage_key(spec, stage), asset_partitions=[release]),
            limit=50,
        ).records
        found = [
            StageMaterialization(
                stage=stage,
                run_id=r.run_id,
                artifact_sha256=_materialized_artifact(r.asset_materialization),
            )
            for r in records
        ]
        pick = (
            next((m for m in found if m.run_id == run_id), None)
            or next((m for m in found if m.artifact_sha256 == artifact_sha256), None)
            or (found[0] if found else StageMaterialization(stage=stage))
        )
        stages.append(pick)
    return RunFacts(
        run_id=run_id,
        status=run.status.value,
        current=run_id == current_run_id,
        failed_steps=failed,
        stages=stages,
    )


def run_in_progress(instance: dg.DagsterInstance) -> Callable[[str], bool | None]:
    """Whether a Dagster run is still in progress (None when the run is unknown here)."""

    def in_progress(run_id: str) -> bool | None:
        run = instance.get_run_by_id(run_id)
        if run is None:
            return None
        return run.status in IN_PROGRESS_STATUSES

    return in_progress


# Queued runs hold no environment; only a run that is executing can own one.
IN_PROGRESS_STATUSES = frozenset(
    {dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING}
)


def own_environment(
    context: dg.AssetExecutionContext,
    spec: ProductSpec,
    env: str,
    *,
    artifact_sha256: str,
    previous_artifact_sha256: str | None,
    phase: str,
) -> None:
    """Make this run the owner of `env` (re-entrant within the run), waiting within the spec's
    bound for another live release; a dead owner is reconciled first. Starts the heartbeat."""
    from dagster_project.core import ownership, reconcile

    ownership.acquire(
        spec.product,
        env,
        run_id=context.run.run_id,
        release=context.partition_key,
        artifact_sha256=artifact_sha256,
        previous_artifact_sha256=previous_artifact_sha256,
        phase=phase,
        wait_seconds=spec.production.owner_wait_seconds,
        stale_after_seconds=spec.production.owner_heartbeat_timeout_seconds,
        run_in_progress=run_in_progress(context.instance),
        take_over=lambda owner, why: context.log.warning(
            f"{env} owner {owner.label} was dead ({why}): {reconcile.take_over(spec, owner, why)}"
        ),
        on_wait=lambda owner: context.log.warning(
            f"{env} of {spec.product} is owned by {owner.label}: waiting up to "
            f"{spec.production.owner_wait_seconds:.0f}s"
        ),
    )
    ownership.start_heartbeat(
        spec.product,
        env,
        context.run.run_id,
        lost_after=spec.production.owner_heartbeat_timeout_seconds / 2,
    )


def own_staging(context: dg.AssetExecutionContext, spec: ProductSpec, artifact_sha256: str) -> None:
    """Staging belongs to one release at a time, from its migrations to its canary."""
    own_environment(
        context,
        spec,
        "staging",
        artifact_sha256=artifact_sha256,
        previous_artifact_sha256=None,
        phase="staging",
    )


def own_production(
    context: dg.AssetExecutionContext,
    spec: ProductSpec,
    artifact_sha256: str,
    stable: TrackRef | None,
    phase: str,
) -> None:
    """Production belongs to one release at a time; `stable` is what serves before it acts."""
    own_environment(
        context,
        spec,
        "production",
        artifact_sha256=artifact_sha256,
        previous_artifact_sha256=stable.artifact_sha256 if stable else None,
        phase=phase,
    )


def release_environment(context: dg.AssetExecutionContext, spec: ProductSpec, env: str) -> None:
    from dagster_project.core import ownership

    ownership.release(spec.product, env, context.run.run_id)
