"""Canary analysis through the real platform: edge, API processes, Postgres, real traffic.

One platform for the module (production: 1.0.0 on stable, migrations applied); each test
deploys a release on track `canary` and runs `run_canary` with the spec's steps, load rate
and minimum samples. Every blocked case must leave production at 100% on the previous
version: checked in the platform state and by measuring through the edge.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagster_project.core import httpclient, registry
from dagster_project.core.canary.analysis import CanaryReport, run_canary
from dagster_project.core.canary.judge import METRICS, METRICS_SOURCE, WORKER_METRICS, Verdict
from dagster_project.core.canary.load import LoadGenerator, LoadRefused, Target
from dagster_project.core.canary.metrics import LocalScrapeSource
from dagster_project.core.canary.snapshots import render_snapshots
from dagster_project.core.migrations.history import apply_pending
from dagster_project.core.platform import LocalPlatform
from dagster_project.core.spec import ProductSpec, load_spec

PRODUCT = "4pnihc40q-yj"
ENV = "production"
# Bake and extension times halved where the outcome does not depend on the canary reaching
# its minimum sample at 5% (the spec file is untouched).
FAST = 0.5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spec() -> ProductSpec:
    return load_spec(PRODUCT)


@pytest.fixture(scope="module")
def platform(spec: ProductSpec) -> Iterator[LocalPlatform]:
    local = LocalPlatform(PRODUCT)
    try:
        local.up()
        apply_pending(local.database(ENV), spec.migrations_path, actor="test_canary_analysis")
        local.deploy(ENV, "stable", registry.push(registry.build_artifact(spec, "1.0.0")))
        yield local
    finally:
        local.down()


def deploy_canary(
    platform: LocalPlatform, spec: ProductSpec, version: str, **settings: float
) -> registry.Artifact:
    artifact = registry.push(registry.build_artifact(spec, version, settings or None))
    platform.deploy(ENV, "canary", artifact)
    return artifact


def assert_production_on(platform: LocalPlatform, version: str) -> None:
    """100% on `version` (stable), canary gone: in the platform state and through the edge."""
    current = platform.current(ENV)
    assert set(current) == {"stable"}, current
    assert current["stable"]["version"] == version
    status = platform.status()[ENV]
    assert status["weights"] == {"stable": 100, "canary": 0}
    assert "canary" not in status["tracks"]
    edge = platform.edge_url(ENV)
    seen: Counter[tuple[str | None, str | None]] = Counter()
    with httpclient.client(timeout=5.0, trust_env=False) as client:
        for n in range(60):
            response = client.get(f"{edge}/v1/items?check={time.monotonic_ns()}-{n}")
            assert response.status_code == 200
            seen[(response.headers.get("x-track"), response.headers.get("x-release"))] += 1
    assert seen == Counter({("stable", version): 60})


def assert_blocked(report: CanaryReport, *, reason: str) -> None:
    assert report.verdict == Verdict.FAIL and not report.passed
    assert report.rolled_back
    assert reason in report.reason, report.reason
    # Traffic moved back before the canary's processes were stopped (the callers check every
    # request goes to stable). How fast depends on the host while the load saturates the edge:
    # measured by benchmarks/bench_real_edge.py, not asserted here (tests/test_platform.py
    # bounds the switch on an idle edge).
    assert 0 < report.rollback_result["switch_seconds"] <= report.rollback_result["seconds"]
    rows = report.rows()
    assert rows, "a blocked canary must carry its table"
    assert {r["metric"] for r in rows if r["step"] == report.steps[-1].index} >= set(METRICS)


def test_healthy_release_passes_every_step_and_is_promoted(
    platform: LocalPlatform, spec: ProductSpec, tmp_path: Path
) -> None:
    artifact = deploy_canary(platform, spec, "1.1.0")
    events: list[dict[str, Any]] = []
    report = run_canary(platform, spec, env=ENV, artifact=artifact, on_event=events.append)

    assert report.passed, report.to_dict()
    assert [s.weight for s in report.steps] == [s.weight for s in spec.canary.steps]
    assert all(s.verdict == Verdict.PASS for s in report.steps)
    for step in report.steps:
        assert step.judgement is not None
        rows = {m.metric: m for m in step.judgement.metrics}
        assert set(rows) == set(METRICS) | set(WORKER_METRICS)  # the spec judges workers too
        assert all(m.verdict == Verdict.PASS for m in rows.values())
        assert step.judgement.canary_requests >= spec.canary.min_requests_per_side
    for step in report.steps:  # the edge split traffic as the weights say (cross-check)
        share, n, w = step.traffic["canary_share"], step.traffic["origin_requests"], step.weight
        assert n >= 100 and share is not None, step.traffic
        # The edge picks tracks at random: allow 4.5 binomial standard deviations.
        assert abs(share - w / 100) < 4.5 * ((w / 100) * (1 - w / 100) / n) ** 0.5, step.traffic
    kinds = Counter(e["event"] for e in events)
    assert kinds["step_started"] == kinds["step_judged"] == len(spec.canary.steps)
    # The load went through the edge to both tracks, and counted what it saw.
    load = report.load_summary
    assert load["by_track"].get("canary", 0) > 0 and load["by_track"].get("stable", 0) > 0
    ok = load["by_status"].get("200", 0) + load["by_status"].get("202", 0)  # 202: jobs queued
    assert load["by_status"].get("202", 0) > 0, load["by_status"]  # canary.job_share
    assert ok >= 0.99 * load["completed"], load["by_status"]
    assert load["by_cache"].get("MISS", 0) > load["by_cache"].get("HIT", 0)

    snapshots = render_snapshots(report, tmp_path / "snapshots")
    assert {Path(s["path"]).name for s in snapshots} == {"latency.png", "error_rate.png"}
    for snap in snapshots:
        data = Path(snap["path"]).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        import hashlib

        assert hashlib.sha256(data).hexdigest() == snap["sha256"]

    platform.promote(ENV)
    assert platform.current(ENV)["stable"]["version"] == "1.1.0"


def test_error_rate_regression_is_blocked(platform: LocalPlatform, spec: ProductSpec) -> None:
    previous = platform.current(ENV)["stable"]["version"]
    artifact = deploy_canary(platform, spec, "1.2.0-errors", error_rate=0.05)
    # Start at the 25% step: at 5% the canary needs ~19 s of traffic to reach the minimum
    # sample, which a loaded CI machine may not deliver before the deadline (that would fail
    # too, but as "inconclusive", not as the error-rate regression this test is about).
    from_25 = spec.model_copy(
        update={"canary": spec.canary.model_copy(update={"steps": spec.canary.steps[1:]})}
    )
    report = run_canary(platform, from_25, env=ENV, artifact=artifact, bake_scale=FAST)
    assert_blocked(report, reason="error_rate: fail")
    assert report.steps[0].weight == 25
    assert_production_on(platform, previous)


def test_latency_regression_is_blocked(platform: LocalPlatform, spec: ProductSpec) -> None:
    previous = platform.current(ENV)["stable"]["version"]
    artifact = deploy_canary(platform, spec, "1.2.0-slow", extra_latency_ms=150)
    # The spec's first step (5%), full length: 50 latency samples arrive well before the
    # deadline even when a busy machine slows the edge down.
    report = run_canary(platform, spec, env=ENV, artifact=artifact)
    assert_blocked(report, reason="latency_shift: fail")
    step = report.steps[-1]
    assert step.judgement is not None
    shift = next(m for m in step.judgement.metrics if m.metric == "latency_shift")
    assert shift.canary is not None and shift.baseline is not None
    # The figures are bucket midpoints of the service's histogram, and a busy host slows the
    # baseline too: the canary's median carries at least the injected 150 ms, and is above
    # the baseline's.
    assert shift.canary >= 150 and shift.canary > shift.baseline
    assert step.weight == spec.canary.steps[0].weight
    assert_production_on(platform, previous)


def test_canary_without_traffic_is_inconclusive_then_blocked(
    platform: LocalPlatform, spec: ProductSpec
) -> None:
    previous = platform.current(ENV)["stable"]["version"]
    artifact = deploy_canary(platform, spec, "1.2.0-idle")
    events: list[dict[str, Any]] = []
    report = run_canary(
        platform,
        spec,
        env=ENV,
        artifact=artifact,
        bake_scale=FAST,
        load_enabled=False,
        on_event=events.append,
    )
    assert_blocked(report, reason="deadline reached while inconclusive")
    assert [e["event"] for e in events if e["event"] == "step_extended"] == ["step_extended"]
    step = report.steps[0]
    assert step.extended and step.judgement is not None
    assert step.judgement.verdict == Verdict.INCONCLUSIVE  # never a pass without evidence
    deadline = (spec.canary.steps[0].bake_seconds + spec.canary.max_step_extension_seconds) * FAST
    assert step.ended_at - step.started_at >= deadline
    assert "below minimum sample" in report.reason
    assert_production_on(platform, previous)


def test_metrics_endpoint_that_stops_answering_blocks_after_k_errors(
    platform: LocalPlatform, spec: ProductSpec
) -> None:
    previous = platform.current(ENV)["stable"]["version"]
    artifact = deploy_canary(platform, spec, "1.2.0-dies")
    (canary_api,) = platform.state.processes(ENV, track="canary", role="api", status="serving")

    def kill_canary_api(event: dict[str, Any]) -> None:
        # Stopped through the supervisor, so it stays down (a killed one would be restarted).
        if event["event"] == "step_started" and event["step"] == 1:
            platform.supervisor.stop(canary_api.program)

    k = spec.canary.max_consecutive_metric_errors
    report = run_canary(
        platform, spec, env=ENV, artifact=artifact, bake_scale=FAST, on_event=kill_canary_api
    )
    assert_blocked(report, reason=f"metrics source failed {k} consecutive times")
    rows = {r["metric"]: r for r in report.rows()}
    assert rows[METRICS_SOURCE]["verdict"] == "fail"
    assert "/metrics" in rows[METRICS_SOURCE]["reason"]
    assert all(rows[m]["verdict"] == "inconclusive" for m in METRICS)  # listed, not dropped
    assert report.steps[0].looks == k
    assert_production_on(platform, previous)


def test_local_scrape_of_the_real_service_sees_the_load(
    platform: LocalPlatform, spec: ProductSpec
) -> None:
    source = LocalScrapeSource(platform.api_urls(ENV))
    before = source.snapshot("stable")
    with LoadGenerator.for_spec(spec, platform.edge_url(ENV), rps=50, max_seconds=2.0) as load:
        time.sleep(2.2)
    window = source.snapshot("stable").since(before)
    summary = load.summary()
    # Reads that missed the cache and the job enqueues (canary.job_share; 2xx, never cached).
    reached_origin = sum(1 for r in load.records() if r.cache == "MISS" and 200 <= r.status < 300)
    assert summary["completed"] >= 60
    # Every request that missed the cache was counted once by the stable API process.
    assert window.requests == pytest.approx(reached_origin, abs=2)
    assert len(window.latency_samples_ms) == window.requests
    assert window.errors == 0
    assert window.versions == (platform.current(ENV)["stable"]["version"],)


def test_load_generator_refuses_non_loopback_targets() -> None:
    targets = [Target("/v1/items", 1, True)]
    for url in ("http://10.0.0.5:8080", "https://example.com", "ftp://127.0.0.1/"):
        with pytest.raises(LoadRefused, match="load target"):
            LoadGenerator(url, targets, rps=10)
    with pytest.raises(LoadRefused, match="rps"):
        LoadGenerator("http://127.0.0.1:9", targets, rps=5000)
    with pytest.raises(LoadRefused, match="load_weight"):
        LoadGenerator("http://127.0.0.1:9", [Target("/v1/items", 0, True)], rps=10)


def test_load_generator_is_bounded_in_count_and_time() -> None:
    # Nothing listens on the port: every request fails fast, and is still recorded.
    from dagster_project.core.platform.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"
    load = LoadGenerator(
        url, [Target("/v1/items", 1, True)], rps=200, max_requests=40, max_seconds=5.0
    )
    began = time.monotonic()
    load.start()
    while load.running and time.monotonic() - began < 6:
        time.sleep(0.05)
    load.stop()
    assert time.monotonic() - began < 2.0  # 40 requests at 200/s
    summary = load.summary()
    assert summary["sent"] + summary["skipped_busy"] == 40
    assert summary["transport_errors"] == summary["completed"] > 0
