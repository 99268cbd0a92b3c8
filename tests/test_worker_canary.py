"""Workers judged like the API during the canary, through the real path: the local platform's
processes, the load generator's jobs through the production edge, the workers' own /metrics.

A healthy release is promoted with the canary's workers having processed their share of the
production jobs; a release with slow jobs (`job_latency_ms`) or failing jobs
(`fail_jobs_matching`) is blocked by `slo_regression` at the canary, naming the worker metric,
with production back on stable and every job the canary took finished by a worker."""

import os
import time
from collections.abc import Iterator

import psycopg2
import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project import deploy as deploy_cli
from dagster_project.core import changes, database, httpclient

pytestmark = pytest.mark.slow

PRODUCTION_DB = database.environment_database(PRODUCT, "production")


@pytest.fixture(scope="module")
def platform() -> Iterator[object]:
    from dagster_project.core.platform.local import LocalPlatform

    os.environ["GUARDRAIL_TOKEN"] = GUARDRAIL_TOKEN
    local = LocalPlatform(PRODUCT)
    local.up()
    yield local
    local.down()


def _deploy(version: str, *pairs: str) -> deploy_cli.DeployOutcome:
    outcome = deploy_cli.deploy(PRODUCT, version, list(pairs), echo=lambda line: None)
    print(outcome)
    return outcome


def _production_rows(sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg2.connect(database.server().dsn(PRODUCTION_DB)) as conn, conn.cursor() as cur:
        cur.execute(sql, params or None)  # no parameters: a LIKE's % stays literal
        return cur.fetchall()


def _served_versions(local: object, n: int = 40) -> set[str]:
    with httpclient.client(timeout=5) as client:
        return {
            client.get(f"{local.edge_url('production')}/v1/items?wc={i}").headers["x-release"]  # type: ignore[attr-defined]
            for i in range(n)
        }


def _blocked_by_worker_metric(outcome: deploy_cli.DeployOutcome, metrics: tuple[str, ...]) -> str:
    assert outcome.exit_code == deploy_cli.EXIT_BLOCKED, outcome.headline
    why = {b["check"]: b["why"] for b in outcome.blocked_by}
    assert "slo_regression" in why, outcome.blocked_by
    assert any(m in why["slo_regression"] for m in metrics), why["slo_regression"]
    return why["slo_regression"]


def _jobs_left_behind(deadline_s: float = 20.0) -> list[tuple[object, ...]]:
    """Canary-lane load jobs still queued: the stable worker drains a lane whose worker
    stopped beating, so none should stay."""
    left: list[tuple[object, ...]] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        left = _production_rows(
            "SELECT job_key, lane FROM jobs "
            "WHERE status = 'queued' AND job_key LIKE 'canary-load-%'"
        )
        if not left:
            return []
        time.sleep(0.5)
    return left


def test_first_release_then_a_healthy_second_with_canary_workers(platform: object) -> None:
    assert _deploy("wc-1.0.0").exit_code == deploy_cli.EXIT_OK
    outcome = _deploy("wc-1.1.0")
    assert outcome.exit_code == deploy_cli.EXIT_OK, outcome.headline
    # The canary's workers took production jobs, each recorded with its version.
    by_version = dict(
        _production_rows(  # type: ignore[arg-type]
            "SELECT processed_version, count(*) FROM jobs WHERE lane = 'canary' "
            "AND status = 'done' GROUP BY processed_version"
        )
    )
    assert by_version.get("wc-1.1.0", 0) >= 8, by_version
    # ... in proportion to the canary weight: never the majority (steps go up to 50%).
    stable_jobs = _production_rows(
        "SELECT count(*) FROM jobs WHERE lane = 'stable' AND job_key LIKE 'canary-load-%'"
    )[0][0]
    assert 0 < by_version["wc-1.1.0"] < int(stable_jobs), (by_version, stable_jobs)  # type: ignore[call-overload]
    assert _served_versions(platform) == {"wc-1.1.0"}


@pytest.mark.parametrize(
    ("version", "knob", "metrics"),
    [
        # 100 ms more per job: twice the stable workers' enqueue-to-done latency, yet within
        # the staging smoke's retry-timing tolerance (250 ms), so it reaches the canary.
        ("wc-1.2.0", "job_latency_ms=100", ("job_latency_shift",)),
        ("wc-1.3.0", "fail_jobs_matching=^canary-load-", ("job_failure_rate", "dead_letters")),
    ],
)
def test_bad_workers_are_blocked_at_the_canary(
    platform: object, version: str, knob: str, metrics: tuple[str, ...]
) -> None:
    # The baseline is whatever the healthy test above left live (wc-1.1.0, or wc-1.0.0 if
    # that one was blocked): one flake there must not fail these as well.
    live = platform.current("production")["stable"]["version"]  # type: ignore[attr-defined]
    assert live in ("wc-1.0.0", "wc-1.1.0"), live
    outcome = _deploy(version, knob)
    reason = _blocked_by_worker_metric(outcome, metrics)
    print(reason)
    production = platform.current("production")  # type: ignore[attr-defined]
    assert production["stable"]["version"] == live
    assert "canary" not in production
    assert _served_versions(platform) == {live}
    aborted = [c for c in changes.for_release(PRODUCT, version) if c.outcome == "aborted"]
    assert len(aborted) == 1
    assert _jobs_left_behind() == []
    # Each job the canary's workers touched is settled once: done or dead, never both.
    twice = _production_rows(
        "SELECT job_key FROM job_attempts GROUP BY job_key "
        "HAVING count(*) FILTER (WHERE settled_as = 'done') > 1"
    )
    assert twice == []
