"""The fault matrix, through the real path, each from a promoted baseline: the platform's own
processes and the pipeline killed at the worst moments, Postgres stopped, two releases at
once, `canary` launched alone. After each, `production_is_whole` holds: within 30 s
production serves 100% from exactly one ready version (>= 99% of 200 requests answered 200),
no process outside the serving tracks runs, every production change has exactly one audit
entry, and `release audit verify` exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project import deploy as deploy_cli
from dagster_project.core import audit, changes, ownership

pytestmark = pytest.mark.slow

RECOVERY_SECONDS = 30


@pytest.fixture(scope="module")
def platform() -> Iterator[object]:
    from dagster_project.core.platform.local import LocalPlatform

    os.environ["GUARDRAIL_TOKEN"] = GUARDRAIL_TOKEN
    local = LocalPlatform(PRODUCT)
    local.up()
    outcome = deploy_cli.deploy(PRODUCT, "f1.0.0", [], echo=lambda line: None)
    assert outcome.exit_code == deploy_cli.EXIT_OK, outcome.headline
    yield local
    local.down()


# -- helpers ---------------------------------------------------------------------------------

_versions = iter(f"f1.{minor}.0" for minor in range(1, 100))


def _next_version() -> str:
    return next(_versions)


def _cli(entry: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    code = f"from dagster_project.cli import {entry}; raise SystemExit({entry}())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "GUARDRAIL_TOKEN": GUARDRAIL_TOKEN},
    )


def _start_deploy(version: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    code = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, PRODUCT, "--release", version, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GUARDRAIL_TOKEN": GUARDRAIL_TOKEN},
        )


def _weights(local: object) -> dict[str, int]:
    record = local.state.environment("production")  # type: ignore[attr-defined]
    return dict(record.weights) if record else {}


def _wait_for(what: str, condition, timeout: float = 180.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the deploy exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_for_canary_weight(local: object, weight: int, proc=None) -> None:
    _wait_for(f"canary at {weight}%", lambda: _weights(local).get("canary") == weight, proc=proc)


def _pid(local: object, track: str, role: str) -> int:
    status = local.status()["production"]  # type: ignore[attr-defined]
    if role == "edge":
        return int(status["edge"]["pid"])
    return int(status["tracks"][track]["pids"][role])


def _served(local: object, n: int = 200) -> tuple[dict[str, int], int]:
    """(versions answering, count of 200s) for n requests through the production edge."""
    versions: dict[str, int] = {}
    ok = 0
    with httpx.Client(timeout=5, trust_env=False) as client:
        for i in range(n):
            try:
                response = client.get(f"{local.edge_url('production')}/v1/items?probe={i}")  # type: ignore[attr-defined]
            except httpx.HTTPError:
                continue
            ok += response.status_code == 200
            version = response.headers.get("x-release", "?")
            versions[version] = versions.get(version, 0) + 1
    return versions, ok


def _platform_service_processes(release_home: Path) -> list[psutil.Process]:
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
    status = _cli("release_main", "status", PRODUCT, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        tracks = local.current("production")  # type: ignore[attr-defined]
        versions, ok = _served(local)
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
    running = _platform_service_processes(release_home)
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
    verify = _cli("release_main", "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return str(tracks["stable"]["version"])


def _finish(proc: subprocess.Popen[bytes], timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("the deploy did not finish in time") from None


# -- the faults -------------------------------------------------------------------------------


def test_sigkill_of_deploy_at_25_percent(platform: object, release_home: Path) -> None:
    before = platform.current("production")["stable"]["version"]  # type: ignore[attr-defined]
    version = _next_version()
    proc = _start_deploy(version, log=release_home / f"deploy-{version}.log")
    _wait_for_canary_weight(platform, 25, proc)
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
    proc = _start_deploy(version, log=release_home / f"deploy-{version}.log")
    _wait_for_canary_weight(platform, 25, proc)
    assert database.stop_embedded()
    time.sleep(5)
    database._servers.clear()
    database.server()  # the embedded server again, same data directory and socket
    code = _finish(proc)
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
    proc = _start_deploy(version, log=release_home / f"deploy-{version}.log")
    _wait_for_canary_weight(platform, 25, proc)
    os.kill(_pid(platform, track, role), signal.SIGKILL)
    code = _finish(proc)
    log = (release_home / f"deploy-{version}.log").read_text()
    # A step during which a track or the edge was down cannot pass: the step guard names the
    # outage, or, when the metrics source sees the restarted API's counters reset first, the
    # judge fails closed on that restart (whichever comes first in the step).
    assert code == deploy_cli.EXIT_BLOCKED, log[-3000:]
    assert "outage" in log or "counters went backwards" in log, log[-3000:]
    assert production_is_whole(platform, release_home) == before["version"]
    # Restarted on the same address: the environment's edge URL never moves.
    assert platform.edge_url("production") == edge_url  # type: ignore[attr-defined]


def test_sigkill_during_promotion(platform: object, release_home: Path) -> None:
    version = _next_version()
    log = release_home / f"deploy-{version}.log"
    proc = _start_deploy(version, log=log)
    _wait_for(
        "promotion to start",
        lambda: (
            (owner := ownership.current(PRODUCT, "production")) is not None
            and owner.phase == "promoting"
        ),
        proc=proc,
    )
    time.sleep(1.0)  # in the middle of it: the watch has moved traffic
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    served = production_is_whole(platform, release_home)
    recorded = changes.for_release(PRODUCT, version)
    assert len(recorded) == 1, recorded
    # Either the switch had happened (promoted) or production went back (aborted).
    assert (recorded[0].outcome == "promoted") == (served == version)


@pytest.mark.parametrize("apart", [0.5, 12.0])
def test_two_releases_at_once_never_overlap(
    platform: object, release_home: Path, apart: float
) -> None:
    first, second = _next_version(), _next_version()
    a = _start_deploy(first, log=release_home / f"deploy-{first}.log")
    time.sleep(apart)
    b = _start_deploy(second, log=release_home / f"deploy-{second}.log")
    overlap = []
    while a.poll() is None or b.poll() is None:
        owner = ownership.current(PRODUCT, "production")
        weights = _weights(platform)
        tracks = platform.current("production")  # type: ignore[attr-defined]
        if weights.get("canary") and owner is None:
            overlap.append(f"canary traffic without an owner: {weights}")
        canary = tracks.get("canary")
        if owner and canary and canary["artifact_sha"] != owner.artifact_sha256:
            overlap.append(f"canary {canary['version']} running under owner {owner.release}")
        time.sleep(0.2)
    codes = {first: a.returncode, second: b.returncode}
    logs = "\n".join(
        (release_home / f"deploy-{v}.log").read_text()[-2000:] for v in (first, second)
    )
    assert overlap == []
    # Each either released in turn or was refused because production was owned.
    assert set(codes.values()) <= {deploy_cli.EXIT_OK, deploy_cli.EXIT_OWNED}, (codes, logs)
    assert deploy_cli.EXIT_OK in codes.values(), codes
    production_is_whole(platform, release_home)


def _launch_canary_alone(version: str):
    import dagster as dg

    from dagster_project.definitions import defs
    from dagster_project.instance import get_instance
    from dagster_project.partitions import register_release

    instance = get_instance()
    register_release(instance, PRODUCT, version)
    # What a UI launch of `canary` alone for this partition executes.
    job = defs.resolve_job_def("release_" + PRODUCT.replace("-", "_"))
    return job.execute_in_process(
        asset_selection=[dg.AssetKey([PRODUCT, "canary"])],
        partition_key=version,
        instance=instance,
        raise_on_error=False,
    )


def test_canary_alone_for_a_never_staged_release_is_refused(
    platform: object, release_home: Path
) -> None:
    before = platform.current("production")  # type: ignore[attr-defined]
    result = _launch_canary_alone(_next_version())
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.event_specific_data.error.message
    # Refused before the body runs: the release has no build to load, let alone passed gates.
    assert "did not pass" in message or 'loading input "artifact"' in message, message
    assert platform.current("production") == before  # type: ignore[attr-defined]
    production_is_whole(platform, release_home)


def test_canary_alone_after_a_failed_gate_is_refused(platform: object, release_home: Path) -> None:
    version = _next_version()
    outcome = deploy_cli.deploy(
        PRODUCT, version, ["fail_jobs_matching=.*"], echo=lambda line: None
    )  # every job fails: the staging worker gate blocks
    assert outcome.exit_code == deploy_cli.EXIT_BLOCKED, outcome.headline
    before = platform.current("production")  # type: ignore[attr-defined]
    result = _launch_canary_alone(version)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.event_specific_data.error.message
    assert "blocking checks upstream did not pass" in message, message
    assert platform.current("production") == before  # type: ignore[attr-defined]
    production_is_whole(platform, release_home)


def test_release_rollback_returns_to_the_previous_version_and_is_audited(
    platform: object, release_home: Path
) -> None:
    before = platform.current("production")["stable"]["version"]  # type: ignore[attr-defined]
    version = _next_version()
    assert deploy_cli.deploy(PRODUCT, version, [], echo=lambda line: None).exit_code == 0
    assert platform.current("production")["stable"]["version"] == version  # type: ignore[attr-defined]
    refused = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dagster_project.cli import release_main; raise SystemExit(release_main())",
            "rollback",
            PRODUCT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "GUARDRAIL_TOKEN"},
    )
    assert refused.returncode == deploy_cli.EXIT_REFUSED, refused.stdout + refused.stderr
    assert "GUARDRAIL_TOKEN" in refused.stderr + refused.stdout
    done = _cli("release_main", "rollback", PRODUCT, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert production_is_whole(platform, release_home) == before
    rolled = [c for c in changes.history(PRODUCT) if c.outcome == "rolled_back"]
    assert rolled and rolled[-1].release == before
    entry = audit.find(rolled[-1].change_id)
    assert entry is not None and entry.payload["outcome"] == "rolled_back"


def test_a_failed_watch_returns_production_to_the_previous_version(
    platform: object, release_home: Path
) -> None:
    """The new version's API dies while it serves 100% during the watch after promotion: the
    previous version (kept running at 0%) takes production back, recorded as rolled_back."""
    before = platform.current("production")["stable"]["version"]  # type: ignore[attr-defined]
    version = _next_version()
    log = release_home / f"deploy-{version}.log"
    proc = _start_deploy(version, log=log)
    _wait_for(
        "the watch at 100%",
        lambda: (
            (owner := ownership.current(PRODUCT, "production")) is not None
            and owner.phase == "promoting"
            and _weights(platform).get("canary") == 100
        ),
        proc=proc,
    )
    os.kill(_pid(platform, "canary", "api"), signal.SIGKILL)
    code = _finish(proc)
    assert code == deploy_cli.EXIT_BLOCKED, log.read_text()[-3000:]
    assert "post_deploy_smoke" in log.read_text()
    assert production_is_whole(platform, release_home) == before
    recorded = changes.for_release(PRODUCT, version)
    assert [c.outcome for c in recorded] == ["rolled_back"], recorded
    assert recorded[0].details.restored_release == before
