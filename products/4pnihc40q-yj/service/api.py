"""The product's API tier (api-i): a Starlette app served by uvicorn as its own process.

    python -m uvicorn api:app --app-dir <artifact>/service --host 127.0.0.1 --port N

Configuration comes from the environment (see service_config.py). Every response carries
X-Release and X-Track; the spec's endpoints also carry Cache-Control (TTL of their class) and
Surrogate-Key, which the edge uses for caching and selective purge. Prometheus metrics are
labelled with version and track so the canary judge can compare the two tracks.

Release knobs (manifest `settings`) act on the data endpoints through the real code path:
`extra_latency_ms` sleeps inside the handler, `error_rate` makes that exact fraction of
requests raise, which the app answers with a 500; `dynamic_max_age` replaces the max-age the
dynamic endpoints declare (a release that would keep dynamic data cached too long);
`guardrails_off` switches off the rate limit and the circuit breaker below.

Guardrails (limits from product.yaml `guardrails`, state machines in guardrails.py):
- a rate limit per client (`X-Client-Id`, else the client address) on every request but the
  platform's probes: over it, 429 with `Retry-After` and `Cache-Control: no-store`;
- a circuit breaker around the database calls (reads and job enqueues): after
  `failure_threshold` consecutive failures it opens, `/readyz` answers not ready and data
  requests fail fast with 503 (the database is not touched) for `open_seconds`; then one probe
  goes through and its success closes it;
- with SERVICE_FAULT_INJECTION=1 (the platform sets it on staging only), `POST /_faults/database`
  `{"seconds", "delay_ms"}` makes every database call wait `delay_ms` and fail for `seconds`
  (at most 60), `DELETE` ends it: the staging smoke's drill of the breaker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import itertools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from db import Database, DatabaseUnavailable
from guardrails import CircuitBreaker, RateLimiter, retry_after_seconds
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from service_config import ConfigError, EndpointPolicy, ServiceConfig, load_config
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("api")

try:
    CONFIG: ServiceConfig = load_config()
except ConfigError as exc:
    # Fail at start-up with one readable line rather than a traceback from deep in uvicorn.
    sys.exit(f"api: configuration error: {exc}")

STATIC_DIR = Path(__file__).resolve().parent / "static"
SCHEMA_TABLES = ("items", "jobs", "job_results", "dead_letter")
JOB_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")
UNMATCHED_PATH = "(unmatched)"  # one label for every unknown URL keeps cardinality bounded

# Dense buckets (seconds): the canary judge rebuilds latency samples from bucket deltas.
LATENCY_BUCKETS_MS = (
    1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 75, 100, 125, 150, 200, 250, 300, 400, 500,
    750, 1000, 1500, 2500,
)  # fmt: skip

METRICS = CollectorRegistry()
REQUESTS = Counter(
    "http_requests",  # exposed as http_requests_total
    "HTTP requests answered, by route template and status.",
    ("version", "track", "path", "status"),
    registry=METRICS,
)
LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time from request to the end of the response body, by route template.",
    ("version", "track", "path"),
    buckets=tuple(ms / 1000 for ms in LATENCY_BUCKETS_MS),
    registry=METRICS,
)

DB = Database(
    CONFIG.database_url,
    display_url=CONFIG.display_database(),
    application_name=f"{CONFIG.api_tier}-{CONFIG.track}",
)


class InjectedFault(RuntimeError):
    """Raised by a data handler when the release's error_rate selects this request."""


class FaultSchedule:
    """Selects exactly `rate` of the calls, evenly spread (deterministic, unlike random())."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._calls = itertools.count(1)  # next() on itertools.count is atomic in CPython

    def should_fail(self) -> bool:
        if self.rate <= 0:
            return False
        n = next(self._calls)
        return math.floor(n * self.rate) > math.floor((n - 1) * self.rate)


FAULTS = FaultSchedule(CONFIG.knobs.error_rate)

# --- guardrails -----------------------------------------------------------------------------

CLIENT_ID_HEADER = "x-client-id"
MAX_CLIENT_ID_LENGTH = 128
# The platform's probes, metrics scrapes and the fault drill are never rate limited.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
FAULT_PATH = "/_faults/database"
MAX_FAULT_SECONDS = 60.0
MAX_FAULT_DELAY_MS = 5000

_GUARDRAILS_ON = CONFIG.guardrails is not None and not CONFIG.knobs.guardrails_off
LIMITER = RateLimiter(  # clients naming themselves in X-Client-Id
    CONFIG.guardrails.requests_per_second if CONFIG.guardrails else 1.0,
    CONFIG.guardrails.burst if CONFIG.guardrails else 1,
    enabled=_GUARDRAILS_ON,
)
ADDRESS_LIMITER = RateLimiter(  # the rest, by address (behind the edge: the edge)
    CONFIG.guardrails.address_requests_per_second if CONFIG.guardrails else 1.0,
    CONFIG.guardrails.address_burst if CONFIG.guardrails else 1,
    enabled=_GUARDRAILS_ON,
)
BREAKER = CircuitBreaker(
    CONFIG.guardrails.failure_threshold if CONFIG.guardrails else 1,
    CONFIG.guardrails.open_seconds if CONFIG.guardrails else 1.0,
    enabled=_GUARDRAILS_ON,
)


class CircuitOpen(RuntimeError):
    """The breaker refused a database call without trying it."""

    @classmethod
    def now(cls) -> CircuitOpen:
        return cls(
            f"circuit breaker open after {BREAKER.consecutive_failures} consecutive database "
            f"failures; retry in {BREAKER.retry_in():.1f}s"
        )


class DatabaseFault:
    """The staging drill: database calls wait `delay_ms`, then fail, until `until`."""

    def __init__(self) -> None:
        self.until = 0.0
        self.delay_ms = 0

    def active(self) -> bool:
        return time.monotonic() < self.until


DB_FAULT = DatabaseFault()


async def apply_release_knobs() -> None:
    # An open breaker refuses before any work (the release's own latency and errors
    # included): failing fast is the breaker's promise, checked by the staging smoke.
    if BREAKER.state == "open":
        raise CircuitOpen.now()
    if CONFIG.knobs.extra_latency_ms > 0:
        await asyncio.sleep(CONFIG.knobs.extra_latency_ms / 1000)
    if FAULTS.should_fail():
        raise InjectedFault(f"injected fault (error_rate={CONFIG.knobs.error_rate})")


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


async def query(sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Every database call goes through the circuit breaker (and the staging fault drill)."""
    if not BREAKER.allow():
        raise CircuitOpen.now()
    try:
        if DB_FAULT.active():
            await asyncio.sleep(DB_FAULT.delay_ms / 1000)
            raise DatabaseUnavailable(f"database {DB.display_url}: injected fault (staging drill)")
        rows = await run_in_threadpool(DB.query, sql, params)
    except DatabaseUnavailable:
        BREAKER.failed()
        raise
    except BaseException:
        # The database answered (e.g. a statement error) or the request was cancelled.
        BREAKER.abandoned()
        raise
    BREAKER.succeeded()
    return rows


# --- probes and metrics ---------------------------------------------------------------------


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "version": CONFIG.version, "track": CONFIG.track})


async def readyz(request: Request) -> JSONResponse:
    if BREAKER.state == "open":  # answered without touching the database
        reason = (
            f"circuit breaker open after {BREAKER.consecutive_failures} consecutive database "
            f"failures; a probe in {BREAKER.retry_in():.1f}s"
        )
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    try:
        rows = await query(
            "SELECT t.name FROM unnest(%s::TEXT[]) AS t(name) "
            "WHERE to_regclass('public.' || t.name) IS NULL",
            (list(SCHEMA_TABLES),),
        )
    except (DatabaseUnavailable, CircuitOpen) as exc:
        return JSONResponse({"status": "not ready", "reason": str(exc)}, status_code=503)
    missing = [row["name"] for row in rows]
    if missing:
        reason = f"schema incomplete in {DB.display_url}: missing table(s) {', '.join(missing)}"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ready", "version": CONFIG.version, "track": CONFIG.track})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(METRICS), media_type=CONTENT_TYPE_LATEST)


# --- data endpoints -------------------------------------------------------------------------


async def list_items(request: Request) -> JSONResponse:
    await apply_release_knobs()
    rows = await query("SELECT id, name, price_cents, updated_at FROM items ORDER BY id")
    return JSONResponse({"items": jsonable(rows), "count": len(rows)})


async def get_item(request: Request) -> JSONResponse:
    await apply_release_knobs()
    item_id: int = request.path_params["item_id"]
    rows = await query(
        "SELECT id, name, price_cents, updated_at FROM items WHERE id = %s", (item_id,)
    )
    # Per-item surrogate keys also for items the spec does not list (the spec's win if listed).
    headers = {"Surrogate-Key": f"items item-{item_id}"}
    if not rows:
        return JSONResponse({"error": f"item {item_id} not found"}, 404, headers=headers)
    return JSONResponse(jsonable(rows[0]), headers=headers)


async def summary(request: Request) -> JSONResponse:
    await apply_release_knobs()
    rows = await query(
        """
        SELECT
            (SELECT count(*) FROM items) AS items,
            (SELECT coalesce(sum(price_cents), 0) FROM items) AS items_total_price_cents,
            (SELECT count(*) FROM jobs WHERE status = 'queued') AS jobs_queued,
            (SELECT count(*) FROM jobs WHERE status = 'running') AS jobs_running,
            (SELECT count(*) FROM jobs WHERE status = 'done') AS jobs_done,
            (SELECT count(*) FROM jobs WHERE status = 'dead') AS jobs_dead,
            (SELECT count(*) FROM job_results) AS job_results,
            (SELECT max(written_at) FROM job_results) AS job_results_latest_written_at,
            (SELECT count(*) FROM dead_letter) AS dead_letter
        """
    )
    row = jsonable(rows[0])
    return JSONResponse(
        {
            "items": {"count": row["items"], "total_price_cents": row["items_total_price_cents"]},
            "jobs": {s: row[f"jobs_{s}"] for s in ("queued", "running", "done", "dead")},
            "job_results": {
                "count": row["job_results"],
                "latest_written_at": row["job_results_latest_written_at"],
            },
            "dead_letter": {"count": row["dead_letter"]},
        }
    )


# --- jobs -----------------------------------------------------------------------------------


def _bad_request(field: str, reason: str, status: int = 422) -> JSONResponse:
    return JSONResponse({"error": f"field '{field}': {reason}", "field": field}, status)


async def enqueue_job(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return _bad_request("(body)", "request body is not valid JSON", 400)
    if not isinstance(body, dict):
        return _bad_request("(body)", "request body must be a JSON object", 400)
    unknown = sorted(set(body) - {"key", "priority", "payload"})
    if unknown:
        return _bad_request(unknown[0], "unknown field; expected key, priority, payload")
    key, priority, payload = body.get("key"), body.get("priority"), body.get("payload", {})
    if not isinstance(key, str) or not JOB_KEY_RE.match(key):
        return _bad_request(
            "key",
            "must be 1-200 characters of letters, digits and . _ : @ -, starting "
            "with a letter or digit",
        )
    if priority not in CONFIG.queues:
        return _bad_request("priority", f"must be one of {', '.join(CONFIG.queues)}")
    if not isinstance(payload, dict):
        return _bad_request("payload", "must be a JSON object")

    # The job's lane is this API's track: during a canary the edge sends the canary its
    # weight's share of producers, so the canary's workers take that share of the jobs.
    inserted = await query(
        "INSERT INTO jobs (job_key, queue, payload, lane) VALUES (%s, %s, %s::JSONB, %s) "
        "ON CONFLICT (job_key) DO NOTHING RETURNING job_key, queue, status, attempts",
        (key, priority, json.dumps(payload), CONFIG.track),
    )
    if inserted:
        return JSONResponse({**jsonable(inserted[0]), "key": key, "created": True}, 202)
    # Idempotent on the key: the same request again answers with the job as it stands.
    existing = await query(
        "SELECT job_key, queue, payload, status, attempts FROM jobs WHERE job_key = %s", (key,)
    )
    job = existing[0]
    if job["queue"] != priority or job["payload"] != payload:
        return _bad_request(
            "key", f"job {key!r} already exists with a different priority or payload", 409
        )
    job.pop("payload")
    return JSONResponse({**jsonable(job), "key": key, "created": False}, 200)


async def get_job(request: Request) -> JSONResponse:
    key: str = request.path_params["key"]
    rows = await query(
        """
        SELECT j.job_key, j.queue, j.status, j.attempts, j.next_attempt_at, j.last_error,
               j.created_at, j.updated_at, j.lane, j.processed_version, r.result, r.written_at
        FROM jobs AS j LEFT JOIN job_results AS r ON r.job_key = j.job_key
        WHERE j.job_key = %s
        """,
        (key,),
    )
    if not rows:
        return JSONResponse({"error": f"job {key!r} not found"}, 404)
    # Every settled attempt, oldest first (a replayed job's attempts count from 1 again).
    attempt_log = await query(
        """
        SELECT attempt_number AS attempt, settled_as AS outcome, worker_track AS track,
               worker_version, failure_reason AS error, attempt_began_at AS started_at,
               attempt_ended_at AS finished_at
        FROM job_attempts WHERE job_key = %s ORDER BY id
        """,
        (key,),
    )
    job = jsonable({**rows[0], "attempt_log": attempt_log})
    job["key"] = job.pop("job_key")
    job["priority"] = job["queue"]
    return JSONResponse(job)


# --- headers, metrics and errors for every request -------------------------------------------


def route_template(routes: list[BaseRoute], scope: Scope) -> str:
    """The route's path template (`/v1/items/{item_id:int}`), never the raw URL."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            if isinstance(route, Mount):
                return f"{route.path}/{{path}}"
            return getattr(route, "path", UNMATCHED_PATH)
    return UNMATCHED_PATH


class ReleaseMiddleware:
    """Adds the release headers to every response and records the request metrics (errors
    included: Starlette's own error handling answers inside this middleware)."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], config: ServiceConfig) -> None:
        self.app = app
        self.routes = routes
        self.config = config
        # TTL of each spec endpoint's route template, so /v1/items/7 gets /v1/items/1's TTL.
        self.by_template: dict[str, EndpointPolicy] = {}
        for endpoint in config.endpoints.values():
            template = route_template(routes, _probe_scope(endpoint.path))
            self.by_template.setdefault(template, endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        template = route_template(self.routes, scope)
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self._add_headers(MutableHeaders(scope=message), scope["path"], template, status)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if template != "/metrics":  # scrapes would drown the traffic being judged
                labels = (self.config.version, self.config.track, template)
                REQUESTS.labels(*labels, str(status)).inc()
                LATENCY.labels(*labels).observe(time.perf_counter() - started)

    def _add_headers(self, headers: MutableHeaders, path: str, template: str, status: int) -> None:
        headers["X-Release"] = self.config.version
        headers["X-Track"] = self.config.track
        endpoint = self.config.endpoints.get(path)
        if endpoint is not None and endpoint.surrogate_keys:
            headers["Surrogate-Key"] = " ".join(endpoint.surrogate_keys)
        endpoint = endpoint or self.by_template.get(template)
        if endpoint is not None and status < 400:
            ttl = endpoint.ttl_seconds
            if endpoint.ttl_class == "dynamic" and self.config.knobs.dynamic_max_age:
                ttl = self.config.knobs.dynamic_max_age  # release knob: a too-long TTL
            immutable = ", immutable" if endpoint.immutable else ""
            headers["Cache-Control"] = f"public, max-age={ttl}{immutable}"
        else:
            # Errors and non-spec endpoints (jobs, probes, metrics) must never be cached.
            headers["Cache-Control"] = "no-store"


async def injected_fault(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, 500)


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s", exc)
    return JSONResponse({"error": str(exc)}, 503)


async def circuit_open(request: Request, exc: Exception) -> JSONResponse:
    retry = retry_after_seconds(BREAKER.retry_in())
    return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": str(retry)})


# --- the staging fault drill (SERVICE_FAULT_INJECTION=1 only) ---------------------------------


async def start_fault(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return _bad_request("(body)", "request body is not valid JSON", 400)
    if not isinstance(body, dict):
        return _bad_request("(body)", "request body must be a JSON object", 400)
    seconds, delay_ms = body.get("seconds"), body.get("delay_ms", 0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return _bad_request("seconds", f"must be a number in (0, {MAX_FAULT_SECONDS:g}]")
    if not 0 < seconds <= MAX_FAULT_SECONDS:
        return _bad_request("seconds", f"must be a number in (0, {MAX_FAULT_SECONDS:g}]")
    if not isinstance(delay_ms, int) or isinstance(delay_ms, bool):
        return _bad_request("delay_ms", f"must be an integer in [0, {MAX_FAULT_DELAY_MS}]")
    if not 0 <= delay_ms <= MAX_FAULT_DELAY_MS:
        return _bad_request("delay_ms", f"must be an integer in [0, {MAX_FAULT_DELAY_MS}]")
    DB_FAULT.until, DB_FAULT.delay_ms = time.monotonic() + seconds, delay_ms
    log.warning("fault drill: database calls fail for %ss (delay %s ms)", seconds, delay_ms)
    return JSONResponse({"fault": "database", "seconds": seconds, "delay_ms": delay_ms}, 202)


async def end_fault(request: Request) -> JSONResponse:
    was = DB_FAULT.active()
    DB_FAULT.until = 0.0
    return JSONResponse({"fault": "database", "ended": was, "breaker": BREAKER.state})


class RateLimitMiddleware:
    """429 with Retry-After for a client over its rate (the probes are never limited)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        key = client_key(scope)
        wait = (LIMITER if key.startswith("id:") else ADDRESS_LIMITER).take(key)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry = retry_after_seconds(wait)
        response = JSONResponse(
            {"error": f"rate limit exceeded: retry after {retry}s"},
            429,
            headers={"Retry-After": str(retry), "Cache-Control": "no-store"},
        )
        await response(scope, receive, send)


def client_key(scope: Scope) -> str:
    """The client a request is counted against: its client id header, else its address."""
    for name, value in scope.get("headers") or ():
        if name == CLIENT_ID_HEADER.encode():
            client_id = value.decode("latin-1").strip()[:MAX_CLIENT_ID_LENGTH]
            if client_id:
                return f"id:{client_id}"
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:(unknown)"


def _probe_scope(path: str) -> Scope:
    return {"type": "http", "method": "GET", "path": path, "root_path": ""}


ROUTES: list[BaseRoute] = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    Route("/v1/items", list_items),
    Route("/v1/items/{item_id:int}", get_item),
    Route("/v1/summary", summary),
    Route("/v1/jobs", enqueue_job, methods=["POST"]),
    Route("/v1/jobs/{key}", get_job),
    Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
]
if CONFIG.fault_injection:
    ROUTES += [
        Route(FAULT_PATH, start_fault, methods=["POST"]),
        Route(FAULT_PATH, end_fault, methods=["DELETE"]),
    ]


def create_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            InjectedFault: injected_fault,
            DatabaseUnavailable: database_unavailable,
            CircuitOpen: circuit_open,
        },
    )
    log.info(
        "%s %s (%s) serving %s; knobs: error_rate=%s extra_latency_ms=%s; guardrails %s%s",
        CONFIG.api_tier, CONFIG.version, CONFIG.track, CONFIG.display_database(),
        CONFIG.knobs.error_rate, CONFIG.knobs.extra_latency_ms,
        "on" if _GUARDRAILS_ON else "off",
        "; fault drill endpoint on" if CONFIG.fault_injection else "",
    )  # fmt: skip
    return ReleaseMiddleware(RateLimitMiddleware(app), ROUTES, CONFIG)


app = create_app()
