"""`release rollback`: which release it returns to (a pure table); the real path is in
tests/test_production_faults.py (it needs a promoted baseline)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dagster_project.core.changes import ProductionChange
from dagster_project.core.rollback import RollbackRefused, choose_target


def _change(i: int, release: str, sha: str, outcome: str = "promoted") -> ProductionChange:
    return ProductionChange(
        i,
        f"p/{release}/{outcome}/{i}",
        "p",
        release,
        outcome,
        sha,
        None,
        f"r{i}",
        datetime(2026, 1, 1, tzinfo=UTC),
    )


HISTORY = [
    _change(1, "1.0.0", "a"),
    _change(2, "1.1.0", "b", "aborted"),  # an aborted canary never served as stable
    _change(3, "1.1.0", "b"),
    _change(4, "1.2.0", "c"),
]


@pytest.mark.parametrize(
    ("history", "live", "to", "expected"),
    [
        (HISTORY, "c", None, ("1.1.0", "b")),  # the previous promoted release
        (HISTORY, "c", "1.0.0", ("1.0.0", "a")),  # a named, previously promoted release
        ([*HISTORY, _change(5, "1.1.0", "b", "rolled_back")], "b", None, ("1.2.0", "c")),
        (HISTORY[:2], "a", None, RollbackRefused),  # nothing earlier was promoted
        (HISTORY, "c", "9.9.9", RollbackRefused),  # never promoted
        (HISTORY, "c", "1.2.0", RollbackRefused),  # already live
        (HISTORY, None, None, RollbackRefused),  # nothing live
        ([_change(1, "1.0.0", "a"), _change(2, "1.0.0", "a2")], "a2", "1.0.0", RollbackRefused),
    ],
)
def test_choose_target(history, live, to, expected) -> None:
    if expected is RollbackRefused:
        with pytest.raises(RollbackRefused):
            choose_target(history, live, to)
        return
    target = choose_target(history, live, to)
    assert (target.release, target.artifact_sha256) == expected
