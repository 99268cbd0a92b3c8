"""Gates on the schema: lint (sqlfluff), safety (squawk + own rules, backward compatibility,
history) on `schema_migration_check`, and schema drift on staging (after applying) and on
production (before the canary touches it)."""

from pathlib import Path

import dagster as dg

from assets.common import stage_key, table
from dagster_project.core.contracts import (
    CanaryStageReport,
    Finding,
    MigrationGateReport,
    SchemaDrift,
)
from dagster_project.core.spec import ProductSpec

FINDING_COLUMNS = ["source", "file", "line", "rule", "message", "help"]


def migration_checks(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> list[dg.AssetChecksDefinition]:
    target = stage_key(spec, "schema_migration_check")

    @dg.asset_check(
        asset=target,
        name="migration_lint",
        blocking=True,
        partitions_def=partitions_def,
        description="sqlfluff (postgres, [tool.sqlfluff] of pyproject.toml) on every migration.",
    )
    def migration_lint(schema_migration_check: MigrationGateReport) -> dg.AssetCheckResult:
        return lint_result(schema_migration_check)

    @dg.asset_check(
        asset=target,
        name="migration_safety",
        blocking=True,
        partitions_def=partitions_def,
        description="Pending migrations: locking/rewriting operations (squawk and own rules), "
        "backward compatibility with the running version, checksum history.",
    )
    def migration_safety(schema_migration_check: MigrationGateReport) -> dg.AssetCheckResult:
        return safety_result(schema_migration_check)

    @dg.asset_check(
        asset=target,
        name="schema_drift",
        blocking=True,
        partitions_def=partitions_def,
        description="Live staging schema equals the schema its recorded migrations define.",
    )
    def staging_schema_drift(schema_migration_check: MigrationGateReport) -> dg.AssetCheckResult:
        from dagster_project.core.database import environment_database
        from dagster_project.core.migrations.drift import check_drift
        from dagster_project.core.migrations.gate import schema_drift

        db = environment_database(spec.product, "staging")
        report = check_drift(db, Path(schema_migration_check.migrations_dir))
        return drift_result(schema_drift(report), "staging")

    @dg.asset_check(
        asset=stage_key(spec, "canary"),
        name="schema_drift",
        blocking=True,
        partitions_def=partitions_def,
        description="Production schema checked for drift before the canary touched it.",
    )
    def production_schema_drift(canary: CanaryStageReport) -> dg.AssetCheckResult:
        return production_drift_result(canary)

    return [migration_lint, migration_safety, staging_schema_drift, production_schema_drift]


def lint_result(report: MigrationGateReport) -> dg.AssetCheckResult:
    findings = report.lint_findings
    if not report.linted_files:
        return dg.AssetCheckResult(
            passed=False, description="no migration files were linted: inconclusive"
        )
    return dg.AssetCheckResult(
        passed=not findings,
        description=f"{len(findings)} finding(s) in {len(report.linted_files)} file(s)",
        metadata={
            "findings": table(findings, FINDING_COLUMNS),
            "files": len(report.linted_files),
            "cached": report.lint_cached,
        },
    )


def safety_result(report: MigrationGateReport) -> dg.AssetCheckResult:
    findings = report.unsafe()
    errors = report.safety_errors
    passed = not findings and not errors
    return dg.AssetCheckResult(
        passed=passed,
        description=(
            "pending migrations are safe"
            if passed
            else f"{len(findings)} finding(s), {len(errors)} error(s):\n"
            + "\n".join(finding_lines(findings, errors))
        ),
        metadata={
            "pending": table([{"file": f} for f in report.pending_before], ["file"]),
            "findings": table(findings, FINDING_COLUMNS),
            "errors": table([{"error": e} for e in errors], ["error"]),
            "waivers": table(report.waivers, ["rule", "file", "line", "reason", "message"]),
        },
    )


def finding_lines(findings: list[Finding], errors: list[str]) -> list[str]:
    """Every finding, whole, as `file:line rule — message — how to fix` (what the CLI prints;
    the metadata tables hold the same)."""
    return [f.line_text() for f in findings] + [f"  error — {e}" for e in errors]


def production_drift_result(canary: CanaryStageReport) -> dg.AssetCheckResult:
    if canary.drift is None:
        if canary.outcome in ("already_live", "superseded"):
            return dg.AssetCheckResult(
                passed=True, description=f"canary {canary.outcome}: production not touched"
            )
        return dg.AssetCheckResult(
            passed=False, description="no drift check recorded for production: inconclusive"
        )
    return drift_result(canary.drift, "production")


def drift_result(drift: SchemaDrift, env: str) -> dg.AssetCheckResult:
    items = drift.differences
    return dg.AssetCheckResult(
        passed=not items,
        description=(
            f"{env} schema matches its migrations"
            if not items
            else f"{env} schema drift: {len(items)} difference(s): "
            + "; ".join(f"{i.change} {i.kind} {i.object}" for i in items[:5])
        ),
        metadata={
            "environment": env,
            "differences": dg.MetadataValue.md(drift.markdown),
            "objects_expected": drift.expected_count,
            "objects_actual": drift.actual_count,
        },
    )
