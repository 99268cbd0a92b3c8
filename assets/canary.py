"""Stage 4: the canary in production.

Requires the guardrail token before touching production. Under the production lock: checks the
production schema for drift and the pending migrations for safety and backward compatibility,
applies the expand-only migrations, starts the new version beside the stable one and shifts
traffic through the production edge step by step (weights and bake times from the spec) while
load flows, judging canary against the stable baseline at every step. Any failure sends 100%
back to stable. A canary that passes is parked at 0% (still running) for `promotion`, so
production is never left half-moved between stages. Gates: `slo_regression`, `schema_drift`.
"""

import os
import time
from typing import Any

import dagster as dg

from assets.common import (
    behind_production,
    group_name,
    md_table,
    run_actor,
    stage_input,
    stage_key,
)
from assets.schema_migration import drift_as_dict, migration_gate_report
from dagster_project.core import changes
from dagster_project.core.locks import production_lock
from dagster_project.core.settings import release_home
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import (
    ApprovalResource,
    MetricsResource,
    PlatformResource,
    RegistryResource,
)

ENV = "production"


def canary_asset(spec: ProductSpec, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "canary"),
        ins={"artifact": stage_input(spec, "build")},
        deps=[stage_key(spec, "staging_smoke")],
        partitions_def=partitions_def,
        group_name=group_name(spec),
        kinds={"prometheus"},
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
        started = time.monotonic()
        approver = approval.approve(spec).approver  # refuses before production is touched
        local = platform.for_product(spec.product)
        local.up()
        with production_lock(spec.product, context.run.run_id):
            report = _run_canary(context, artifact, local, registry, metrics)
        report["approver"] = approver
        report["seconds"] = round(time.monotonic() - started, 3)
        return dg.Output(report, metadata=_metadata(report))

    def _run_canary(
        context: dg.AssetExecutionContext,
        artifact: dict[str, Any],
        local: Any,
        registry: RegistryResource,
        metrics: MetricsResource,
    ) -> dict[str, Any]:
        from dagster_project.core.canary.analysis import run_canary
        from dagster_project.core.migrations.drift import check_drift

        current = local.current(ENV)
        stable = current.get("stable") or None
        report: dict[str, Any] = {
            "version": artifact["version"],
            "artifact_sha256": artifact["sha256"],
            "previous": stable,
            "steps": [],
            "snapshots": [],
        }
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

        migrations_dir = registry.unpacked(artifact["sha256"]) / spec.migrations_dir
        drift = check_drift(ENV, migrations_dir)
        report["drift"] = drift_as_dict(drift)
        if drift.items:
            report.update(outcome="blocked", passed=False, reason="production schema drift")
            context.log.error(f"production schema drift: {len(drift.items)} difference(s)")
            return report
        gate = migration_gate_report(ENV, migrations_dir, run_actor(context), apply=True)
        report["migrations"] = gate
        if gate["blocked_by"]:
            report.update(
                outcome="blocked",
                passed=False,
                reason=f"production migrations blocked by {', '.join(gate['blocked_by'])}",
            )
            return report

        fetched = registry.fetch(artifact["sha256"])
        local.deploy(ENV, "canary", fetched)
        context.log.info(f"canary {artifact['version']} started beside stable {_v(stable)}")
        try:
            result = run_canary(
                local,
                spec,
                env=ENV,
                artifact=fetched,
                metrics=metrics.source(local.api_urls(ENV)),
                bake_scale=bake_scale(),
                baseline=stable is not None,
                on_event=lambda event: context.log.info(f"canary: {describe_event(event)}"),
            )
        except BaseException:
            local.rollback(ENV)  # whatever failed, production goes back to 100% stable
            raise
        result_dict = result.to_dict()
        result_dict["steps"] = result_dict.pop("rows", [])
        snapshot_dir = release_home() / "snapshots" / spec.product / artifact["version"]
        result_dict["snapshots"] = render_snapshots(result, snapshot_dir)
        report.update(result_dict)
        report["passed"] = bool(result.passed)
        if result.passed:
            # Parked at 0%: promotion moves traffic only once the gates are confirmed. A first
            # release has nothing to park behind: it keeps the traffic it was judged on.
            if stable is not None:
                local.set_weights(ENV, {"stable": 100, "canary": 0})
            report["outcome"] = "passed"
        else:
            report["outcome"] = "aborted"
            change = changes.record(
                product=spec.product,
                release=artifact["version"],
                outcome="aborted",
                artifact_sha256=artifact["sha256"],
                previous_artifact_sha256=(stable or {}).get("artifact_sha"),
                run_id=context.run.run_id,
                details={
                    "slo_verdict": result_dict.get("verdict"),
                    "reason": result_dict.get("reason"),
                    "steps": result_dict.get("steps"),
                    "snapshots": result_dict.get("snapshots"),
                },
            )
            report["change_id"] = change.change_id
            context.log.error(f"canary aborted, all traffic back to stable: {report.get('reason')}")
        return report

    return canary


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
        "steps": md_table(report.get("steps", [])),
        "snapshots": md_table(report.get("snapshots", [])),
        "seconds": report.get("seconds", 0.0),
    }
