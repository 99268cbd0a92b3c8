"""`release rollback`: which release it returns to (a pure table); the real path is in
tests/test_production_faults.py (it needs a promoted baseline)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dagster_project.core.changes import ProductionChange
from dagster_project.core.rollback import RollbackRefused, choose_target


def _change(
    i: int, release: str, sha: str, outcome: str = "promoted", **details: str
) -> ProductionChange:
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
        details,
    )


def _rollback(i: int, removed: str, removed_sha: str, restored: str, restored_sha: str):
    return _change(
        i,
        removed,
        removed_sha,
        "rolled_back",
        restored_release=restored,
        restored_artifact_sha256=restored_sha,
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
        # `release rollback` to 1.1.0: rolling back again returns to 1.2.0
        ([*HISTORY, _rollback(5, "1.1.0", "b", "1.1.0", "b")], "b", None, ("1.2.0", "c")),
        # 1.3.0 failed its watch and 1.2.0 took production back: 1.3.0 is never a target
        ([*HISTORY, _rollback(5, "1.3.0", "d", "1.2.0", "c")], "c", None, ("1.1.0", "b")),
        ([*HISTORY, _rollback(5, "1.3.0", "d", "1.2.0", "c")], "c", "1.3.0", RollbackRefused),
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
