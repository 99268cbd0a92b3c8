"""The fault matrix, part 1, through the real path from a promoted baseline: the pipeline and
the platform's own processes killed at the worst moments, Postgres stopped mid-canary. After
each, `production_is_whole` (fault_matrix.py) holds. Part 2: test_production_races.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_matrix import (
    finish,
    pid_of,
    production_is_whole,
    promoted_platform,
    start_deploy,
    version_counter,
    wait_for,
    wait_for_canary_weight,
)

from conftest import PRODUCT
from dagster_project import deploy as deploy_cli
from dagster_project.core import changes, ownership

pytestmark = pytest.mark.slow

_next_version = version_counter("1")


@pytest.fixture(scope="module")
def platform() -> Iterator[object]:
    yield from promoted_platform("f1.0.0")


# -- the faults -------------------------------------------------------------------------------


def test_sigkill_of_deploy_at_25_percent(platform: object, release_home: Path) -> None:
    before = platform.current("production")["stable"]["version"]  # type: ignore[attr-defined]
    version = _next_version()
    proc = start_deploy(version, log=release_home / f"deploy-{version}.log")
    wait_for_canary_weight(platform, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert production_is_whole(platform, release_home) == before
    aborted = [c for c in changes.for_release(PRODUCT, version) if c.outcome == "aborted"]
    assert len(aborted) == 1 and aborted[0].details.reconciled is True
    # The Dagster run the killed process left STARTED was marked failed by the reconciliation
    # of the next command (`release status` in production_is_whole).
    from dagster_project.instance import get_instance

    instance = get_instance()
    assert instance.get_run_by_id(aborted[0].run_id).status.value == "FAILURE"


def test_postgres_stopped_at_25_percent_and_restarted(platform: object, release_home: Path) -> None:
    from dagster_project.core import database

    if os.environ.get(database.ENV_URL):
        pytest.skip("stops the embedded server; an external one is not ours to stop")
    before = platform.current("production")["stable"]["version"]  # type: ignore[attr-defined]
    version = _next_version()
    proc = start_deploy(version, log=release_home / f"deploy-{version}.log")
    wait_for_canary_weight(platform, 25, proc)
    assert database.stop_embedded()
    time.sleep(5)
    database._servers.clear()
    database.server()  # the embedded server again, same data directory and socket
    code = finish(proc)
    assert code != deploy_cli.EXIT_OK
    assert production_is_whole(platform, release_home) == before


@pytest.mark.parametrize(
    ("track", "role"), [("canary", "api"), ("stable", "api"), ("edge", "edge")]
)
def test_sigkill_of_a_platform_process_during_a_step(
    platform: object, release_home: Path, track: str, role: str
) -> None:
    before = platform.current("production")["stable"]  # type: ignore[attr-defined]
    edge_url = platform.edge_url("production")  # type: ignore[attr-defined]
    version = _next_version()
    proc = start_deploy(version, log=release_home / f"deploy-{version}.log")
    wait_for_canary_weight(platform, 25, proc)
    os.kill(pid_of(platform, track, role), signal.SIGKILL)
    code = finish(proc)
    log = (release_home / f"deploy-{version}.log").read_text()
    # A step during which a track or the edge was down cannot pass: the step guard names the
    # outage, or, when the metrics source sees the restarted API's counters reset first, the
    # judge fails closed on that restart (whichever comes first in the step).
    assert code == deploy_cli.EXIT_BLOCKED, log[-3000:]
    assert "outage" in log or "counters went backwards" in log, log[-3000:]
    assert production_is_whole(platform, release_home) == before["version"]
    # Restarted on the same address: the environment's edge URL never moves.
    assert platform.edge_url("production") == edge_url  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("phase", "after"),
    [
        ("promoting", 1.0),  # in the watch: the new version at 100%, the old one at 0%
        # deciding done, the switch under way: the old stable is being stopped or is gone
        # while the fresh stable starts; the reconciler finishes the promotion
        ("switching", 0.0),
    ],
)
def test_sigkill_during_promotion(
    platform: object, release_home: Path, phase: str, after: float
) -> None:
    version = _next_version()
    log = release_home / f"deploy-{version}.log"
    proc = start_deploy(version, log=log)
    wait_for(
        f"promotion to reach {phase}",
        lambda: (
            (owner := ownership.current(PRODUCT, "production")) is not None and owner.phase == phase
        ),
        proc=proc,
    )
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    served = production_is_whole(platform, release_home)
    recorded = changes.for_release(PRODUCT, version)
    assert len(recorded) == 1, recorded
    # Either the switch had happened (promoted) or production went back (aborted).
    assert (recorded[0].outcome == "promoted") == (served == version)
    if phase == "switching":  # decided: never undone
        assert served == version and recorded[0].outcome == "promoted", recorded
