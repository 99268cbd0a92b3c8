"""Stage 2: the schema-migration check on staging.

Lints the release's migrations (sqlfluff), checks the pending ones for unsafe operations
(squawk and our own rules) and for backward compatibility with the running version, checks the
history (checksums, ordering), and only when all of that is clean applies the pending
migrations to staging. The gates (`migration_lint`, `migration_safety`, `schema_drift`) are
asset checks in `checks/migrations.py`; this stage records what they judge.
"""

import time
from typing import Any

import dagster as dg

from assets.common import (
    group_name,
    own_staging,
    release_pool,
    run_actor,
    stage_input,
    stage_key,
    table,
)
from dagster_project.core.spec import ProductSpec
from dagster_project.resources import RegistryResource

ENV = "staging"


def migration_gate_report(
    env: str, migrations_dir: Any, actor: str, *, apply: bool
) -> dict[str, Any]:
    """Lint, safety, compatibility and history for `env`; applies pending files if all clean.

    Shared with the canary stage, which runs the same gate on production before it touches it.
    """
    from dagster_project.core.migrations import compat, history, lint, safety

    started = time.monotonic()
    files = history.read_migrations(migrations_dir)
    plan = history.plan(env, migrations_dir)
    lint_report = lint.lint_migrations([f.path for f in files])
    safety_report = safety.check_safety(plan.pending)
    applied_files = [f for f in files if f.filename in {a.filename for a in plan.applied}]
    compat_findings = compat.check_backward_compat(applied_files, plan.pending)
    blocked_by = [
        name
        for name, ok in (
            ("migration_lint", lint_report.ok),
            ("migration_safety", safety_report.ok and not compat_findings),
            ("migration_history", plan.ok),
        )
        if not ok
    ]
    applied: list[dict[str, Any]] = []
    if apply and not blocked_by:
        applied = history.apply_pending(env, migrations_dir, actor)
    return {
        "env": env,
        "plan": plan.as_dict(),
        "lint": lint_report.as_dict(),
        "safety": safety_report.as_dict(),
        "compat": [_as_dict(f) for f in compat_findings],
        "blocked_by": blocked_by,
        "applied": [a["filename"] if isinstance(a, dict) else str(a) for a in applied],
        "seconds": round(time.monotonic() - started, 3),
    }


def drift_as_dict(report: Any) -> dict[str, Any]:
    """A drift report as a JSON-able dict (stage values and check metadata)."""
    return {
        "env": report.env,
        "items": [item.as_dict() for item in report.items],
        "expected_count": report.expected_count,
        "actual_count": report.actual_count,
        "summary": report.summary(),
        "markdown": report.as_markdown(),
        "seconds": round(report.seconds, 3),
    }


def _as_dict(item: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(item) if is_dataclass(item) else dict(item)


def schema_migration_asset(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(spec, "schema_migration_check"),
        ins={"artifact": stage_input(spec, "build")},
        partitions_def=partitions_def,
        group_name=group_name(spec),
        kinds={"postgres", "sqlfluff"},
        pool=release_pool(spec.product),
        description="Lint, safety and history of the migrations; pending ones applied to staging.",
    )
    def schema_migration_check(
        context: dg.AssetExecutionContext, artifact: dict[str, Any], registry: RegistryResource
    ) -> dg.Output[dict[str, Any]]:
        own_staging(context, spec, artifact["sha256"])
        migrations_dir = registry.unpacked(artifact["sha256"]) / spec.migrations_dir
        report = migration_gate_report(ENV, migrations_dir, run_actor(context), apply=True)
        report["migrations_dir"] = str(migrations_dir)
        if report["blocked_by"]:
            context.log.warning(
                f"migrations not applied to {ENV}: blocked by {report['blocked_by']}"
            )
        else:
            context.log.info(f"applied to {ENV}: {report['applied'] or 'nothing pending'}")
        return dg.Output(
            report,
            metadata={
                "environment": ENV,
                "artifact_sha256": artifact["sha256"],
                "applied": table([{"file": f} for f in report["applied"]], ["file"]),
                "pending_before": table([{"file": f} for f in report["plan"]["pending"]], ["file"]),
                "blocked_by": ", ".join(report["blocked_by"]) or "nothing",
                "seconds": report["seconds"],
            },
        )

    return schema_migration_check
