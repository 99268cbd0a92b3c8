"""The worker_dlq gate's backoff judgement (pure: attempt logs as data) and the contract and
spec fields the timing, crash and priority checks read. The real path (a deployed worker,
SIGKILL, a flood) is in tests/test_smoke.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from dagster_project.core import smoke
from dagster_project.core.smoke import Attempt, CheckFailed, backoff_gaps, judge_backoff
from dagster_project.core.spec import Queue, SpecError, load_spec

PRODUCT = "4pnihc40q-yj"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
# initial 50 ms, x2, capped at 150 ms; up to 100 ms late
QUEUE = Queue(
    name="high",
    max_attempts=5,
    backoff_initial_ms=50,
    backoff_multiplier=2.0,
    backoff_max_ms=150,
    backoff_tolerance_ms=100,
)


def log(gaps_ms: list[float], work_ms: float = 3.0) -> list[Attempt]:
    """An attempt log whose attempts take `work_ms` and are separated by `gaps_ms`."""
    attempts, start = [], T0
    for gap in [None, *gaps_ms]:
        if gap is not None:
            start = attempts[-1].finished + timedelta(milliseconds=gap)
        finished = start + timedelta(milliseconds=work_ms)
        attempts.append(Attempt(started=start, finished=finished, outcome="retry"))
    return attempts


@pytest.mark.parametrize(
    ("gaps", "expected_attempts", "problem"),
    [
        ([50, 100, 150, 150], 5, None),  # exactly the schedule, the cap applied twice
        ([60, 175, 240, 249], 5, None),  # late within the tolerance
        ([46, 96, 146], 4, None),  # early by less than the rounding slack
        ([50, 100], 3, None),  # a retry job: done on attempt 3
        ([30, 100, 150, 150], 5, "attempt 2 started 30 ms after attempt 1 finished, earlier"),
        ([50, 100, 100, 150], 5, "attempt 4 started 100 ms after attempt 3 finished, earlier"),
        ([50, 100, 150, 251], 5, "attempt 5 started 251 ms after attempt 4 finished, later than"),
        ([50, 100, 400, 150], 5, "later than 250 ms (backoff 150 ms"),  # the cap is 150, not 200
        ([50, 201, 150, 150], 5, "later than 200 ms (backoff 100 ms"),
        ([50, 100], 5, "3 attempts in its attempt log, expected 5: too few"),
        ([], 1, "1 attempts in its attempt log, expected 2: too few"),
    ],
)
def test_backoff_judgement(gaps: list[float], expected_attempts: int, problem: str | None) -> None:
    attempts = log(gaps)
    if problem is None:
        detail = judge_backoff(QUEUE, attempts, expected_attempts, "job j")
        assert f"{len(gaps)} gaps within bounds" in detail
        assert "queues.high.backoff_tolerance_ms" in detail
        return
    with pytest.raises(CheckFailed) as failed:
        judge_backoff(QUEUE, attempts, expected_attempts, "job j")
    message = str(failed.value)
    assert problem in message, message
    assert message.startswith("job j: ")
    assert "queue 'high'" in message


def test_gaps_carry_the_capped_schedule_and_bounds() -> None:
    gaps = backoff_gaps(QUEUE, log([50, 100, 150, 150]))
    assert [g.expected_ms for g in gaps] == [50, 100, 150, 150]
    assert [g.attempt for g in gaps] == [2, 3, 4, 5]
    assert all(g.ok for g in gaps)
    assert gaps[0].low_ms == 50 - smoke.BACKOFF_EARLY_SLACK_MS
    assert gaps[0].high_ms == 150


def test_gap_is_measured_from_finish_to_start_not_start_to_start() -> None:
    # Attempts of 400 ms: start-to-start would be 450 ms, far above 50 + 100.
    detail = judge_backoff(QUEUE, log([50], work_ms=400), 2, "job j")
    assert "50 ms (expected 50)" in detail


# --- the fields the checks read ----------------------------------------------------------------


def test_sample_contract_and_spec_name_the_timing_probes_and_bounds() -> None:
    spec = load_spec(PRODUCT)
    probes = spec.contract.worker.probes
    first = spec.queues.ordered[0]
    assert probes.retry is not None and 0 < probes.retry.fails < first.max_attempts
    assert probes.slow is not None and probes.slow.duration_ms >= 1000
    assert spec.contract.worker.recognise.attempt_log is not None
    assert first.priority_max_wait_ms is not None
    # A flood is more work than the bound, so a worker ignoring priority cannot pass.
    assert probes.flood is not None
    assert probes.flood.count * probes.flood.duration_ms > 1.5 * first.priority_max_wait_ms
    assert all(q.backoff_tolerance_ms > 0 for q in spec.queues.ordered)


def _copy_product(tmp_path: Path, edit_contract: Any) -> Path:
    import shutil

    from dagster_project.core.settings import product_dir

    target = tmp_path / PRODUCT
    shutil.copytree(product_dir(PRODUCT), target)
    path = target / "contract.yaml"
    raw = yaml.safe_load(path.read_text())
    edit_contract(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return target


def test_retry_probe_failing_every_attempt_is_a_contract_error(tmp_path: Path) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["worker"]["probes"]["retry"]["fails"] = 4  # high has max_attempts 4

    folder = _copy_product(tmp_path, edit)
    with pytest.raises(SpecError) as failed:
        load_spec(folder / "product.yaml")
    message = str(failed.value)
    assert "contract.yaml:" in message
    assert "worker.probes.retry.fails" in message
    assert "max_attempts 4" in message


def test_slow_probe_shorter_than_the_floor_is_a_contract_error(tmp_path: Path) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["worker"]["probes"]["slow"]["duration_ms"] = 50

    folder = _copy_product(tmp_path, edit)
    with pytest.raises(SpecError) as failed:
        load_spec(folder / "product.yaml")
    assert "worker.probes.slow.duration_ms" in str(failed.value)
