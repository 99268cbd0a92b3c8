"""Gates on the schema: lint (sqlfluff), safety (squawk + own rules, backward compatibility,
history) on `schema_migration_check`, and schema drift on staging (after applying) and on
production (before the canary touches it)."""

from pathlib import Path
from typing import Any

import dagster as dg

from assets.common import stage_key, table
from assets.schema_migration import drift_as_dict
from dagster_project.core.spec import ProductSpec


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
    def migration_lint(schema_migration_check: dict[str, Any]) -> dg.AssetCheckResult:
        lint = schema_migration_check["lint"]
        findings = lint["findings"]
        if not lint["files"]:
            return dg.AssetCheckResult(
                passed=False, description="no migration files were linted: inconclusive"
            )
        return dg.AssetCheckResult(
            passed=not findings,
            description=f"{len(findings)} finding(s) in {len(lint['files'])} file(s)",
            metadata={
                "findings": table(findings, ["file", "line", "rule", "description"]),
                "files": len(lint["files"]),
                "cached": lint["cached"],
            },
        )

    @dg.asset_check(
        asset=target,
        name="migration_safety",
        blocking=True,
        partitions_def=partitions_def,
        description="Pending migrations: locking/rewriting operations (squawk and own rules), "
        "backward compatibility with the running version, checksum history.",
    )
    def migration_safety(schema_migration_check: dict[str, Any]) -> dg.AssetCheckResult:
        return safety_result(schema_migration_check)

    @dg.asset_check(
        asset=target,
        name="schema_drift",
        blocking=True,
        partitions_def=partitions_def,
        description="Live staging schema equals the schema its recorded migrations define.",
    )
    def staging_schema_drift(schema_migration_check: dict[str, Any]) -> dg.AssetCheckResult:
        from dagster_project.core.migrations.drift import check_drift

        report = check_drift("staging", Path(schema_migration_check["migrations_dir"]))
        return drift_result(drift_as_dict(report), "staging")

    @dg.asset_check(
        asset=stage_key(spec, "canary"),
        name="schema_drift",
        blocking=True,
        partitions_def=partitions_def,
        description="Production schema checked for drift before the canary touched it.",
    )
    def production_schema_drift(canary: dict[str, Any]) -> dg.AssetCheckResult:
        if "drift" not in canary:
            if canary.get("outcome") in ("already_live", "superseded"):
                return dg.AssetCheckResult(
                    passed=True,
                    description=f"canary {canary['outcome']}: production not touched",
                )
            return dg.AssetCheckResult(
                passed=False, description="no drift check recorded for production: inconclusive"
            )
        return drift_result(canary["drift"], "production")

    return [migration_lint, migration_safety, staging_schema_drift, production_schema_drift]


def safety_result(report: dict[str, Any]) -> dg.AssetCheckResult:
    safety = report["safety"]
    problems = [
        {"file": "(history)", "line": "", "rule": "history", "message": p}
        for p in report["plan"]["problems"]
    ]
    findings = list(safety["findings"]) + list(report["compat"]) + problems
    errors = list(safety.get("errors", []))
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
            "pending": table([{"file": f} for f in report["plan"]["pending"]], ["file"]),
            "findings": table(findings),
            "errors": table([{"error": e} for e in errors], ["error"]),
            "waivers": table(safety.get("waivers", [])),
        },
    )


def finding_lines(findings: list[dict[str, Any]], errors: list[str]) -> list[str]:
    """Every finding, whole, as `file:line rule — message — how to fix` (what the CLI prints;
    the metadata tables hold the same)."""
    lines = []
    for f in findings:
        where = Path(str(f.get("file", ""))).name or "(unknown file)"
        if f.get("line"):
            where += f":{f['line']}"
        fix = str(f.get("help") or "").strip()
        lines.append(
            f"  {where} {f.get('rule', '?')} — {str(f.get('message', f)).strip()}"
            + (f" — {fix}" if fix else "")
        )
    lines.extend(f"  error — {e}" for e in errors)
    return lines


def drift_result(drift: dict[str, Any], env: str) -> dg.AssetCheckResult:
    items = drift["items"]
    return dg.AssetCheckResult(
        passed=not items,
        description=(
            f"{env} schema matches its migrations"
            if not items
            else f"{env} schema drift: {len(items)} difference(s): "
            + "; ".join(f"{i['change']} {i['kind']} {i['object']}" for i in items[:5])
        ),
        metadata={
            "environment": env,
            "differences": dg.MetadataValue.md(drift.get("markdown", "")),
            "objects_expected": drift.get("expected_count", 0),
            "objects_actual": drift.get("actual_count", 0),
        },
    )
