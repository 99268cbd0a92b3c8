"""Metric sources for the canary judge: cumulative snapshots per track, windows as differences.

A source returns a `TrackSnapshot` (cumulative counters and histogram buckets, summed over
paths) for a track; the window of a step is `later.since(earlier)`, which is what the judge
sees. Two sources implement `MetricsSource`:

- `LocalScrapeSource(api_urls)`: scrapes each track's API process `/metrics` with httpx.
- `PrometheusSource(base_url)`: the same numbers through PromQL over Prometheus's HTTP API
  (the platform's own Prometheus, core/platform/prometheus.py, or a real deployment's);
  `window(track, seconds)` also offers Prometheus-native `increase()`.

Latency samples are reconstructed from histogram bucket deltas: every request counted in the
bucket (lo, hi] becomes one sample at the bucket's midpoint (lo + hi) / 2; the first bucket
uses (0, hi]; the +Inf bucket uses its finite lower bound. The error is at most half a bucket
width per sample, which the dense buckets of the service keep small; tests of shift (ranks)
and of "slower than X" (X on a bucket bound) are unaffected beyond that. At a few ms one bucket
step is wider than the shift allowance, which is why the judge's allowance has an absolute
floor (`slos.latency_shift_floor_ms`).

Worker metrics ride along in the same snapshot when the source knows each track's worker
(`worker_urls` / `worker_instances`): attempts and failed attempts (`retry` and `dead`
outcomes), dead-letter additions and the enqueue-to-done histogram, from the worker's own
/metrics (`WORKER_*` names below, labelled with the track). A track without them gets `None`
worker fields, which the judge treats as missing data (inconclusive), never as zero.

Errors (connection refused, timeouts, bad payloads, counters going backwards) are retried with
tenacity, then raised as `MetricsUnavailable` naming the endpoint; the caller counts
consecutive failures and fails closed. Nothing is ever silently dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from dagster_project.core import httpclient
from dagster_project.core.canary.judge import SideWindow

REQUESTS_METRIC = "http_requests_total"
DURATION_METRIC = "http_request_duration_seconds"
WORKER_ATTEMPTS_METRIC = "worker_job_attempts_total"  # label outcome: done | retry | dead
WORKER_LATENCY_METRIC = "worker_job_latency_seconds"  # enqueue to done
WORKER_DEAD_LETTERS_METRIC = "worker_dead_letters_total"
FAILED_OUTCOMES = ("retry", "dead")
# Probes and scrapes are not user traffic; they would dilute error rates and latencies.
DEFAULT_EXCLUDED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


class MetricsUnavailable(RuntimeError):
    """The metric source could not deliver a usable snapshot; the message names where."""


@dataclass(frozen=True)
class TrackSnapshot:
    """Cumulative totals of one track at one moment (summed over paths)."""

    track: str
    taken_at: float  # time.monotonic() of the scrape
    requests: float
    errors: float
    # upper bound in seconds (math.inf for +Inf) -> cumulative count
    buckets: Mapping[float, float] = field(default_factory=dict)
    versions: tuple[str, ...] = ()
    workers: WorkerTotals | None = None  # None: the source does not know this track's worker

    def since(self, earlier: TrackSnapshot) -> TrackWindow:
        """The window between `earlier` and this snapshot."""
        if earlier.track != self.track:
            raise ValueError(f"cannot subtract track {earlier.track!r} from {self.track!r}")
        requests = self.requests - earlier.requests
        errors = self.errors - earlier.errors
        bounds, cumulative = _bucket_deltas(self.buckets, earlier.buckets)
        if requests < 0 or errors < 0 or any(c < 0 for c in cumulative):
            raise MetricsUnavailable(
                f"track {self.track!r}: counters went backwards between snapshots "
                "(the API process restarted?); the window cannot be computed"
            )
        workers = None
        if self.workers is not None and earlier.workers is not None:
            workers = self.workers.since(earlier.workers, self.track)
        return TrackWindow(
            track=self.track,
            seconds=self.taken_at - earlier.taken_at,
            requests=requests,
            errors=errors,
            bucket_bounds=bounds,
            bucket_cumulative=cumulative,
            versions=self.versions,
            workers=workers,
        )


@dataclass(frozen=True)
class WorkerTotals:
    """Cumulative worker counters of one track (or, from `since`, their window)."""

    attempts: float
    failed_attempts: float
    dead_letters: float
    # upper bound in seconds -> cumulative count of jobs done (enqueue to done)
    buckets: Mapping[float, float] = field(default_factory=dict)

    def since(self, earlier: WorkerTotals, track: str) -> WorkerTotals:
        bounds, cumulative = _bucket_deltas(self.buckets, earlier.buckets)
        window = WorkerTotals(
            self.attempts - earlier.attempts,
            self.failed_attempts - earlier.failed_attempts,
            self.dead_letters - earlier.dead_letters,
            dict(zip(bounds, cumulative, strict=True)),
        )
        if min(window.attempts, window.failed_attempts, window.dead_letters, *cumulative, 0) < 0:
            raise MetricsUnavailable(
                f"track {track!r}: worker counters went backwards between snapshots "
                "(the worker restarted?); the window cannot be computed"
            )
        return window

    @property
    def latency_samples_ms(self) -> list[float]:
        bounds = tuple(sorted(self.buckets))
        return samples_from_buckets(bounds, tuple(self.buckets[b] for b in bounds))


def _bucket_deltas(
    later: Mapping[float, float], earlier: Mapping[float, float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    bounds = tuple(sorted(set(later) | set(earlier)))
    return bounds, tuple(later.get(b, 0.0) - earlier.get(b, 0.0) for b in bounds)


@dataclass(frozen=True)
class TrackWindow:
    """What one track served between two snapshots."""

    track: str
    seconds: float
    requests: float
    errors: float
    bucket_bounds: tuple[float, ...]  # seconds, ascending, may end with inf
    bucket_cumulative: tuple[float, ...]
    versions: tuple[str, ...] = ()
    workers: WorkerTotals | None = None

    @property
    def latency_samples_ms(self) -> list[float]:
        return samples_from_buckets(self.bucket_bounds, self.bucket_cumulative)

    def side(self) -> SideWindow:
        if self.workers is None:
            return SideWindow(self.requests, self.errors, self.latency_samples_ms)
        return SideWindow(
            self.requests,
            self.errors,
            self.latency_samples_ms,
            jobs=self.workers.attempts,
            job_failures=self.workers.failed_attempts,
            job_latencies_ms=self.workers.latency_samples_ms,
            dead_letters=self.workers.dead_letters,
        )

    def quantile_ms(self, q: float) -> float | None:
        samples = self.latency_samples_ms
        if not samples:
            return None
        import numpy as np

        return float(np.quantile(samples, q))


def samples_from_buckets(bounds_s: Sequence[float], cumulative: Sequence[float]) -> list[float]:
    """One latency sample (ms) per request at its bucket's midpoint; see the module docstring."""
    samples: list[float] = []
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in zip(bounds_s, cumulative, strict=True):
        in_bucket = round(count - previous_count)
        if in_bucket > 0:
            value = previous_bound if math.isinf(bound) else (previous_bound + bound) / 2
            samples.extend([round(value * 1000.0, 6)] * in_bucket)  # no float dust
        previous_bound = previous_bound if math.isinf(bound) else bound
        previous_count = max(previous_count, count)
    return samples


class MetricsSource(Protocol):
    """Anything that can give cumulative per-track totals."""

    def snapshot(self, track: str) -> TrackSnapshot: ...


def _retrying(attempts: int) -> Retrying:
    return Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.05, max=0.5),
        retry=retry_if_exception_type((httpx.HTTPError, MetricsUnavailable, ValueError)),
        reraise=True,
    )


# --------------------------------------------------------------------- local scraping


class LocalScrapeSource:
    """Scrapes `<api_url>/metrics` of each track's API process (Prometheus text format)."""

    def __init__(
        self,
        api_urls: Mapping[str, str],
        *,
        worker_urls: Mapping[str, str] | None = None,
        timeout_s: float = 2.0,
        attempts: int = 2,
        excluded_paths: frozenset[str] = DEFAULT_EXCLUDED_PATHS,
    ) -> None:
        """`worker_urls`: per track, the worker's metrics URL; None: no worker metrics."""
        self.api_urls = dict(api_urls)
        self.worker_urls = None if worker_urls is None else dict(worker_urls)
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.excluded_paths = excluded_paths

    def snapshot(self, track: str) -> TrackSnapshot:
        if track not in self.api_urls:
            raise MetricsUnavailable(
                f"no API URL for track {track!r} (known: {sorted(self.api_urls)})"
            )
        snapshot = parse_exposition(self._scrape(self.api_urls[track]), track, self.excluded_paths)
        if self.worker_urls is None:
            return snapshot
        if track not in self.worker_urls:
            raise MetricsUnavailable(
                f"no worker metrics URL for track {track!r} (known: {sorted(self.worker_urls)})"
            )
        workers = parse_worker_exposition(self._scrape(self.worker_urls[track]), track)
        return replace(snapshot, workers=workers)

    def _scrape(self, base_url: str) -> str:
        url = base_url.rstrip("/") + "/metrics"
        try:
            for attempt in _retrying(self.attempts):
                with attempt:
                    response = httpclient.get(url, timeout=self.timeout_s)
                    response.raise_for_status()
                    return response.text
        except httpx.HTTPError as exc:
            raise MetricsUnavailable(
                f"GET {url} failed after {self.attempts} attempts: {type(exc).__name__}: {exc}"
            ) from exc
        raise AssertionError("unreachable")  # Retrying either returns or raises


def parse_exposition(
    text: str, track: str, excluded_paths: frozenset[str] = DEFAULT_EXCLUDED_PATHS
) -> TrackSnapshot:
    """Sum the request counter and duration histogram of `track` over its paths."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = errors = 0.0
    buckets: dict[float, float] = {}
    versions: set[str] = set()
    found_counter = False
    for family in text_string_to_metric_families(text):
        # The parser names a counter family without `_total`; an unused labelled counter
        # has a family but no samples yet, which is zero traffic, not a missing metric.
        found_counter = found_counter or family.name in (REQUESTS_METRIC, "http_requests")
        for sample in family.samples:
            labels = sample.labels
            if labels.get("track", track) != track or labels.get("path") in excluded_paths:
                continue
            if sample.name == REQUESTS_METRIC:
                requests += sample.value
                if str(labels.get("status", "")).startswith("5"):
                    errors += sample.value
                if "version" in labels:
                    versions.add(labels["version"])
            elif sample.name == DURATION_METRIC + "_bucket":
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if not found_counter:
        raise MetricsUnavailable(f"track {track!r}: the exposition has no {REQUESTS_METRIC} metric")
    return TrackSnapshot(
        track, time.monotonic(), requests, errors, buckets, tuple(sorted(versions))
    )


def parse_worker_exposition(text: str, track: str) -> WorkerTotals:
    """Sum the worker metrics of `track` over queues and versions."""
    from prometheus_client.parser import text_string_to_metric_families

    attempts = failed = dead = 0.0
    buckets: dict[float, float] = {}
    found = False
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise MetricsUnavailable(f"track {track!r}: worker metrics unreadable: {exc}") from exc
    for family in families:
        found = found or family.name in (WORKER_ATTEMPTS_METRIC, "worker_job_attempts")
        for sample in family.samples:
            if sample.labels.get("track", track) != track:
                continue
            if sample.name == WORKER_ATTEMPTS_METRIC:
                attempts += sample.value
                if sample.labels.get("outcome") in FAILED_OUTCOMES:
                    failed += sample.value
            elif sample.name == WORKER_DEAD_LETTERS_METRIC:
                dead += sample.value
            elif sample.name == WORKER_LATENCY_METRIC + "_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if not found:
        raise MetricsUnavailable(
            f"track {track!r}: the worker's exposition has no {WORKER_ATTEMPTS_METRIC} metric"
        )
    return WorkerTotals(attempts, failed, dead, buckets)


# ------------------------------------------------------------------------ Prometheus


class PrometheusSource:
    """The same totals via PromQL over Prometheus's HTTP API (`/api/v1/query`)."""

    def __init__(
        self,
        base_url: str,
        *,
        selector: str = "",
        instances: Mapping[str, str] | None = None,
        worker_instances: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
        attempts: int = 3,
        excluded_paths: frozenset[str] = DEFAULT_EXCLUDED_PATHS,
    ) -> None:
        """`selector`: extra label matchers, e.g. `job="api-orders",env="production"`;
        `instances`: per track, the one scrape target (`host:port`) to count, so a process
        that served the track before (and whose series are still fresh) is never added in;
        `worker_instances`: the same for the workers (None: no worker metrics)."""
        self.base_url = base_url.rstrip("/")
        self.selector = selector
        self.instances = dict(instances or {})
        self.worker_instances = None if worker_instances is None else dict(worker_instances)
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.excluded_paths = excluded_paths

    def _matchers(self, track: str, extra: str = "") -> str:
        parts = [f'track="{track}"']
        if self.excluded_paths:
            parts.append('path!~"' + "|".join(sorted(self.excluded_paths)) + '"')
        if self.selector:
            parts.append(self.selector)
        if track in self.instances:
            parts.append(f'instance="{self.instances[track]}"')
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}"

    def _queries(self, track: str, wrap: str) -> dict[str, str]:
        def metric(name: str, extra: str = "") -> str:
            return wrap.format(name + self._matchers(track, extra))

        return {
            "requests": f"sum({metric(REQUESTS_METRIC)})",
            "errors": f"sum({metric(REQUESTS_METRIC, 'status=~' + chr(34) + '5..' + chr(34))})",
            "buckets": f"sum by (le) ({metric(DURATION_METRIC + '_bucket')})",
            "versions": f"count by (version) ({metric(REQUESTS_METRIC)})",
        }

    def snapshot(self, track: str) -> TrackSnapshot:
        """Cumulative totals now (plain sums of the counters, as of the last scrape)."""
        if self.instances and track not in self.instances:
            raise MetricsUnavailable(
                f"no scrape target for track {track!r} (known: {sorted(self.instances)})"
            )
        values = self._collect(self._queries(track, "{}"))
        return TrackSnapshot(track, time.monotonic(), **values, workers=self._workers(track))

    def _workers(self, track: str) -> WorkerTotals | None:
        if self.worker_instances is None:
            return None
        if track not in self.worker_instances:
            raise MetricsUnavailable(
                f"no worker scrape target for track {track!r} "
                f"(known: {sorted(self.worker_instances)})"
            )
        parts = [f'track="{track}"', f'instance="{self.worker_instances[track]}"']
        if self.selector:
            parts.append(self.selector)
        match = ",".join(parts)
        present = self._query(f"count({WORKER_ATTEMPTS_METRIC}{{{match}}})")
        if not present:
            # The worker exposes its counters from the start: no series means no scrape yet.
            raise MetricsUnavailable(
                f"track {track!r}: no {WORKER_ATTEMPTS_METRIC} series from the worker at "
                f"{self.worker_instances[track]} yet"
            )
        failed = "|".join(FAILED_OUTCOMES)
        buckets = self._query(f"sum by (le) ({WORKER_LATENCY_METRIC}_bucket{{{match}}})")
        return WorkerTotals(
            attempts=self._scalar(self._query(f"sum({WORKER_ATTEMPTS_METRIC}{{{match}}})")),
            failed_attempts=self._scalar(
                self._query(f'sum({WORKER_ATTEMPTS_METRIC}{{{match},outcome=~"{failed}"}})')
            ),
            dead_letters=self._scalar(self._query(f"sum({WORKER_DEAD_LETTERS_METRIC}{{{match}}})")),
            buckets={float(r["metric"]["le"]): _value(r) for r in buckets},
        )

    def window(self, track: str, seconds: float) -> TrackWindow:
        """The last `seconds` via `increase()` (Prometheus handles counter resets)."""
        rng = f"[{max(1, round(seconds))}s]"
        values = self._collect(self._queries(track, "increase({}" + rng + ")"))
        bounds = tuple(sorted(values["buckets"]))
        return TrackWindow(
            track=track,
            seconds=float(seconds),
            requests=values["requests"],
            errors=values["errors"],
            bucket_bounds=bounds,
            bucket_cumulative=tuple(values["buckets"][b] for b in bounds),
            versions=values["versions"],
        )

    def _collect(self, queries: dict[str, str]) -> dict[str, Any]:
        requests = self._scalar(self._query(queries["requests"]))
        errors = self._scalar(self._query(queries["errors"]))
        buckets = {float(r["metric"]["le"]): _value(r) for r in self._query(queries["buckets"])}
        versions = tuple(
            sorted(r["metric"].get("version", "") for r in self._query(queries["versions"]))
        )
        return {"requests": requests, "errors": errors, "buckets": buckets, "versions": versions}

    @staticmethod
    def _scalar(result: list[dict[str, Any]]) -> float:
        # An empty vector means no matching series: nothing was served (the judge then says
        # inconclusive for lack of sample, never pass).
        return sum(_value(r) for r in result)

    def _query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.base_url}/api/v1/query"
        try:
            for attempt in _retrying(self.attempts):
                with attempt:
                    response = httpclient.get(url, params={"query": promql}, timeout=self.timeout_s)
                    body = response.json()
                    if body.get("status") != "success":
                        raise MetricsUnavailable(
                            f"{body.get('errorType', 'error')}: {body.get('error', body)}"
                        )
                    response.raise_for_status()
                    data = body["data"]
                    if data.get("resultType") != "vector":
                        raise MetricsUnavailable(f"expected a vector, got {data.get('resultType')}")
                    return list(data["result"])
        except (httpx.HTTPError, ValueError, KeyError, MetricsUnavailable) as exc:
            raise MetricsUnavailable(
                f"Prometheus query {promql!r} at {url} failed after {self.attempts} attempts: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        raise AssertionError("unreachable")


def _value(result: dict[str, Any]) -> float:
    value = float(result["value"][1])
    if math.isnan(value):
        raise MetricsUnavailable(f"NaN value for series {result.get('metric')}")
    return value
