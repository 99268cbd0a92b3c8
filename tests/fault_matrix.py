"""What the fault matrix's tests share (test_production_faults*.py; split in two files so the
two pytest workers run them side by side, each file on its own platform): a promoted
baseline, the deploy started as a child process, waits on the platform's state, and
`production_is_whole`: within 30 s production serves 100% from exactly one ready version
(>= 99% of 200 requests answered 200), no process outside the serving tracks runs, every
production change has exactly one audit entry, and `release audit verify` exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project import deploy as deploy_cli
from dagster_project.core import audit, changes, httpclient, ownership

RECOVERY_SECONDS = 30


def promoted_platform(baseline: str) -> Iterator[object]:
    """The body of a test module's `platform` fixture: the platform up, `baseline` promoted."""
    from dagster_project.core.platform.local import LocalPlatform

    os.environ["GUARDRAIL_TOKEN"] = GUARDRAIL_TOKEN
    local = LocalPlatform(PRODUCT)
    local.up()
    outcome = deploy_cli.deploy(PRODUCT, baseline, [], echo=lambda line: None)
    assert outcome.exit_code == deploy_cli.EXIT_OK, outcome.headline
    yield local
    local.down()


# -- helpers ---------------------------------------------------------------------------------


def version_counter(major: str) -> Callable[[], str]:
    """`f<major>.1.0`, `f<major>.2.0`, ...: release keys of one test module."""
    versions = iter(f"f{major}.{minor}.0" for minor in range(1, 100))
    return lambda: next(versions)


def cli(entry: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One of the project's CLI entry points in a child process, run to its end."""
    with start_cli(entry, *args) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_cli(entry: str, *args: str) -> subprocess.Popen[str]:
    """`cli`, started: the caller collects it with `communicate`."""
    code = f"from dagster_project.cli import {entry}; raise SystemExit({entry}())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GUARDRAIL_TOKEN": GUARDRAIL_TOKEN},
    )


def start_deploy(version: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    code = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, PRODUCT, "--release", version, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GUARDRAIL_TOKEN": GUARDRAIL_TOKEN},
        )
    proc.log_path = log  # type: ignore[attr-defined]  (wait_for quotes it when the deploy ends)
    return proc


def production_weights(local: object) -> dict[str, int]:
    record = local.state.environment("production")  # type: ignore[attr-defined]
    return dict(record.weights) if record else {}


def wait_for(what: str, condition, timeout: float = 180.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            tail = Path(log).read_text(errors="replace")[-3000:] if log else "(no log)"
            raise AssertionError(f"the deploy exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_canary_weight(local: object, weight: int, proc=None) -> None:
    wait_for(
        f"canary at {weight}%", lambda: production_weights(local).get("canary") == weight, proc=proc
    )


def pid_of(local: object, track: str, role: str) -> int:
    status = local.status()["production"]  # type: ignore[attr-defined]
    if role == "edge":
        return int(status["edge"]["pid"])
    return int(status["tracks"][track]["pids"][role])


def served_versions(local: object, n: int = 200) -> tuple[dict[str, int], int]:
    """(versions answering, count of 200s) for n requests through the production edge."""
    versions: dict[str, int] = {}
    ok = 0
    with httpclient.client(timeout=5, trust_env=False) as client:
        for i in range(n):
            try:
                response = client.get(f"{local.edge_url('production')}/v1/items?probe={i}")  # type: ignore[attr-defined]
            except httpx.HTTPError:
                continue
            ok += response.status_code == 200
            version = response.headers.get("x-release", "?")
            versions[version] = versions.get(version, 0) + 1
    return versions, ok


def platform_service_processes(release_home: Path) -> list[psutil.Process]:
    """Every API or worker process started from this test session's deployments."""
    deployments = str(release_home / "deployments")
    found = []
    for proc in psutil.process_iter(["cwd", "status"]):
        try:
            if (proc.info["cwd"] or "").startswith(deployments) and proc.info[
                "status"
            ] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def production_is_whole(local: object, release_home: Path) -> str:
    """The guarantees after any fault; returns the version production serves."""
    # Reconcile the way an operator's next command does (every CLI command reconciles first).
    status = cli("release_main", "status", PRODUCT, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    # The reconciliation is done: the chain is verified (a CLI start, seconds) beside the checks.
    verify = start_cli("release_main", "audit", "verify")
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        tracks = local.current("production")  # type: ignore[attr-defined]
        versions, ok = served_versions(local)
        whole = (
            set(tracks) == {"stable"}
            and list(versions) == [tracks["stable"]["version"]]
            and ok >= 198
            and ownership.current(PRODUCT, "production") is None
        )
        if whole or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert set(tracks) == {"stable"}, tracks
    assert list(versions) == [tracks["stable"]["version"]], versions
    assert ok >= 198, f"only {ok}/200 answered 200"
    assert ownership.current(PRODUCT, "production") is None
    # No process outside the serving tracks: staging's and production's stable api + worker.
    serving = {
        (env, track["artifact_sha"])
        for env in ("staging", "production")
        for track in local.current(env).values()  # type: ignore[attr-defined]
    }
    running = platform_service_processes(release_home)
    shas = {Path(p.info["cwd"]).parts[len(release_home.parts) + 1] for p in running}
    assert shas <= {sha for _, sha in serving}, (shas, serving)
    assert len(running) == 2 * len(serving), [p.info for p in running]
    # Every production change has exactly one audit entry, and the chain verifies.
    history = changes.history(PRODUCT)
    entries = audit.entries(PRODUCT)
    by_change = [e.payload["change_id"] for e in entries]
    for change in history:
        assert by_change.count(change.change_id) == 1, change
    assert len(entries) == len(history)
    out, err = verify.communicate(timeout=120)
    assert verify.returncode == 0, out + err
    return str(tracks["stable"]["version"])


def finish(proc: subprocess.Popen[bytes], timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("the deploy did not finish in time") from None
