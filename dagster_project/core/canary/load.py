"""A bounded load generator: real requests through the production edge during the canary.

- Rate: `rps` requests per second (the spec's `canary.load_rps`), paced by the clock.
- Paths: the spec's endpoints, picked at random in proportion to `load_weight`. Dynamic
  endpoints get a unique query string (`?lg=<n>`) so the requests reach the origins through
  the edge cache, as the long tail of real, uncached URLs does; static ones are served from
  the cache, as in production.
- Bounds: loopback URLs only; at most `max_seconds` and `max_requests`; at most `concurrency`
  requests in flight (a request that cannot start because all are busy is counted as
  `skipped`, never queued without limit). Requests run on one asyncio loop in the
  generator's thread (aiohttp).
- Jobs: with a `JobTarget`, a share of the requests (the spec's `canary.job_share`) are
  `POST`s enqueueing the contract's `ok` probe job (keys `canary-load-<run>-<n>`, queues in
  turn), so the canary's workers take their weight's share of production jobs.
- Records per request: time, path, status, latency, X-Track and X-Cache of the response.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

if TYPE_CHECKING:
    from dagster_project.core.spec import ProductSpec


class LoadRefused(ValueError):
    """The load generator refuses a target or a setting; the message names it."""


@dataclass(frozen=True)
class Target:
    path: str
    weight: int
    unique_query: bool  # dynamic endpoints: bypass the edge cache with ?lg=<n>


@dataclass(frozen=True)
class JobTarget:
    """How to enqueue one job (the product contract's `worker.enqueue` and `ok` probe)."""

    path: str
    key_field: str
    queue_field: str
    payload_field: str
    payload: dict[str, Any]
    queues: tuple[str, ...]
    share: float  # of all requests
    key_prefix: str = "canary-load"

    def body(self, run: str, n: int) -> dict[str, Any]:
        return {
            self.key_field: f"{self.key_prefix}-{run}-{n}",
            self.queue_field: self.queues[n % len(self.queues)],
            self.payload_field: self.payload,
        }


@dataclass(frozen=True)
class RequestRecord:
    t: float  # seconds since the generator started
    path: str
    status: int  # 0 when the request failed without a response
    latency_ms: float
    track: str | None
    cache: str | None
    error: str | None = None


def require_loopback(url: str) -> str:
    """Return `url` if it points at the loopback interface; raise `LoadRefused` otherwise."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise LoadRefused(f"load target {url!r}: not an http(s) URL")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise LoadRefused(
                f"load target {url!r}: host {host!r} is not loopback; the load generator "
                "only sends traffic to 127.0.0.1/::1/localhost"
            )
    return url.rstrip("/")


class LoadGenerator:
    """Sends `rps` requests/s to `base_url` in a background thread until stopped or bounded."""

    def __init__(
        self,
        base_url: str,
        targets: Sequence[Target],
        *,
        rps: float,
        max_seconds: float = 600.0,
        max_requests: int | None = None,
        concurrency: int = 16,
        timeout_s: float = 5.0,
        seed: int | None = None,
        job_target: JobTarget | None = None,
    ) -> None:
        self.base_url = require_loopback(base_url)
        if not targets or not any(t.weight > 0 for t in targets):
            raise LoadRefused("load targets: no endpoint has a positive load_weight")
        if not 0 < rps <= 1000:
            raise LoadRefused(f"load rate: rps must be in (0, 1000], got {rps}")
        if max_seconds <= 0:
            raise LoadRefused(f"load duration: max_seconds must be > 0, got {max_seconds}")
        self.targets = [t for t in targets if t.weight > 0]
        self.rps = rps
        self.max_seconds = max_seconds
        self.max_requests = max_requests if max_requests is not None else int(rps * max_seconds)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        if job_target is not None and not (0 < job_target.share <= 1 and job_target.queues):
            raise LoadRefused(f"load jobs: share must be in (0, 1] with a queue, got {job_target}")
        self.jobs = job_target
        self.run_token = secrets.token_hex(4)  # job keys are unique per generator
        self._random = random.Random(seed)
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent = 0
        self._skipped = 0
        self._started_at = 0.0
        self._stopped_at: float | None = None

    @classmethod
    def for_spec(cls, spec: ProductSpec, base_url: str, **kwargs: Any) -> LoadGenerator:
        # The endpoints of the product's shortest TTL class are its dynamic ones.
        shortest = min(spec.ttl_classes[e.ttl_class] for e in spec.endpoints)
        targets = [
            Target(e.path, e.load_weight, unique_query=spec.ttl_classes[e.ttl_class] == shortest)
            for e in spec.endpoints
        ]
        worker = spec.contract.worker
        jobs = JobTarget(
            path=worker.enqueue.path,
            key_field=worker.enqueue.key_field,
            queue_field=worker.enqueue.queue_field,
            payload_field=worker.enqueue.payload_field,
            payload=dict(worker.probes.ok),
            queues=tuple(q.name for q in spec.queues.ordered),
            share=spec.canary.job_share,
        )
        kwargs.setdefault("job_target", jobs)
        return cls(base_url, targets, rps=kwargs.pop("rps", spec.canary.load_rps), **kwargs)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> LoadGenerator:
        if self._thread is not None:
            raise RuntimeError("load generator already started")
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="canary-load", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s if timeout_s is not None else self.timeout_s + 2)
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def started_at(self) -> float:
        """time.monotonic() when the generator started (record times are relative to it)."""
        return self._started_at

    def track_share(self, since: float, until: float) -> dict[str, Any]:
        """Requests that reached an origin (cache MISS) between two monotonic times, by
        X-Track: a cross-check of the weights that does not rely on the metric source."""
        lo, hi = since - self._started_at, until - self._started_at
        tracks = Counter(
            r.track for r in self.records() if lo <= r.t < hi and r.cache == "MISS" and r.track
        )
        total = sum(tracks.values())
        return {
            "origin_requests": total,
            "by_track": dict(tracks),
            "canary_share": round(tracks.get("canary", 0) / total, 4) if total else None,
        }

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._paced())
        self._stopped_at = time.monotonic()

    async def _paced(self) -> None:
        # One event loop with aiohttp, not a thread per request with httpx: the generator runs
        # inside the deploy process, beside Dagster's step, and at load_rps the threads' client
        # cost about three times the CPU per request.
        interval = 1.0 / self.rps
        deadline = self._started_at + self.max_seconds
        in_flight: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            next_at = time.monotonic()
            while not self._stop.is_set() and self._sent + self._skipped < self.max_requests:
                now = time.monotonic()
                if now >= deadline:
                    break
                if now < next_at:
                    # Short sleeps, so a stop is seen within 50 ms.
                    await asyncio.sleep(min(next_at - now, 0.05))
                    continue
                next_at += interval
                if next_at < now - 1.0:
                    next_at = now  # fell behind by more than a second: do not burst to catch up
                if len(in_flight) >= self.concurrency:
                    self._skipped += 1
                    continue
                self._sent += 1
                job = None
                if self.jobs is not None and self._random.random() < self.jobs.share:
                    path, job = self.jobs.path, self.jobs.body(self.run_token, self._sent)
                else:
                    path = self._next_path(self._sent)
                task = asyncio.create_task(self._send(session, path, job))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:  # let the requests under way finish (each bounded by timeout_s)
                await asyncio.wait(in_flight)

    def _next_path(self, n: int) -> str:
        target = self._random.choices(self.targets, weights=[t.weight for t in self.targets])[0]
        return f"{target.path}?lg={n}" if target.unique_query else target.path

    async def _send(
        self, session: aiohttp.ClientSession, path: str, job: dict[str, Any] | None = None
    ) -> None:
        began = time.monotonic()
        try:
            method = "GET" if job is None else "POST"
            async with session.request(method, self.base_url + path, json=job) as response:
                await response.read()
                record = RequestRecord(
                    t=began - self._started_at,
                    path=path.split("?")[0],
                    status=response.status,
                    latency_ms=(time.monotonic() - began) * 1000,
                    track=response.headers.get("x-track"),
                    cache=response.headers.get("x-cache"),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            record = RequestRecord(
                t=began - self._started_at,
                path=path.split("?")[0],
                status=0,
                latency_ms=(time.monotonic() - began) * 1000,
                track=None,
                cache=None,
                error=f"{type(exc).__name__}: {exc}",
            )
        with self._lock:
            self._records.append(record)

    # -- results -------------------------------------------------------------------------

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def elapsed(self) -> float:
        end = self._stopped_at if self._stopped_at is not None else time.monotonic()
        return max(0.0, end - self._started_at) if self._started_at else 0.0

    def summary(self) -> dict[str, Any]:
        records = self.records()
        elapsed = self.elapsed()
        return {
            "target": self.base_url,
            "rps_target": self.rps,
            "rps_achieved": round(len(records) / elapsed, 1) if elapsed else 0.0,
            "seconds": round(elapsed, 2),
            "sent": self._sent,
            "completed": len(records),
            "skipped_busy": self._skipped,
            "by_track": dict(Counter(r.track or "(none)" for r in records)),
            "by_status": {str(k): v for k, v in Counter(r.status for r in records).items()},
            "by_cache": dict(Counter(r.cache or "(none)" for r in records)),
            "transport_errors": sum(1 for r in records if r.error),
        }
