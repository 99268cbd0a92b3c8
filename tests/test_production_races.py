"""The fault matrix, part 2, through the real path from a promoted baseline: two releases at
once, `canary` launched alone from the UI's point of view, a rollback, a watch that fails after
promotion. After each, `production_is_whole` (fault_matrix.py) holds. Part 1:
test_production_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_matrix import (
    cli,
    finish,
    pid_of,
    production_is_whole,
    production_weights,
    promoted_platform,
    start_deploy,
    version_counter,
    wait_for,
)

from conftest import PRODUCT
from dagster_project import deploy as deploy_cli
from dagster_project.core import audit, changes, ownership

pytestmark = pytest.mark.slow

_next_version = version_counter("2")


@pytest.fixture(scope="module")
def platform() -> Iterator[object]:
    yield from promoted_platform("f2.0.0")


def test_releases_at_once_never_overlap(platform: object, release_home: Path) -> None:
    """Three deploys: the second 0.5 s after the first (they race for staging), the third
    12 s after it (it arrives while the first holds production and the second staging), so
    one run sees both interleavings; each releases in turn, is refused as owned, or (an
    older one) is blocked as superseded."""
    versions = [_next_version() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    for version, at in zip(versions, (0.0, 0.5, 12.0), strict=True):
        time.sleep(max(0.0, started + at - time.monotonic()))
        procs.append(start_deploy(version, log=release_home / f"deploy-{version}.log"))
    overlap = []
    while any(p.poll() is None for p in procs):
        owner = ownership.current(PRODUCT, "production")
        weights = production_weights(platform)
        tracks = platform.current("production")  # type: ignore[attr-defined]
        if weights.get("canary") and owner is None:
            overlap.append(f"canary traffic without an owner: {weights}")
        canary = tracks.get("canary")
        if owner and canary and canary["artifact_sha"] != owner.artifact_sha256:
            overlap.append(f"canary {canary['version']} running under owner {owner.release}")
        time.sleep(0.2)
    codes = {v: p.returncode for v, p in zip(versions, procs, strict=True)}
    # A string, not a tuple: pytest shortens a tuple's repr and dropped the gate's reason.
    logs = "\n".join(
        f"--- {v}:\n" + (release_home / f"deploy-{v}.log").read_text()[-3000:] for v in versions
    )
    assert overlap == []
    # Each released in turn, or was refused because production was owned, or (an older one
    # whose canary came after a newer release's promotion) was blocked as superseded:
    # production never moves backwards.
    for version, code in codes.items():
        log = (release_home / f"deploy-{version}.log").read_text()
        assert code in (deploy_cli.EXIT_OK, deploy_cli.EXIT_OWNED) or (
            code == deploy_cli.EXIT_BLOCKED and "production is never moved backwards" in log
        ), f"{codes}\n{logs}"
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
    done = cli("release_main", "rollback", PRODUCT, timeout=180)
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
    proc = start_deploy(version, log=log)
    wait_for(
        "the watch at 100%",
        lambda: (
            (owner := ownership.current(PRODUCT, "production")) is not None
            and owner.phase == "promoting"
            and production_weights(platform).get("canary") == 100
        ),
        proc=proc,
    )
    os.kill(pid_of(platform, "canary", "api"), signal.SIGKILL)
    code = finish(proc)
    assert code == deploy_cli.EXIT_BLOCKED, log.read_text()[-3000:]
    assert "post_deploy_smoke" in log.read_text()
    assert production_is_whole(platform, release_home) == before
    recorded = changes.for_release(PRODUCT, version)
    assert [c.outcome for c in recorded] == ["rolled_back"], recorded
    assert recorded[0].details.restored_release == before
