"""Prometheus as the metrics source, through the real path: the platform starts Prometheus
under the session's supervisord with a generated config, deploy and rollback rewrite its
file-based service discovery, and the canary judge's `PrometheusSource` reads the same
numbers through PromQL that the APIs expose. Skips naming the Debian package where the binary
is missing (a failure under CI=true)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from real_parts import PRODUCT, require_prometheus

from dagster_project.core import httpclient, registry
from dagster_project.core.canary.judge import JudgeConfig, Verdict, judge
from dagster_project.core.canary.metrics import LocalScrapeSource, PrometheusSource
from dagster_project.core.migrations.history import apply_pending
from dagster_project.core.platform import LocalPlatform
from dagster_project.core.settings import release_home
from dagster_project.core.spec import load_spec

# Every test here runs the real binary (a fixture of the module requires it).
pytestmark = pytest.mark.slow

ENV = "production"


@pytest.fixture(scope="module", autouse=True)
def _needs_prometheus() -> None:
    require_prometheus()


@pytest.fixture(scope="module")
def platform() -> Iterator[LocalPlatform]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELEASE_EDGE", "embedded")
        patch.setenv("RELEASE_METRICS", "prometheus")
        local = LocalPlatform(PRODUCT)
        try:
            local.up()
            spec = load_spec(PRODUCT)
            db = local.database(ENV)
            apply_pending(db, spec.migrations_path, actor="test_prometheus_metrics")
            local.deploy(ENV, "stable", registry.push(registry.build_artifact(spec, "1.0.0")))
            yield local
        finally:
            local.down()
    assert not (release_home() / "prometheus").exists()
    assert f"{PRODUCT}.prometheus" not in local.supervisor.all_info()


def _until(what: str, check: Callable[[], Any], seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds}s (last: {value!r})")
        time.sleep(0.2)


def _active_targets(platform: LocalPlatform) -> set[str]:
    body = httpclient.get(f"{platform.prometheus_url()}/api/v1/targets", trust_env=False).json()
    return {
        t["labels"]["instance"]
        for t in body["data"]["activeTargets"]
        if t["labels"].get("env") == ENV and t["health"] == "up"
    }


def _instances(platform: LocalPlatform) -> set[str]:
    """What Prometheus must scrape: every serving API and worker (each on its own port)."""
    urls = [*platform.api_urls(ENV).values(), *platform.worker_metrics_urls(ENV).values()]
    return {url.removeprefix("http://") for url in urls}


def _hit(url: str, n: int) -> None:
    with httpclient.client(trust_env=False, timeout=10) as client:
        for i in range(n):
            assert client.get(f"{url}/v1/items?n={i}").status_code == 200


def test_prometheus_runs_on_loopback_and_status_shows_it(platform: LocalPlatform) -> None:
    status = platform.status()[ENV]
    assert status["healthy"], status["problems"]
    metrics = status["metrics"]
    assert metrics["kind"] == "prometheus"
    assert metrics["prometheus"]["ready"] is True
    assert metrics["prometheus"]["url"].startswith("http://127.0.0.1:")
    assert set(metrics["prometheus"]["targets"]) == _instances(platform)
    config = (release_home() / "prometheus" / PRODUCT / "prometheus.yml").read_text()
    assert "scrape_interval: 1s" in config and "file_sd_configs" in config


def test_deploy_and_rollback_rewrite_service_discovery(platform: LocalPlatform) -> None:
    spec = load_spec(PRODUCT)
    stable = _instances(platform)
    platform.deploy(ENV, "canary", registry.push(registry.build_artifact(spec, "1.1.0")))
    both = _instances(platform)
    assert len(both) == 4  # stable and canary, each an API and a worker
    _until("Prometheus scrapes stable and canary", lambda: _active_targets(platform) == both)
    platform.rollback(ENV)
    _until("the canary's target is gone", lambda: _active_targets(platform) == stable)


def test_promql_gives_the_judge_the_same_numbers_as_the_apis(platform: LocalPlatform) -> None:
    spec = load_spec(PRODUCT)
    platform.deploy(ENV, "canary", registry.push(registry.build_artifact(spec, "1.1.1")))
    urls = platform.api_urls(ENV)
    source = platform.metrics_source(ENV)
    assert isinstance(source, PrometheusSource)
    scrape = LocalScrapeSource(urls)
    _until("canary scraped", lambda: _active_targets(platform) == _instances(platform))
    time.sleep(2.5)
    before = {t: source.snapshot(t) for t in ("stable", "canary")}
    _hit(urls["stable"], 120)
    _hit(urls["canary"], 80)
    time.sleep(2.5)  # two scrapes later
    for track, sent in (("stable", 120), ("canary", 80)):
        window = source.snapshot(track).since(before[track])
        assert window.requests == sent, (track, window)
        assert len(window.latency_samples_ms) == sent
        exposed = scrape.snapshot(track)
        promql = source.snapshot(track)
        assert (promql.requests, dict(promql.buckets)) == (exposed.requests, dict(exposed.buckets))


def test_a_latency_regression_fails_the_judge_on_promql_figures(platform: LocalPlatform) -> None:
    spec = load_spec(PRODUCT)
    slow = registry.build_artifact(spec, "1.2.0-slow", {"extra_latency_ms": 120})
    platform.deploy(ENV, "canary", registry.push(slow))
    urls = platform.api_urls(ENV)
    source = platform.metrics_source(ENV)
    _until("slow canary scraped", lambda: _active_targets(platform) == _instances(platform))
    time.sleep(1.5)
    before = {t: source.snapshot(t) for t in ("stable", "canary")}
    _hit(urls["stable"], 150)
    _hit(urls["canary"], 150)
    time.sleep(2.5)
    windows = {t: source.snapshot(t).since(before[t]) for t in ("stable", "canary")}
    config = JudgeConfig.from_spec(spec)
    judgement = judge(windows["stable"].side(), windows["canary"].side(), config)
    assert judgement.verdict == Verdict.FAIL, judgement.reasons
    assert any("latency" in reason for reason in judgement.reasons)
    platform.rollback(ENV)


def test_a_killed_prometheus_comes_back_on_its_port(platform: LocalPlatform) -> None:
    url = platform.prometheus_url()
    info = platform.supervisor.info(f"{PRODUCT}.prometheus")
    assert info is not None and info.pid
    os.kill(info.pid, signal.SIGKILL)

    def ready_again() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            now = platform.supervisor.info(f"{PRODUCT}.prometheus")
            return bool(
                now
                and now.running
                and now.pid != info.pid
                and httpclient.get(f"{url}/-/ready", trust_env=False).status_code == 200
            )
        return False

    _until("Prometheus restarted by supervisord", ready_again, 30)
    assert platform.prometheus_url() == url
    _until("targets scraped again", lambda: _active_targets(platform) == _instances(platform))
