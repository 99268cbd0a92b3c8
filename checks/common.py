"""Helpers for the gates: a verdict from smoke rows that never passes on no data."""

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from assets.common import table
from dagster_project.core.contracts import SmokeReport, SmokeRow

COLUMNS = ["name", "passed", "detail"]


def section_rows(report: SmokeReport | None, section: str) -> list[SmokeRow]:
    return report.section_rows(section) if report is not None else []


def rows_result(
    rows: Sequence[SmokeRow],
    *,
    what: str,
    columns: Sequence[str] | None = COLUMNS,
    extra: Mapping[str, Any] | None = None,
    details: bool = False,
) -> dg.AssetCheckResult:
    """Pass only when there is at least one row and every row passed. `details`: the
    description also carries the failed rows' details (what broke, e.g. which rule)."""
    failed = [r for r in rows if not r.passed]
    if not rows:
        return dg.AssetCheckResult(
            passed=False,
            description=f"{what}: inconclusive, no results recorded (no data is never a pass)",
            metadata={"verdict": "inconclusive", **(extra or {})},
        )
    passed = not failed
    names = ", ".join(r.name for r in failed[:5])
    return dg.AssetCheckResult(
        passed=passed,
        description=f"{what}: {len(rows) - len(failed)}/{len(rows)} passed"
        + ("" if passed else f"; failed: {names}")
        + (f" ({'; '.join(r.detail[:300] for r in failed[:5])})" if details and failed else ""),
        metadata={
            "verdict": "pass" if passed else "fail",
            "results": table(rows, columns),
            **(extra or {}),
        },
    )
