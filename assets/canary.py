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

import os
import time
from collections.abc import Sequence
from typing import Any

import dagster as dg

from assets.common import (
    GATE_COLUMNS,
    behind_production,
    group_name,
    own_production,
    release_environment,
    release_pool,
    require_checks_passed,
    run_actor,
    run_in_progress,
    stage_input,
    stage_key,
    table,
)
from assets.schema_migration import drift_as_dict, migration_gate_report
from dagster_project.core import changes, ownership
from dagster_project.core.settings import release_home
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
        artifact: dict[str, Any],
        platform: PlatformResource,
        registry: RegistryResource,
        metrics: MetricsResource,
        approval: ApprovalResource,
    ) -> dg.Output[dict[str, Any]]:
        from dagster_project.core.reconcile import reconcile

        started = time.monotonic()
        approver = approval.approve(spec).approver  # refuses before production is touched
        gate = require_checks_passed(context, staging_gates, artifact["sha256"])
        release_environment(context, spec, "staging")  # this run's staging phase is over
        local = platform.for_product(spec.product)
        local.up()
        for line in reconcile(
            spec.product, run_in_progress=run_in_progress(context.instance)
        ).lines():
            context.log.warning(f"reconciled before the canary: {line}")
        stable = local.current(ENV).get("stable")
        report = _quick_outcome(context, artifact, stable)
        if report is None:
            # Phase `preparing`: traffic has not moved, so a death here records no change.
            own_production(context, spec, artifact["sha256"], stable, "preparing")
            report = _owned_canary(context, artifact, local, registry, metrics)
        report["approver"] = approver
        report["gate"] = gate
        report["seconds"] = round(time.monotonic() - started, 3)
        return dg.Output(report, metadata=_metadata(report))

    def _quick_outcome(
        context: dg.AssetExecutionContext, artifact: dict[str, Any], stable: Any
    ) -> dict[str, Any] | None:
        """Already live or superseded: decided without owning production (None: go on)."""
        report = _new_report(artifact, stable)
        if stable and stable.get("artifact_sha") == artifact["sha256"]:
            report.update(outcome="already_live", passed=True, reason="already serving 100%")
            return report
        if behind_production(context, (stable or {}).get("version")):
            report.update(
                outcome="superseded",
                passed=False,
                reason=f"release {artifact['version']} is older than {stable['version']}, "
                "live in production: production is never moved backwards (not touched)",
            )
            context.log.warning(report["reason"])
            return report
        return None

    def _owned_canary(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        local: Any,
        registry: RegistryResource,
        metrics: MetricsResource,
    ) -> dict[str, Any]:
        """The canary while this run owns production. Ownership is kept only by a parked,
        passed canary (for promotion); every other end releases it."""
        stable = local.current(ENV).get("stable")  # re-read: it may have moved while we waited
        report = _quick_outcome(context, artifact, stable)
        if report is not None:
            release_environment(context, spec, ENV)
            return report
        report = _new_report(artifact, stable)
        try:
            _run_canary(context, artifact, local, registry, metrics, report)
        except BaseException as exc:
            # The step loop already rolled back whatever it started; an error outside it (a
            # deploy that failed half-way, snapshots) still must not leave a canary running.
            # If that fails too (Postgres gone), the ownership stays for the reconciler and the
            # original error is the one reported.
            try:
                if "canary" in local.current(ENV):
                    local.rollback(ENV)
                if report.get("deployed"):
                    _record_abort(context, artifact, stable, report, f"{type(exc).__name__}: {exc}")
                release_environment(context, spec, ENV)
            except Exception as cleanup:
                context.log.error(
                    f"cleanup after the canary's error failed ({type(cleanup).__name__}: "
                    f"{cleanup}); the reconciler will return production to stable"
                )
            raise
        if report["outcome"] == "passed":
            ownership.set_phase(spec.product, ENV, context.run.run_id, "parked")
        else:
            if report.get("deployed"):
                _record_abort(context, artifact, stable, report, report.get("reason", ""))
            release_environment(context, spec, ENV)
        return report

    def _run_canary(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        local: Any,
        registry: RegistryResource,
        metrics: MetricsResource,
        report: dict[str, Any],
    ) -> None:
        """Fills `report`; `deployed` is set once the canary track runs (production touched)."""
        from dagster_project.core.canary.analysis import run_canary
        from dagster_project.core.migrations.drift import check_drift

        stable = report["previous"]
        migrations_dir = registry.unpacked(artifact["sha256"]) / spec.migrations_dir
        drift = check_drift(ENV, migrations_dir)
        report["drift"] = drift_as_dict(drift)
        if drift.items:
            report.update(outcome="blocked", passed=False, reason="production schema drift")
            context.log.error(f"production schema drift: {len(drift.items)} difference(s)")
            return
        gate = migration_gate_report(ENV, migrations_dir, run_actor(context), apply=True)
        report["migrations"] = gate
        if gate["blocked_by"]:
            report.update(
                outcome="blocked",
                passed=False,
                reason=f"production migrations blocked by {', '.join(gate['blocked_by'])}",
            )
            return

        fetched = registry.fetch(artifact["sha256"])
        report["deployed"] = True  # from here on production may carry the canary's traffic
        ownership.set_phase(spec.product, ENV, context.run.run_id, "canary")
        local.deploy(ENV, "canary", fetched)
        context.log.info(f"canary {artifact['version']} started beside stable {_v(stable)}")
        result = run_canary(
            local,
            spec,
            env=ENV,
            artifact=fetched,
            metrics=metrics.source(local.api_urls(ENV)),
            bake_scale=bake_scale(),
            baseline=stable is not None,
            on_event=lambda event: context.log.info(f"canary: {describe_event(event)}"),
            step_guard=lambda since: step_problems(spec, local, since),
        )
        result_dict = result.to_dict()
        result_dict["steps"] = result_dict.pop("rows", [])
        report.update(result_dict)
        report["snapshots"] = render_snapshots(result, _snapshot_dir(artifact, context))
        report["passed"] = bool(result.passed)
        if result.passed:
            # Parked at 0%: promotion moves traffic only once the gates are confirmed. A first
            # release has nothing to park behind: it keeps the traffic it was judged on.
            if stable is not None:
                local.set_weights(ENV, {"stable": 100, "canary": 0})
            report["outcome"] = "passed"
        else:
            report["outcome"] = "aborted"
            context.log.error(f"canary aborted, all traffic back to stable: {report.get('reason')}")

    def _record_abort(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        stable: Any,
        report: dict[str, Any],
        reason: str,
    ) -> None:
        change = changes.record(
            product=spec.product,
            release=artifact["version"],
            outcome="aborted",
            artifact_sha256=artifact["sha256"],
            previous_artifact_sha256=(stable or {}).get("artifact_sha"),
            run_id=context.run.run_id,
            details={
                "slo_verdict": report.get("verdict", "fail"),
                "reason": reason,
                "steps": report.get("steps"),
                "snapshots": report.get("snapshots"),
            },
        )
        report["change_id"] = change.change_id

    return canary


def step_problems(spec: ProductSpec, local: Any, since_epoch: float) -> list[str]:
    """Why the current step (of a canary, or of the watch after promotion) cannot pass: this
    run lost production, or the edge or a track was down during it."""
    problems = []
    lost = ownership.lost(spec.product, ENV)
    if lost:
        problems.append(f"this run no longer owns production ({lost})")
    problems += local.outages(ENV, since_epoch)
    return problems


def _new_report(artifact: dict[str, Any], stable: Any) -> dict[str, Any]:
    return {
        "version": artifact["version"],
        "artifact_sha256": artifact["sha256"],
        "previous": stable,
        "steps": [],
        "snapshots": [],
    }


def _snapshot_dir(artifact: dict[str, Any], context: dg.AssetExecutionContext) -> Any:
    # Per run: a second canary of the same version never overwrites the first one's evidence.
    return (
        release_home()
        / "snapshots"
        / artifact["product"]
        / artifact["version"]
        / context.run.run_id[:8]
    )


def bake_scale() -> float:
    """`RELEASE_BAKE_SCALE` shortens bake times (tests, demos) without editing the spec."""
    return float(os.environ.get("RELEASE_BAKE_SCALE", "1.0"))


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


def render_snapshots(result: Any, directory: Any) -> list[dict[str, str]]:
    from dagster_project.core.canary.snapshots import render_snapshots as render

    return render(result, directory)


def _v(track: dict[str, Any] | None) -> str:
    return track["version"] if track else "(none: first release)"


def _metadata(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "outcome": report["outcome"],
        "version": report["version"],
        "artifact_sha256": report["artifact_sha256"],
        "previous_version": _v(report.get("previous")),
        "gate": table(report.get("gate", []), GATE_COLUMNS),
        "steps": table(report.get("steps", [])),
        "snapshots": table(report.get("snapshots", [])),
        "seconds": report.get("seconds", 0.0),
    }
