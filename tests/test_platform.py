"""The local platform through the real path: edge and service processes on 127.0.0.1, state
in the session's Postgres, traffic over HTTP. Tests run in file order on one platform
(module fixture); the last test takes it down."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from dagster_project.core import database, registry
from dagster_project.core.migrations.history import apply_pending
from dagster_project.core.platform import LocalPlatform, PlatformError
from dagster_project.core.platform.processes import ProcessStartError, is_alive
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
        apply_pending(env, load_spec(PRODUCT).migrations_path, actor="test_platform")
        platform.deploy(env, "stable", artifacts["1.0.0"])
    return platform


def _get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=5.0, trust_env=False, **kwargs)


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


def test_deploy_that_never_gets_ready_names_endpoint_and_log(
    platform: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    # Runs before `deployed`. With a table of the schema missing, /readyz answers 503.
    assert platform.current("production") == {}
    platform.ready_deadline_seconds = 3.0
    try:
        with (
            _table_hidden("production", "dead_letter"),
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


def test_up_twice_is_harmless(deployed: LocalPlatform) -> None:
    before = {p.id: p.pid for p in deployed.state.processes()}
    status = deployed.up()
    assert {p.id: p.pid for p in deployed.state.processes()} == before
    assert all(status[env]["healthy"] for env in ENVS)


def test_weighted_split_then_rollback_under_a_second(
    deployed: LocalPlatform, artifacts: dict[str, registry.Artifact]
) -> None:
    deployed.deploy("production", "canary", artifacts["1.1.0"])
    deployed.set_weights("production", {"stable": 90, "canary": 10})
    edge = deployed.edge_url("production")
    served: Counter[str] = Counter()
    with httpx.Client(timeout=5.0, trust_env=False) as client:
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
    started = time.monotonic()
    result = deployed.rollback("production")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, result
    assert result["switch_seconds"] < 1.0
    assert sorted(result["stopped_pids"]) == sorted(canary_pids)
    assert canary_pids and not any(_running(pid) for pid in canary_pids)

    with httpx.Client(timeout=5.0, trust_env=False) as client:
        tracks = Counter(
            client.get(f"{edge}/v1/items", params={"after": i}).headers["x-track"]
            for i in range(200)
        )
    assert tracks == Counter({"stable": 200})
    info = deployed.status()["production"]
    assert info["weights"] == {"stable": 100, "canary": 0}
    assert "canary" not in info["tracks"] and info["healthy"], info["problems"]


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


def test_restarted_edge_serves_the_recorded_release(deployed: LocalPlatform) -> None:
    edge = deployed.state.processes("production", role="edge")[0]
    os.kill(edge.pid, signal.SIGKILL)
    _wait_dead(edge.pid, edge.create_time)
    info = deployed.status()["production"]
    assert info["healthy"] is False
    assert any("edge of production" in p and "not running" in p for p in info["problems"])

    deployed.up()
    response = _get(f"{deployed.edge_url('production')}/v1/items")
    assert response.status_code == 200
    assert response.headers["x-release"] == "1.1.0"
    assert deployed.status()["production"]["healthy"] is True


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
    status = json.loads(completed.stdout)
    for env in ENVS:
        assert status[env]["edge_url"] == deployed.edge_url(env)
        assert status[env]["healthy"] is True


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
    assert bad.returncode == 1
    assert "product spec not found" in bad.stderr and "Traceback" not in bad.stderr


def test_killed_api_is_reported_not_hidden(deployed: LocalPlatform) -> None:
    api = deployed.state.processes("staging", track="stable", role="api")[0]
    os.kill(api.pid, signal.SIGKILL)
    _wait_dead(api.pid, api.create_time)
    info = deployed.status()["staging"]
    assert info["healthy"] is False
    assert info["tracks"]["stable"]["alive"] is False
    assert any(
        f"api of staging/stable (pid {api.pid}) is not running" in p for p in info["problems"]
    ), info["problems"]
    # Not silently restarted: still the dead pid, and production is unaffected.
    assert deployed.status()["staging"]["tracks"]["stable"]["pids"]["api"] == api.pid
    assert deployed.status()["production"]["healthy"] is True
    cli = subprocess.run(
        [sys.executable, "-m", "dagster_project.cli", "platform", "status", "--json"],
        capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT, check=False,
    )  # fmt: skip
    assert cli.returncode == 1  # unhealthy is a non-zero exit


def test_down_leaves_no_platform_process(deployed: LocalPlatform) -> None:
    recorded = deployed.state.processes()
    assert {p.role for p in recorded} == {"edge", "api", "worker"}
    deployed.down()
    for proc in recorded:
        assert not is_alive(proc.pid, proc.create_time), proc.label
    assert deployed.state.processes() == []
    status = deployed.status()
    assert all(not status[env]["healthy"] for env in ENVS)
    deployed.down()  # a second down is harmless


@contextlib.contextmanager
def _table_hidden(env: str, table: str) -> Iterator[None]:
    """Rename a product table away for the block (other test modules of the session may
    already have applied the migrations to this database)."""
    hidden = f"{table}_hidden_by_test"
    with database.connection(env) as conn, conn.cursor() as cur:
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


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_dead(pid: int, create_time: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while is_alive(pid, create_time):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)
