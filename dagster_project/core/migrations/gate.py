"""The migration gate of one environment, as a contract: lint, safety, backward compatibility
and history of the release's migrations, and the pending files applied only when all of that is
clean. Run on staging by `schema_migration_check` and on production by `canary` before traffic
moves; the gates `migration_lint`, `migration_safety` and `schema_drift` judge its report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dagster_project.core.contracts import (
    DriftDifference,
    Finding,
    MigrationGate,
    MigrationGateReport,
    SchemaDrift,
    Waiver,
)


def migration_gate_report(
    env: str, migrations_dir: Path, actor: str, *, apply: bool
) -> MigrationGateReport:
    """Lint, safety, compatibility and history for `env`; applies pending files if all clean."""
    from dagster_project.core.migrations import compat, history, lint, safety

    started = time.monotonic()
    files = history.read_migrations(migrations_dir)
    plan = history.plan(env, migrations_dir)
    lint_report = lint.lint_migrations([f.path for f in files])
    safety_report = safety.check_safety(plan.pending)
    applied_names = {a.filename for a in plan.applied}
    compat_found = compat.check_backward_compat(
        [f for f in files if f.filename in applied_names], plan.pending
    )
    checks: tuple[tuple[MigrationGate, bool], ...] = (
        ("migration_lint", lint_report.ok),
        ("migration_safety", safety_report.ok and not compat_found),
        ("migration_history", plan.ok),
    )
    blocked_by = [name for name, ok in checks if not ok]
    applied: list[str] = []
    if apply and not blocked_by:
        applied = [_filename(a) for a in history.apply_pending(env, migrations_dir, actor)]
    return MigrationGateReport(
        env=env,
        migrations_dir=str(migrations_dir),
        linted_files=list(lint_report.files),
        lint_cached=lint_report.cached,
        lint_findings=[
            Finding(
                source="sqlfluff",
                file=f.file,
                line=f.line,
                rule=f.rule,
                message=f.description,
                help=f.name,
            )
            for f in lint_report.findings
        ],
        safety_findings=safety_findings(safety_report),
        compat_findings=[
            Finding(source="compat", file=f.file, line=f.line, rule=f.rule, message=f.message)
            for f in compat_found
        ],
        history_problems=list(plan.problems),
        safety_errors=list(safety_report.errors),
        waivers=waivers(safety_report),
        pending_before=[p.filename for p in plan.pending],
        applied=applied,
        blocked_by=blocked_by,
        seconds=round(time.monotonic() - started, 3),
    )


def safety_findings(report: Any) -> list[Finding]:
    """A `safety.check_safety` report's findings as contracts."""
    return [
        Finding(
            source="squawk" if f.source == "squawk" else "release",
            file=f.file,
            line=f.line,
            rule=f.rule,
            message=f.message,
            help=f.help,
        )
        for f in report.findings
    ]


def waivers(report: Any) -> list[Waiver]:
    """A `safety.check_safety` report's waivers as contracts."""
    return [
        Waiver(rule=w.rule, file=w.file, line=w.line, reason=w.reason, message=w.message)
        for w in report.waivers
    ]


def _filename(applied: Any) -> str:
    return str(applied["filename"]) if isinstance(applied, dict) else str(applied)


def schema_drift(report: Any) -> SchemaDrift:
    """A `drift.check_drift` report as the contract stages and gates exchange."""
    return SchemaDrift(
        env=report.env,
        differences=[
            DriftDifference(
                kind=item.kind,
                object=item.object,
                change=item.change,
                expected=item.expected,
                actual=item.actual,
            )
            for item in report.items
        ],
        expected_count=report.expected_count,
        actual_count=report.actual_count,
        summary=report.summary(),
        markdown=report.as_markdown(),
        seconds=round(report.seconds, 3),
    )
