"""The automations (release sensor, nightly release train, post-deploy verification) through
Dagster's test APIs and through the real daemon, and the product's concurrency pool on the launch
paths: an in-process run (how the CLI runs) and the run queue (UI, backfill, schedule, sensor)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import pytest

from assets import release_pool
from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project.core.spec import ProductSpec, load_spec
from dagster_project.core.versioning import default_release_version
from dagster_project.jobs import PRODUCT_TAG, release_job_name
from dagster_project.partitions import register_release, releases_partitions_name
from dagster_project.resources import ApprovalResource, PlatformResource
from dagster_project.schedules import live_in_production, release_schedules
from dagster_project.sensors import release_sensors

ROOT = Path(__file__).resolve().parents[1]
SLUG = PRODUCT.replace("-", "_")
DAEMON = ROOT / ".venv" / "bin" / "dagster-daemon"
NOTHING_DEPLOYED = "nothing is deployed to production"
T = TypeVar("T")


def _spec() -> ProductSpec:
    return load_spec(PRODUCT)


def _release_sensor() -> dg.SensorDefinition:
    return next(s for s in release_sensors(_spec()) if s.name == f"release_sensor_{SLUG}")


def _schedule(prefix: str) -> dg.ScheduleDefinition:
    return next(s for s in release_schedules(_spec()) if s.name.startswith(prefix))


class _FakeProduction:
    def __init__(self, live: str | None) -> None:
        self.live = live

    def current(self, env: str) -> dict[str, dict[str, str | None]]:
        assert env == "production"
        return {"stable": {"version": self.live, "artifact_sha": "0" * 64}} if self.live else {}


class FakePlatform(PlatformResource):
    """Production as the test says it is; never starts anything."""

    live: str = ""

    def for_product(self, product_id: str) -> Any:
        assert product_id == PRODUCT
        return _FakeProduction(self.live or None)


class UntouchablePlatform(PlatformResource):
    def for_product(self, product_id: str) -> Any:
        raise AssertionError("the platform was used")


def _wait_for(what: str, probe: Callable[[], T | None], deadline: float, every: float = 0.5) -> T:
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


# -- release sensor ---------------------------------------------------------------------------


def test_release_sensor_registers_the_current_source_once() -> None:
    instance = dg.DagsterInstance.ephemeral()
    sensor = _release_sensor()
    version = default_release_version(_spec())

    result = sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SensorResult)
    (request,) = result.dynamic_partitions_requests or []
    assert isinstance(request, dg.AddDynamicPartitionsRequest)
    assert request.partitions_def_name == releases_partitions_name(PRODUCT)
    assert list(request.partition_keys) == [version]
    assert result.cursor == version
    assert not result.run_requests  # it registers; the train or a person releases

    # The next tick with the same source skips, by cursor ...
    again = sensor(dg.build_sensor_context(instance=instance, cursor=version))
    assert isinstance(again, dg.SkipReason)
    assert version in (again.skip_message or "")
    # ... and without a cursor once the release is registered (deploy registers it too).
    instance.add_dynamic_partitions(releases_partitions_name(PRODUCT), [version])
    known = sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(known, dg.SkipReason)


# -- nightly release train --------------------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[dg.DagsterInstance]:
    """A persistent throwaway instance (schedule contexts need one), DAGSTER_HOME untouched."""
    with dg.instance_for_test(set_dagster_home=False) as instance:
        yield instance


def _train_context(
    instance: dg.DagsterInstance, platform: PlatformResource
) -> dg.ScheduleEvaluationContext:
    return dg.build_schedule_context(
        instance=instance,
        resources={"platform": platform, "approval": ApprovalResource()},
        scheduled_execution_time=datetime(2026, 1, 2, 2, 0, tzinfo=UTC),
    )


@pytest.mark.parametrize("token", [None, "tpt-wrong-token"])
def test_nightly_train_skips_without_the_right_token_before_any_work(
    token: str | None, scratch: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    if token is None:
        monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    else:
        monkeypatch.setenv("GUARDRAIL_TOKEN", token)
    instance = scratch
    register_release(instance, PRODUCT, "1.0.0")

    def no_work(*_: object, **__: object) -> None:
        raise AssertionError("the train looked at releases without the token")

    monkeypatch.setattr(dg.DagsterInstance, "get_dynamic_partitions", no_work)
    result = _schedule("nightly_release_train")(_train_context(instance, UntouchablePlatform()))
    assert isinstance(result, dg.SkipReason)
    message = result.skip_message or ""
    assert "GUARDRAIL_TOKEN" in message
    assert GUARDRAIL_TOKEN not in message
    if token:
        assert token not in message


def test_nightly_train_releases_the_newest_release_not_in_production(
    guardrail_token: str, scratch: dg.DagsterInstance
) -> None:
    instance = scratch
    train = _schedule("nightly_release_train")
    assert train.job_name == release_job_name(PRODUCT)

    nothing = train(_train_context(instance, UntouchablePlatform()))
    assert isinstance(nothing, dg.SkipReason)
    assert "no release registered" in (nothing.skip_message or "")

    for version in ("1.0.0", "1.1.0"):
        register_release(instance, PRODUCT, version)
    request = train(_train_context(instance, FakePlatform(live="1.0.0")))
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "1.1.0"
    assert request.run_key == "train-1.1.0-20260102"
    assert guardrail_token not in repr(request)  # the token never rides in run config or tags

    from dagster_project.definitions import defs

    job = defs.resolve_job_def(release_job_name(PRODUCT))
    assert job.tags[PRODUCT_TAG] == PRODUCT
    assert dg.validate_run_config(job, request.run_config)

    live = train(_train_context(instance, FakePlatform(live="1.1.0")))
    assert isinstance(live, dg.SkipReason)
    assert "already in production" in (live.skip_message or "")


# -- post-deploy verification -----------------------------------------------------------------


def _verification() -> tuple[dg.ScheduleDefinition, dg.JobDefinition]:
    schedule = _schedule("post_deploy_verification")
    job = schedule.job
    assert isinstance(job, dg.JobDefinition)
    return schedule, job


def test_verification_schedule_requests_a_valid_run_of_its_job(
    scratch: dg.DagsterInstance,
) -> None:
    schedule, job = _verification()
    assert schedule.cron_schedule == "0 * * * *"
    data = schedule.evaluate_tick(dg.build_schedule_context(instance=scratch))
    (request,) = data.run_requests or []
    assert dg.validate_run_config(job, request.run_config)
    assert job.tags[PRODUCT_TAG] == PRODUCT
    (node,) = job.nodes
    assert node.definition.pool == release_pool(PRODUCT)


def test_verification_fails_clearly_when_nothing_is_deployed() -> None:
    _, job = _verification()
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"platform": FakePlatform()},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert NOTHING_DEPLOYED in failure.step_failure_data.error.to_string()


@pytest.mark.parametrize("passed", [True, False])
def test_verification_judges_the_post_deploy_smoke(
    passed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster_project.core import smoke

    seen: list[str] = []

    class Report:
        def to_dict(self) -> dict[str, Any]:
            return {
                "rows": [{"name": "GET /v1/items", "passed": True}, {"name": "x", "passed": passed}]
            }

    def fake_smoke(spec: ProductSpec, platform: Any, version: str) -> Report:
        seen.append(version)
        return Report()

    monkeypatch.setattr(smoke, "post_deploy_smoke", fake_smoke)
    _, job = _verification()
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"platform": FakePlatform(live="2.0.0")},
        raise_on_error=False,
    )
    assert seen == ["2.0.0"]
    assert result.success is passed


# -- the product's pool on the launch paths ---------------------------------------------------


def test_instance_limits_each_pool_to_one_step_at_a_time() -> None:
    from dagster._core.instance.config import PoolGranularity

    from dagster_project.instance import get_instance

    instance = get_instance()
    config = instance.get_concurrency_config()
    assert config.pool_config.pool_granularity == PoolGranularity.OP
    assert config.pool_config.default_pool_limit == 1
    assert {
        "key": PRODUCT_TAG,
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in config.run_queue_config.tag_concurrency_limits
    assert instance.event_log_storage.supports_global_concurrency_limits
    assert instance.run_monitoring_settings.get("free_slots_after_run_end_seconds")


@contextlib.contextmanager
def _pool_held(instance: dg.DagsterInstance, pool: str) -> Iterator[Callable[[], None]]:
    """The product's only slot, claimed by another (fake) run; yields a function freeing it."""
    storage = instance.event_log_storage
    holder = f"pool-holder-{uuid.uuid4().hex}"
    if pool not in storage.get_concurrency_keys():
        # As the executor does on first use. (Only then: on Postgres, dagster 1.13.27 fails to
        # re-initialise a pool that exists, its INSERT conflict aborting the transaction.)
        storage.initialize_concurrency_limit_to_default(pool)
    assert storage.get_concurrency_info(pool).slot_count == 1
    assert storage.claim_concurrency_slot(pool, holder, "holder_step", 0).is_claimed

    def free() -> None:
        storage.free_concurrency_slots_for_run(holder)

    try:
        yield free
    finally:
        free()


def _events(instance: dg.DagsterInstance, run_id: str) -> list[dg.EventLogEntry]:
    return list(instance.all_logs(run_id))


@pytest.mark.parametrize("job_name", ["__ASSET_JOB", release_job_name(PRODUCT)])
def test_an_in_process_run_waits_for_the_product_pool(job_name: str) -> None:
    """`execute_job` in-process (the CLI's way; `__ASSET_JOB` is what the UI launches from the
    asset graph) bypasses the run queue, yet its executor claims the pool slot before the stage's
    step starts. The stage fails right after, on its missing input: nothing touches staging."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from dagster_project.instance import get_instance

    instance = get_instance()
    pool = release_pool(PRODUCT)
    release = f"0.0.0-pool-{uuid.uuid4().hex[:8]}"
    register_release(instance, PRODUCT, release)
    recon = ReconstructableRepository.for_module(
        "dagster_project.definitions", "defs", working_directory=str(ROOT)
    ).get_reconstructable_job(job_name)
    invocation = uuid.uuid4().hex
    outcome: dict[str, Any] = {}

    def launch() -> None:
        result = dg.execute_job(
            recon,
            instance=instance,
            asset_selection=[dg.AssetKey([PRODUCT, "schema_migration_check"])],
            tags={"dagster/partition": release, "test/invocation": invocation},
            raise_on_error=False,
        )
        outcome["run_id"], outcome["success"] = result.run_id, result.success

    step = f"{SLUG}__schema_migration_check"
    runner = threading.Thread(target=launch, daemon=True)
    with _pool_held(instance, pool) as free:
        runner.start()
        deadline = time.monotonic() + 60
        run = _wait_for(
            "the run",
            lambda: next(
                iter(instance.get_runs(dg.RunsFilter(tags={"test/invocation": invocation}))), None
            ),
            deadline,
        )
        blocked = _wait_for(
            "the step to wait for the pool",
            lambda: [
                e
                for e in _events(instance, run.run_id)
                if e.step_key == step and f"blocked by limit for pool {pool}" in (e.message or "")
            ],
            deadline,
        )
        time.sleep(2)  # a few claim retries: still waiting
        started = [
            e
            for e in _events(instance, run.run_id)
            if e.is_dagster_event and e.dagster_event.is_step_start
        ]
        assert not started, "the step started while another run held the product's pool"
        freed_at = time.time()
        free()
        runner.join(timeout=60)
    assert not runner.is_alive()
    assert outcome["run_id"] == run.run_id and outcome["success"] is False
    starts = [
        e
        for e in _events(instance, run.run_id)
        if e.is_dagster_event and e.dagster_event.is_step_start and e.step_key == step
    ]
    assert starts and starts[0].timestamp >= freed_at > blocked[0].timestamp
    # The step gave its slot back when it ended: the pool is free for the next release.
    assert not instance.event_log_storage.get_concurrency_info(pool).claimed_slots


# -- one run each through the real daemon -----------------------------------------------------


@contextlib.contextmanager
def _daemon(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(DAEMON), "run", "-w", "workspace.yaml"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the code server and run workers too
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left


def _finished_tick(instance: dg.DagsterInstance, remote: Any) -> Any:
    from dagster._core.scheduler.instigation import TickStatus

    ticks = instance.get_ticks(remote.get_remote_origin_id(), remote.selector_id, limit=1)
    if ticks and ticks[0].status != TickStatus.STARTED:
        return ticks[0]
    return None


@pytest.mark.slow
def test_the_daemon_ticks_each_automation_and_queues_behind_the_pool(tmp_path: Path) -> None:
    """`dagster-daemon run` on the session's instance, the token absent from its environment:
    the release sensor registers the current source (or says it already is), the nightly train
    skips naming GUARDRAIL_TOKEN, and the verification schedule's run waits in the queue while
    another run holds the product's pool, then runs and fails clearly (nothing deployed)."""
    from dagster._core.scheduler.instigation import ScheduleInstigatorData, TickStatus
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    from dagster_project.core.platform.local import LocalPlatform
    from dagster_project.instance import get_instance

    begun = time.monotonic()
    instance = get_instance()
    version = default_release_version(_spec())
    registered_before = instance.has_dynamic_partition(releases_partitions_name(PRODUCT), version)
    live_before = live_in_production(LocalPlatform(PRODUCT))
    env = {k: v for k, v in os.environ.items() if k != "GUARDRAIL_TOKEN"}

    with WorkspaceProcessContext(
        instance, WorkspaceFileTarget(paths=[str(ROOT / "workspace.yaml")])
    ) as workspace:
        location = workspace.create_request_context().get_code_location("release_pipeline")
        repository = location.get_repository("__repository__")
        sensor = repository.get_sensor(f"release_sensor_{SLUG}")
        train = repository.get_schedule(f"nightly_release_train_{SLUG}")
        verification = repository.get_schedule(f"post_deploy_verification_{SLUG}")

    instance.start_sensor(sensor)
    for schedule in (train, verification):
        state = instance.start_schedule(schedule)
        # Started a day ago: the daemon's first iteration owes each schedule its latest tick.
        instance.update_instigator_state(
            state.with_data(
                ScheduleInstigatorData(schedule.cron_schedule, start_timestamp=time.time() - 90_000)
            )
        )
    log = tmp_path / "daemon.log"
    try:
        with _pool_held(instance, release_pool(PRODUCT)) as free, _daemon(env, log):
            deadline = time.monotonic() + 75

            sensor_tick = _wait_for(
                "the sensor tick", lambda: _finished_tick(instance, sensor), deadline
            )
            # Registering requests no run: Dagster records such a tick as skipped, with what
            # its dynamic-partitions request did.
            assert sensor_tick.status == TickStatus.SKIPPED, sensor_tick
            if registered_before:
                assert "already registered" in (sensor_tick.skip_reason or "")
            else:
                (registered,) = sensor_tick.dynamic_partitions_request_results
                assert registered.partitions_def_name == releases_partitions_name(PRODUCT)
                assert list(registered.added_partitions or []) == [version]
                assert sensor_tick.cursor == version
            assert instance.has_dynamic_partition(releases_partitions_name(PRODUCT), version)

            train_tick = _wait_for(
                "the train tick", lambda: _finished_tick(instance, train), deadline
            )
            assert train_tick.status == TickStatus.SKIPPED, train_tick
            assert "GUARDRAIL_TOKEN" in (train_tick.skip_reason or "")
            assert not train_tick.run_ids

            tick = _wait_for(
                "the verification tick", lambda: _finished_tick(instance, verification), deadline
            )
            assert tick.status == TickStatus.SUCCESS, tick
            (run_id,) = tick.run_ids
            _wait_for(
                "the queue to hold the run on the pool",
                lambda: f"Run {run_id} is blocked by global concurrency limits" in log.read_text(),
                deadline,
            )
            run = instance.get_run_by_id(run_id)
            assert run and run.status == dg.DagsterRunStatus.QUEUED
            assert run.tags[PRODUCT_TAG] == PRODUCT
            freed_at = time.time()
            free()
            finished = _wait_for(
                "the verification run to finish",
                lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r,
                deadline,
            )
            if live_before:
                assert finished.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
            else:
                assert finished.status == dg.DagsterRunStatus.FAILURE
                failures = [
                    e
                    for e in _events(instance, run_id)
                    if e.is_dagster_event and e.dagster_event.is_step_failure
                ]
                assert (
                    NOTHING_DEPLOYED
                    in failures[0].dagster_event.step_failure_data.error.to_string()
                )
            record = instance.get_run_record_by_id(run_id)
            assert record and record.start_time and record.start_time >= freed_at
    finally:
        instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
        for schedule in (train, verification):
            instance.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)
    assert time.monotonic() - begun < 90
