"""Stage 4: the canary in production.

However it was launched (CLI, a UI launch of this asset alone, a backfill, a schedule, a
re-execution), it refuses before touching production unless the guardrail token is presented
and every blocking check upstream passed for this partition *and this artifact*. Then this run
becomes the one owner of production (`core/ownership.py`), waiting within the spec's bound for
another release; it checks the production schema for drift and the pending migrations for
safety and backward compatibility, applies the expand-only migrations, starts the new version
beside the stable one and shifts traffic through the production edge step by step while load
flows, judging canary against stable at every step. A step during which the edge or a track
was down, or during which this run lost ownership, cannot pass. Any failure sends 100% back to
stable (in the step loop, the one place a canary is rolled back) and is recorded as a
production change for the audit. A canary that passes is parked at 0%, still owned by this
run, for `promotion`; if the run dies first, the reconciler returns production to stable and
records the abort. Gates: `slo_regression`, `schema_drift`.
"""

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import dagster as dg

from assets.common import (
    GATE_COLUMNS,
    facts_before_production,
    group_name,
    live_track,
    own_production,
    refuse,
    release_environment,
    release_pool,
    run_actor,
    run_in_progress,
    stage_input,
    stage_key,
    table,
)
from dagster_project.core import changes, ownership
from dagster_project.core.contracts import (
    ArtifactRecord,
    CanaryStageReport,
    ChangeEvidence,
    MetricRow,
    Snapshot,
    TrackRef,
)
from dagster_project.core.decisions import Decision, ReleaseFacts, decide_canary
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import (
    ApprovalResource,
    MetricsResource,
    PlatformResource,
    RegistryResource,
)

ENV = "production"


def canary_asset(
    spec: ProductSpec,
    partitions_def: dg.PartitionsDefinition,
    upstream_blocking_checks: Sequence[dg.AssetCheckKey] = (),
) -> dg.AssetsDefinition:
    # The gates of the stages before this one (the canary's own gates judge its output).
    staging_gates = [k for k in upstream_blocking_checks if k.asset_key.path[-1] != "canary"]

    @dg.asset(
        key=stage_key(spec, "canary"),
        ins={"artifact": stage_input(spec, "build")},
        deps=[stage_key(spec, "staging_smoke")],
        partitions_def=partitions_def,
        group_name=group_name(spec),
        kinds={"prometheus"},
        pool=release_pool(spec.product),
        description="Canary in production: 5 -> 25 -> 50% by default, judged against stable.",
    )
    def canary(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        platform: PlatformResource,
        registry: RegistryResource,
        metrics: MetricsResource,
        approval: ApprovalResource,
    ) -> dg.Output[CanaryStageReport]:
        from dagster_project.core.reconcile import reconcile

        started = time.monotonic()
        approver, facts = facts_before_production(
            context, spec, approval, staging_gates, artifact.sha256
        )
        decision = decide_canary(facts)  # token and gates: before production is looked at
        if decision.refused:
            refuse(decision)
        release_environment(context, spec, "staging")  # this run's staging phase is over
        local = platform.for_product(spec.product)
        local.up()
        for line in reconcile(
            spec.product, run_in_progress=run_in_progress(context.instance)
        ).lines():
            context.log.warning(f"reconciled before the canary: {line}")
        facts = replace(facts, live=live_track(local.current(ENV)))
        decision = decide_canary(facts)
        if decision.proceed:
            # Phase `preparing`: traffic has not moved, so a death here records no change.
            own_production(context, spec, artifact.sha256, facts.live, "preparing")
            report = _owned_canary(context, artifact, facts, local, registry, metrics, approver)
        else:
            report = _ended(artifact, facts, decision, approver)
        report = report.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
        return dg.Output(report, metadata=_metadata(report))

    def _owned_canary(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        facts: ReleaseFacts,
        local: Any,
        registry: RegistryResource,
        metrics: MetricsResource,
        approver: str,
    ) -> CanaryStageReport:
        """The canary while this run owns production. Ownership is kept only by a parked,
        passed canary (for promotion); every other end releases it."""
        facts = replace(facts, live=live_track(local.current(ENV)))  # it may have moved
        decision = decide_canary(facts)
        if not decision.proceed:
            release_environment(context, spec, ENV)
            return _ended(artifact, facts, decision, approver)
        progress = {"deployed": False}
        try:
            report = _run_canary(
                context, artifact, facts, local, registry, metrics, approver, progress
            )
        except BaseException as exc:
            _settle_after_error(context, artifact, facts, local, progress, exc)
            raise
        if report.passed:
            ownership.set_phase(spec.product, ENV, context.run.run_id, "parked")
            return report
        if report.deployed:
            report = report.model_copy(
                update={"change_id": _record_abort(context, artifact, facts, report, report.reason)}
            )
        release_environment(context, spec, ENV)
        return report

    def _run_canary(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        facts: ReleaseFacts,
        local: Any,
        registry: RegistryResource,
        metrics: MetricsResource,
        approver: str,
        progress: dict[str, bool],
    ) -> CanaryStageReport:
        """Gather the facts one by one, deciding after each; `progress` says how far it got
        (`deployed`: the canary track runs, production may carry its traffic)."""
        from dagster_project.core.canary.analysis import run_canary
        from dagster_project.core.database import environment_database
        from dagster_project.core.migrations.drift import check_drift
        from dagster_project.core.migrations.gate import migration_gate_report, schema_drift

        migrations_dir = registry.unpacked(artifact.sha256) / spec.migrations_dir
        db = environment_database(spec.product, ENV)  # the product's own production database
        drift = schema_drift(check_drift(db, migrations_dir))
        decision = decide_canary(facts, drift_differences=len(drift.differences))
        if not decision.proceed:
            context.log.error(decision.reason)
            return _ended(artifact, facts, decision, approver, drift=drift)
        gate = migration_gate_report(db, migrations_dir, run_actor(context), apply=True)
        decision = decide_canary(facts, drift_differences=0, migrations_blocked_by=gate.blocked_by)
        if not decision.proceed:
            return _ended(artifact, facts, decision, approver, drift=drift, migrations=gate)

        from dagster_project.core.canary.snapshots import preload

        preload()  # the charts' imports load while the canary starts and bakes
        fetched = registry.fetch(artifact.sha256)
        ownership.set_phase(spec.product, ENV, context.run.run_id, "canary")
        progress["deployed"] = True  # from here on production may carry the canary's traffic
        local.deploy(ENV, "canary", fetched)
        context.log.info(f"canary {artifact.version} started beside stable {_v(facts.live)}")
        result = run_canary(
            local,
            spec,
            env=ENV,
            artifact=fetched,
            metrics=metrics.source(local.api_urls(ENV), platform=local, env=ENV),
            bake_scale=bake_scale(),
            scale_deadline=False,  # the scale shortens waiting, never the evidence
            baseline=facts.live is not None,
            on_event=lambda event: context.log.info(f"canary: {describe_event(event)}"),
            step_guard=lambda since: step_problems(spec, local, since),
        )
        snapshots = render_snapshots(result)
        decision = decide_canary(
            facts,
            drift_differences=0,
            migrations_blocked_by=(),
            canary_verdict=result.verdict.value,
            canary_reason=result.reason,
        )
        if decision.outcome == "passed" and facts.live is not None:
            # Parked at 0%: promotion moves traffic only once the gates are confirmed. A first
            # release has nothing to park behind: it keeps the traffic it was judged on.
            local.set_weights(ENV, {"stable": 100, "canary": 0})
        elif decision.outcome == "aborted":
            context.log.error(f"canary aborted, all traffic back to stable: {result.reason}")
        return _ended(
            artifact,
            facts,
            decision,
            approver,
            drift=drift,
            migrations=gate,
            deployed=True,
            verdict=result.verdict.value,
            steps=metric_rows(result),
            snapshots=snapshots,
            rollback_seconds=result.rollback_seconds,
        )

    def _settle_after_error(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        facts: ReleaseFacts,
        local: Any,
        progress: dict[str, bool],
        exc: BaseException,
    ) -> None:
        """An error inside the canary: production back to stable and the abort recorded if
        traffic may have moved. If this
        fails too (Postgres gone), the ownership stays for the reconciler and the original
        error is the one reported."""
        from dagster_project.core.reconcile import return_to_stable

        try:
            # A no-op when the step loop already rolled back; else a deploy that failed
            # half-way, or an error after the loop (snapshots, parking).
            return_to_stable(local, ENV)
            if progress["deployed"]:
                _record_abort(context, artifact, facts, None, f"{type(exc).__name__}: {exc}")
            release_environment(context, spec, ENV)
        except Exception as cleanup:
            context.log.error(
                f"cleanup after the canary's error failed ({type(cleanup).__name__}: "
                f"{cleanup}); the reconciler will return production to stable"
            )

    def _record_abort(
        context: dg.AssetExecutionContext,
        artifact: ArtifactRecord,
        facts: ReleaseFacts,
        report: CanaryStageReport | None,
        reason: str,
    ) -> str:
        return changes.record(
            product=spec.product,
            release=artifact.version,
            outcome="aborted",
            artifact_sha256=artifact.sha256,
            previous_artifact_sha256=facts.live.artifact_sha256 if facts.live else None,
            run_id=context.run.run_id,
            details=ChangeEvidence(
                reason=reason,
                slo_verdict=report.verdict if report else "fail",
                slo_steps=report.steps if report else [],
                snapshots=report.snapshots if report else [],
            ),
        ).change_id

    return canary


def _ended(
    artifact: ArtifactRecord,
    facts: ReleaseFacts,
    decision: Decision,
    approver: str,
    **evidence: Any,
) -> CanaryStageReport:
    """The stage's report for a decision that ends it."""
    return CanaryStageReport(
        version=artifact.version,
        artifact_sha256=artifact.sha256,
        previous=facts.live,
        outcome=decision.outcome,  # type: ignore[arg-type]
        reason=decision.reason,
        approver=approver,
        gate=list(facts.gates),
        **evidence,
    )


def metric_rows(result: Any) -> list[MetricRow]:
    """The canary analysis' per-step, per-metric rows as contracts."""
    return [MetricRow.model_validate(row) for row in result.rows()]


def step_problems(spec: ProductSpec, local: Any, since_epoch: float) -> list[str]:
    """Why the current step (of a canary, or of the watch after promotion) cannot pass: this
    run lost production, or the edge or a track was down during it."""
    problems = []
    lost = ownership.lost(spec.product, ENV)
    if lost:
        problems.append(f"this run no longer owns production ({lost})")
    problems += local.outages(ENV, since_epoch)
    return problems


def bake_scale() -> float:
    """`RELEASE_BAKE_SCALE` shortens bake times (tests, demos) without editing the spec
    (validated by `deploy` before any work; here an invalid value fails the stage, naming it)."""
    from dagster_project.core.settings import bake_scale as scale

    return scale()


def describe_event(event: dict[str, Any]) -> str:
    kind = event.get("event", "?")
    weight = f" ({event['weight']}%)" if event.get("weight") is not None else ""
    step = f"step {event['step']}{weight}" if "step" in event else ""
    if kind == "step_judged":
        return f"{step} {event.get('verdict')}: {event.get('reason', '')}"
    if kind == "step_extended":
        return f"{step} extended (inconclusive): {'; '.join(event.get('reasons', []))[:200]}"
    if kind == "step_started":
        return f"{step} started, baking {event.get('bake_seconds', 0):.0f}s"
    return f"{kind}: {event.get('reason', '')}".strip()


def render_snapshots(result: Any) -> list[Snapshot]:
    """The charts, rendered in a scratch directory and kept in the evidence store by content
    hash (never overwritten: a second canary of the same version keeps both sets); each
    Snapshot's path is the stored file."""
    import tempfile

    from dagster_project.core import evidence
    from dagster_project.core.canary.snapshots import render_snapshots as render

    stored = []
    with tempfile.TemporaryDirectory(prefix="snapshots-") as scratch:
        for chart in render(result, scratch):
            path, sha256 = evidence.store_file(chart["path"])
            stored.append(Snapshot(name=chart["name"], path=str(path), sha256=sha256))
    return stored


def _v(track: TrackRef | None) -> str:
    return track.version if track else "(none: first release)"


def _metadata(report: CanaryStageReport) -> dict[str, Any]:
    return {
        "outcome": report.outcome,
        "version": report.version,
        "artifact_sha256": report.artifact_sha256,
        "previous_version": _v(report.previous),
        "gate": table(report.gate, GATE_COLUMNS),
        "steps": table(report.steps),
        "snapshots": table(report.snapshots),
        "seconds": report.seconds,
    }
