"""The automations (release sensor, nightly release train, post-deploy verification) through
Dagster's test APIs and through the real daemon, and the product's concurrency pool at run
granularity: the run queue (UI, backfill, schedule, sensor) starts no run with the pool while a
run that has it is in progress, a CLI run included."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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


def _tick(
    schedule: dg.ScheduleDefinition,
    instance: dg.DagsterInstance,
    platform: PlatformResource | None = None,
) -> Any:
    """Evaluate `schedule` once inside an entered context. The context opens its own copy of the
    instance, and Dagster keeps the open instance's state storage in a context variable: left
    unclosed, that variable outlives `scratch`'s temporary folder and a later
    `Definitions.get_repository_def()` in the same worker fails opening a deleted runs.db."""
    resources = {} if platform is None else {"platform": platform, "approval": ApprovalResource()}
    with dg.build_schedule_context(
        instance=instance,
        resources=resources,
        scheduled_execution_time=datetime(2026, 1, 2, 2, 0, tzinfo=UTC),
    ) as context:
        return schedule(context) if platform is not None else schedule.evaluate_tick(context)


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
    result = _tick(_schedule("nightly_release_train"), instance, UntouchablePlatform())
    assert isinstance(result, dg.SkipReason)
    message = result.skip_message or ""
    assert "GUARDRAIL_TOKEN" in message
    assert GUARDRAIL_TOKEN not in message
    if token:
        assert token not in message


@pytest.mark.slow
def test_nightly_train_releases_the_newest_release_not_in_production(
    guardrail_token: str, scratch: dg.DagsterInstance
) -> None:
    instance = scratch
    train = _schedule("nightly_release_train")
    assert train.job_name == release_job_name(PRODUCT)

    nothing = _tick(train, instance, UntouchablePlatform())
    assert isinstance(nothing, dg.SkipReason)
    assert "no release registered" in (nothing.skip_message or "")

    for version in ("1.0.0", "1.1.0"):
        register_release(instance, PRODUCT, version)
    request = _tick(train, instance, FakePlatform(live="1.0.0"))
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "1.1.0"
    assert request.run_key == "train-1.1.0-20260102"
    assert guardrail_token not in repr(request)  # the token never rides in run config or tags

    from dagster_project.definitions import defs

    job = defs.resolve_job_def(release_job_name(PRODUCT))
    assert job.tags[PRODUCT_TAG] == PRODUCT
    assert dg.validate_run_config(job, request.run_config)

    live = _tick(train, instance, FakePlatform(live="1.1.0"))
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
    data = _tick(schedule, scratch)
    (request,) = data.run_requests or []
    assert dg.validate_run_config(job, request.run_config)
    assert job.tags[PRODUCT_TAG] == PRODUCT
    (node,) = job.nodes
    assert node.definition.pool == release_pool(PRODUCT)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("passed", [True, False])
def test_verification_judges_the_post_deploy_smoke(
    passed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster_project.core import smoke

    seen: list[str] = []

    from dagster_project.core.contracts import SmokeReport, SmokeRow

    def fake_smoke(spec: ProductSpec, platform: Any, version: str) -> SmokeReport:
        seen.append(version)
        return SmokeReport(
            product=spec.product,
            env="production",
            expected_version=version,
            run_id="fake",
            edge_url="http://127.0.0.1:1",
            sections=["smoke"],
            started_at="2026-12-01T00:00:00+00:00",
            rows=[
                SmokeRow(section="smoke", name="GET /v1/items", passed=True, detail="", seconds=0),
                SmokeRow(section="smoke", name="x", passed=passed, detail="", seconds=0),
            ],
        )

    monkeypatch.setattr(smoke, "post_deploy_smoke", fake_smoke)
    _, job = _verification()
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"platform": FakePlatform(live="2.0.0")},
        raise_on_error=False,
    )
    assert seen == ["2.0.0"]
    assert result.success is passed


# -- the product's pool at run granularity ---------------------------------------------------


@pytest.mark.slow
def test_instance_limits_each_pool_to_one_run_at_a_time() -> None:
    from dagster._core.instance.config import PoolGranularity

    from dagster_project.instance import get_instance

    instance = get_instance()
    config = instance.get_concurrency_config()
    assert config.pool_config.pool_granularity == PoolGranularity.RUN
    assert config.pool_config.default_pool_limit == 1
    assert config.run_queue_config.should_block_op_concurrency_limited_runs
    assert {
        "key": PRODUCT_TAG,
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in config.run_queue_config.tag_concurrency_limits
    assert instance.event_log_storage.supports_global_concurrency_limits


@pytest.mark.slow
def test_get_instance_creates_each_product_pool_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every product's pool exists at the default limit before a run needs it, so the queue
    daemon never initialises one (dagster-io/dagster#33552 on Postgres); existing pools are
    never re-initialised, and a pool another process created meanwhile is no error."""
    from dagster_project.core.settings import list_products
    from dagster_project.instance import ensure_product_pools, get_instance

    instance = get_instance()
    storage = instance.event_log_storage
    limits = {limit.name: limit for limit in storage.get_pool_limits()}
    for product in list_products():
        limit = limits[release_pool(product)]
        assert (limit.limit, limit.from_default) == (1, True), limit

    initialised: list[str] = []
    initialise = type(storage).initialize_concurrency_limit_to_default

    def spy(self: Any, key: str) -> bool:
        initialised.append(key)
        return initialise(self, key)

    monkeypatch.setattr(type(storage), "initialize_concurrency_limit_to_default", spy)
    new = f"zz-pool-{uuid.uuid4().hex[:8]}"
    try:
        assert ensure_product_pools(instance, [PRODUCT, new]) == [release_pool(new)]
        assert ensure_product_pools(instance, [PRODUCT, new]) == []
        assert initialised == [release_pool(new)]
        assert storage.get_concurrency_info(release_pool(new)).slot_count == 1

        # Another process created the pool between the read and the write: on Postgres the
        # re-initialisation fails (#33552); either way the pool is there, at its limit.
        real_keys = storage.get_concurrency_keys
        stale = [set[str]()]  # the first read misses the pool; later reads are real
        monkeypatch.setattr(
            storage, "get_concurrency_keys", lambda: stale.pop() if stale else real_keys()
        )
        assert ensure_product_pools(instance, [new]) in ([], [release_pool(new)])
        assert storage.get_concurrency_info(release_pool(new)).slot_count == 1
    finally:
        storage.delete_concurrency_limit(release_pool(new))


def _start(instance: dg.DagsterInstance, run: Any) -> Any:
    """Mark a run started, as `execute_job` does when the CLI runs it in-process."""
    from dagster._core.events import DagsterEvent

    instance.handle_run_event(
        run.run_id,
        DagsterEvent(event_type_value="PIPELINE_START", job_name=run.job_name, message="started"),
    )
    started = instance.get_run_by_id(run.run_id)
    assert started and started.status == dg.DagsterRunStatus.STARTED
    return started


def _asset_run(instance: dg.DagsterInstance, stage: str, **kwargs: Any) -> Any:
    """A run of one stage as a UI launch creates it: `__ASSET_JOB`, untagged; never executed."""
    from dagster_project.definitions import defs

    return instance.create_run_for_job(
        defs.resolve_job_def("__ASSET_JOB"),
        asset_selection={dg.AssetKey([PRODUCT, stage])},
        **kwargs,
    )


@pytest.mark.slow
def test_an_in_progress_run_with_the_pool_blocks_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release run in progress (as the CLI's in-process run is) has the product's pool; while
    it is, the queue's pool counter (the daemon's, at the instance's granularity) holds a queued
    UI launch of an environment stage and lets one of build through; once the run has ended,
    the stage's launch may start. The pool exists already, so the counter initialises none."""
    from dagster._core.op_concurrency_limits_counter import GlobalOpConcurrencyLimitsCounter
    from dagster._core.storage.dagster_run import ACTIVE_RUN_STATUSES

    from dagster_project.definitions import defs
    from dagster_project.instance import get_instance

    instance = get_instance()
    storage = instance.event_log_storage
    config = instance.get_concurrency_config()
    pool = release_pool(PRODUCT)

    def no_initialise(self: Any, key: str) -> bool:
        raise AssertionError(f"the queue initialised pool {key}")

    monkeypatch.setattr(type(storage), "initialize_concurrency_limit_to_default", no_initialise)
    release = instance.create_run_for_job(
        defs.resolve_job_def(release_job_name(PRODUCT)), tags={PRODUCT_TAG: PRODUCT}
    )
    # The launches the queue would consider. The counter reads only what a run records at
    # creation (its pools); a QUEUED status would need a code location's origin.
    canary, build = queued = [_asset_run(instance, stage) for stage in ("canary", "build")]
    assert release.run_op_concurrency and pool in release.run_op_concurrency.all_pools
    assert canary.run_op_concurrency and pool in canary.run_op_concurrency.all_pools
    assert build.run_op_concurrency is None

    def blocked() -> list[bool]:
        """What the queue daemon decides (queued_run_coordinator_daemon.py, one pass)."""
        in_progress = instance.get_run_records(
            dg.RunsFilter(run_ids=[release.run_id], statuses=list(ACTIVE_RUN_STATUSES))
        )
        counter = GlobalOpConcurrencyLimitsCounter(
            instance,
            queued,
            in_progress,
            concurrency_keys=storage.get_concurrency_keys(),
            pool_limits=storage.get_pool_limits(),
            slot_count_offset=config.run_queue_config.op_concurrency_slot_buffer,
            pool_granularity=config.pool_config.pool_granularity,
        )
        return [counter.is_blocked(run) for run in queued]

    try:
        assert blocked() == [False, False]  # created, not started: holds nothing
        _start(instance, release)
        assert blocked() == [True, False]
        # No slot is claimed inside a run: nothing to leak when its process is killed.
        assert not storage.get_concurrency_info(pool).claimed_slots
        run = instance.get_run_by_id(release.run_id)
        assert run
        instance.report_run_failed(run, message="ended (test)")
        assert blocked() == [False, False]
    finally:
        for run_id in (release.run_id, canary.run_id, build.run_id):
            instance.delete_run(run_id)


@contextlib.contextmanager
def _pool_held(instance: dg.DagsterInstance) -> Iterator[Callable[[], None]]:
    """The product's pool, held by an in-progress run (a UI launch of the canary, untagged, so
    the tag limit plays no part); yields a function that ends the run, as `deploy` or the
    reconciler mark a run failed whose process died."""
    run = _start(instance, _asset_run(instance, "canary", tags={"test/pool-holder": "1"}))
    assert run.run_op_concurrency and release_pool(PRODUCT) in run.run_op_concurrency.all_pools

    def free() -> None:
        current = instance.get_run_by_id(run.run_id)
        if current and not current.is_finished:
            instance.report_run_failed(current, message="pool holder ended (test)")

    try:
        yield free
    finally:
        free()


def _events(instance: dg.DagsterInstance, run_id: str) -> list[dg.EventLogEntry]:
    return list(instance.all_logs(run_id))


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
    another run that has the product's pool is in progress, then, once that run has ended, runs
    and fails clearly (nothing deployed)."""
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
        with _pool_held(instance) as free, _daemon(env, log):
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
