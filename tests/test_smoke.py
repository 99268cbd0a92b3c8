"""The smoke suite: pure logic (TTL parsing, backoff deadlines, response contracts, the report)
and the real path: releases deployed on the local platform and smoke-tested through the
staging edge, healthy and broken in the ways the suite must catch."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import PRODUCT
from dagster_project.core import smoke
from dagster_project.core.contracts import ContractError
from dagster_project.core.smoke import (
    FLOOD_DRAINED_ROW,
    CheckFailed,
    SmokeReport,
    SmokeRow,
    backoff_delays,
    check_body,
    effective_ttl,
    expiry_endpoint,
    job_deadline_seconds,
    post_deploy_smoke,
    purged_keys,
    run_smoke,
)
from dagster_project.core.spec import ProductSpec, load_spec


@pytest.fixture(scope="module")
def spec() -> ProductSpec:
    return load_spec(PRODUCT)


# --- pure logic -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        ("public, s-maxage=5", 5),
        ("public, max-age=60, s-maxage=86400", 86400),  # the shared-cache TTL wins
        ("max-age=60", 60),
        ('public, s-maxage="7"', 7),
        ("no-store", None),
        ("max-age=soon", None),
        ("", None),
        (None, None),
    ],
)
def test_effective_ttl_reads_the_shared_cache_lifetime(cache_control: str | None, ttl: int) -> None:
    assert effective_ttl(cache_control) == ttl


def test_job_deadline_follows_the_spec_backoff_policy(spec: ProductSpec) -> None:
    high, low = spec.queues.high, spec.queues.low
    # 4 attempts: three waits, 50 ms doubling (high) and 100 ms doubling (low).
    assert backoff_delays(high) == pytest.approx([0.05, 0.1, 0.2])
    assert backoff_delays(low) == pytest.approx([0.1, 0.2, 0.4])
    assert job_deadline_seconds(high, slack=2.0) == pytest.approx(2.35)
    capped = high.model_copy(update={"max_attempts": 8, "backoff_max_ms": 300})
    assert backoff_delays(capped)[-1] == pytest.approx(0.3)  # never above backoff_max_ms


def _with_keys(spec: ProductSpec, keys: dict[str, tuple[str, ...]]) -> ProductSpec:
    endpoints = tuple(
        e.model_copy(update={"surrogate_keys": keys.get(e.path, e.surrogate_keys)})
        for e in spec.endpoints
    )
    return spec.model_copy(update={"endpoints": endpoints})


@pytest.mark.parametrize(
    ("keys", "ttls", "purge", "expected"),
    [
        # The sample: the cache checks purge `items` and `static`; /v1/summary is untouched.
        ({}, {}, True, ("/v1/summary", True)),
        # No purges in this run: the first endpoint of the shortest class, at once.
        ({}, {}, False, ("/v1/items", True)),
        # Every short endpoint shares a purged key: it waits until the purges are done.
        ({"/v1/summary": ("items",)}, {}, True, ("/v1/items", False)),
        # No class short enough to wait out: no expiry check.
        ({}, {"dynamic": 30}, True, None),
    ],
)
def test_the_expiry_check_runs_beside_the_others_only_on_an_object_no_purge_touches(
    spec: ProductSpec,
    keys: dict[str, tuple[str, ...]],
    ttls: dict[str, int],
    purge: bool,
    expected: tuple[str, bool] | None,
) -> None:
    variant = _with_keys(spec, keys).model_copy(
        update={"ttl_classes": {**spec.ttl_classes, **ttls}}
    )
    assert purged_keys(spec) == {"items", "static"}
    plan = expiry_endpoint(variant, purged_keys(variant) if purge else frozenset())
    got = (plan.endpoint.path, plan.early) if plan else None
    assert got == expected


def _contract(spec: ProductSpec, path: str) -> Any:
    return spec.contract.endpoints[path]


def test_json_contracts_accept_the_documented_shapes(spec: ProductSpec) -> None:
    item = {"id": 1, "name": "notebook", "price_cents": 450, "updated_at": "2025-01-01"}
    body = {"items": [item], "count": 1}
    assert check_body("/v1/items", _contract(spec, "/v1/items"), body) == (
        "matches its JSON Schema (2 keys)"
    )
    assert "matches" in check_body("/v1/items/1", _contract(spec, "/v1/items/1"), item)
    summary_body = {
        "items": {"count": 5, "total_price_cents": 8994},
        "jobs": {"queued": 0, "running": 0, "done": 2, "dead": 1},
        "dead_letter": {"count": 1},
    }
    assert "matches" in check_body("/v1/summary", _contract(spec, "/v1/summary"), summary_body)


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/items", {"items": [{"id": 1, "name": "x"}]}, "field 'items.0'"),
        ("/v1/items", {"items": [{"id": 1, "name": "x"}]}, "'price_cents' is a required"),
        ("/v1/items", [{"id": 1, "name": "x", "price_cents": 1}], "is not of type 'object'"),
        ("/v1/items", {"items": []}, "field 'items': [] should be non-empty"),
        ("/v1/items/1", {"id": "one", "name": "x", "price_cents": 1}, "field 'id'"),
        ("/v1/summary", {"items": 5}, "field 'items': 5 is not of type 'object'"),
    ],
)
def test_json_contract_violations_name_the_path_and_field(
    spec: ProductSpec, path: str, body: Any, named: str
) -> None:
    with pytest.raises(CheckFailed) as failure:
        check_body(path, _contract(spec, path), body)
    assert path in str(failure.value)
    assert named in str(failure.value)


def _report(rows: list[tuple[str, bool]], sections: list[str] | None = None) -> SmokeReport:
    return SmokeReport(
        product=PRODUCT,
        env="staging",
        expected_version="1.0.0",
        run_id="abc123",
        edge_url="http://127.0.0.1:1",
        sections=sections or ["smoke", "edge_cache", "worker_dlq"],  # type: ignore[arg-type]
        started_at="2025-01-01T00:00:00+00:00",
        rows=[
            SmokeRow(section=section, name=f"check {i}", passed=ok, detail=f"d|{i}", seconds=0.1)  # type: ignore[arg-type]
            for i, (section, ok) in enumerate(rows)
        ],
    )


def test_report_passes_a_section_only_with_rows_all_passing() -> None:
    report = _report(
        [("smoke", True), ("smoke", True), ("edge_cache", True), ("edge_cache", False)]
    )
    assert report.passed("smoke")
    assert not report.passed("edge_cache")  # one failing row
    assert not report.passed("worker_dlq")  # asked for, but no rows: never a pass
    assert report.verdict("worker_dlq") == "FAILED (no checks ran)"
    assert not report.passed()
    assert not _report([("smoke", True)], sections=["smoke"]).passed("edge_cache")  # not run
    assert _report([("smoke", True)], sections=["smoke"]).passed()
    assert not _report([], sections=[]).passed()  # nothing asked, nothing proven


def test_report_round_trips_through_json_and_summarises() -> None:
    report = _report([("smoke", True), ("edge_cache", False), ("worker_dlq", True)])
    stored = json.loads(report.model_dump_json())
    again = SmokeReport.parse(stored)
    assert again == report
    assert again.passed("smoke")
    assert not again.passed("edge_cache")
    stored["seconds"] = 4.2  # a contract refuses fields it does not define
    with pytest.raises(ContractError, match="seconds"):
        SmokeReport.parse(stored)

    summary = report.summary()
    assert "FAILED" in summary
    assert "edge_cache: FAILED (0/1 checks passed); first failure: check 1: d|1" in summary
    assert "smoke: PASSED (1/1" in summary


def test_report_from_a_bad_dict_names_the_field() -> None:
    stored = _report([("smoke", True)]).model_dump(mode="json")
    stored["rows"][0]["passed"] = "maybe"
    with pytest.raises(ContractError, match=r"rows\.0\.passed"):
        SmokeReport.parse(stored)
    with pytest.raises(ContractError, match="expected_version"):
        SmokeReport.parse({k: v for k, v in stored.items() if k != "expected_version"})


# --- through real sockets, without the platform ---------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EdgeAt:
    """A platform whose edge is at a fixed URL (e.g. a closed port): `purge` is never reached
    because the edge fails first."""

    def __init__(self, url: str) -> None:
        self.url = url

    def edge_url(self, env: str) -> str:
        return self.url

    def purge(self, env: str, url: str | None = None, surrogate_key: str | None = None) -> int:
        raise AssertionError("purge must not be reached when the edge does not answer")

    def kill_worker(self, env: str) -> int:
        raise AssertionError("no worker is killed when the edge does not answer")


class NoEdge(EdgeAt):
    def edge_url(self, env: str) -> str:
        raise RuntimeError(f"environment {env!r} has no edge running")


def test_closed_edge_port_fails_every_section_naming_the_url(spec: ProductSpec) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    report = run_smoke(spec, EdgeAt(url), "staging", "1.0.0", job_slack_seconds=1.0)
    for section in smoke.SECTIONS:
        assert report.section_rows(section), section
        assert not report.passed(section), section
    assert not report.passed()
    health = report.section_rows("smoke")[0]
    assert health.name == "GET /healthz"
    assert f"{url}/healthz" in health.detail
    assert "ConnectError" in health.detail
    assert any(f"{url}/v1/jobs" in row.detail for row in report.section_rows("worker_dlq"))


def test_environment_without_edge_fails_closed(spec: ProductSpec) -> None:
    report = run_smoke(spec, NoEdge(""), "staging", "1.0.0")
    assert not report.passed()
    assert {row.section for row in report.rows} == set(smoke.SECTIONS)
    assert all("has no edge running" in row.detail for row in report.rows)


# --- the real path: releases on the local platform --------------------------------------------


@pytest.fixture(scope="module")
def platform(spec: ProductSpec) -> Iterator[Any]:
    from dagster_project.core.migrations.history import apply_pending
    from dagster_project.core.platform.local import LocalPlatform

    local = LocalPlatform(PRODUCT)
    try:
        local.up()
        apply_pending(local.database("staging"), spec.migrations_path, "test")
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def deploy(spec: ProductSpec, platform: Any) -> Callable[..., str]:
    """Build, push and deploy a release to a track of an environment; returns its version."""
    from dagster_project.core import registry

    def deploy_release(
        version: str, settings: dict[str, Any] | None = None, env: str = "staging"
    ) -> str:
        artifact = registry.build_artifact(spec, version, settings or {})
        registry.push(artifact)
        platform.deploy(env, "stable", artifact)
        return version

    return deploy_release


def _failure_details(report: SmokeReport, section: str) -> str:
    return "\n".join(f"{row.name}: {row.detail}" for row in report.failures(section))


@pytest.mark.slow
def test_healthy_release_passes_all_sections(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    version = deploy("1.0.0-smoke")
    timing_judged: list[bool] = []  # the caller's cue to start CPU work (the DQ validator)
    report = run_smoke(
        spec, platform, "staging", version, after_retry_timing=lambda: timing_judged.append(True)
    )
    assert report.passed(), report.summary()
    assert timing_judged == [True]
    guardrail_rows = [r for r in report.section_rows("smoke") if r.name.startswith("guardrails:")]
    smoke_rows = [r for r in report.section_rows("smoke") if r not in guardrail_rows]
    # /healthz, /readyz and every smoke endpoint of the spec
    assert len(smoke_rows) == 2 + sum(e.smoke for e in spec.endpoints)
    # The rate limit (429, per client, after Retry-After) and the breaker drill (ready before,
    # opens, fails fast, closes).
    assert len(guardrail_rows) == 7, [row.name for row in guardrail_rows]
    assert {row.name for row in smoke_rows} >= {"GET /v1/items", "GET /static/app.js"}
    cache_names = [row.name for row in report.section_rows("edge_cache")]
    for kind in ("dynamic", "static"):
        probe_rows = [n for n in cache_names if f"({kind}):" in n and "policy" not in n]
        assert len(probe_rows) == 7 + (kind == "dynamic"), cache_names  # + expiry (short TTL)
        assert any(f"({kind}): authenticated request never a HIT" in n for n in cache_names)
    policy_rows = [n for n in cache_names if n.endswith("headers obey the cache policy")]
    assert len(policy_rows) == len(spec.endpoints), cache_names
    worker_rows = report.section_rows("worker_dlq")
    assert len(worker_rows) == 11, [row.name for row in worker_rows]
    assert "dead after 4 attempts" in worker_rows[1].detail
    details = {row.name: row.detail for row in worker_rows}
    print("\n".join(f"{name}: {detail}" for name, detail in details.items()))
    # Backoff timing (poison jobs of both queues and the retry job), retry, crash, priority.
    backoff = [name for name in details if name.startswith("backoff between attempts")]
    assert len(backoff) == 3, backoff
    assert (
        "3 gaps within bounds" in details["backoff between attempts of the poison job (low queue)"]
    )
    retried = details["retry job (high queue) done after 2 failures, written back once"]
    assert "done after 3 attempts (2 failed)" in retried
    crash = details["worker SIGKILLed during a job (high queue): done once after restart"]
    assert "SIGKILLed" in crash and "1 done in the attempt log, 1 result" in crash
    priority = details["high job not delayed by a flood of low jobs"]
    assert "bound 1000 ms" in priority and "still queued ahead of it" in priority
    assert details[FLOOD_DRAINED_ROW].startswith("all 40 low jobs done")
    # Stored as an asset value: survives JSON.
    assert SmokeReport.parse(json.loads(report.model_dump_json())).passed()


@pytest.mark.slow
def test_wrong_expected_version_fails_the_smoke_section(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    deploy("1.0.0-smoke")
    report = run_smoke(
        spec, platform, "staging", "9.9.9", include_edge_cache=False, include_worker=False
    )
    assert not report.passed("smoke")
    details = _failure_details(report, "smoke")
    assert "X-Release '1.0.0-smoke', expected '9.9.9'" in details
    assert "/v1/items" in details


@pytest.mark.slow
def test_release_answering_errors_fails_smoke_naming_the_endpoint(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    version = deploy("1.0.1-errors", {"error_rate": 1.0})
    report = run_smoke(spec, platform, "staging", version, include_worker=False)
    assert not report.passed("smoke")
    assert not report.passed("edge_cache")  # nothing cacheable was served
    failed = {row.name: row.detail for row in report.failures("smoke")}
    assert "GET /v1/items" in failed
    assert "/v1/items?smoke=" in failed["GET /v1/items"]
    assert "status 500" in failed["GET /v1/items"]
    # Probes and static files do not go through the data handlers: they still pass.
    assert report.section_rows("smoke")[0].passed


@pytest.mark.slow
def test_occasional_errors_are_retried_once_and_listed_not_hidden(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    # One data request in five answers 500: a smoke suite checks function; the error rate is
    # the canary's statistical job. Every retry is listed in the report.
    version = deploy("1.0.3-flaky", {"error_rate": 0.2})
    report = run_smoke(spec, platform, "staging", version, include_worker=False)
    assert report.passed("smoke"), report.summary()
    assert report.passed("edge_cache"), report.summary()
    assert report.retries, "the 500s must be listed"
    # The breaker drill's requests during database faults are retried into the drill's 503.
    for line in report.retries:
        drill = "-cb-fault-" in line or "-cb-open-" in line
        assert ("500, retried: 503" if drill else "500, retried: 200") in line, report.retries


@pytest.mark.slow
def test_release_failing_jobs_fails_the_worker_section(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    version = deploy("1.0.2-failjobs", {"fail_jobs_matching": f"^{smoke.NORMAL_JOB_PREFIX}"})
    report = run_smoke(spec, platform, "staging", version, include_edge_cache=False)
    assert report.passed("smoke"), report.summary()
    assert not report.passed("worker_dlq")
    failed = {row.name: row.detail for row in report.failures("worker_dlq")}
    normal = failed["normal job done after one attempt"]
    assert smoke.NORMAL_JOB_PREFIX in normal
    assert "status 'dead' after 4 attempts" in normal
    assert "re-enqueue of a done key is not processed twice" in failed
    # Poison jobs still behave: only the normal job's rows fail.
    assert len(report.failures("worker_dlq")) == 2


@pytest.mark.slow
def test_release_failing_retried_and_priority_jobs_is_blocked_by_the_new_rows(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    # The retry probe never succeeds and the high job of the priority check is dead-lettered:
    # exactly those two rows fail; the backoff of the (now dead) retry job is still on time.
    pattern = f"^({smoke.RETRY_JOB_PREFIX}|{smoke.PRIORITY_JOB_PREFIX})"
    version = deploy("1.0.5-retry-fails", {"fail_jobs_matching": pattern})
    report = run_smoke(spec, platform, "staging", version, include_edge_cache=False)
    assert not report.passed("worker_dlq")
    failed = {row.name: row.detail for row in report.failures("worker_dlq")}
    retried = failed.pop("retry job (high queue) done after 2 failures, written back once")
    assert smoke.RETRY_JOB_PREFIX in retried
    assert "status 'dead' after 4 attempts" in retried
    assert "expected 'done' after exactly 3 (worker.probes.retry.fails 2 + 1" in retried
    priority = failed.pop("high job not delayed by a flood of low jobs")
    assert "status 'dead'" in priority and "queues.high.priority_max_wait_ms" in priority
    assert not failed, failed
    backoff = {row.name: row for row in report.section_rows("worker_dlq")}
    assert backoff["backoff between attempts of the retry job (high queue)"].passed


@pytest.mark.slow
def test_post_deploy_smoke_runs_the_smoke_section_on_production(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    from dagster_project.core.migrations.history import apply_pending

    apply_pending(platform.database("production"), spec.migrations_path, "test")
    version = deploy("1.0.0-smoke", env="production")
    report = post_deploy_smoke(spec, platform, version)
    assert report.env == "production"
    assert report.sections == ["smoke"]
    assert report.passed(), report.summary()
    assert report.edge_url == platform.edge_url("production").rstrip("/")
    assert not post_deploy_smoke(spec, platform, "0.0.1-not-deployed").passed()


@pytest.mark.slow
def test_stopped_edge_fails_naming_the_endpoint_never_passes(
    spec: ProductSpec, platform: Any, deploy: Callable[..., str]
) -> None:
    from dagster_project.core.platform import processes

    version = deploy("1.0.0-smoke")
    url = platform.edge_url("staging")
    edges = platform.state.processes("staging", role="edge")
    assert edges, "the fixture's platform has an edge for staging"
    processes.terminate([(edge.pid, edge.create_time) for edge in edges])
    try:
        report = run_smoke(spec, platform, "staging", version, job_slack_seconds=1.0)
        assert not report.passed()
        for section in smoke.SECTIONS:
            assert report.section_rows(section), section
            assert not report.passed(section), section
        details = _failure_details(report, "smoke")
        assert f"GET {url}/healthz" in details
        assert f"GET {url}/v1/items?smoke=" in details
    finally:
        platform.up()  # a dead edge is replaced, so later tests find staging serving
    assert run_smoke(spec, platform, "staging", version, include_worker=False).passed()
