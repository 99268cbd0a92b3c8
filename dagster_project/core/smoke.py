"""The smoke suite: run through an environment's edge after a deploy (staging) or a promotion
(production).

Three sections, each a list of rows `{section, name, passed, detail, seconds}`:

- `smoke`: `/healthz`, `/readyz` and every spec endpoint marked `smoke: true` answer 200 with
  the expected content type and shape, served by the release under test (`X-Release`).
- `edge_cache`: for one dynamic and one static endpoint, MISS then HIT with `Age`, the TTL the
  edge serves equals the spec's TTL class, purge by surrogate key and by URL each force a MISS,
  and a purge without the purge key is refused (403).
- `worker_dlq`: a normal job is done after one attempt with one result written back, a poison
  job lands in the dead-letter queue after exactly the queue's `max_attempts`, and enqueueing a
  known key again does not process it twice.

Fail closed: a section that was asked for and has no rows, or whose checks raised (connection
refused, timeout: the detail names the URL), is FAILED. Every request carries a per-run query
string (`?smoke=<run id>`) so runs never see each other's cache entries.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
from psycopg2 import sql
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from dagster_project.core import database
from dagster_project.core.contracts import SmokeReport, SmokeRow, SmokeSection
from dagster_project.core.spec import Endpoint, ProductSpec, Queue

Section = SmokeSection
SECTIONS: tuple[Section, ...] = ("smoke", "edge_cache", "worker_dlq")

# Job keys the suite enqueues; tests make a release fail normal jobs by matching this prefix.
NORMAL_JOB_PREFIX = "smoke-ok-"
POISON_JOB_PREFIX = "smoke-poison-"
NORMAL_JOB_VALUES = [1, 2, 3, 4]

REQUEST_TIMEOUT_SECONDS = 5.0
RETRY_DELAY_SECONDS = 0.2
# The edge's purge endpoint (core/platform/edge.py); it wants the key in this header.
EDGE_PURGE_PATH = "/_edge/purge"
PURGE_KEY_HEADER = "X-Purge-Key"
# Added to the backoff schedule when waiting for a job: worker poll interval, process start.
JOB_DEADLINE_SLACK_SECONDS = 10.0
JOB_POLL_INTERVAL_SECONDS = 0.1
# How long a re-enqueued key is watched for a second processing.
IDEMPOTENCY_WATCH_SECONDS = 1.5


class SmokePlatform(Protocol):
    """What the suite needs from a platform (`LocalPlatform` or a production adapter)."""

    def edge_url(self, env: str) -> str: ...

    def purge(self, env: str, url: str | None = None, surrogate_key: str | None = None) -> int: ...


class CheckFailed(Exception):
    """A check's verdict is 'failed'; the message is the row's detail."""


# --------------------------------------------------------------------------------------------
# Response shapes of the product's API (extra fields are allowed: the contract is a minimum)
# --------------------------------------------------------------------------------------------


class _Item(BaseModel):
    id: int
    name: str
    price_cents: int


class _ItemList(BaseModel):
    items: list[_Item]


class _Count(BaseModel):
    count: int = Field(ge=0)


class _Summary(BaseModel):
    items: _Count
    jobs: dict[str, int]
    dead_letter: _Count


_JSON_OBJECT = TypeAdapter(dict[str, Any])

# Which shape each kind of API path must have; first match wins.
_SHAPES: tuple[tuple[re.Pattern[str], str, type[BaseModel] | None], ...] = (
    (re.compile(r"^/v1/items$"), "items list", _ItemList),
    (re.compile(r"^/v1/items/[^/]+$"), "item object", _Item),
    (re.compile(r"^/v1/summary$"), "summary object", _Summary),
    (re.compile(r"^/v1/"), "JSON object", None),
)


def check_json_shape(path: str, body: Any) -> str:
    """Validate an API response body against the contract for its path; returns a short
    description, raises CheckFailed naming the path and the field."""
    for pattern, label, model in _SHAPES:
        if not pattern.match(path):
            continue
        try:
            if model is None:
                _JSON_OBJECT.validate_python(body)
                return label
            parsed = model.model_validate(body)
        except ValidationError as exc:
            fields = "; ".join(
                f"field '{'.'.join(str(p) for p in err['loc']) or '(top level)'}': {err['msg']}"
                for err in exc.errors()[:3]
            )
            raise CheckFailed(f"{path}: body is not a valid {label}: {fields}") from None
        if isinstance(parsed, _ItemList):
            if not parsed.items:
                raise CheckFailed(f"{path}: items list is empty (no catalogue rows served)")
            return f"{label} ({len(parsed.items)} items)"
        return label
    raise CheckFailed(f"{path}: no JSON contract known for this path")


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

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; an idempotent GET answered 5xx is retried once, and the retry listed."""
        response = self._send(method, path, **kwargs)
        if method == "GET" and response.status_code >= 500:
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
) -> SmokeReport:
    """Run the smoke suite through `env`'s edge against the release `expected_version`.

    `purge=False` leaves the purge checks out of the edge_cache section (the MISS/HIT/TTL and
    restricted-purge checks still run). Never raises for a failing environment: every problem
    is a failed row.
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
    with httpx.Client(
        base_url=edge, timeout=REQUEST_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False
    ) as client:
        run = _Run(spec, platform, env, expected_version, client, report, purge, job_slack_seconds)
        _smoke_section(run)
        if include_edge_cache:
            _edge_cache_section(run)
        if include_worker:
            _worker_section(run)
    return report.model_copy(update={"finished_at": _now()})


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
    response = run.request("GET", run.tagged(endpoint.path, "contract"))
    problems: list[str] = []
    if response.status_code != 200:
        problems.append(
            f"status {response.status_code}, expected 200 (body: {_snippet(response.text)})"
        )
    release = response.headers.get("X-Release")
    if release != run.expected_version:
        problems.append(
            f"X-Release {release!r}, expected {run.expected_version!r} (release under test)"
        )
    content_type = response.headers.get("Content-Type", "")
    shape = ""
    if response.status_code == 200:
        if endpoint.path.startswith("/v1/"):
            if not content_type.startswith("application/json"):
                problems.append(f"Content-Type {content_type!r}, expected application/json")
            else:
                try:
                    shape = check_json_shape(endpoint.path, response.json())
                except ValueError as exc:
                    problems.append(f"body is not JSON: {exc}")
                except CheckFailed as exc:
                    problems.append(str(exc))
        else:
            if not response.content:
                problems.append("empty body")
            if endpoint.path.endswith(".js") and "javascript" not in content_type:
                problems.append(f"Content-Type {content_type!r}, expected a JavaScript type")
            shape = f"{len(response.content)} bytes"
    if problems:
        raise CheckFailed(f"GET {response.url}: " + "; ".join(problems))
    return f"200 {content_type.split(';')[0]}, {shape}, X-Release {release}"


def _snippet(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# --- edge cache -------------------------------------------------------------------------------


def _edge_cache_section(run: _Run) -> None:
    for ttl_class in ("dynamic", "static"):
        endpoint = next((e for e in run.spec.endpoints if e.ttl_class == ttl_class), None)
        if endpoint is None:
            run.record(
                "edge_cache",
                f"{ttl_class} endpoint",
                _fail(f"the product spec has no {ttl_class} endpoint to test the edge with"),
            )
            continue
        _cache_checks(run, endpoint)


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
        response = probe.get()
        probe.expect(response, "HIT", "(second request)")
        age = response.headers.get("Age")
        if age is None or not age.isdigit():
            raise CheckFailed(f"GET {response.url}: HIT without a numeric Age header ({age!r})")
        ttl = effective_ttl(response.headers.get("Cache-Control"))
        if ttl != probe.ttl:
            raise CheckFailed(
                f"GET {response.url}: Cache-Control {response.headers.get('Cache-Control')!r} "
                f"gives TTL {ttl}, expected the {endpoint.ttl_class} TTL {probe.ttl}s"
            )
        return f"HIT, Age {age}, TTL {ttl}s = {endpoint.ttl_class} class"

    if not run.record(section, f"{label}: second request HIT with Age and TTL", second_hit):
        return

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


@dataclass
class _Job:
    key: str
    queue: Queue
    poison: bool
    enqueued_at: float = 0.0
    deadline: float = 0.0
    settled_after: float | None = None  # seconds from enqueue to done/dead
    state: dict[str, Any] | None = None
    enqueue_error: str | None = None


def _worker_section(run: _Run) -> None:
    queues = run.spec.queues
    normal = _Job(f"{NORMAL_JOB_PREFIX}{run.run_id}", queues.high, poison=False)
    poison = [
        _Job(f"{POISON_JOB_PREFIX}{queue.name}-{run.run_id}", queue, poison=True)
        for queue in (queues.high, queues.low)
    ]
    jobs = [normal, *poison]
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
    run.record(
        "worker_dlq",
        "re-enqueue of a done key is not processed twice",
        lambda: _check_idempotent(run, normal),
    )


def _enqueue(run: _Run, job: _Job) -> str | None:
    """POST the job; returns an error text, or None when the edge accepted it."""
    payload: dict[str, Any] = {"poison": True} if job.poison else {"values": NORMAL_JOB_VALUES}
    try:
        response = run.request(
            "POST",
            "/v1/jobs",
            json={"key": job.key, "priority": job.queue.name, "payload": payload},
        )
    except CheckFailed as exc:
        return str(exc)
    if response.status_code not in (200, 201, 202):
        return (
            f"POST {response.url} (key {job.key}): status {response.status_code} "
            f"(body: {_snippet(response.text)})"
        )
    return None


def _job_state(run: _Run, key: str) -> dict[str, Any]:
    response = run.request("GET", f"/v1/jobs/{key}")
    if response.status_code != 200:
        raise CheckFailed(
            f"GET {response.url}: status {response.status_code} (body: {_snippet(response.text)})"
        )
    try:
        return _JSON_OBJECT.validate_python(response.json())
    except (ValueError, ValidationError) as exc:
        raise CheckFailed(f"GET {response.url}: not a JSON object: {exc}") from None


_FINAL_STATUSES = ("done", "dead")


def _wait_for_final_states(run: _Run, jobs: Iterable[_Job]) -> None:
    """Poll every job until it is done or dead, or its deadline passes (bounded loop)."""
    pending = [job for job in jobs if job.enqueue_error is None]
    while pending:
        for job in list(pending):
            try:
                job.state = _job_state(run, job.key)
            except CheckFailed as exc:
                job.state = {"status": "(unreadable)", "error": str(exc)}
                pending.remove(job)  # the edge is failing: stop polling, the row says why
                continue
            now = time.monotonic()
            if job.state.get("status") in _FINAL_STATUSES:
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
    if "error" in state and state.get("status") == "(unreadable)":
        raise CheckFailed(str(state["error"]))
    return state


def _check_done(run: _Run, job: _Job) -> str:
    state = _settled_state(job)
    status, attempts = state.get("status"), state.get("attempts")
    if status != "done":
        raise CheckFailed(
            f"job {job.key}: status {status!r} after {attempts} attempts "
            f"(last error: {state.get('last_error')!r}), expected 'done' within "
            f"{job_deadline_seconds(job.queue, run.job_slack):.1f}s"
        )
    if attempts != 1:
        raise CheckFailed(f"job {job.key}: done after {attempts} attempts, expected exactly 1")
    if state.get("result") is None:
        raise CheckFailed(f"GET /v1/jobs/{job.key}: done but no result reported")
    results = _count_rows(run.env, "job_results", job.key)
    if results != 1:
        raise CheckFailed(
            f"job {job.key}: {results} rows in {run.env}.job_results, expected exactly 1"
        )
    return (
        f"done in {job.settled_after or 0:.2f}s, 1 attempt, 1 result written back "
        f"({_snippet(json.dumps(state.get('result'), sort_keys=True), 60)})"
    )


def _check_dead_lettered(run: _Run, job: _Job) -> str:
    state = _settled_state(job)
    status, attempts = state.get("status"), state.get("attempts")
    wanted = job.queue.max_attempts
    if status != "dead":
        raise CheckFailed(
            f"poison job {job.key}: status {status!r} after {attempts} attempts, expected "
            f"'dead' within {job_deadline_seconds(job.queue, run.job_slack):.1f}s"
        )
    if attempts != wanted:
        raise CheckFailed(
            f"poison job {job.key}: dead after {attempts} attempts, expected exactly {wanted} "
            f"(max_attempts of queue {job.queue.name!r})"
        )
    dlq_rows = _count_rows(run.env, "dead_letter", job.key)
    if dlq_rows != 1:
        raise CheckFailed(
            f"poison job {job.key}: {dlq_rows} rows in {run.env}.dead_letter "
            f"(queue {run.spec.queues.dead_letter!r}), expected 1"
        )
    results = _count_rows(run.env, "job_results", job.key)
    if results:
        raise CheckFailed(f"poison job {job.key}: {results} results written back, expected 0")
    return (
        f"dead after {attempts} attempts in {job.settled_after or 0:.2f}s "
        f"(backoff schedule {sum(backoff_delays(job.queue)):.2f}s), "
        f"in {run.spec.queues.dead_letter}, no result"
    )


def _check_idempotent(run: _Run, job: _Job) -> str:
    before = _settled_state(job)
    if before.get("status") != "done":
        raise CheckFailed(
            f"job {job.key} never reached 'done' (status {before.get('status')!r}); "
            "idempotency cannot be judged"
        )
    error = _enqueue(run, job)
    if error:
        raise CheckFailed(f"re-enqueue refused: {error}")
    watch_until = time.monotonic() + IDEMPOTENCY_WATCH_SECONDS
    polls = 0
    while True:
        state = _job_state(run, job.key)
        polls += 1
        if state.get("status") != "done" or state.get("attempts") != before.get("attempts"):
            raise CheckFailed(
                f"job {job.key} re-enqueued: status {state.get('status')!r}, attempts "
                f"{state.get('attempts')} (was done after {before.get('attempts')}): "
                "processed twice"
            )
        if time.monotonic() >= watch_until:
            break
        time.sleep(JOB_POLL_INTERVAL_SECONDS * 2)
    results = _count_rows(run.env, "job_results", job.key)
    if results != 1:
        raise CheckFailed(
            f"job {job.key}: {results} rows in {run.env}.job_results after re-enqueue"
        )
    return f"still done after 1 attempt, 1 result ({polls} polls over {IDEMPOTENCY_WATCH_SECONDS}s)"


def _count_rows(env: str, table: str, job_key: str) -> int:
    """Rows for a job key in the environment database (the worker's write-back tables)."""
    query = sql.SQL("SELECT count(*) FROM {} WHERE job_key = %s").format(sql.Identifier(table))
    with database.connection(env) as conn, conn.cursor() as cur:
        cur.execute(query, (job_key,))
        row = cur.fetchone()
    return int(row[0]) if row else 0
