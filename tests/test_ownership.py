"""Ownership of an environment: the pure liveness rule as a table, then the real thing on the
session's Postgres (acquire, re-entry, wait and refuse, take over a dead owner, heartbeat)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dagster_project.core import database, ownership
from dagster_project.core.ownership import OwnerFacts, ProductionOwned, judge_owner
from dagster_project.core.reconcile import finishes_promotion, production_decision

STALE = 30.0


@pytest.mark.parametrize(
    ("facts", "alive", "why"),
    [
        (OwnerFacts(1.0, True, True, True), True, "alive"),
        (OwnerFacts(1.0, True, True, None), True, "alive"),
        (OwnerFacts(1.0, True, False, True), False, "process is gone"),
        (OwnerFacts(1.0, True, False, None), False, "process is gone"),
        (OwnerFacts(1.0, True, True, False), False, "no longer in progress"),
        (OwnerFacts(31.0, True, True, True), False, "heartbeat is 31s old"),
        (OwnerFacts(31.0, False, None, None), False, "heartbeat"),
        (OwnerFacts(1.0, False, None, None), True, "alive"),  # another host: heartbeat decides
        (OwnerFacts(1.0, False, None, False), False, "no longer in progress"),
    ],
)
def test_owner_liveness_table(facts: OwnerFacts, alive: bool, why: str) -> None:
    verdict = judge_owner(facts, stale_after_seconds=STALE)
    assert verdict.alive is alive
    assert why in verdict.reason


@pytest.mark.parametrize(
    ("phase", "owner", "previous", "stable", "canary", "outcome", "finish"),
    [
        # died during the canary: stable untouched
        ("canary", "new", "old", "old", "new", "aborted", False),
        ("parked", "new", "old", "old", "new", "aborted", False),  # died with its canary parked
        # died after the promotion switched
        ("promoting", "new", "old", "new", None, "promoted", False),
        # died in the watch, before the switch: the old stable, kept at 0%, takes it back
        ("promoting", "new", "old", "old", "new", "aborted", False),
        # died switching: the reconciler finishes the promotion, whether the old stable still
        # runs at 0% or was already stopped, or the fresh stable already serves
        ("switching", "new", "old", "old", "new", "promoted", True),
        ("switching", "new", "old", None, "new", "promoted", True),
        ("switching", "new", None, None, "new", "promoted", True),  # a first release
        ("switching", "new", "old", "new", "new", "promoted", False),
        ("switching", "new", "old", "new", None, "promoted", False),
        # switching but its canary is gone: nothing of it to promote, back to stable
        ("switching", "new", "old", "old", None, "aborted", False),
        ("switching", "new", "old", "old", "other", "aborted", False),
        ("canary", "new", None, None, "new", "aborted", False),  # first release, before promotion
        ("promoting", "new", None, "new", None, "promoted", False),  # first, after promotion
        # drift checks, migrations: nothing moved
        ("preparing", "new", "old", "old", None, None, False),
        # already live: nothing changed hands
        ("promoting", "same", "same", "same", None, None, False),
        ("switching", "same", "same", "same", None, None, False),
        # rollback died after promote
        ("rollback", "target", "live", "target", None, "rolled_back", False),
        ("rollback", "target", "live", "live", "target", "aborted", False),  # died mid-shift
        ("staging", "new", None, None, None, None, False),
    ],
)
def test_what_a_dead_owner_did(
    phase: str,
    owner: str,
    previous: str | None,
    stable: str | None,
    canary: str | None,
    outcome: str | None,
    finish: bool,
) -> None:
    decided = production_decision(
        phase=phase,
        owner_artifact=owner,
        owner_previous=previous,
        stable_artifact=stable,
        canary_artifact=canary,
    )
    assert decided == outcome
    assert finishes_promotion(decided, owner, stable) is finish


def _acquire(
    run_id: str,
    *,
    wait: float = 0.0,
    in_progress: bool | None = None,
    settles: bool = True,
    taken: list[tuple[str, str]] | None = None,
    **kw: object,
):
    """Acquire production of "own-test"; a dead owner is handed to a stand-in reconciler that
    records it in `taken` and releases it (keeps it when not `settles`)."""
    taken = [] if taken is None else taken

    def take_over(owner: ownership.Owner, why: str) -> None:
        taken.append((owner.run_id, why))
        if settles:
            ownership.release(owner.product, owner.env, owner.run_id)

    owner = ownership.acquire(
        "own-test",
        "production",
        run_id=run_id,
        release=str(kw.get("release", "1.0.0")),
        artifact_sha256="a" * 64,
        previous_artifact_sha256=None,
        phase="canary",
        wait_seconds=wait,
        stale_after_seconds=STALE,
        run_in_progress=lambda run: in_progress,
        take_over=take_over,
    )
    return owner, taken


@pytest.mark.slow
def test_one_owner_at_a_time_reentrant_and_released() -> None:
    owner, _ = _acquire("run-a")
    assert owner.run_id == "run-a"
    again, _ = _acquire("run-a")  # the same run, a later stage: re-entrant
    assert again.run_id == "run-a"
    started = time.monotonic()
    with pytest.raises(ProductionOwned) as refused:
        _acquire("run-b", wait=1.5)
    assert time.monotonic() - started >= 1.5  # waited within the bound, then refused
    message = str(refused.value)
    assert "release 1.0.0" in message and "owner_wait_seconds" in message
    assert ownership.release("own-test", "production", "run-b") is False  # not the owner
    assert ownership.release("own-test", "production", "run-a") is True
    assert ownership.current("own-test", "production") is None


@pytest.mark.slow
def test_a_dead_owner_is_handed_to_the_reconciler() -> None:
    # An owner whose process is gone: a child that records ownership, then exits.
    code = (
        "from dagster_project.core import ownership;"
        "ownership.acquire('own-test','production',run_id='run-dead',release='0.9',"
        "artifact_sha256='b'*64,previous_artifact_sha256=None,phase='canary',wait_seconds=0,"
        "stale_after_seconds=30,run_in_progress=lambda r: None,take_over=lambda o, w: None)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert ownership.current("own-test", "production").run_id == "run-dead"
    owner, taken = _acquire("run-c")
    assert owner.run_id == "run-c"
    assert taken == [("run-dead", "its process is gone")]
    ownership.release("own-test", "production", "run-c")


@pytest.mark.slow
def test_a_dead_owner_the_reconciler_cannot_settle_is_waited_for_then_refused() -> None:
    """The reconciler keeps a dead owner it could not settle (a promotion it could not finish
    yet): acquiring waits within its bound and is refused, naming the owner, instead of
    handing it over again and again."""
    _acquire("run-unsettled", release="0.8")
    taken: list[tuple[str, str]] = []
    started = time.monotonic()
    with pytest.raises(ProductionOwned) as refused:
        # its Dagster run ended: dead; the reconciler keeps it
        _acquire("run-g", wait=2.0, in_progress=False, settles=False, taken=taken)
    assert 2.0 <= time.monotonic() - started < 10
    assert "release 0.8" in str(refused.value)
    assert taken and {run for run, _ in taken} == {"run-unsettled"} and len(taken) <= 5, taken
    assert ownership.release("own-test", "production", "run-unsettled") is True


@pytest.mark.slow
def test_a_finished_run_no_longer_owns() -> None:
    _acquire("run-d")
    owner, taken = _acquire("run-e", in_progress=False)
    assert owner.run_id == "run-e"
    assert taken == [("run-d", "its Dagster run is no longer in progress")]
    ownership.release("own-test", "production", "run-e")


@pytest.mark.slow
def test_heartbeat_refreshes_and_notices_a_take_over() -> None:
    _acquire("run-f")
    with ownership.heartbeat_while("own-test", "production", "run-f") as beat:
        time.sleep(ownership.HEARTBEAT_INTERVAL_SECONDS * 1.5)
        assert ownership.current("own-test", "production").heartbeat_age_seconds < 2.5
        assert beat.lost is None
        with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM platform.owners WHERE run_id = 'run-f'")  # a take-over
        time.sleep(ownership.HEARTBEAT_INTERVAL_SECONDS * 1.5)
        assert beat.lost is not None and "taken over" in beat.lost


@pytest.mark.slow
def test_reconcile_sensor_takes_over_a_dead_staging_owner() -> None:
    """The daemon's reconciler through Dagster's test API: a run that died while it owned
    staging is released, and its Dagster run (left STARTED) is marked failed."""
    import dagster as dg

    from conftest import PRODUCT
    from dagster_project.definitions import defs
    from dagster_project.instance import get_instance

    instance = get_instance()
    run = instance.create_run_for_job(
        defs.resolve_job_def("audit_" + PRODUCT.replace("-", "_")), run_id=None
    )
    instance.handle_run_event(
        run.run_id,
        dg.DagsterEvent(
            event_type_value="PIPELINE_START", job_name=run.job_name, message="started"
        ),
    )
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    code = (
        "from dagster_project.core import ownership;"
        f"ownership.acquire({PRODUCT!r},'staging',run_id={run.run_id!r},release='0.0.1',"
        "artifact_sha256='c'*64,previous_artifact_sha256=None,phase='staging',wait_seconds=0,"
        "stale_after_seconds=30,run_in_progress=lambda r: None,take_over=lambda o, w: None)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    sensor = next(s for s in defs.sensors if s.name.startswith("reconcile_sensor_"))
    result = sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SkipReason)
    assert "staging: owner 0.0.1" in result.skip_message
    assert "its process is gone" in result.skip_message
    assert ownership.current(PRODUCT, "staging") is None
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
