"""The smoke suite: run through an environment's edge after a deploy (staging) or a promotion
(production).

Three sections, each a list of rows `{section, name, passed, detail, seconds}`. Everything
product-specific comes from the product's folder: the spec (endpoints, TTL classes, queues) and
the contract (`contract.yaml`: expected status, content type and JSON Schema per endpoint, the
worker probes and where their results land).

- `smoke`: `/healthz`, `/readyz` (the platform's probes) and every spec endpoint marked
  `smoke: true` answer with their contract's status, content type and body (JSON Schema),
  served by the release under test (`X-Release`). On staging the section also verifies the
  API's own guardrails (`guardrails` of the spec and the contract; rows named `guardrails:
  ...`): a burst as one client answered 429 with a valid Retry-After (no-store, after at least
  the spec's burst), another client not throttled, the same URL passing after Retry-After; the
  fault drill opening the circuit breaker (readyz 503, data 503 within fail_fast_ms) and the
  breaker closing after it ends. A product without guardrails fails a row.
- `edge_cache`: every endpoint's headers obey its class's `cache_policy` (declared TTL within
  `max_ttl_seconds`/`min_ttl_seconds`, `immutable` where asked, no `Set-Cookie` on a cacheable
  response: the row names the endpoint and the rule); for one endpoint of each TTL class, MISS
  then HIT with `0 < Age <= TTL`, a request with `Authorization` is never a HIT, purge by
  surrogate key and by URL each force a MISS, and a purge without the purge key is refused
  (403); an object of a short class (TTL <= 10 s) is a MISS again after the class's TTL (an
  object the purges cannot touch, so the check waits beside the others, when there is one).
- `worker_dlq`: the contract's `ok` probe job is done after one attempt with one row in the
  results table, a `poison` job in every queue lands in the dead-letter table after exactly the
  queue's `max_attempts`, and enqueueing a known key again does not process it twice. From the
  jobs' attempt logs, every gap between attempts is within the queue's backoff (never earlier,
  at most `backoff_tolerance_ms` later); the `retry` probe is done after its failures + 1
  attempts with one result; the `slow` probe survives a SIGKILL of the worker in the middle of
  it (done once after the restart); and a job of the first queue is done within the queue's
  `priority_max_wait_ms` while the last queue is flooded (`flood` probe).

Fail closed: a section that was asked for and has no rows, or whose checks raised (connection
refused, timeout: the detail names the URL), is FAILED. Every request carries a per-run query
string (`?smoke=<run id>`) so runs never see each other's cache entries.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
from psycopg2 import sql
from pydantic import TypeAdapter, ValidationError

from dagster_project.core import database, httpclient
from dagster_project.core.contracts import SmokeReport, SmokeRow, SmokeSection
from dagster_project.core.spec import (
    CachePolicy,
    CircuitBreaker,
    Endpoint,
    EndpointContract,
    GuardrailsContract,
    ProductSpec,
    Queue,
    RateLimit,
)

Section = SmokeSection
SECTIONS: tuple[Section, ...] = ("smoke", "edge_cache", "worker_dlq")

# Job keys the suite enqueues; tests make a release fail normal jobs by matching this prefix.
NORMAL_JOB_PREFIX = "smoke-ok-"
POISON_JOB_PREFIX = "smoke-poison-"

REQUEST_TIMEOUT_SECONDS = 5.0
RETRY_DELAY_SECONDS = 0.2
# The edge's purge endpoint (core/platform/edge.py); it wants the key in this header.
EDGE_PURGE_PATH = "/_edge/purge"
PURGE_KEY_HEADER = "X-Purge-Key"
# The TTL-expiry check waits out a class's TTL only for classes at most this long.
MAX_EXPIRY_WAIT_SECONDS = 10
# The Authorization header the suite sends to check that authenticated answers are not shared.
SMOKE_AUTHORIZATION = "Bearer smoke-not-a-real-token"
# Added to the backoff schedule when waiting for a job: worker poll interval, process start.
JOB_DEADLINE_SLACK_SECONDS = 10.0
JOB_POLL_INTERVAL_SECONDS = 0.1
# How long a re-enqueued key is watched for a second processing.
IDEMPOTENCY_WATCH_SECONDS = 1.5


class SmokePlatform(Protocol):
    """What the suite needs from a platform (`LocalPlatform` or a production adapter)."""

    def edge_url(self, env: str) -> str: ...

    def purge(self, env: str, url: str | None = None, surrogate_key: str | None = None) -> int: ...

    # SIGKILL the serving stable worker of env (its supervisor restarts it); the pid killed.
    def kill_worker(self, env: str) -> int: ...


class CheckFailed(Exception):
    """A check's verdict is 'failed'; the message is the row's detail."""


# --------------------------------------------------------------------------------------------
# Response bodies against the product's contract (its JSON Schemas)
# --------------------------------------------------------------------------------------------

_JSON_OBJECT = TypeAdapter(dict[str, Any])
_VALIDATORS: dict[str, Any] = {}  # one compiled validator per schema (by its JSON text)


def schema_problems(schema: dict[str, Any], body: Any, limit: int = 3) -> list[str]:
    """The first `limit` ways `body` violates the JSON Schema `schema` (draft 2020-12), each
    naming the field path (`orders.0.total_cents`) and the rule; empty when it conforms."""
    from jsonschema import Draft202012Validator  # ~0.2 s: only when a body is checked

    key = json.dumps(schema, sort_keys=True)
    validator = _VALIDATORS.get(key)
    if validator is None:
        validator = _VALIDATORS[key] = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    return [
        f"field '{'.'.join(str(p) for p in error.absolute_path) or '(top level)'}': "
        f"{_snippet(error.message, 160)}"
        for error in errors[:limit]
    ]


def check_body(path: str, contract: EndpointContract, body: Any) -> str:
    """Validate a JSON body against the endpoint's contract; returns a short description,
    raises CheckFailed naming the path and the fields that violate the schema."""
    assert contract.json_schema is not None
    problems = schema_problems(contract.json_schema, body)
    if problems:
        raise CheckFailed(f"{path}: body does not match its contract: " + "; ".join(problems))
    if isinstance(body, dict):
        return f"matches its JSON Schema ({len(body)} keys)"
    if isinstance(body, list):
        return f"matches its JSON Schema ({len(body)} entries)"
    return "matches its JSON Schema"


def effective_ttl(cache_control: str | None) -> int | None:
    """The shared-cache TTL a `Cache-Control` value grants: `s-maxage`, else `max-age`."""
    if not cache_control:
        return None
    directives: dict[str, str] = {}
    for part in cache_control.split(","):
        name, _, value = part.strip().partition("=")
        directives[name.strip().lower()] = value.strip().strip('"')
    for name in ("s-maxage", "max-age"):
        if name in directives:
            try:
                return int(directives[name])
            except ValueError:
                return None
    return None


def cache_directives(cache_control: str | None) -> dict[str, str]:
    """`Cache-Control` as {directive (lower case): value ('' when none)}."""
    directives: dict[str, str] = {}
    for part in (cache_control or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip():
            directives[name.strip().lower()] = value.strip().strip('"')
    return directives


def is_cacheable(cache_control: str | None) -> bool:
    """Whether a shared cache may store a response declaring `cache_control`."""
    directives = cache_directives(cache_control)
    if {"no-store", "no-cache", "private"} & set(directives):
        return False
    ttl = effective_ttl(cache_control)
    return ttl is not None and ttl > 0


def policy_problems(
    label: str,
    ttl_class: str,
    policy: CachePolicy | None,
    cache_control: str | None,
    set_cookie: bool = False,
) -> list[str]:
    """How the headers an endpoint was served with break its TTL class's policy, each naming
    the endpoint (`label`, e.g. `GET /path`) and the rule; empty when they obey it."""
    directives = cache_directives(cache_control)
    ttl = effective_ttl(cache_control)
    cacheable = is_cacheable(cache_control)
    which = "s-maxage" if "s-maxage" in directives else "max-age"
    problems: list[str] = []
    if policy is not None:
        high, low = policy.max_ttl_seconds, policy.min_ttl_seconds
        if high is not None and cacheable and ttl is not None and ttl > high:
            problems.append(
                f"{label}: {ttl_class} {which} {ttl} > policy {high} (rule max_ttl_seconds)"
            )
        if low is not None and (not cacheable or ttl is None or ttl < low):
            shown = f"{which} {ttl}" if cacheable else f"not cacheable ({cache_control!r})"
            problems.append(f"{label}: {ttl_class} {shown} < policy {low} (rule min_ttl_seconds)")
        if policy.immutable and "immutable" not in directives:
            problems.append(
                f"{label}: {ttl_class} Cache-Control {cache_control!r} lacks immutable "
                "(rule immutable)"
            )
    if cacheable and set_cookie:
        problems.append(
            f"{label}: Set-Cookie on a cacheable response ({cache_control!r}) "
            "(rule no_set_cookie_when_cacheable)"
        )
    return problems


def backoff_delays(queue: Queue) -> list[float]:
    """Seconds the worker waits before each retry of a job that keeps failing."""
    return [
        min(queue.backoff_initial_ms * queue.backoff_multiplier**i, queue.backoff_max_ms) / 1000
        for i in range(queue.max_attempts - 1)
    ]


def job_deadline_seconds(queue: Queue, slack: float = JOB_DEADLINE_SLACK_SECONDS) -> float:
    """How long a job may take to reach a final state: every backoff, plus slack."""
    return sum(backoff_delays(queue)) + slack


# --------------------------------------------------------------------------------------------
# Running the suite
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    spec: ProductSpec
    platform: SmokePlatform
    env: str
    expected_version: str
    client: httpx.Client
    report: SmokeReport
    purge: bool
    job_slack: float

    @property
    def run_id(self) -> str:
        return self.report.run_id

    def record(self, section: Section, name: str, check: Callable[[], str]) -> bool:
        """Run one check; its return value is the passing detail, any exception a failure."""
        started = time.monotonic()
        try:
            detail, passed = check(), True
        except CheckFailed as exc:
            detail, passed = str(exc), False
        except Exception as exc:  # fail closed: an error in a check is never a pass
            detail, passed = f"error: {type(exc).__name__}: {exc}", False
        self.report.rows.append(
            SmokeRow(
                section=section,
                name=name,
                passed=passed,
                detail=detail,
                seconds=round(time.monotonic() - started, 3),
            )
        )
        return passed

    def request(
        self, method: str, path: str, *, retry_statuses: range = range(500, 600), **kwargs: Any
    ) -> httpx.Response:
        """One request; an idempotent GET answered 5xx (`retry_statuses`) is retried once, and
        the retry listed."""
        response = self._send(method, path, **kwargs)
        if method == "GET" and response.status_code in retry_statuses:
            time.sleep(RETRY_DELAY_SECONDS)
            retried = self._send(method, path, **kwargs)
            self.report.retries.append(
                f"GET {response.url}: {response.status_code}, retried: {retried.status_code}"
            )
            return retried
        return response

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.client.base_url.join(path)
        try:
            return self.client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise CheckFailed(
                f"{method} {url}: no answer within {REQUEST_TIMEOUT_SECONDS:g}s "
                f"({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise CheckFailed(f"{method} {url}: {type(exc).__name__}: {exc}") from None

    def tagged(self, path: str, purpose: str) -> str:
        """The path with this run's query string, so no other run shares its cache entry."""
        return f"{path}?smoke={self.run_id}-{purpose}"


def run_smoke(
    spec: ProductSpec,
    platform: SmokePlatform,
    env: str,
    expected_version: str,
    *,
    include_edge_cache: bool = True,
    include_worker: bool = True,
    purge: bool = True,
    job_slack_seconds: float = JOB_DEADLINE_SLACK_SECONDS,
    include_guardrails: bool = True,
    after_retry_timing: Callable[[], None] | None = None,
) -> SmokeReport:
    """Run the smoke suite through `env`'s edge against the release `expected_version`.

    `after_retry_timing` is called once the worker's retry-timing rows are judged: from then
    on the suite only waits or measures with wide bounds, so the caller may start CPU work.

    `purge=False` leaves the purge checks out of the edge_cache section (the MISS/HIT/TTL and
    restricted-purge checks still run). `include_guardrails` adds the guardrail rows to the
    smoke section (rate limit and circuit breaker drill; staging only: the drill needs the
    API's fault endpoint). Never raises for a failing environment: every problem is a failed
    row.
    """
    sections: list[Section] = ["smoke"]
    if include_edge_cache:
        sections.append("edge_cache")
    if include_worker:
        sections.append("worker_dlq")
    report = SmokeReport(
        product=spec.product,
        env=env,
        expected_version=expected_version,
        run_id=uuid.uuid4().hex[:12],
        edge_url="(unknown)",
        sections=sections,
        started_at=_now(),
    )
    try:
        edge = platform.edge_url(env).rstrip("/")
    except Exception as exc:  # no edge: every section fails with the reason
        for section in sections:
            report.rows.append(
                SmokeRow(
                    section=section,
                    name="edge of the environment",
                    passed=False,
                    detail=f"no edge URL for environment {env!r}: {type(exc).__name__}: {exc}",
                    seconds=0.0,
                )
            )
        return report.model_copy(update={"finished_at": _now()})
    report = report.model_copy(update={"edge_url": edge})
    with httpclient.client(
        base_url=edge, timeout=REQUEST_TIMEOUT_SECONDS, follow_redirects=False
    ) as client:
        run = _Run(spec, platform, env, expected_version, client, report, purge, job_slack_seconds)
        _smoke_section(run)
        # The worker's retry timing (each gap within backoff_tolerance_ms) is judged on jobs
        # that run first, beside nothing but the TTL-expiry check (three requests and a
        # sleep; it starts here when no purge of the cache checks can remove its object, see
        # `expiry_endpoint`, else it runs after them). Then the edge cache and the worker
        # drills, which mostly wait (Age timers, idempotency watch, restart) and touch nothing
        # the other checks do, run at once. The guardrails run last, once the expiry check is
        # done, and beside nothing that calls the API: the rate limit's burst goes through the
        # data handlers (a release's own errors are selected by call count, and a retry must
        # meet them as it would alone), and the breaker drill fails every database call. Only
        # the priority drill's flood drains beside them: that waits on the worker (which never
        # calls the API) and counts rows in Postgres.
        plan = expiry_endpoint(spec, purged_keys(spec) if purge else frozenset())
        expiry = plan.endpoint if plan is not None else None
        early = include_edge_cache and plan is not None and plan.early
        floods: list[_Flood] = []  # the priority drill's, once enqueued

        def jobs_edge_and_drills(own: _Run) -> None:
            jobs = _worker_jobs(own) if include_worker else None
            if after_retry_timing is not None:
                after_retry_timing()
            branches: list[Callable[[_Run], None]] = []
            if include_edge_cache:
                last = None if early else expiry
                branches.append(lambda part: _edge_cache_section(part, expiry_last=last))
            if jobs is not None:
                branches.append(lambda part: _worker_drills(part, jobs, floods))
            _concurrently(own, branches)

        beside = [lambda own: _expiry_check(own, expiry)] if early and expiry else []
        _concurrently(run, [jobs_edge_and_drills, *beside])

        def drained(own: _Run) -> None:
            for flood in floods:
                own.record("worker_dlq", FLOOD_DRAINED_ROW, lambda f=flood: _drain(own, f))

        def guardrails(own: _Run) -> None:
            _rate_limit_checks(own)
            _breaker_drill(own)

        _concurrently(run, [drained, guardrails] if include_guardrails else [drained])
    return report.model_copy(update={"finished_at": _now()})


def _concurrently(run: _Run, branches: list[Callable[[_Run], None]]) -> None:
    """Run independent parts of the suite in threads, each recording into its own copy of the
    report; their rows are then appended in the order of `branches`, so the report reads as if
    they had run one after the other. An error in a part is raised here, as it would have been
    in turn."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    if len(branches) <= 1:
        for branch in branches:
            branch(run)
        return
    runs = [
        replace(run, report=run.report.model_copy(update={"rows": [], "retries": []}))
        for _ in branches
    ]
    with ThreadPoolExecutor(len(branches), thread_name_prefix="smoke") as pool:
        futures = [pool.submit(branch, own) for branch, own in zip(branches, runs, strict=True)]
        try:
            for future in futures:
                future.result()
        finally:
            for own in runs:
                run.report.rows.extend(own.report.rows)
                run.report.retries.extend(own.report.retries)


def post_deploy_smoke(
    spec: ProductSpec, platform: SmokePlatform, expected_version: str
) -> SmokeReport:
    """The smoke section on production after a promotion: no purges, no poison jobs."""
    return run_smoke(
        spec,
        platform,
        "production",
        expected_version,
        include_edge_cache=False,
        include_worker=False,
        include_guardrails=False,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- smoke ------------------------------------------------------------------------------------


def _smoke_section(run: _Run) -> None:
    for path in ("/healthz", "/readyz"):
        run.record("smoke", f"GET {path}", lambda path=path: _check_health(run, path))
    smoke_endpoints = [e for e in run.spec.endpoints if e.smoke]
    for endpoint in smoke_endpoints:
        run.record("smoke", f"GET {endpoint.path}", lambda e=endpoint: _check_endpoint(run, e))


def _check_health(run: _Run, path: str) -> str:
    response = run.request("GET", run.tagged(path, "health"))
    if response.status_code != 200:
        raise CheckFailed(f"GET {response.url}: status {response.status_code}, expected 200")
    return f"200 from {response.url.path}"


def _check_endpoint(run: _Run, endpoint: Endpoint) -> str:
    contract = run.spec.contract.endpoints[endpoint.path]
    response = run.request("GET", run.tagged(endpoint.path, "contract"))
    problems: list[str] = []
    if response.status_code != contract.status:
        problems.append(
            f"status {response.status_code}, expected {contract.status} "
            f"(body: {_snippet(response.text)})"
        )
    release = response.headers.get("X-Release")
    if release != run.expected_version:
        problems.append(
            f"X-Release {release!r}, expected {run.expected_version!r} (release under test)"
        )
    content_type = response.headers.get("Content-Type", "")
    media_type = content_type.split(";")[0].strip().lower()
    shape = ""
    if response.status_code == contract.status:
        if media_type != contract.content_type:
            problems.append(f"Content-Type {content_type!r}, expected {contract.content_type}")
        elif contract.is_json:
            try:
                shape = check_body(endpoint.path, contract, response.json())
            except ValueError as exc:
                problems.append(f"body is not JSON: {exc}")
            except CheckFailed as exc:
                problems.append(str(exc))
        else:
            if len(response.content) < contract.min_bytes:
                size, least = len(response.content), contract.min_bytes
                problems.append(f"body of {size} bytes, expected at least {least}")
            shape = f"{len(response.content)} bytes"
    if problems:
        raise CheckFailed(f"GET {response.url}: " + "; ".join(problems))
    return f"{response.status_code} {media_type}, {shape}, X-Release {release}"


def _snippet(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# --- guardrails (rows of the smoke section, staging only) -------------------------------------

# A rate-limit burst: at most this many requests, this many in flight.
BURST_CONCURRENCY = 16
BURST_MAX_SECONDS = 5.0
# The breaker drill: how long each faulty database call waits before failing (an open breaker
# must answer well before it), and the fault's lifetime (the API ends it even if we die).
FAULT_DELAY_FACTOR = 3
FAULT_MAX_SECONDS = 30.0
BREAKER_RECOVERY_SLACK_SECONDS = 5.0
MAX_RETRY_AFTER_SECONDS = 60


def _rate_limit_checks(run: _Run) -> None:
    """The API's rate limit through the edge: a burst over it answers 429 with a valid
    Retry-After (never cached), another client is not throttled, the same request after
    Retry-After passes. No declaration of the guardrails is a failed row."""
    guardrails = run.spec.guardrails
    probes = run.spec.contract.guardrails
    if guardrails is None or probes is None:
        missing = "product.yaml 'guardrails'" if guardrails is None else "contract.yaml"
        missing += "" if probes is not None or guardrails is None else " 'guardrails'"
        run.record(
            "smoke",
            "guardrails: declared",
            lambda: _guardrails_undeclared(
                f"no guardrails to verify: {missing} is missing (a rate limit and a circuit "
                "breaker are required)"
            ),
        )
        return
    limit = guardrails.rate_limit
    client = _guardrail_client(run)
    burst: dict[str, Any] = {}

    def over_limit() -> str:
        burst.update(_burst(run, probes.probe_path, probes.client_id_header, client, limit))
        throttled = burst.get("throttled")
        if throttled is None:
            raise CheckFailed(
                f"{burst['sent']} requests in {burst['seconds']:.2f}s to {probes.probe_path} as "
                f"client {client!r}: no 429 (rate limit {limit.requests_per_second:g}/s, burst "
                f"{limit.burst}; statuses {burst['statuses']})"
            )
        problems = _throttle_problems(throttled, limit.burst, burst["accepted"])
        if problems:
            raise CheckFailed(f"GET {throttled.url}: " + "; ".join(problems))
        return (
            f"429 after {burst['accepted']} accepted of {burst['sent']} in "
            f"{burst['seconds']:.2f}s, Retry-After {throttled.headers.get('Retry-After')}, "
            f"{throttled.headers.get('Cache-Control')}"
        )

    if run.record("smoke", "guardrails: a burst over the rate limit answers 429", over_limit):

        def other_client() -> str:
            response = run.request(
                "GET",
                run.tagged(probes.probe_path, "rl-other"),
                headers={probes.client_id_header: f"{client}-other"},
            )
            if response.status_code != 200:
                raise CheckFailed(
                    f"GET {response.url} as another client while {client!r} is throttled: "
                    f"status {response.status_code}, expected 200 (the limit is per client)"
                )
            return "200 for another client while the first is throttled"

        run.record("smoke", "guardrails: the rate limit is per client", other_client)

        def after_retry_after() -> str:
            throttled = burst["throttled"]
            wait = int(throttled.headers["Retry-After"])
            time.sleep(wait)
            response = run.request(
                "GET", throttled.url.raw_path.decode(), headers={probes.client_id_header: client}
            )
            if response.status_code != 200 or _x_cache(response) == "HIT":
                raise CheckFailed(
                    f"GET {response.url} {wait}s after a 429 with Retry-After {wait}: status "
                    f"{response.status_code}, X-Cache {_x_cache(response)} (expected 200 from "
                    "the origin: the 429 must never be cached)"
                )
            return f"200 ({_x_cache(response)}) for the same URL after Retry-After {wait}s"

        run.record("smoke", "guardrails: a request after Retry-After passes", after_retry_after)


def _guardrail_client(run: _Run) -> str:
    return f"smoke-{run.run_id}"


def _breaker_drill(run: _Run) -> None:
    """Database faults open the circuit breaker (readyz not ready, data requests 503 fast) and
    it closes after they end. Nothing to drill without the guardrails' declaration (the rate
    limit's rows already failed for it)."""
    guardrails, probes = run.spec.guardrails, run.spec.contract.guardrails
    if guardrails is not None and probes is not None:
        _breaker_checks(run, guardrails.circuit_breaker, probes, _guardrail_client(run))


def _guardrails_undeclared(detail: str) -> str:
    raise CheckFailed(detail)


def _burst(run: _Run, path: str, header: str, client: str, limit: RateLimit) -> dict[str, Any]:
    """Requests as one client, BURST_CONCURRENCY at a time, until one is answered 429 or
    enough were sent that the limit must have been crossed (burst + the refill meanwhile)."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    statuses: dict[int, int] = {}
    accepted, sent = 0, 0
    throttled: httpx.Response | None = None
    with ThreadPoolExecutor(BURST_CONCURRENCY) as pool:
        while throttled is None:
            elapsed = time.monotonic() - started
            ceiling = limit.burst + limit.requests_per_second * elapsed + 2 * BURST_CONCURRENCY
            if elapsed > BURST_MAX_SECONDS or sent > ceiling + limit.burst:
                break
            paths = [run.tagged(path, f"rl-{sent + i}") for i in range(BURST_CONCURRENCY)]
            sent += len(paths)
            for response in pool.map(
                lambda p: run._send("GET", p, headers={header: client}), paths
            ):
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 429:
                    throttled = throttled or response
                else:  # let through by the limiter (a release's own 5xx included)
                    accepted += 1
    return {
        "throttled": throttled,
        "accepted": accepted,
        "sent": sent,
        "seconds": time.monotonic() - started,
        "statuses": dict(sorted(statuses.items())),
    }


def _throttle_problems(response: httpx.Response, burst: int, accepted: int) -> list[str]:
    """How a 429 breaks the rules: a whole-seconds Retry-After within 1..60, no-store, not a
    cache HIT, and not before the spec's burst was granted."""
    problems = []
    retry_after = response.headers.get("Retry-After", "")
    if not retry_after.isdigit() or not 1 <= int(retry_after) <= MAX_RETRY_AFTER_SECONDS:
        problems.append(
            f"Retry-After {retry_after!r}, expected whole seconds in 1..{MAX_RETRY_AFTER_SECONDS}"
        )
    if "no-store" not in cache_directives(response.headers.get("Cache-Control")):
        problems.append(
            f"Cache-Control {response.headers.get('Cache-Control')!r} on a 429, expected no-store"
        )
    if _x_cache(response) == "HIT":
        problems.append("429 served from the edge cache (X-Cache HIT)")
    if accepted < burst:
        problems.append(
            f"only {accepted} requests accepted before 429, the spec's burst is {burst}"
        )
    return problems


def _breaker_checks(
    run: _Run, breaker: CircuitBreaker, probes: GuardrailsContract, client: str
) -> None:
    """The drill: database faults (each call waits, then fails) until the breaker opens;
    readyz not ready and data requests 503 fast while open; after the faults end, readyz ready
    and data 200 within open_seconds (+ slack)."""
    headers = {probes.client_id_header: f"{client}-breaker"}
    delay_ms = probes.fail_fast_ms * FAULT_DELAY_FACTOR

    def ready_before() -> str:
        response = run._send("GET", run.tagged("/readyz", "cb-before"))
        if response.status_code != 200:
            raise CheckFailed(
                f"GET {response.url}: status {response.status_code} before the drill, expected "
                f"200 (body: {_snippet(response.text)})"
            )
        return "ready before the drill"

    if not run.record("smoke", "guardrails: ready before the breaker drill", ready_before):
        return
    counter = iter(range(1_000_000))

    def data(purpose: str) -> tuple[httpx.Response, float]:
        # A 500 is the release's own error (not the breaker's 503): retried once, listed; the
        # time is the answered request's own.
        response = run.request(
            "GET",
            run.tagged(probes.probe_path, f"cb-{purpose}-{next(counter)}"),
            headers=headers,
            retry_statuses=range(500, 501),
        )
        return response, response.elapsed.total_seconds() * 1000

    fault_on = False
    try:

        def opens() -> str:
            nonlocal fault_on
            seconds = min(FAULT_MAX_SECONDS, breaker.open_seconds * 4 + 10)
            response = run._send(
                "POST",
                probes.fault_path,
                json={"seconds": seconds, "delay_ms": delay_ms},
                headers=headers,
            )
            if response.status_code not in (200, 202):
                raise CheckFailed(
                    f"POST {response.url}: status {response.status_code} (body: "
                    f"{_snippet(response.text)}); the fault drill endpoint must be on in "
                    f"{run.env}"
                )
            fault_on = True
            failures = []
            for _ in range(breaker.failure_threshold):
                response, ms = data("fault")
                failures.append(f"{response.status_code} in {ms:.0f}ms")
                if response.status_code < 500:
                    raise CheckFailed(
                        f"GET {response.url} during database faults: status "
                        f"{response.status_code}, expected 5xx"
                    )
            ready = run._send("GET", run.tagged("/readyz", "cb-open"))
            if ready.status_code != 503:
                raise CheckFailed(
                    f"GET {ready.url} after {breaker.failure_threshold} consecutive database "
                    f"failures ({', '.join(failures)}): status {ready.status_code}, expected "
                    "503 not ready (breaker open)"
                )
            return (
                f"{breaker.failure_threshold} failures ({', '.join(failures)}), then readyz "
                f"503: {_snippet(ready.text, 100)}"
            )

        if not run.record("smoke", "guardrails: database faults open the breaker", opens):
            return

        def fails_fast() -> str:
            timings = []
            for _ in range(3):
                response, ms = data("open")
                timings.append(ms)
                if response.status_code != 503:
                    raise CheckFailed(
                        f"GET {response.url} with the breaker open: status "
                        f"{response.status_code}, expected 503"
                    )
                if ms > probes.fail_fast_ms:
                    raise CheckFailed(
                        f"GET {response.url} with the breaker open: 503 after {ms:.0f}ms, "
                        f"expected within fail_fast_ms {probes.fail_fast_ms} (a faulty "
                        f"database call takes {delay_ms}ms: the breaker did not fail fast)"
                    )
            return (
                f"503 in {', '.join(f'{ms:.0f}' for ms in timings)}ms "
                f"(<= {probes.fail_fast_ms}ms; a database call would take {delay_ms}ms)"
            )

        run.record("smoke", "guardrails: an open breaker fails fast with 503", fails_fast)

        def closes() -> str:
            nonlocal fault_on
            response = run._send("DELETE", probes.fault_path, headers=headers)
            if response.status_code != 200:
                raise CheckFailed(f"DELETE {response.url}: status {response.status_code}")
            fault_on = False
            ended = time.monotonic()
            deadline = ended + breaker.open_seconds + BREAKER_RECOVERY_SLACK_SECONDS
            ready = run._send("GET", run.tagged("/readyz", "cb-close-0"))
            polls = 1
            while ready.status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
                ready = run._send("GET", run.tagged("/readyz", f"cb-close-{polls}"))
                polls += 1
            if ready.status_code != 200:
                raise CheckFailed(
                    f"GET {ready.url}: still {ready.status_code} "
                    f"{time.monotonic() - ended:.1f}s after the faults ended (open_seconds "
                    f"{breaker.open_seconds:g}; body: {_snippet(ready.text)})"
                )
            response, _ = data("closed")
            if response.status_code != 200:
                raise CheckFailed(
                    f"GET {response.url} after recovery: status {response.status_code}, "
                    "expected 200"
                )
            return f"ready again {time.monotonic() - ended:.1f}s after the faults ended; data 200"

        run.record("smoke", "guardrails: the breaker closes after recovery", closes)
    finally:
        if fault_on:  # never leave the environment failing
            with contextlib.suppress(CheckFailed):
                run._send("DELETE", probes.fault_path, headers=headers)


# --- edge cache -------------------------------------------------------------------------------


def _edge_cache_section(run: _Run, *, expiry_last: Endpoint | None) -> None:
    """The policy of every endpoint answering 200; the cache behaviour for one endpoint of
    each of the spec's TTL classes (the first the edge may cache: its contract expects 200);
    then the TTL expiry of `expiry_last`, if given (else it runs beside the section or not)."""
    contracts = run.spec.contract.endpoints
    for endpoint in run.spec.endpoints:
        if contracts[endpoint.path].status == 200:
            run.record(
                "edge_cache",
                f"GET {endpoint.path} ({endpoint.ttl_class}): headers obey the cache policy",
                lambda e=endpoint: _check_policy(run, e),
            )
    # One branch per TTL class, at once: each waits past Age 1 on its own entry, and their
    # purges are of their own URL and surrogate key.
    _concurrently(run, [_class_cache_checks(ttl_class) for ttl_class in run.spec.ttl_classes])
    if expiry_last is not None:
        _expiry_check(run, expiry_last)  # after the purges above: they may remove its object


def cache_probe_endpoint(spec: ProductSpec, ttl_class: str) -> Endpoint | None:
    """The endpoint whose cache behaviour stands for `ttl_class`: its first answering 200."""
    contracts = spec.contract.endpoints
    return next(
        (e for e in spec.endpoints if e.ttl_class == ttl_class and contracts[e.path].status == 200),
        None,
    )


def purged_keys(spec: ProductSpec) -> frozenset[str]:
    """The surrogate keys the cache checks purge (each probe endpoint's first)."""
    probes = (cache_probe_endpoint(spec, ttl_class) for ttl_class in spec.ttl_classes)
    return frozenset(e.surrogate_keys[0] for e in probes if e is not None and e.surrogate_keys)


@dataclass(frozen=True)
class ExpiryPlan:
    endpoint: Endpoint
    early: bool  # no purge of the cache checks can remove it: it may run beside them


def expiry_endpoint(spec: ProductSpec, purged: frozenset[str]) -> ExpiryPlan | None:
    """The object the TTL-expiry check waits on: an endpoint answering 200 of the shortest TTL
    class (at most MAX_EXPIRY_WAIT_SECONDS), preferring one none of whose surrogate keys is
    in `purged`, since a purge would pass for an expiry. None: no class short enough."""
    contracts = spec.contract.endpoints
    candidates = [
        e
        for e in spec.endpoints
        if contracts[e.path].status == 200
        and spec.ttl_classes[e.ttl_class] <= MAX_EXPIRY_WAIT_SECONDS
    ]
    if not candidates:
        return None
    shortest = min(spec.ttl_classes[e.ttl_class] for e in candidates)
    candidates = [e for e in candidates if spec.ttl_classes[e.ttl_class] == shortest]
    untouched = [e for e in candidates if not purged.intersection(e.surrogate_keys)]
    return ExpiryPlan(untouched[0], True) if untouched else ExpiryPlan(candidates[0], False)


def _class_cache_checks(ttl_class: str) -> Callable[[_Run], None]:
    def checks(run: _Run) -> None:
        endpoint = cache_probe_endpoint(run.spec, ttl_class)
        if endpoint is None:
            run.record(
                "edge_cache",
                f"{ttl_class} endpoint",
                _fail(
                    f"the product spec has no {ttl_class} endpoint answering 200 to test the "
                    "edge with"
                ),
            )
            return
        _cache_checks(run, endpoint)

    return checks


def _check_policy(run: _Run, endpoint: Endpoint) -> str:
    response = run.request("GET", run.tagged(endpoint.path, "policy"))
    if response.status_code != 200:
        raise CheckFailed(f"GET {response.url}: status {response.status_code}, expected 200")
    cache_control = response.headers.get("Cache-Control")
    policy = run.spec.cache_policy.get(endpoint.ttl_class)
    problems = policy_problems(
        f"GET {endpoint.path}",
        endpoint.ttl_class,
        policy,
        cache_control,
        set_cookie="set-cookie" in response.headers,
    )
    if problems:
        raise CheckFailed("; ".join(problems))
    rules = policy.model_dump(exclude_defaults=True) if policy else {}
    return f"Cache-Control {cache_control!r} within {rules or 'the always-on rules'}"


def _expiry_check(run: _Run, endpoint: Endpoint) -> None:
    """One object of the shortest TTL class (`expiry_endpoint`): stored, a HIT at once, a MISS
    again once the class's TTL is over."""
    ttl = run.spec.ttl_classes[endpoint.ttl_class]
    path = run.tagged(endpoint.path, "expiry")

    def check() -> str:
        first = run.request("GET", path)
        stored_at = time.monotonic()
        if first.status_code != 200 or _x_cache(first) != "MISS":
            raise CheckFailed(
                f"GET {first.url}: status {first.status_code}, X-Cache {_x_cache(first)!r}, "
                "expected a 200 MISS (first request of this run)"
            )
        second = run.request("GET", path)
        if _x_cache(second) != "HIT":
            raise CheckFailed(f"GET {second.url}: X-Cache {_x_cache(second)!r}, expected HIT")
        time.sleep(max(0.0, stored_at + ttl + 1.1 - time.monotonic()))
        response = run.request("GET", path)
        got = _x_cache(response)
        elapsed = time.monotonic() - stored_at
        if got == "MISS":
            return f"HIT at once, MISS {elapsed:.1f}s after it was stored"
        # An edge with grace (Varnish) may answer one stale HIT while it refetches in the
        # background: expired all the same if the object is then replaced by a younger one.
        stale_age = _age(response)
        for _ in range(3):
            time.sleep(0.5)
            again = run.request("GET", path)
            if _x_cache(again) == "MISS" or _age(again) < stale_age:
                return (
                    f"HIT at once; after the TTL one stale HIT (Age {stale_age}, grace), then "
                    f"refetched ({_x_cache(again)}, Age {_age(again)})"
                )
        raise CheckFailed(
            f"GET {response.url}: X-Cache {got!r} (Age {response.headers.get('Age')}, "
            f"Cache-Control {response.headers.get('Cache-Control')!r}) {elapsed:.1f}s after "
            f"it was stored, still Age {_age(again)} 1.5s later: cached past the "
            f"{endpoint.ttl_class} TTL {ttl}s"
        )

    name = f"{endpoint.path} ({endpoint.ttl_class}): MISS again after the {ttl}s TTL"
    run.record("edge_cache", name, check)


def _fail(detail: str) -> Callable[[], str]:
    def check() -> str:
        raise CheckFailed(detail)

    return check


class _CacheProbe:
    """One endpoint's cache entry under test, remembering when the edge last stored it, so a
    MISS after a purge is only credited to the purge while the entry could not have expired."""

    def __init__(self, run: _Run, endpoint: Endpoint) -> None:
        self.run = run
        self.endpoint = endpoint
        self.path = run.tagged(endpoint.path, "cache")
        self.ttl = run.spec.ttl_classes[endpoint.ttl_class]
        self.stored_at: float | None = None

    def get(self) -> httpx.Response:
        response = self.run.request("GET", self.path)
        if response.status_code != 200:
            raise CheckFailed(
                f"GET {response.url}: status {response.status_code}, expected 200 "
                f"(body: {_snippet(response.text)})"
            )
        if _x_cache(response) == "MISS":
            self.stored_at = time.monotonic()
        return response

    def expect(self, response: httpx.Response, wanted: str, after: str) -> None:
        got = _x_cache(response)
        if got != wanted:
            raise CheckFailed(f"GET {response.url} {after}: X-Cache {got!r}, expected {wanted}")

    def within_ttl(self, what: str) -> None:
        """Fail (inconclusive) if the entry may have expired on its own before `what`."""
        if self.stored_at is None:
            raise CheckFailed(f"{what}: the entry was never stored by the edge")
        age = time.monotonic() - self.stored_at
        if age >= self.ttl * 0.8:
            raise CheckFailed(
                f"inconclusive: {what} ran {age:.1f}s after the entry was stored, too close to "
                f"its {self.ttl}s TTL to credit a MISS to the purge"
            )


def _age(response: httpx.Response) -> int:
    """The `Age` header in seconds (0 when missing or not a number)."""
    age = response.headers.get("Age", "0")
    return int(age) if age.isdigit() else 0


def _x_cache(response: httpx.Response) -> str:
    return response.headers.get("X-Cache", "(missing)").upper()


def _cache_checks(run: _Run, endpoint: Endpoint) -> None:
    probe = _CacheProbe(run, endpoint)
    label = f"{endpoint.path} ({endpoint.ttl_class})"
    section: Section = "edge_cache"

    def first_miss() -> str:
        response = probe.get()
        probe.expect(response, "MISS", "(first request of this run)")
        return f"MISS from {response.headers.get('X-Track', '?')} track"

    if not run.record(section, f"{label}: first request MISS", first_miss):
        return  # nothing cached: the later checks would only repeat this failure

    def second_hit() -> str:
        # Age counts whole seconds: wait past one so a HIT has 0 < Age.
        time.sleep(max(0.0, (probe.stored_at or 0.0) + 1.1 - time.monotonic()))
        response = probe.get()
        probe.expect(response, "HIT", "(second request)")
        age = response.headers.get("Age")
        if age is None or not age.isdigit():
            raise CheckFailed(f"GET {response.url}: HIT without a numeric Age header ({age!r})")
        cache_control = response.headers.get("Cache-Control")
        ttl = effective_ttl(cache_control)
        if ttl is None:
            raise CheckFailed(
                f"GET {response.url}: HIT but Cache-Control {cache_control!r} grants no TTL"
            )
        if not 0 < int(age) <= ttl:
            raise CheckFailed(f"GET {response.url}: HIT with Age {age}, expected 0 < Age <= {ttl}")
        return f"HIT, 0 < Age {age} <= TTL {ttl}s"

    if not run.record(section, f"{label}: second request HIT with 0 < Age <= TTL", second_hit):
        return

    def authenticated_not_hit() -> str:
        headers = {"Authorization": SMOKE_AUTHORIZATION}
        seen = []
        for _ in range(2):
            response = run.request("GET", probe.path, headers=headers)
            got = _x_cache(response)
            if got == "HIT":
                raise CheckFailed(
                    f"GET {response.url} with Authorization: X-Cache HIT (rule: a response to "
                    "an authenticated request is never cached or served from the cache)"
                )
            seen.append(got)
        return f"with Authorization: {', '.join(seen)} (never from the cache)"

    run.record(section, f"{label}: authenticated request never a HIT", authenticated_not_hit)

    def surrogate_keys_served() -> str:
        response = probe.get()
        served = set(response.headers.get("Surrogate-Key", "").split())
        missing = [key for key in endpoint.surrogate_keys if key not in served]
        if missing:
            raise CheckFailed(
                f"GET {response.url}: Surrogate-Key {sorted(served)} lacks {missing} "
                "(from the product spec)"
            )
        return f"Surrogate-Key {' '.join(sorted(served)) or '(none required)'}"

    run.record(section, f"{label}: Surrogate-Key header", surrogate_keys_served)

    if run.purge and endpoint.surrogate_keys:
        key = endpoint.surrogate_keys[0]

        def purge_by_key() -> str:
            probe.within_ttl("purge by surrogate key")
            purged = run.platform.purge(run.env, surrogate_key=key)
            response = probe.get()
            probe.expect(response, "MISS", f"after purging surrogate key {key!r}")
            if purged < 1:
                raise CheckFailed(f"purge of surrogate key {key!r} reported {purged} entries")
            return f"purge of {key!r} removed {purged} entries; next request MISS"

        run.record(section, f"{label}: purge by surrogate key -> MISS", purge_by_key)

    def purge_refused_without_key() -> str:
        response = probe.get()
        probe.expect(response, "HIT", "(before the unauthorised purge)")
        refusal = _unauthorised_purge(run, probe.path)
        after = probe.get()
        probe.expect(after, "HIT", "after a refused purge (entry must survive)")
        return f"purge without key: {refusal}; entry still cached"

    run.record(section, f"{label}: purge without key refused", purge_refused_without_key)

    if run.purge:

        def purge_by_url() -> str:
            probe.within_ttl("purge by URL")
            purged = run.platform.purge(run.env, url=probe.path)
            response = probe.get()
            probe.expect(response, "MISS", f"after purging URL {probe.path}")
            if purged < 1:
                raise CheckFailed(f"purge of URL {probe.path} reported {purged} entries")
            return f"purge of URL removed {purged} entries; next request MISS"

        run.record(section, f"{label}: purge by URL -> MISS", purge_by_url)


def _unauthorised_purge(run: _Run, path: str) -> str:
    """Ask the edge to purge `path` the way a stranger on loopback would: without the purge
    key, then with a wrong one. Both must be refused."""
    attempts = {"no key": {}, "a wrong key": {PURGE_KEY_HEADER: f"not-the-key-{run.run_id}"}}
    for label, headers in attempts.items():
        response = run.request("POST", EDGE_PURGE_PATH, json={"url": path}, headers=headers)
        if response.status_code != 403:
            raise CheckFailed(
                f"POST {response.url} with {label}: status {response.status_code}, "
                "expected 403 (purge must be restricted to holders of the purge key)"
            )
    return "403 with no key and with a wrong key"


# --- worker and dead-letter queue -----------------------------------------------------------

# Job keys of the timing, crash and priority checks (never NORMAL_JOB_PREFIX: a release that
# fails normal jobs fails only the normal job's rows).
RETRY_JOB_PREFIX = "smoke-retry-"
SLOW_JOB_PREFIX = "smoke-slow-"
FLOOD_JOB_PREFIX = "smoke-flood-"
PRIORITY_JOB_PREFIX = "smoke-prio-"
# A retry may not start earlier than its backoff: only timestamp rounding is forgiven.
BACKOFF_EARLY_SLACK_MS = 5.0
# The slow probe counts as in progress once a transaction of the environment database that
# began after its enqueue has been open this long (a worker holding it); it is looked for
# during this share of the probe's duration.
IN_PROGRESS_MIN_MS = 150.0
IN_PROGRESS_LOOK_SHARE = 0.6
FAST_POLL_SECONDS = 0.02
# The only environment whose worker the crash drill may kill.
CRASH_DRILL_ENV = "staging"
FLOOD_ENQUEUE_THREADS = 8
# The flood must drain within count * (duration + this) + the run's job slack.
FLOOD_PER_JOB_OVERHEAD_MS = 50.0
FLOOD_DRAINED_ROW = "every job of the priority drill's flood done (none starved or lost)"


@dataclass(frozen=True)
class _Flood:
    """The priority drill's flood: what its drain waits for, and until when."""

    keys: tuple[str, ...]
    queue: str
    started: float  # monotonic, the flood's enqueue
    deadline: float  # monotonic, the priority measurement's end + the flood's budget


@dataclass
class _Job:
    key: str
    queue: Queue
    poison: bool
    payload: dict[str, Any] | None = None  # None: the contract's ok or poison probe
    enqueued_at: float = 0.0
    deadline: float = 0.0
    settled_after: float | None = None  # seconds from enqueue to done/dead
    state: dict[str, Any] | None = None
    enqueue_error: str | None = None


def _worker_jobs(run: _Run) -> _Job:
    """The contract's `ok` probe on the first (highest-priority) queue, a `poison` probe on
    every queue, the `retry` probe: done, dead-lettered, retried, and every gap between their
    attempts within the queue's backoff. Returns the `ok` job (the drills enqueue it again)."""
    queues = run.spec.queues.ordered
    normal = _Job(f"{NORMAL_JOB_PREFIX}{run.run_id}", queues[0], poison=False)
    poison = [
        _Job(f"{POISON_JOB_PREFIX}{queue.name}-{run.run_id}", queue, poison=True)
        for queue in queues
    ]
    probes = run.spec.contract.worker.probes
    retry = (
        _Job(
            f"{RETRY_JOB_PREFIX}{run.run_id}", queues[0], poison=False, payload=probes.retry.payload
        )
        if probes.retry is not None
        else None
    )
    jobs = [normal, *poison, *([retry] if retry else [])]
    for job in jobs:
        job.enqueue_error = _enqueue(run, job)
        job.enqueued_at = time.monotonic()
        job.deadline = job.enqueued_at + job_deadline_seconds(job.queue, run.job_slack)
    _wait_for_final_states(run, jobs)

    run.record("worker_dlq", "normal job done after one attempt", lambda: _check_done(run, normal))
    for job in poison:
        run.record(
            "worker_dlq",
            f"poison job ({job.queue.name} queue) dead-lettered after "
            f"{job.queue.max_attempts} attempts",
            lambda job=job: _check_dead_lettered(run, job),
        )
    for job in poison:
        run.record(
            "worker_dlq",
            f"backoff between attempts of the poison job ({job.queue.name} queue)",
            lambda job=job: _check_backoff(run, job, job.queue.max_attempts),
        )
    fails = probes.retry.fails if probes.retry is not None else 0
    run.record(
        "worker_dlq",
        f"retry job ({queues[0].name} queue) done after {fails} failures, written back once",
        lambda: _check_retried(run, retry),
    )
    run.record(
        "worker_dlq",
        f"backoff between attempts of the retry job ({queues[0].name} queue)",
        lambda: _check_backoff(run, retry, fails + 1),
    )
    return normal


def _worker_drills(run: _Run, normal: _Job, floods: list[_Flood]) -> None:
    """Idempotency (the `ok` job's key enqueued again), a SIGKILL of the worker during a job,
    and priority under a flood of the last queue (the flood, once enqueued, goes to `floods`:
    the caller waits for it to drain)."""
    queues = run.spec.queues.ordered
    run.record(
        "worker_dlq",
        "re-enqueue of a done key is not processed twice",
        lambda: _check_idempotent(run, normal),
    )
    run.record(
        "worker_dlq",
        f"worker SIGKILLed during a job ({queues[0].name} queue): done once after restart",
        lambda: _check_crash(run, queues[0]),
    )
    if len(queues) > 1:
        run.record(
            "worker_dlq",
            f"{queues[0].name} job not delayed by a flood of {queues[-1].name} jobs",
            lambda: _check_priority(run, queues[0], queues[-1], floods),
        )


def _enqueue(run: _Run, job: _Job) -> str | None:
    """POST the job as the contract says; returns an error text, or None when accepted."""
    worker = run.spec.contract.worker
    enqueue = worker.enqueue
    payload = job.payload
    if payload is None:
        payload = worker.probes.poison if job.poison else worker.probes.ok
    try:
        response = run.request(
            "POST",
            enqueue.path,
            json={
                enqueue.key_field: job.key,
                enqueue.queue_field: job.queue.name,
                enqueue.payload_field: payload,
            },
        )
    except CheckFailed as exc:
        return str(exc)
    if response.status_code not in enqueue.accepted:
        return (
            f"POST {response.url} (key {job.key}): status {response.status_code} "
            f"(body: {_snippet(response.text)})"
        )
    return None


def _job_state(run: _Run, key: str) -> dict[str, Any]:
    response = run.request("GET", run.spec.contract.worker.status_url_path(key))
    if response.status_code != 200:
        raise CheckFailed(
            f"GET {response.url}: status {response.status_code} (body: {_snippet(response.text)})"
        )
    try:
        return _JSON_OBJECT.validate_python(response.json())
    except (ValueError, ValidationError) as exc:
        raise CheckFailed(f"GET {response.url}: not a JSON object: {exc}") from None


def _state(run: _Run, state: dict[str, Any]) -> tuple[Any, Any]:
    """(status, attempts) of a job's state, by the contract's field names."""
    recognise = run.spec.contract.worker.recognise
    return state.get(recognise.status_field), state.get(recognise.attempts_field)


def _wait_for_final_states(run: _Run, jobs: Iterable[_Job]) -> None:
    """Poll every job until it is done or dead, or its deadline passes (bounded loop)."""
    recognise = run.spec.contract.worker.recognise
    final = (recognise.done, recognise.dead)
    pending = [job for job in jobs if job.enqueue_error is None]
    while pending:
        for job in list(pending):
            try:
                job.state = _job_state(run, job.key)
            except CheckFailed as exc:
                job.state = {"(unreadable)": str(exc)}
                pending.remove(job)  # the edge is failing: stop polling, the row says why
                continue
            now = time.monotonic()
            if _state(run, job.state)[0] in final:
                job.settled_after = now - job.enqueued_at
                pending.remove(job)
            elif now > job.deadline:
                pending.remove(job)
        if pending:
            time.sleep(JOB_POLL_INTERVAL_SECONDS)


def _settled_state(job: _Job) -> dict[str, Any]:
    if job.enqueue_error:
        raise CheckFailed(job.enqueue_error)
    state = job.state or {}
    if "(unreadable)" in state:
        raise CheckFailed(str(state["(unreadable)"]))
    return state


def _check_done(run: _Run, job: _Job) -> str:
    worker = run.spec.contract.worker
    state = _settled_state(job)
    status, attempts = _state(run, state)
    if status != worker.recognise.done:
        raise CheckFailed(
            f"job {job.key}: status {status!r} after {attempts} attempts "
            f"(state: {_snippet(json.dumps(state, sort_keys=True, default=str), 200)}), "
            f"expected {worker.recognise.done!r} within "
            f"{job_deadline_seconds(job.queue, run.job_slack):.1f}s"
        )
    if attempts != 1:
        raise CheckFailed(f"job {job.key}: done after {attempts} attempts, expected exactly 1")
    result = state.get(worker.recognise.result_field)
    if result is None:
        raise CheckFailed(
            f"GET {worker.status_url_path(job.key)}: done but no "
            f"{worker.recognise.result_field!r} reported"
        )
    table = worker.results.table
    results = _count_rows(run, table, worker.results.key_column, job.key)
    if results != 1:
        raise CheckFailed(f"job {job.key}: {results} rows in {run.env}.{table}, expected exactly 1")
    return (
        f"done in {job.settled_after or 0:.2f}s, 1 attempt, 1 result written back "
        f"({_snippet(json.dumps(result, sort_keys=True), 60)})"
    )


def _check_dead_lettered(run: _Run, job: _Job) -> str:
    worker = run.spec.contract.worker
    dead_letter = run.spec.queues.dead_letter
    state = _settled_state(job)
    status, attempts = _state(run, state)
    wanted = job.queue.max_attempts
    if status != worker.recognise.dead:
        raise CheckFailed(
            f"poison job {job.key}: status {status!r} after {attempts} attempts, expected "
            f"{worker.recognise.dead!r} within "
            f"{job_deadline_seconds(job.queue, run.job_slack):.1f}s"
        )
    if attempts != wanted:
        raise CheckFailed(
            f"poison job {job.key}: dead after {attempts} attempts, expected exactly {wanted} "
            f"(max_attempts of queue {job.queue.name!r})"
        )
    dlq_rows = _count_rows(run, dead_letter, worker.dead_letter_key_column, job.key)
    if dlq_rows != 1:
        raise CheckFailed(
            f"poison job {job.key}: {dlq_rows} rows in {run.env}.{dead_letter} "
            "(queues.dead_letter), expected 1"
        )
    results = _count_rows(run, worker.results.table, worker.results.key_column, job.key)
    if results:
        raise CheckFailed(f"poison job {job.key}: {results} results written back, expected 0")
    return (
        f"dead after {attempts} attempts in {job.settled_after or 0:.2f}s "
        f"(backoff schedule {sum(backoff_delays(job.queue)):.2f}s), "
        f"in {dead_letter}, no result"
    )


def _check_idempotent(run: _Run, job: _Job) -> str:
    worker = run.spec.contract.worker
    before = _settled_state(job)
    status, attempts = _state(run, before)
    if status != worker.recognise.done:
        raise CheckFailed(
            f"job {job.key} never reached {worker.recognise.done!r} (status {status!r}); "
            "idempotency cannot be judged"
        )
    error = _enqueue(run, job)
    if error:
        raise CheckFailed(f"re-enqueue refused: {error}")
    watch_until = time.monotonic() + IDEMPOTENCY_WATCH_SECONDS
    polls = 0
    while True:
        now_status, now_attempts = _state(run, _job_state(run, job.key))
        polls += 1
        if now_status != worker.recognise.done or now_attempts != attempts:
            raise CheckFailed(
                f"job {job.key} re-enqueued: status {now_status!r}, attempts "
                f"{now_attempts} (was done after {attempts}): processed twice"
            )
        if time.monotonic() >= watch_until:
            break
        time.sleep(JOB_POLL_INTERVAL_SECONDS * 2)
    table = worker.results.table
    results = _count_rows(run, table, worker.results.key_column, job.key)
    if results != 1:
        raise CheckFailed(f"job {job.key}: {results} rows in {run.env}.{table} after re-enqueue")
    return f"still done after 1 attempt, 1 result ({polls} polls over {IDEMPOTENCY_WATCH_SECONDS}s)"


def _count_rows(run: _Run, table: str, key_column: str, key: str) -> int:
    """Rows for a job key in the product's environment database (the worker's tables)."""
    query = sql.SQL("SELECT count(*) FROM {} WHERE {} = %s").format(
        sql.Identifier(table), sql.Identifier(key_column)
    )
    db = database.environment_database(run.spec.product, run.env)
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(query, (key,))
        row = cur.fetchone()
    return int(row[0]) if row else 0


def _count_rows_any(run: _Run, table: str, key_column: str, keys: list[str]) -> int:
    """Rows for any of `keys` in the product's environment database."""
    query = sql.SQL("SELECT count(*) FROM {} WHERE {} = ANY(%s)").format(
        sql.Identifier(table), sql.Identifier(key_column)
    )
    db = database.environment_database(run.spec.product, run.env)
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(query, (keys,))
        row = cur.fetchone()
    return int(row[0]) if row else 0


# --- backoff timing, retries, crash and priority ---------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One settled attempt of a job's attempt log (timestamps of one clock)."""

    started: datetime
    finished: datetime
    outcome: str


@dataclass(frozen=True)
class BackoffGap:
    """The wait before attempt `attempt` (2-based: the first retry is attempt 2)."""

    attempt: int
    expected_ms: float
    observed_ms: float
    low_ms: float
    high_ms: float

    @property
    def ok(self) -> bool:
        return self.low_ms <= self.observed_ms <= self.high_ms


def expected_backoff_ms(queue: Queue, failed_attempt: int) -> float:
    """The backoff after failed attempt number `failed_attempt` (1-based), capped."""
    return float(
        min(
            queue.backoff_initial_ms * queue.backoff_multiplier ** (failed_attempt - 1),
            queue.backoff_max_ms,
        )
    )


def backoff_gaps(queue: Queue, attempts: list[Attempt]) -> list[BackoffGap]:
    """The gap between each attempt's finish and the next one's start, with its bounds:
    never earlier than the backoff (BACKOFF_EARLY_SLACK_MS of rounding), at most the queue's
    `backoff_tolerance_ms` later."""
    gaps = []
    for i in range(1, len(attempts)):
        expected = expected_backoff_ms(queue, i)
        observed = (attempts[i].started - attempts[i - 1].finished).total_seconds() * 1000
        gaps.append(
            BackoffGap(
                attempt=i + 1,
                expected_ms=expected,
                observed_ms=observed,
                low_ms=expected - BACKOFF_EARLY_SLACK_MS,
                high_ms=expected + queue.backoff_tolerance_ms,
            )
        )
    return gaps


def judge_backoff(queue: Queue, attempts: list[Attempt], expected_attempts: int, what: str) -> str:
    """The passing detail of a job's backoff timing; raises CheckFailed naming the gap, its
    bound and the spec fields when a gap is out of bounds or there are too few attempts."""
    bounds = (
        f"queue {queue.name!r}: initial {queue.backoff_initial_ms} ms x"
        f"{queue.backoff_multiplier:g} capped at {queue.backoff_max_ms} ms, "
        f"+0..{queue.backoff_tolerance_ms} ms (queues.{queue.name}.backoff_tolerance_ms)"
    )
    if len(attempts) < max(expected_attempts, 2):
        raise CheckFailed(
            f"{what}: {len(attempts)} attempts in its attempt log, expected "
            f"{max(expected_attempts, 2)}: too few to judge the backoff ({bounds})"
        )
    gaps = backoff_gaps(queue, attempts)
    shown = ", ".join(f"{g.observed_ms:.0f} ms (expected {g.expected_ms:.0f})" for g in gaps)
    bad = [g for g in gaps if not g.ok]
    if bad:
        problems = "; ".join(
            f"attempt {g.attempt} started {g.observed_ms:.0f} ms after attempt {g.attempt - 1} "
            f"finished, "
            + (
                f"earlier than its backoff {g.expected_ms:.0f} ms"
                if g.observed_ms < g.low_ms
                else f"later than {g.high_ms:.0f} ms (backoff {g.expected_ms:.0f} ms + tolerance)"
            )
            for g in bad
        )
        raise CheckFailed(f"{what}: {problems} (gaps: {shown}; {bounds})")
    return f"{what}: {len(gaps)} gaps within bounds: {shown} ({bounds})"


def _parse_time(value: Any, field: str, what: str) -> datetime:
    if not isinstance(value, str):
        raise CheckFailed(f"{what}: attempt log field {field!r} is {value!r}, not a timestamp")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CheckFailed(f"{what}: attempt log field {field!r}: not ISO 8601: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def attempt_log(run: _Run, state: dict[str, Any], what: str) -> list[Attempt]:
    """The job state's attempt log by the contract's `recognise.attempt_log` field names."""
    spec = run.spec.contract.worker.recognise.attempt_log
    if spec is None:
        raise CheckFailed(
            "contract.yaml: field 'worker.recognise.attempt_log' is not set: the attempt "
            "timing cannot be read"
        )
    entries = state.get(spec.field)
    if not isinstance(entries, list):
        raise CheckFailed(
            f"{what}: the job state has no list {spec.field!r} "
            "(contract worker.recognise.attempt_log.field)"
        )
    attempts = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise CheckFailed(f"{what}: an entry of {spec.field!r} is not an object: {entry!r}")
        attempts.append(
            Attempt(
                started=_parse_time(entry.get(spec.started_field), spec.started_field, what),
                finished=_parse_time(entry.get(spec.finished_field), spec.finished_field, what),
                outcome=str(entry.get(spec.outcome_field)),
            )
        )
    return attempts


def _check_backoff(run: _Run, job: _Job | None, expected_attempts: int) -> str:
    if job is None:
        raise CheckFailed("contract.yaml: field 'worker.probes.retry' is not set")
    what = f"job {job.key}"
    return judge_backoff(
        job.queue, attempt_log(run, _settled_state(job), what), expected_attempts, what
    )


def _check_retried(run: _Run, job: _Job | None) -> str:
    worker = run.spec.contract.worker
    retry = worker.probes.retry
    if job is None or retry is None:
        raise CheckFailed(
            "contract.yaml: field 'worker.probes.retry' is not set: the retry-then-succeed "
            "check cannot run"
        )
    state = _settled_state(job)
    status, attempts = _state(run, state)
    wanted = retry.fails + 1
    if status != worker.recognise.done or attempts != wanted:
        raise CheckFailed(
            f"retry job {job.key}: status {status!r} after {attempts} attempts, expected "
            f"{worker.recognise.done!r} after exactly {wanted} (worker.probes.retry.fails "
            f"{retry.fails} + 1; max_attempts {job.queue.max_attempts})"
        )
    log = attempt_log(run, state, f"retry job {job.key}")
    done = [a for a in log if a.outcome == worker.recognise.attempt_log.done]  # type: ignore[union-attr]
    if len(log) != wanted or len(done) != 1 or log[-1] not in done:
        raise CheckFailed(
            f"retry job {job.key}: attempt log {[a.outcome for a in log]}, expected "
            f"{retry.fails} failures then one success"
        )
    table = worker.results.table
    results = _count_rows(run, table, worker.results.key_column, job.key)
    if results != 1:
        raise CheckFailed(
            f"retry job {job.key}: {results} rows in {run.env}.{table}, expected exactly 1"
        )
    return (
        f"done after {attempts} attempts ({retry.fails} failed) in {job.settled_after or 0:.2f}s, "
        f"1 result in {table}"
    )


def _open_transaction(run: _Run, since_epoch: float, min_ms: float) -> tuple[str, float] | None:
    """(application name, age in ms) of the oldest transaction of the environment database
    that began after `since_epoch` and has been open at least `min_ms`: a worker inside a
    job holds one."""
    db = database.environment_database(run.spec.product, run.env)
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT application_name, extract(epoch FROM clock_timestamp() - xact_start) * 1000 "
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%%' "
            "AND xact_start >= to_timestamp(%s) "
            "AND clock_timestamp() - xact_start >= make_interval(secs => %s) "
            "ORDER BY xact_start LIMIT 1",
            (since_epoch, min_ms / 1000),
        )
        row = cur.fetchone()
    return (str(row[0]), float(row[1])) if row else None


def _poll_until_final(run: _Run, job: _Job, interval: float) -> None:
    recognise = run.spec.contract.worker.recognise
    while True:
        job.state = _job_state(run, job.key)
        now = time.monotonic()
        if _state(run, job.state)[0] in (recognise.done, recognise.dead):
            job.settled_after = now - job.enqueued_at
            return
        if now > job.deadline:
            return
        time.sleep(interval)


def _check_crash(run: _Run, queue: Queue) -> str:
    worker = run.spec.contract.worker
    slow = worker.probes.slow
    if slow is None:
        raise CheckFailed(
            "contract.yaml: field 'worker.probes.slow' is not set: the crash-during-a-job "
            "check cannot run"
        )
    if run.env != CRASH_DRILL_ENV:
        raise CheckFailed(
            f"the crash drill SIGKILLs a worker: it runs in {CRASH_DRILL_ENV} only, not {run.env}"
        )
    job = _Job(f"{SLOW_JOB_PREFIX}{run.run_id}", queue, poison=False, payload=slow.payload)
    since = time.time()
    error = _enqueue(run, job)
    if error:
        raise CheckFailed(error)
    job.enqueued_at = time.monotonic()
    look_until = job.enqueued_at + slow.duration_ms / 1000 * IN_PROGRESS_LOOK_SHARE
    held = None
    while held is None and time.monotonic() < look_until:
        held = _open_transaction(run, since - 0.05, IN_PROGRESS_MIN_MS)
        if held is None:
            time.sleep(FAST_POLL_SECONDS)
    if held is None:
        raise CheckFailed(
            f"slow job {job.key}: no transaction held it for {IN_PROGRESS_MIN_MS:.0f} ms within "
            f"{slow.duration_ms * IN_PROGRESS_LOOK_SHARE:.0f} ms of its enqueue "
            f"(worker.probes.slow.duration_ms {slow.duration_ms}): the worker never took it"
        )
    status, _ = _state(run, _job_state(run, job.key))
    if status in (worker.recognise.done, worker.recognise.dead):
        raise CheckFailed(
            f"slow job {job.key}: already {status!r} before the kill: "
            f"worker.probes.slow.duration_ms {slow.duration_ms} is too short to kill it mid-job"
        )
    into_job = time.monotonic() - job.enqueued_at
    pid = run.platform.kill_worker(run.env)
    killed_at = time.monotonic()
    job.deadline = killed_at + slow.duration_ms / 1000 + run.job_slack
    _poll_until_final(run, job, JOB_POLL_INTERVAL_SECONDS)
    after_kill = time.monotonic() - killed_at
    state = job.state or {}
    status, attempts = _state(run, state)
    if status != worker.recognise.done:
        raise CheckFailed(
            f"slow job {job.key}: status {status!r} after {attempts} attempts "
            f"{after_kill:.1f}s after its worker (pid {pid}) was SIGKILLed, expected "
            f"{worker.recognise.done!r} within {slow.duration_ms / 1000 + run.job_slack:.1f}s"
        )
    log = attempt_log(run, state, f"slow job {job.key}")
    done = [a for a in log if a.outcome == worker.recognise.attempt_log.done]  # type: ignore[union-attr]
    table = worker.results.table
    results = _count_rows(run, table, worker.results.key_column, job.key)
    if len(done) != 1 or results != 1:
        raise CheckFailed(
            f"slow job {job.key}: {len(done)} done attempts in its attempt log "
            f"{[a.outcome for a in log]} and {results} rows in {run.env}.{table} after a "
            f"SIGKILL of worker pid {pid}, expected exactly 1 of each"
        )
    return (
        f"worker pid {pid} SIGKILLed {into_job:.2f}s after the enqueue, inside the job "
        f"({held[0] or 'a session'} held a transaction for {held[1]:.0f} ms); the restarted "
        f"worker finished it {after_kill:.2f}s after the kill (job {slow.duration_ms} ms): "
        f"{attempts} attempt(s) counted, 1 done in the attempt log, 1 result in {table}"
    )


def _check_priority(run: _Run, first: Queue, last: Queue, floods: list[_Flood]) -> str:
    from concurrent.futures import ThreadPoolExecutor

    worker = run.spec.contract.worker
    flood = worker.probes.flood
    if flood is None:
        raise CheckFailed(
            "contract.yaml: field 'worker.probes.flood' is not set: the priority check cannot run"
        )
    bound = first.priority_max_wait_ms
    if bound is None:
        raise CheckFailed(
            f"product.yaml: field 'queues.{first.name}.priority_max_wait_ms' is not set: "
            "no bound to measure the priority against"
        )
    flood_jobs = [
        _Job(f"{FLOOD_JOB_PREFIX}{run.run_id}-{i}", last, poison=False, payload=flood.payload)
        for i in range(flood.count)
    ]
    with ThreadPoolExecutor(FLOOD_ENQUEUE_THREADS) as pool:
        errors = [e for e in pool.map(lambda j: _enqueue(run, j), flood_jobs) if e]
    if errors:
        raise CheckFailed(f"{len(errors)} of {flood.count} flood jobs refused: {errors[0]}")
    table, key_column = worker.results.table, worker.results.key_column
    keys = [job.key for job in flood_jobs]
    enqueued = time.monotonic()
    try:
        ahead = flood.count - _count_rows_any(run, table, key_column, keys)
        if ahead * flood.duration_ms <= bound:
            raise CheckFailed(
                f"inconclusive: only {ahead} of {flood.count} {last.name} jobs of "
                f"{flood.duration_ms} ms were still queued once the flood was enqueued, "
                f"{ahead * flood.duration_ms} ms of work, not above the {bound} ms bound "
                f"(queues.{first.name}.priority_max_wait_ms): a worker ignoring priority would "
                "pass too (raise worker.probes.flood.count or duration_ms)"
            )
        high = _Job(f"{PRIORITY_JOB_PREFIX}{run.run_id}", first, poison=False)
        started = time.monotonic()
        error = _enqueue(run, high)
        if error:
            raise CheckFailed(error)
        high.enqueued_at = started
        high.deadline = started + max(3 * bound / 1000, run.job_slack)
        _poll_until_final(run, high, FAST_POLL_SECONDS)
        waited_ms = (time.monotonic() - started) * 1000
        pending = flood.count - _count_rows_any(run, table, key_column, keys)
        status, attempts = _state(run, high.state or {})
        if status != worker.recognise.done:
            raise CheckFailed(
                f"{first.name} job {high.key}: status {status!r} after {attempts} attempts "
                f"{waited_ms:.0f} ms after its enqueue behind {flood.count} {last.name} jobs, "
                f"expected {worker.recognise.done!r} within {bound} ms "
                f"(queues.{first.name}.priority_max_wait_ms)"
            )
        if waited_ms > bound:
            raise CheckFailed(
                f"{first.name} job {high.key} done {waited_ms:.0f} ms after its enqueue with "
                f"{pending} of {flood.count} {last.name} jobs still queued, above "
                f"queues.{first.name}.priority_max_wait_ms {bound} ms"
            )
        if pending <= 0:
            raise CheckFailed(
                f"inconclusive: all {flood.count} {last.name} jobs were done before the "
                f"{first.name} job ({waited_ms:.0f} ms): no contention was measured "
                "(raise worker.probes.flood.count or duration_ms)"
            )
        return (
            f"{first.name} job done {waited_ms:.0f} ms after its enqueue (bound {bound} ms, "
            f"queues.{first.name}.priority_max_wait_ms) with {ahead} of {flood.count} "
            f"{last.name} jobs of {flood.duration_ms} ms still queued ahead of it "
            f"(>= {ahead * flood.duration_ms} ms of work; {pending} still queued when it was done)"
        )
    finally:
        # Drained whatever the verdict; the deadline counts from the end of the measurement,
        # as when this row waited for the drain itself.
        budget = flood.count * (flood.duration_ms + FLOOD_PER_JOB_OVERHEAD_MS) / 1000
        floods.append(
            _Flood(tuple(keys), last.name, enqueued, time.monotonic() + budget + run.job_slack)
        )


def _drain(run: _Run, flood: _Flood) -> str:
    """The flood drains before the smoke ends, so later stages find an idle worker; a job
    still queued at the deadline was starved or lost."""
    worker = run.spec.contract.worker
    table, key_column = worker.results.table, worker.results.key_column
    keys = list(flood.keys)
    left = len(keys) - _count_rows_any(run, table, key_column, keys)
    while left > 0 and time.monotonic() < flood.deadline:
        time.sleep(JOB_POLL_INTERVAL_SECONDS)
        left = len(keys) - _count_rows_any(run, table, key_column, keys)
    if left > 0:
        raise CheckFailed(
            f"{left} of {len(keys)} {flood.queue} jobs of the priority drill's flood were still "
            f"not done {flood.deadline - flood.started:.1f}s after their enqueue (starved or lost)"
        )
    return (
        f"all {len(keys)} {flood.queue} jobs done "
        f"{time.monotonic() - flood.started:.2f}s after their enqueue"
    )
