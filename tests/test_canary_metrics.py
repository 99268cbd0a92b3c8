"""Metric sources against real HTTP servers on loopback.

- `LocalScrapeSource` scrapes a real prometheus-client exposition server (the library's own
  `start_http_server`, the same exposition code the sample service uses); the scrape of the
  real service processes is covered in test_canary_analysis.py.
- `PrometheusSource` talks to a tiny HTTP server of ours that speaks the Prometheus query API
  format (`/api/v1/query`). That is a fake Prometheus server, acceptable only because no
  Prometheus can run here; it answers from in-memory series and records the PromQL it got.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from dagster_project.core.canary.judge import Verdict
from dagster_project.core.canary.metrics import (
    LocalScrapeSource,
    MetricsUnavailable,
    PrometheusSource,
    TrackSnapshot,
    WorkerTotals,
    parse_exposition,
    samples_from_buckets,
)
from dagster_project.core.platform.processes import free_port

BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# ------------------------------------------------------------------ bucket reconstruction


def test_samples_from_buckets_uses_midpoints() -> None:
    bounds = (0.01, 0.02, 0.05, math.inf)
    # cumulative: 2 in (0, 10ms], 1 in (10, 20], 0 in (20, 50], 1 above 50 ms
    samples = samples_from_buckets(bounds, (2, 3, 3, 4))
    assert samples == [5.0, 5.0, 15.0, 50.0]
    assert samples_from_buckets(bounds, (0, 0, 0, 0)) == []


def test_window_is_the_difference_of_two_snapshots() -> None:
    earlier = TrackSnapshot("canary", 10.0, 100, 1, {0.01: 60, 0.05: 90, math.inf: 100})
    later = TrackSnapshot("canary", 12.5, 150, 4, {0.01: 80, 0.05: 130, math.inf: 150})
    window = later.since(earlier)
    assert (window.requests, window.errors, window.seconds) == (50, 3, 2.5)
    samples = window.latency_samples_ms
    assert len(samples) == 50
    assert samples.count(5.0) == 20 and samples.count(30.0) == 20 and samples.count(50.0) == 10
    assert window.side().requests == 50


def test_counters_going_backwards_are_an_error_not_a_window() -> None:
    earlier = TrackSnapshot("canary", 1.0, 500, 3, {math.inf: 500})
    restarted = TrackSnapshot("canary", 2.0, 20, 0, {math.inf: 20})
    with pytest.raises(MetricsUnavailable, match=r"track 'canary': counters went backwards"):
        restarted.since(earlier)


# ------------------------------------------------------------- local scrape (real server)


class ExpositionServer:
    """A real prometheus-client HTTP server with the service's metric names."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests",
            "requests",
            ("version", "track", "path", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "latency",
            ("version", "track", "path"),
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, "127.0.0.1", self.registry)
        self.url = f"http://127.0.0.1:{self.port}"

    def serve(self, track: str, path: str, status: int, seconds: float, n: int = 1) -> None:
        for _ in range(n):
            self.requests.labels("1.0.0", track, path, str(status)).inc()
            self.latency.labels("1.0.0", track, path).observe(seconds)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exposition() -> Iterator[ExpositionServer]:
    server = ExpositionServer()
    yield server
    server.close()


def test_local_scrape_aggregates_paths_and_counts_5xx(exposition: ExpositionServer) -> None:
    source = LocalScrapeSource({"canary": exposition.url, "stable": exposition.url})
    start = source.snapshot("canary")
    assert start.requests == 0  # a fresh process: zero traffic, not a missing metric
    exposition.serve("canary", "/v1/items", 200, 0.004, n=30)
    exposition.serve("canary", "/v1/summary", 500, 0.03, n=5)
    exposition.serve("canary", "/healthz", 200, 0.001, n=50)  # probes are not traffic
    exposition.serve("stable", "/v1/items", 200, 0.004, n=7)  # the other track
    window = source.snapshot("canary").since(start)
    assert window.requests == 35
    assert window.errors == 5
    samples = window.latency_samples_ms
    assert len(samples) == 35
    assert samples.count(3.5) == 30  # (2, 5] ms -> 3.5 ms
    assert samples.count(35.0) == 5  # (20, 50] ms -> 35 ms
    assert window.versions == ("1.0.0",)
    assert source.snapshot("stable").requests == 7


def test_local_scrape_names_the_endpoint_when_it_stops_answering() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    source = LocalScrapeSource({"canary": url}, attempts=2)
    with pytest.raises(MetricsUnavailable, match=re.escape(f"GET {url}/metrics failed after 2")):
        source.snapshot("canary")
    with pytest.raises(MetricsUnavailable, match="no API URL for track 'stable'"):
        source.snapshot("stable")


def test_exposition_without_the_request_counter_is_an_error() -> None:
    with pytest.raises(MetricsUnavailable, match="no http_requests_total"):
        parse_exposition("# HELP up up\n# TYPE up gauge\nup 1\n", "canary")


# ----------------------------------------------------------------- fake Prometheus server


class FakePrometheus:
    """Answers `/api/v1/query` in the Prometheus HTTP API format from in-memory totals."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, Any]] = {}
        self.increases: dict[str, dict[str, Any]] = {}
        self.queries: list[str] = []
        self.fail_with: tuple[int, dict[str, Any]] | None = None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/api/v1/query":
                    self._send(404, {"status": "error", "errorType": "not_found", "error": "?"})
                    return
                query = parse_qs(parts.query)["query"][0]
                owner.queries.append(query)
                if owner.fail_with:
                    self._send(*owner.fail_with)
                    return
                self._send(
                    200,
                    {
                        "status": "success",
                        "data": {"resultType": "vector", "result": owner.answer(query)},
                    },
                )

            def _send(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, query: str) -> list[dict[str, Any]]:
        track = re.search(r'track="(\w+)"', query)
        data = (self.increases if query.count("increase(") else self.totals).get(
            track.group(1) if track else "", {}
        )
        if not data:
            return []  # no such series: Prometheus answers an empty vector

        def sample(labels: dict[str, str], value: float) -> dict[str, Any]:
            return {"metric": labels, "value": [1764300000.0, str(value)]}

        if "by (le)" in query:
            return [sample({"le": le}, v) for le, v in data["buckets"].items()]
        if "by (version)" in query:
            return [sample({"version": data["version"]}, 1)]
        if "status=~" in query:
            return [sample({}, data["errors"])]
        return [sample({}, data["requests"])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    server = FakePrometheus()
    yield server
    server.close()


def test_prometheus_snapshot_and_window(prometheus: FakePrometheus) -> None:
    prometheus.totals["canary"] = {
        "requests": 1200,
        "errors": 12,
        "version": "1.4.0",
        "buckets": {"0.01": 900, "0.05": 1150, "+Inf": 1200},
    }
    prometheus.increases["canary"] = {
        "requests": 120,
        "errors": 6,
        "version": "1.4.0",
        "buckets": {"0.01": 100, "0.05": 118, "+Inf": 120},
    }
    source = PrometheusSource(prometheus.url, selector='env="production"')
    snap = source.snapshot("canary")
    assert (snap.requests, snap.errors, snap.versions) == (1200, 12, ("1.4.0",))
    assert snap.buckets[math.inf] == 1200

    window = source.window("canary", 30)
    assert (window.requests, window.errors) == (120, 6)
    samples = window.latency_samples_ms
    assert len(samples) == 120 and samples.count(5.0) == 100 and samples.count(30.0) == 18

    increase_queries = [q for q in prometheus.queries if "increase(" in q]
    assert 'sum(increase(http_requests_total{track="canary"' in increase_queries[0]
    assert all("[30s]" in q and 'env="production"' in q for q in increase_queries)
    assert any('status=~"5.."' in q for q in increase_queries)
    assert any(
        q.startswith("sum by (le) (increase(http_request_duration_seconds_bucket")
        for q in increase_queries
    )


def test_prometheus_no_series_means_no_traffic_which_is_never_a_pass(
    prometheus: FakePrometheus,
) -> None:
    from dagster_project.core.canary.judge import JudgeConfig, judge
    from dagster_project.core.spec import load_spec

    prometheus.totals["stable"] = {
        "requests": 5000,
        "errors": 0,
        "version": "1.3.0",
        "buckets": {"0.01": 5000, "+Inf": 5000},
    }
    source = PrometheusSource(prometheus.url)
    canary = source.snapshot("canary")
    assert canary.requests == 0 and canary.buckets == {}
    empty = TrackSnapshot("canary", 0.0, 0, 0, {})
    stable = source.snapshot("stable").since(TrackSnapshot("stable", 0.0, 0, 0, {}))
    judgement = judge(
        stable.side(), canary.since(empty).side(), JudgeConfig.from_spec(load_spec("4pnihc40q-yj"))
    )
    assert judgement.verdict == Verdict.INCONCLUSIVE


def test_prometheus_errors_are_retried_then_named(prometheus: FakePrometheus) -> None:
    prometheus.fail_with = (
        422,
        {"status": "error", "errorType": "bad_data", "error": "parse error at char 7"},
    )
    source = PrometheusSource(prometheus.url, attempts=3)
    with pytest.raises(MetricsUnavailable) as caught:
        source.snapshot("canary")
    message = str(caught.value)
    assert f"{prometheus.url}/api/v1/query" in message
    assert "failed after 3 attempts" in message and "bad_data" in message
    assert len(prometheus.queries) == 3  # retried


def test_prometheus_unreachable_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MetricsUnavailable, match=re.escape(f"{url}/api/v1/query")):
        PrometheusSource(url, attempts=2).snapshot("canary")
    assert httpx.URL(url).host == "127.0.0.1"


# ------------------------------------------------------------------------ worker metrics


class WorkerExposition:
    """The worker's metric names (products/*/service/worker.py) on a real HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("version", "track", "queue")
        self.attempts = Counter(
            "worker_job_attempts", "a", (*labels, "outcome"), registry=self.registry
        )
        self.dead = Counter("worker_dead_letters", "d", labels, registry=self.registry)
        self.latency = Histogram(
            "worker_job_latency_seconds", "l", labels, buckets=BUCKETS_S, registry=self.registry
        )
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, "127.0.0.1", self.registry)
        self.url = f"http://127.0.0.1:{self.port}"

    def settle(self, track: str, outcome: str, seconds: float = 0.0, n: int = 1) -> None:
        for _ in range(n):
            self.attempts.labels("1.0.0", track, "high", outcome).inc()
            if outcome == "dead":
                self.dead.labels("1.0.0", track, "high").inc()
            if outcome == "done":
                self.latency.labels("1.0.0", track, "high").observe(seconds)


def test_local_scrape_adds_the_tracks_worker(exposition: ExpositionServer) -> None:
    worker = WorkerExposition()
    try:
        source = LocalScrapeSource({"canary": exposition.url}, worker_urls={"canary": worker.url})
        start = source.snapshot("canary")
        assert start.workers == WorkerTotals(0.0, 0.0, 0.0, start.workers.buckets)  # type: ignore[union-attr]
        worker.settle("canary", "done", 0.03, n=6)
        worker.settle("canary", "retry", n=3)
        worker.settle("canary", "dead", n=1)
        worker.settle("stable", "dead", n=9)  # another track's worker
        side = source.snapshot("canary").since(start).side()
        assert (side.jobs, side.job_failures, side.dead_letters) == (10, 4, 1)
        assert side.job_latencies_ms == [35.0] * 6  # (20, 50] ms
        # No worker URL for a track the source was asked about: an error naming it.
        with pytest.raises(MetricsUnavailable, match="no worker metrics URL for track 'stable'"):
            LocalScrapeSource(
                {"stable": exposition.url}, worker_urls={"canary": worker.url}
            ).snapshot("stable")
    finally:
        worker.server.shutdown()
        worker.server.server_close()


def test_worker_counters_going_backwards_are_an_error() -> None:
    later = TrackSnapshot("canary", 2.0, 10, 0, workers=WorkerTotals(3, 0, 0))
    earlier = TrackSnapshot("canary", 1.0, 5, 0, workers=WorkerTotals(9, 1, 0))
    with pytest.raises(MetricsUnavailable, match="worker counters went backwards"):
        later.since(earlier)
    # Without worker totals on either side the window simply has none (judged missing).
    assert TrackSnapshot("canary", 2.0, 10, 0).since(earlier).workers is None
