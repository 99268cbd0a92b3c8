"""The local platform through the real path: edge and service processes run by the session's
supervisord on 127.0.0.1, state in the session's Postgres, traffic over HTTP. Tests run in
file order on one platform (module fixture); the last test takes it down. Processes are only
ever killed by the pids these tests read from their own platform."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from dagster_project.core import data_quality, database, httpclient, registry
from dagster_project.core.migrations.history import apply_pending
from dagster_project.core.platform import LocalPlatform, PlatformError
from dagster_project.core.platform.local import materialize
from dagster_project.core.platform.processes import ProcessStartError, is_alive
from dagster_project.core.settings import release_home
from dagster_project.core.spec import load_spec

PRODUCT = "4pnihc40q-yj"
ENVS = ("staging", "production")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def platform() -> Iterator[LocalPlatform]:
    """The platform up, no release deployed yet; always taken down afterwards."""
    local = LocalPlatform(PRODUCT)
    try:
        local.up()
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def artifacts(platform: LocalPlatform) -> dict[str, registry.Artifact]:
    spec = load_spec(PRODUCT)
    return {
        version: registry.push(registry.build_artifact(spec, version))
        for version in ("1.0.0", "1.1.0")
    }


@pytest.fixture(scope="module")
def deployed(platform: LocalPlatform, artifacts: dict[str, registry.Artifact]) -> LocalPlatform:
    """Migrations applied and 1.0.0 serving as stable in both environments."""
    for env in ENVS:
        apply_pending(
            platform.database(env), load_spec(PRODUCT).migrations_path, actor="test_platform"
        )
        platform.deploy(env, "stable", artifacts["1.0.0"])
    return platform


def _get(url: str, **kwargs: Any) -> httpx.Response:
    return httpclient.get(url, timeout=5.0, trust_env=False, **kwargs)


@pytest.mark.slow
def test_environments_without_release_are_healthy_and_answer_503(
    platform: LocalPlatform,
) -> None:
    status = platform.status()
    assert set(status) == set(ENVS)
    for env in ENVS:
        info = status[env]
        assert info["healthy"] is True, info["problems"]
        assert info["tracks"] == {}
        assert info["edge_url"] == platform.edge_url(env)
        assert info["edge_url"].startswith("http://127.0.0.1:")
        assert "***" in info["database"] or "@" not in info["database"]
        response = _get(f"{platform.edge_url(env)}/v1/items")
        assert response.status_code == 503
        assert "no healthy upstream" in response.json()["error"]


@pytest.mark.slow
def test_deploy_that_never_gets_ready_names_endpoint_and_log(
    platform: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    # Runs before `deployed`. With a table of the schema missing, /readyz answers 503.
    assert platform.current("production") == {}
    platform.ready_deadline_seconds = 3.0
    try:
        with (
            _table_hidden(platform.database("production"), "dead_letter"),
            pytest.raises(ProcessStartError) as failure,
        ):
            platform.deploy("production", "stable", artifacts["1.0.0"])
    finally:
        platform.ready_deadline_seconds = 30.0
    message = str(failure.value)
    assert "/readyz" in message and "did not become ready" in message
    assert "logs/" in message and ".log" in message
    # Nothing half-started is left behind.
    assert platform.current("production") == {}
    assert platform.state.processes("production", role="api") == []
    assert platform.status()["production"]["healthy"] is True


@pytest.mark.slow
def test_bad_input_is_refused_with_a_clear_message(deployed: LocalPlatform) -> None:
    with pytest.raises(ValueError, match="add up to 100"):
        deployed.set_weights("production", {"stable": 90, "canary": 5})
    with pytest.raises(ValueError, match=r"unknown track\(s\) \['blue'\]"):
        deployed.set_weights("production", {"blue": 100})
    with pytest.raises(PlatformError, match=r"no release is deployed on track\(s\) \['canary'\]"):
        deployed.set_weights("production", {"stable": 90, "canary": 10})
    with pytest.raises(ValueError, match="unknown environment 'qa'"):
        deployed.edge_url("qa")
    with pytest.raises(PlatformError, match="no canary release is serving"):
        deployed.promote("staging")


@pytest.mark.slow
def test_both_environments_serve_the_stable_release(deployed: LocalPlatform) -> None:
    status = deployed.status()
    for env in ENVS:
        info = status[env]
        assert info["healthy"] is True, info["problems"]
        stable = info["tracks"]["stable"]
        assert stable["version"] == "1.0.0" and stable["alive"] and stable["ready"]
        assert set(stable["pids"]) == {"api", "worker"}
        assert deployed.current(env)["stable"]["version"] == "1.0.0"
        assert _get(f"{deployed.api_urls(env)['stable']}/readyz").status_code == 200
        response = _get(f"{deployed.edge_url(env)}/v1/items")
        assert response.status_code == 200
        assert response.headers["x-release"] == "1.0.0"
        assert response.headers["x-track"] == "stable"


@pytest.mark.slow
def test_up_twice_is_harmless(deployed: LocalPlatform) -> None:
    before = {p.id: p.pid for p in deployed.state.processes()}
    status = deployed.up()
    assert {p.id: p.pid for p in deployed.state.processes()} == before
    assert all(status[env]["healthy"] for env in ENVS)


@pytest.mark.slow
def test_weighted_split_then_rollback_under_a_second(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    deployed.deploy("production", "canary", artifacts["1.1.0"])
    deployed.set_weights("production", {"stable": 90, "canary": 10})
    edge = deployed.edge_url("production")
    served: Counter[str] = Counter()
    with httpclient.client(timeout=5.0, trust_env=False) as client:
        for i in range(1000):
            # A unique query string per request, so every one reaches an origin.
            response = client.get(f"{edge}/v1/items", params={"split": i})
            assert response.status_code == 200
            assert response.headers["x-cache"] == "MISS"
            track = response.headers["x-track"]
            expected_release = "1.1.0" if track == "canary" else "1.0.0"
            assert response.headers["x-release"] == expected_release
            served[track] += 1
    canary_share = served["canary"] / 10  # percent of 1000
    assert 5 <= canary_share <= 15, served

    canary_pids = [p.pid for p in deployed.state.processes("production", track="canary")]
    result = deployed.rollback("production")
    # Traffic is back on stable within a second (the platform times the switch); stopping the
    # canary's processes afterwards is cleanup, slower on a host busy with other releases.
    assert 0 < result["switch_seconds"] < 1.0, result
    assert result["switch_seconds"] <= result["seconds"]
    assert sorted(result["stopped_pids"]) == sorted(canary_pids)
    assert canary_pids and not any(_running(pid) for pid in canary_pids)

    with httpclient.client(timeout=5.0, trust_env=False) as client:
        tracks = Counter(
            client.get(f"{edge}/v1/items", params={"after": i}).headers["x-track"]
            for i in range(200)
        )
    assert tracks == Counter({"stable": 200})
    info = deployed.status()["production"]
    assert info["weights"] == {"stable": 100, "canary": 0}
    assert "canary" not in info["tracks"] and info["healthy"], info["problems"]


@pytest.mark.slow
def test_promote_makes_the_canary_stable_and_starts_a_clean_cache(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    edge = deployed.edge_url("production")
    assert _get(f"{edge}/v1/summary").headers["x-release"] == "1.0.0"
    assert _get(f"{edge}/v1/summary").headers["x-cache"] == "HIT"
    old = {p.pid for p in deployed.state.processes("production", track="stable")}
    deployed.deploy("production", "canary", artifacts["1.1.0"])
    deployed.set_weights("production", {"stable": 50, "canary": 50})

    result = deployed.promote("production")

    assert result["version"] == "1.1.0" and result["retired_version"] == "1.0.0"
    current = deployed.current("production")
    assert current == {"stable": {"version": "1.1.0", "artifact_sha": artifacts["1.1.0"].sha256}}
    assert old and not any(_running(pid) for pid in old)
    first = _get(f"{edge}/v1/summary")
    assert first.headers["x-release"] == "1.1.0" and first.headers["x-track"] == "stable"
    assert first.headers["x-cache"] == "MISS"  # the 1.0.0 entry is never served for 1.1.0
    info = deployed.status()["production"]
    assert info["weights"] == {"stable": 100, "canary": 0}
    assert info["healthy"], info["problems"]


@pytest.mark.slow
def test_promote_that_cannot_start_the_fresh_stable_restarts_the_old_one(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    """The canary at 100% and the old stable at 0% (as after the promotion's watch), and the
    fresh stable fails to start after the idle old stable was stopped: the old one is started
    again (at 0%) before the error is raised, so a rollback still has it."""
    deployed.deploy("production", "canary", artifacts["1.0.0"])
    deployed.set_weights("production", {"stable": 0, "canary": 100})
    old = {p.pid for p in deployed.state.processes("production", track="stable")}
    canary = deployed.state.processes("production", track="canary", role="api")[0]
    with _moved_away(_api_module(canary)), pytest.raises((PlatformError, ProcessStartError)):
        deployed.promote("production")
    assert old and not any(_running(pid) for pid in old)  # it was stopped, then started again
    assert deployed.current("production") == {
        "stable": {"version": "1.1.0", "artifact_sha": artifacts["1.1.0"].sha256},
        "canary": {"version": "1.0.0", "artifact_sha": artifacts["1.0.0"].sha256},
    }
    assert deployed.state.environment("production").weights == {"stable": 0, "canary": 100}
    deployed.rollback("production")
    response = _get(f"{deployed.edge_url('production')}/v1/summary", params={"n": "restarted"})
    assert response.status_code == 200 and response.headers["x-release"] == "1.1.0"
    assert deployed.status()["production"]["healthy"]


@pytest.mark.slow
def test_a_switch_that_can_start_no_stable_keeps_the_canary_for_the_reconciler_to_finish(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    """Neither the fresh stable nor the stopped old one can start: the canary keeps all of
    production (going back would stop the only version it has). A run that died switching is
    then finished by the reconciler: the canary's release promoted, the change recorded."""
    from dagster_project.core import changes, ownership, reconcile

    # A release of its own: the reconciler records a production change for it, and the
    # session's history is shared with other files (test_release_e2e.py releases 1.0.0).
    version = "tp-switch-1.0.0"
    switched = registry.push(registry.build_artifact(load_spec(PRODUCT), version))
    deployed.deploy("production", "canary", switched)
    deployed.set_weights("production", {"stable": 0, "canary": 100})
    canary = deployed.state.processes("production", track="canary", role="api")[0]
    stable = deployed.state.processes("production", track="stable", role="api")[0]
    with (
        _moved_away(_api_module(canary)),
        _moved_away(_api_module(stable)),
        pytest.raises((PlatformError, ProcessStartError)),
    ):
        deployed.promote("production")
    served = {"version": version, "artifact_sha": switched.sha256}
    assert deployed.current("production") == {"canary": served}
    response = _get(f"{deployed.edge_url('production')}/v1/summary", params={"n": "kept"})
    assert response.status_code == 200 and response.headers["x-release"] == version

    owner = ownership.acquire(
        PRODUCT,
        "production",
        run_id="test-platform-switching",
        release=version,
        artifact_sha256=switched.sha256,
        previous_artifact_sha256=artifacts["1.1.0"].sha256,
        phase="switching",
        wait_seconds=0,
        stale_after_seconds=30,
        run_in_progress=lambda run_id: None,
        take_over=lambda owner, why: None,
    )
    taken = reconcile.take_over(load_spec(PRODUCT), owner, "its run died", platform=deployed)
    assert (taken.outcome, taken.problem) == ("promoted", None), taken
    assert deployed.current("production") == {"stable": served}
    recorded = changes.for_release(PRODUCT, version)
    assert [c.outcome for c in recorded] == ["promoted"], recorded
    assert "finished the switch" in (recorded[0].details.reason or "")
    assert ownership.current(PRODUCT, "production") is None
    response = _get(f"{deployed.edge_url('production')}/v1/summary", params={"n": "finished"})
    assert response.headers["x-release"] == version and response.headers["x-track"] == "stable"


@pytest.mark.slow
def test_promote_after_a_watch_stops_the_idle_stable_first_and_serves_throughout(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    """The canary at 100% and the old stable at 0%: the old stable is stopped before the fresh
    one starts, so production never runs three releases at once, and every request meanwhile
    is answered by the new release. (Later tests find 1.1.0 stable.)"""
    edge = deployed.edge_url("production")
    old = {p.pid for p in deployed.state.processes("production", track="stable")}
    deployed.deploy("production", "canary", artifacts["1.1.0"])
    canary = {p.pid for p in deployed.state.processes("production", track="canary")}
    deployed.set_weights("production", {"stable": 0, "canary": 100})
    with _Watcher(edge) as seen:
        result = deployed.promote("production")
    assert result["version"] == "1.1.0"
    assert deployed.current("production") == {
        "stable": {"version": "1.1.0", "artifact_sha": artifacts["1.1.0"].sha256}
    }
    assert old and canary and not any(_running(pid) for pid in old | canary)
    # Two releases at most (the canary and the fresh stable, an api and a worker each).
    assert 0 < seen.most_processes <= 4, seen.most_processes
    assert seen.answers and set(seen.answers) == {(200, "1.1.0")}, seen.answers


class _Watcher:
    """While entered: production's service processes counted, and the edge asked, every 50 ms."""

    def __init__(self, edge: str) -> None:
        self.edge = edge
        self.most_processes = 0
        self.answers: Counter[tuple[int, str]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpclient.client(timeout=5.0, trust_env=False) as client:
            n = 0
            while not self._stop.is_set():
                self.most_processes = max(self.most_processes, len(_production_services()))
                n += 1
                try:
                    response = client.get(f"{self.edge}/v1/summary", params={"w": n})
                    self.answers[(response.status_code, response.headers.get("x-release", ""))] += 1
                except httpx.HTTPError as exc:
                    self.answers[(0, type(exc).__name__)] += 1
                time.sleep(0.05)


def _production_services() -> list[int]:
    """Pids of this session's API and worker processes of production (fault drills off)."""
    deployments = str(release_home() / "deployments")
    found = []
    for proc in psutil.process_iter():
        try:
            if not proc.cwd().startswith(deployments):
                continue
            if proc.environ().get("SERVICE_FAULT_INJECTION") == "0":
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _api_module(api: Any) -> Path:
    """The API module of the deployment a process record runs (moved away, it cannot start)."""
    return Path(str(api.deploy_dir)) / "service" / "api.py"


@contextlib.contextmanager
def _moved_away(path: Path) -> Iterator[None]:
    aside = path.with_suffix(".aside")
    path.rename(aside)
    try:
        yield
    finally:
        aside.rename(path)


@pytest.mark.slow
def test_routes_reload_from_state_without_a_push(deployed: LocalPlatform) -> None:
    # A change written only to platform state reaches the edge by its periodic reload.
    generation = deployed.state.bump_generation("staging")
    deadline = time.monotonic() + 10
    seen = -1
    while time.monotonic() < deadline:
        seen = _get(f"{deployed.edge_url('staging')}/_edge/health").json()["routes"]["generation"]
        if seen >= generation:
            break
        time.sleep(0.2)
    assert seen == generation


@pytest.mark.slow
def test_killed_edge_comes_back_on_the_same_url_and_serves(deployed: LocalPlatform) -> None:
    url = deployed.edge_url("production")
    edge = deployed.state.processes("production", role="edge")[0]
    assert edge.pid and edge.state == "RUNNING"
    since = time.time()
    os.kill(edge.pid, signal.SIGKILL)
    _wait_dead(edge.pid, edge.create_time)
    killed_at = time.monotonic()
    # supervisord restarts it with the same command line: same port, so the same URL.
    _wait_http_200(f"{url}/_edge/health", timeout=10.0)
    restart_seconds = time.monotonic() - killed_at
    print(f"edge restart after SIGKILL: {restart_seconds:.2f}s")
    assert restart_seconds < 10.0
    assert deployed.edge_url("production") == url
    response = _get(f"{url}/v1/items")
    assert response.status_code == 200
    assert response.headers["x-release"] == "1.1.0"
    again = deployed.state.processes("production", role="edge")[0]
    assert again.pid and again.pid != edge.pid
    # It answers before supervisord counts it RUNNING (startsecs): an outage until then.
    _wait_running_state(deployed, "production", "edge")
    outages = deployed.outages("production", since)
    assert any(o.startswith("edge of production") and "(re)started" in o for o in outages), outages
    assert deployed.outages("production", time.time()) == []
    assert deployed.outages("staging", since) == []
    info = deployed.status()["production"]
    assert info["healthy"] is True, info["problems"]
    assert info["edge"]["pid"] == again.pid and info["edge"]["state"] == "RUNNING"
    assert info["edge"]["uptime_seconds"] is not None
    assert any("edge of production" in r and "restarted" in r for r in info["restarts"])


@pytest.mark.slow
def test_cli_status_json_lists_both_edges(deployed: LocalPlatform) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "dagster_project.cli", "platform", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    status = json.loads(completed.stdout)[PRODUCT]  # every product, by id
    for env in ENVS:
        assert status[env]["edge_url"] == deployed.edge_url(env)
        assert status[env]["healthy"] is True


@pytest.mark.slow
def test_cli_table_and_clean_error(deployed: LocalPlatform) -> None:
    table = subprocess.run(
        [sys.executable, "-m", "dagster_project.cli", "platform", "status"],
        capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT, check=False,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "staging: healthy" in table.stdout and "production: healthy" in table.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "dagster_project.cli", "platform", "status", "--product", "nope"],
        capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT, check=False,
    )  # fmt: skip
    assert bad.returncode in (1, 2)  # bad input (the CLI's exit codes are its own contract)
    assert "'nope'" in bad.stderr and "not found" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_killed_api_is_restarted_on_the_same_port_and_reported(deployed: LocalPlatform) -> None:
    api_url = deployed.api_urls("staging")["stable"]
    api = deployed.state.processes("staging", track="stable", role="api")[0]
    assert api.pid
    since = time.time()
    os.kill(api.pid, signal.SIGKILL)
    _wait_dead(api.pid, api.create_time)
    killed_at = time.monotonic()
    outages = deployed.outages("staging", since)
    assert any(o.startswith("api of staging/stable") for o in outages), outages
    deployed.ensure_ready("staging", "stable", deadline_seconds=20)
    print(f"api restart after SIGKILL until /readyz: {time.monotonic() - killed_at:.2f}s")
    assert deployed.api_urls("staging")["stable"] == api_url
    assert _get(f"{api_url}/readyz").status_code == 200
    assert _get(f"{deployed.edge_url('staging')}/v1/items").status_code == 200
    _wait_running_state(deployed, "staging", "api")
    info = deployed.status()["staging"]
    assert info["healthy"] is True, info["problems"]
    restarted = info["tracks"]["stable"]["processes"]["api"]
    assert restarted["restarted"] and restarted["state"] == "RUNNING"
    assert restarted["pid"] == info["tracks"]["stable"]["pids"]["api"] != api.pid
    assert any("api of staging/stable" in r for r in info["restarts"]), info["restarts"]
    outages = deployed.outages("staging", since)
    assert any(o.startswith("api of staging/stable") and "(re)started" in o for o in outages), (
        outages
    )
    # Production was never touched.
    assert deployed.outages("production", since) == []


@pytest.mark.slow
def test_rollback_waits_for_a_restarting_stable_then_routes(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    deployed.deploy("production", "canary", artifacts["1.0.0"])
    deployed.set_weights("production", {"stable": 50, "canary": 50})
    stable = deployed.state.processes("production", track="stable", role="api")[0]
    assert stable.pid
    os.kill(stable.pid, signal.SIGKILL)
    _wait_dead(stable.pid, stable.create_time)

    began = time.monotonic()
    result = deployed.rollback("production")
    print(f"rollback with a killed stable: {time.monotonic() - began:.2f}s")
    assert result["weights"] == {"stable": 100, "canary": 0} and result["stable_serving"]
    assert _get(f"{stable.url}/readyz").status_code == 200  # same port, ready again
    edge = deployed.edge_url("production")
    with httpclient.client(timeout=5.0, trust_env=False) as client:
        answers = [client.get(f"{edge}/v1/items", params={"rb": i}) for i in range(50)]
    assert {(r.status_code, r.headers["x-track"]) for r in answers} == {(200, "stable")}


@pytest.mark.slow
def test_set_weights_refuses_a_track_that_is_not_ready(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    deployed.deploy("production", "canary", artifacts["1.0.0"])
    canary_api = deployed.state.processes("production", track="canary", role="api")[0]
    # Its program is gone from supervisord: the canary cannot be made ready again.
    deployed.supervisor.remove_program(str(canary_api.program))
    deployed.ready_deadline_seconds = 3.0
    try:
        with pytest.raises(PlatformError, match="not ready") as refused:
            deployed.set_weights("production", {"stable": 90, "canary": 10})
    finally:
        deployed.ready_deadline_seconds = 30.0
    assert "last ready routing {'stable': 100, 'canary': 0}" in str(refused.value)
    assert deployed.state.environment("production").weights == {"stable": 100, "canary": 0}  # type: ignore[union-attr]
    outages = deployed.outages("production", time.time())
    assert any(o.startswith("api of production/canary") for o in outages), outages
    deployed.rollback("production")  # stable is ready: the broken canary is removed
    assert deployed.outages("production", time.time()) == []


@pytest.mark.slow
def test_rollback_keeps_the_routing_when_stable_cannot_be_made_ready(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    deployed.deploy("production", "canary", artifacts["1.0.0"])
    deployed.set_weights("production", {"stable": 75, "canary": 25})
    stable = deployed.state.processes("production", track="stable", role="api")[0]
    # Stable's command now fails at every start (its app directory is gone), and it crashes.
    service_dir = Path(str(stable.deploy_dir)) / load_spec(PRODUCT).service_dir
    moved = service_dir.with_name(service_dir.name + ".moved-by-test")
    service_dir.rename(moved)
    try:
        assert stable.pid
        os.kill(stable.pid, signal.SIGKILL)
        _wait_dead(stable.pid, stable.create_time)
        deployed.ready_deadline_seconds = 4.0
        began = time.monotonic()
        with pytest.raises(PlatformError) as refused:
            deployed.rollback("production")
        elapsed = time.monotonic() - began
        message = str(refused.value)
        assert "rollback of production refused" in message and "not ready" in message
        assert "the last ready routing {'stable': 75, 'canary': 25}" in message
        assert "/readyz" in message and ".log" in message
        assert elapsed < 15, elapsed  # bounded by the readiness deadline
        # Nothing switched: weights as they were, the canary still serving and answering.
        assert deployed.state.environment("production").weights == {"stable": 75, "canary": 25}  # type: ignore[union-attr]
        assert "canary" in deployed.current("production")
        canary_url = deployed.api_urls("production")["canary"]
        assert _get(f"{canary_url}/readyz").status_code == 200
        assert any("api of production/stable" in o for o in deployed.outages("production", 0))
    finally:
        deployed.ready_deadline_seconds = 30.0
        moved.rename(service_dir)
    # Repaired (supervisord retries, or ensure_ready starts it again), rollback goes through.
    result = deployed.rollback("production")
    assert result["weights"] == {"stable": 100, "canary": 0}
    assert _get(f"{deployed.edge_url('production')}/v1/items").headers["x-track"] == "stable"


@pytest.mark.slow
def test_reap_orphans_stops_processes_no_serving_track_owns(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    # What a deploy killed after starting its processes leaves: programs recorded `starting`.
    artifact = artifacts["1.0.0"]
    left = deployed._start_release(
        "production",
        "canary",
        materialize(artifact),
        version=artifact.version,
        artifact_sha=artifact.sha256,
    )
    left = deployed.state.processes("production", status="starting")
    assert {p.role for p in left} == {"api", "worker"} and all(p.pid for p in left)
    # And a program of production that no record names.
    stray = f"{PRODUCT}.production.stray-by-test"
    deployed.supervisor.add_program(
        stray, [sys.executable, "-c", "import time; time.sleep(600)"], env={}, cwd=Path("/")
    )
    serving = {p.id: p.pid for p in deployed.state.processes("production", status="serving")}

    reaped = deployed.reap_orphans("production")

    assert len(reaped) == 3, reaped
    assert sum("left starting by an interrupted operation" in r for r in reaped) == 2
    assert any(stray in r and "no platform record" in r for r in reaped)
    for proc in left:
        _wait_dead(int(str(proc.pid)), proc.create_time)
    assert deployed.state.processes("production", status="starting") == []
    assert stray not in deployed.supervisor.all_info()
    assert {
        p.id: p.pid for p in deployed.state.processes("production", status="serving")
    } == serving
    assert deployed.reap_orphans("production") == []
    assert deployed.status()["production"]["healthy"]


@pytest.mark.slow
def test_reap_orphans_waits_for_an_operation_in_progress(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    # An operation holds the state lock while its processes are `starting`; a concurrent
    # reaper waits for it and then finds them serving, so it takes nothing.
    artifact = artifacts["1.0.0"]
    holding = threading.Event()
    done: list[list[str]] = []

    def operation() -> None:
        with deployed.state.lock():
            started = deployed._start_release(
                "production",
                "canary",
                materialize(artifact),
                version=artifact.version,
                artifact_sha=artifact.sha256,
            )
            holding.set()
            time.sleep(1.0)
            deployed.state.switch_serving("production", "canary", [p.id for p in started])

    def reaper() -> None:
        holding.wait(60)
        done.append(deployed.reap_orphans("production"))

    threads = [threading.Thread(target=operation), threading.Thread(target=reaper)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert done == [[]]
    assert deployed.current("production")["canary"]["version"] == "1.0.0"
    assert deployed.outages("production", time.time()) == []
    deployed.rollback("production")


@pytest.mark.slow
def test_programs_get_their_environment_and_arguments_verbatim(
    deployed: LocalPlatform, tmp_path: Path
) -> None:
    # supervisor's config syntax expands `%`, splits on commas and strips quotes: the
    # platform's values must reach the process unchanged anyway.
    env = {
        "PERCENT": "100% of %(name)s and %s",
        "COMMAS": "a,b=c,d",
        "DOUBLE": 'say "hi" twice',
        "SINGLE": "it's",
        "SPACES": "  padded value ",
        "SEMI": "x;y#z",
        "EMPTY": "",
    }
    out = tmp_path / "seen.json"
    code = "import json, os, sys, time; json.dump([dict(os.environ), sys.argv[1:]], open(sys.argv[1], 'w')); time.sleep(60)"  # noqa: E501
    name = f"{PRODUCT}.staging.env-by-test"
    # A value supervisor's syntax cannot carry is left out rather than breaking the config.
    unwritable = {"MULTI_LINE": "one\ntwo"}
    deployed.supervisor.add_program(
        name,
        [sys.executable, "-c", code, str(out), "50% off", "a b"],
        env={**env, **unwritable},
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 10
        while not out.is_file() or not out.read_text().endswith("]"):
            assert time.monotonic() < deadline, processes_log(deployed, name)
            time.sleep(0.05)
        seen, argv = json.loads(out.read_text())
    finally:
        deployed.supervisor.remove_program(name)
    assert {k: seen.get(k) for k in env} == env
    assert "MULTI_LINE" not in seen
    assert argv == [str(out), "50% off", "a b"]
    assert "GUARDRAIL_TOKEN" not in seen


def processes_log(platform: LocalPlatform, name: str) -> str:
    return platform.supervisor.log_path(name).read_text(errors="replace")


@pytest.mark.slow
def test_down_leaves_no_platform_process(deployed: LocalPlatform) -> None:
    recorded = deployed.state.processes()
    assert {p.role for p in recorded} == {"edge", "api", "worker"}
    supervisord = deployed.supervisor.pid()
    assert supervisord and all(p.pid for p in recorded)
    # The data-quality validator runs beside them (a program, no recorded process).
    validator = deployed.supervisor.info(f"{PRODUCT}.validator")
    assert validator is not None and validator.running and validator.pid
    socket_path = data_quality.platform_socket(PRODUCT)
    deadline = time.monotonic() + 60
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert socket_path.exists(), "the platform's validator never listened"
    deployed.down()
    for proc in recorded:
        assert not is_alive(proc.pid, proc.create_time), proc.label
    assert not is_alive(validator.pid, validator.create_time)
    assert not socket_path.exists()
    assert not _running(supervisord)
    assert not deployed.supervisor.is_running()
    assert deployed.state.processes() == []
    assert _processes_of(release_home()) == []
    status = deployed.status()
    assert all(not status[env]["healthy"] for env in ENVS)
    deployed.down()  # a second down is harmless


@pytest.mark.slow
def test_two_ups_at_once_start_one_supervisord_and_one_edge_per_environment(
    platform: LocalPlatform,
) -> None:
    # After `down`, nothing runs; two processes bring the platform up at the same moment.
    assert not platform.supervisor.is_running()
    code = (
        f"from dagster_project.core.platform import LocalPlatform; LocalPlatform({PRODUCT!r}).up()"
    )
    ups = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for up in ups:
        _, err = up.communicate(timeout=180)
        assert up.returncode == 0, err
    config = str(platform.supervisor.config_path)
    supervisords = [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if config in " ".join(proc.info["cmdline"] or [])
    ]
    assert supervisords == [platform.supervisor.pid()]
    edges = platform.state.processes(role="edge")
    assert sorted(p.env for p in edges) == sorted(ENVS)
    assert all(p.state == "RUNNING" and p.pid for p in edges)
    validator = f"{PRODUCT}.validator"  # the data-quality validator, one as well
    assert set(platform.supervisor.all_info()) == {str(p.program) for p in edges} | {validator}
    assert all(platform.status()[env]["healthy"] for env in ENVS)
    platform.down()
    assert _processes_of(release_home()) == []


@contextlib.contextmanager
def _table_hidden(db: str, table: str) -> Iterator[None]:
    """Rename a product table away for the block (other test modules of the session may
    already have applied the migrations to this database)."""
    hidden = f"{table}_hidden_by_test"
    database.ensure_database(db)  # the product's environment database, maybe not made yet
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{table}",))
        row = cur.fetchone()
        present = bool(row and row[0])
        if present:
            cur.execute(f'ALTER TABLE public."{table}" RENAME TO "{hidden}"')
        try:
            yield
        finally:
            if present:
                cur.execute(f'ALTER TABLE public."{hidden}" RENAME TO "{table}"')


def _processes_of(home: Path) -> list[str]:
    """Every process but Postgres (which `down` leaves running) and this one whose command
    line, working directory or environment names the session's RELEASE_HOME."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cwd", "status"]):
        try:
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (proc.info["name"] or "").startswith(("postgres", "pg_ctl")):
                continue
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
            env_home = proc.environ().get("RELEASE_HOME", "")
        except psutil.Error:
            continue
        if str(home) in text or env_home == str(home):
            found.append(f"{proc.pid} {text}")
    return found


def _wait_http_200(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if _get(url).status_code == 200:
                return
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {timeout}s"
        time.sleep(0.05)


def _wait_running_state(platform: LocalPlatform, env: str, role: str) -> None:
    """Until supervisord counts the restarted process as RUNNING (after startsecs)."""
    deadline = time.monotonic() + 10
    while any(p.state != "RUNNING" for p in platform.state.processes(env, role=role)):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_dead(pid: int | None, create_time: float | None, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while is_alive(pid, create_time):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)
