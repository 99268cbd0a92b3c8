"""Helpers for the gates: a verdict from report rows that never passes on no data."""

from collections.abc import Sequence
from typing import Any

import dagster as dg

from assets.common import table


def rows_result(
    rows: Sequence[dict[str, Any]],
    *,
    what: str,
    columns: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dg.AssetCheckResult:
    """Pass only when there is at least one row and every row passed."""
    failed = [r for r in rows if not r.get("passed")]
    if not rows:
        return dg.AssetCheckResult(
            passed=False,
            description=f"{what}: inconclusive, no results recorded (no data is never a pass)",
            metadata={"verdict": "inconclusive", **(extra or {})},
        )
    passed = not failed
    names = ", ".join(str(r.get("name", "?")) for r in failed[:5])
    return dg.AssetCheckResult(
        passed=passed,
        description=f"{what}: {len(rows) - len(failed)}/{len(rows)} passed"
        + ("" if passed else f"; failed: {names}"),
        metadata={
            "verdict": "pass" if passed else "fail",
            "results": table(rows, columns),
            **(extra or {}),
        },
    )
