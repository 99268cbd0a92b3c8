"""The product spec (`products/<id>/product.yaml`) and the product's contract
(`products/<id>/contract.yaml`), validated with pydantic.

A bad spec or contract fails with `SpecError` naming the file, the line and column, the field
path and the reason, for every problem at once (`SpecError.problems` holds them as data).
Every number has a range, so a negative TTL or a zero bake time fails here, before any work,
not in a later stage.

The contract is what the generic pipeline knows of a product's API and data, and all it
knows: per endpoint the expected status, content type and a JSON Schema of the body (the
smoke suite validates answers against it; promotion purges the surrogate keys of endpoints
whose contract changed between releases), how the worker probes enqueue jobs and recognise
their results and which tables hold them, and the data-quality suite.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dagster_project.core.knobs import quote
from dagster_project.core.settings import list_products, product_dir

# A TTL class is a name the product chooses (e.g. `dynamic`, `static`, `hourly`).
TtlClass = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
PRODUCT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CONTRACT_FILE = "contract.yaml"
# libyaml when present: a spec and a contract per product are parsed at every code-location load.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DAY_SECONDS = 86_400
HOUR_MS = 3_600_000
# A TTL of at least a second and at most a year: 0 or less would never cache (or crash the edge).
TtlSeconds = Annotated[int, Field(gt=0, le=365 * DAY_SECONDS)]
# Fields whose input is never quoted back: someone may have pasted the token itself there.
_SECRET_FIELDS = ("guardrail",)


@dataclass(frozen=True)
class Problem:
    """One problem in a product's files: where (file, 1-based line and column, field path)
    and what. `line` is 0 when the problem is the file as a whole."""

    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        if self.field:
            return f"{where}: field '{self.field}': {self.message}"
        return f"{where}: {self.message}"


class SpecError(ValueError):
    """An invalid or missing product spec or contract; the message names file, field and
    reason, and `problems` lists them one by one."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Model):
    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")


class Tiers(_Model):
    edge: Tier
    api: Tier
    worker: Tier


class Endpoint(_Model):
    path: str = Field(pattern=r"^/[A-Za-z0-9/._-]*$")
    ttl_class: TtlClass
    surrogate_keys: tuple[str, ...] = ()
    smoke: bool = True
    load_weight: int = Field(default=1, ge=0, le=1000)


class CachePolicy(_Model):
    """What the origin may declare for one TTL class (judged by the edge_cache gate against
    the `Cache-Control` it observes through the staging edge). Every class also obeys the
    rules that need no field: a response to an authenticated request is never cached, and a
    cacheable response carries no `Set-Cookie`."""

    max_ttl_seconds: TtlSeconds | None = None  # e.g. dynamic data: cached at most this long
    min_ttl_seconds: TtlSeconds | None = None  # e.g. static assets: cached at least this long
    immutable: bool = False  # the origin must declare `immutable` (fingerprinted assets)

    @model_validator(mode="after")
    def _ordered(self) -> CachePolicy:
        low, high = self.min_ttl_seconds, self.max_ttl_seconds
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_ttl_seconds {low} is above max_ttl_seconds {high}")
        return self


class Slos(_Model):
    success_rate_min: float = Field(gt=0, le=1)
    p99_latency_ms_max: float = Field(gt=0, le=60_000)
    max_error_rate_increase: float = Field(ge=0, le=1)
    max_latency_shift_ratio: float = Field(ge=1, le=100)
    # The relative allowance is never less than this many ms (API and jobs alike): at a few ms,
    # one histogram bucket (e.g. 3 -> 5 ms) is wider than 20%, and a busy host's scheduling
    # noise moved a healthy canary's median across it (core/canary/judge.py).
    latency_shift_floor_ms: float = Field(default=5.0, ge=0, le=60_000)
    # The workers, judged during the canary like the API (core/canary/judge.py).
    max_job_failure_rate_increase: float = Field(default=0.01, ge=0, le=1)
    max_job_latency_shift_ratio: float = Field(default=1.5, ge=1, le=100)
    max_dead_letters: int = Field(default=0, ge=0, le=1_000_000)  # from healthy traffic


class CanaryStep(_Model):
    weight: int = Field(gt=0, lt=100)
    bake_seconds: float = Field(gt=0, le=3600)


class Canary(_Model):
    steps: tuple[CanaryStep, ...] = Field(min_length=1)
    load_rps: float = Field(gt=0, le=1000)
    min_requests_per_side: int = Field(ge=1, le=1_000_000)
    min_latency_samples: int = Field(ge=50, le=1_000_000)
    max_step_extension_seconds: float = Field(ge=0, le=3600)
    max_consecutive_metric_errors: int = Field(ge=1, le=100)
    # Share of the load generator's requests that enqueue a job (the contract's `ok` probe,
    # keys `canary-load-<run>-<n>`), so the canary's workers get production jobs.
    job_share: float = Field(default=0.2, gt=0, le=1)
    min_jobs_per_side: int = Field(default=8, ge=1, le=1_000_000)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: tuple[CanaryStep, ...]) -> tuple[CanaryStep, ...]:
        weights = [s.weight for s in steps]
        if weights != sorted(set(weights)):
            raise ValueError(f"step weights must strictly increase, got {weights}")
        return steps


class Queue(_Model):
    name: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")
    max_attempts: int = Field(ge=1, le=50)
    backoff_initial_ms: int = Field(ge=0, le=HOUR_MS)
    backoff_multiplier: float = Field(ge=1, le=100)
    backoff_max_ms: int = Field(ge=0, le=HOUR_MS)
    # How much later than its backoff a retry may start (the worker_dlq gate's backoff rows):
    # the worker's idle poll (75 ms in the sample), other due jobs it settles first and commit
    # latency. A retry never starts before its backoff (timestamps of one database clock).
    backoff_tolerance_ms: int = Field(default=250, ge=0, le=HOUR_MS)
    # A job of this queue is done within this long of its enqueue while every lower-priority
    # queue is flooded (the worker_dlq gate measures it on the first queue); None: unmeasured,
    # which the gate fails.
    priority_max_wait_ms: int | None = Field(default=None, ge=1, le=HOUR_MS)


class Queues(_Model):
    """The product's job queues by name, in priority order (workers drain the first one
    first), and the dead-letter table: `{<name>: {name: <name>, max_attempts: ...}, ...,
    dead_letter: <table>}`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Queue] = Field(init=False)  # type: ignore[assignment]

    dead_letter: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")

    @model_validator(mode="after")
    def _named_queues(self) -> Queues:
        queues = self.__pydantic_extra__ or {}
        if not queues:
            raise ValueError("at least one queue is needed besides dead_letter")
        for key, queue in queues.items():
            if queue.name != key:
                raise ValueError(f"queue {key!r} has name {queue.name!r}: they must be equal")
        return self

    @property
    def ordered(self) -> tuple[Queue, ...]:
        """The queues in priority order (as written in the spec)."""
        return tuple((self.__pydantic_extra__ or {}).values())

    def __getitem__(self, name: str) -> Queue:
        return (self.__pydantic_extra__ or {})[name]


# --- the contract (contract.yaml) -------------------------------------------------------------

RoutePath = Annotated[str, Field(pattern=r"^/[A-Za-z0-9/._-]*$", max_length=200)]
JsonField = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")]
SqlName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")]


class EndpointContract(_Model):
    """What a client may rely on for one endpoint: its status, content type and, for JSON,
    the JSON Schema (draft 2020-12) of its body."""

    status: int = Field(default=200, ge=100, le=599)
    content_type: str = Field(
        default="application/json", pattern=r"^[a-z]+/[A-Za-z0-9.+-]+$", max_length=100
    )
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    # A body shorter than this fails (a static asset must not be empty).
    min_bytes: int = Field(default=1, ge=0, le=1_000_000_000)

    @property
    def is_json(self) -> bool:
        return self.content_type == "application/json" or self.content_type.endswith("+json")

    @model_validator(mode="after")
    def _json_needs_a_schema(self) -> EndpointContract:
        if self.is_json and self.json_schema is None:
            raise ValueError("a JSON endpoint needs a 'schema' (the JSON Schema of its body)")
        if not self.is_json and self.json_schema is not None:
            raise ValueError(f"'schema' applies to JSON bodies, not {self.content_type}")
        return self


class Enqueue(_Model):
    """`POST <path>` with `{<key_field>: key, <queue_field>: queue, <payload_field>: {...}}`."""

    path: RoutePath
    key_field: JsonField
    queue_field: JsonField
    payload_field: JsonField
    accepted: tuple[int, ...] = Field(default=(200, 201, 202), min_length=1)


class RetryProbe(_Model):
    """A job whose first `fails` attempts fail, then it succeeds (fewer than the first
    queue's max_attempts)."""

    payload: dict[str, Any]
    fails: int = Field(ge=1, le=49)


class SlowProbe(_Model):
    """A job that takes `duration_ms` (long enough to kill the worker in the middle of it)."""

    payload: dict[str, Any]
    duration_ms: int = Field(ge=300, le=30_000)


class FloodProbe(_Model):
    """`count` jobs of `duration_ms` each, enqueued on the last queue to delay a job of the
    first one (the priority check)."""

    payload: dict[str, Any]
    count: int = Field(ge=10, le=2000)
    duration_ms: int = Field(ge=0, le=1000)


class ProbeJobs(_Model):
    """Payloads of the worker probes: `ok` must be done after one attempt with one result
    row; `poison` must fail every attempt and land in the dead-letter table; `retry`, `slow`
    and `flood` drive the timing, crash and priority checks (a contract without them fails
    those checks, naming the field)."""

    ok: dict[str, Any]
    poison: dict[str, Any]
    retry: RetryProbe | None = None
    slow: SlowProbe | None = None
    flood: FloodProbe | None = None


class AttemptLog(_Model):
    """`<field>`: a list of objects, one per settled attempt, with its start and finish
    (ISO 8601 timestamps of one clock) and outcome; `done` is the outcome of a success."""

    field: JsonField
    started_field: JsonField
    finished_field: JsonField
    outcome_field: JsonField
    done: str = Field(min_length=1)


class Recognise(_Model):
    """How a job's state is read from `GET <status_path>`."""

    status_field: JsonField
    attempts_field: JsonField
    result_field: JsonField
    done: str = Field(min_length=1)  # the status value of a job done
    dead: str = Field(min_length=1)  # the status value of a job in the dead-letter table
    # The job state's list of settled attempts (oldest first); needed by the timing checks.
    attempt_log: AttemptLog | None = None


class KeyedTable(_Model):
    table: SqlName
    key_column: SqlName


class DeadLetterColumns(_Model):
    """The dead-letter table's columns `release dlq list` reads (the table is
    `queues.dead_letter` of the spec, its key column `worker.dead_letter_key_column`)."""

    queue_column: SqlName
    attempts_column: SqlName
    error_column: SqlName
    dead_since_column: SqlName  # when the job was dead-lettered (its age)


class JobsTable(_Model):
    """The jobs table a replay puts a dead job back into: status to `queued`, attempts to 0,
    due now (and the error column, when named, cleared)."""

    table: SqlName
    key_column: SqlName
    status_column: SqlName
    attempts_column: SqlName
    due_column: SqlName  # when the job is next due to a worker
    error_column: SqlName | None = None
    queued: str = Field(min_length=1)  # the status value of a job waiting for a worker
    dead: str = Field(min_length=1)  # the status value of a job in the dead-letter table


class ReplayContract(_Model):
    """How `release dlq list|replay` reads the dead-letter table and replays a job
    (core/dlq.py)."""

    dead_letter: DeadLetterColumns
    jobs_table: JobsTable


class WorkerContract(_Model):
    enqueue: Enqueue
    status_path: str = Field(pattern=r"^/[A-Za-z0-9/._-]*\{key\}[A-Za-z0-9/._-]*$")
    probes: ProbeJobs
    recognise: Recognise
    # The workers' write-back table (one row per done job) in the environment database.
    results: KeyedTable
    # The key column of the dead-letter table (the table is `queues.dead_letter` of the spec).
    dead_letter_key_column: SqlName
    # The dead-letter workflow (`release dlq`); a contract without it cannot list or replay.
    replay: ReplayContract | None = None

    def status_url_path(self, key: str) -> str:
        return self.status_path.replace("{key}", key)


class DataQualityContract(_Model):
    # The Great Expectations suite (a file in the spec's expectations_dir); its `tables` are
    # the tables the data-quality gate reads in staging.
    suite: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.json$")


class GuardrailsContract(_Model):
    """How the staging smoke reaches the API's own guardrails (rate limit, circuit breaker)
    through the edge; the limits themselves are `guardrails` in product.yaml."""

    # The request header naming the client; the rate limit is per client.
    client_id_header: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9-]{0,63}$")
    # A data endpoint that reads the database (the smoke adds a unique query string, so the
    # edge passes every probe to the origin).
    probe_path: RoutePath
    # Staging only: POST {"seconds", "delay_ms"} makes the API's database calls fail for that
    # long; DELETE ends the drill.
    fault_path: RoutePath
    # An open breaker's 503 must arrive within this many milliseconds through the edge.
    fail_fast_ms: int = Field(default=150, ge=1, le=10_000)


class Contract(_Model):
    endpoints: dict[RoutePath, EndpointContract] = Field(min_length=1)
    worker: WorkerContract
    data_quality: DataQualityContract
    # The staging smoke's guardrail probes (the smoke fails when absent).
    guardrails: GuardrailsContract | None = None

    # Set by load_spec; not part of the YAML.
    source_path: Path | None = Field(default=None, exclude=True)

    def for_path(self, path: str) -> EndpointContract | None:
        return self.endpoints.get(path)


class Guardrail(_Model):
    token_sha256: str

    @field_validator("token_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(
                "must be the SHA-256 hex digest of the token (64 lowercase hex characters), "
                "never the token itself"
            )
        return value


class RateLimit(_Model):
    """Token bucket per client: `burst` requests at once, refilled at `requests_per_second`.
    A client names itself in the contract's client id header; a request without one counts
    against its address, which behind the edge is the edge itself (every anonymous client,
    the canary load generator included), hence its own, higher limit."""

    requests_per_second: float = Field(gt=0, le=100_000)
    burst: int = Field(ge=1, le=100_000)
    address_requests_per_second: float = Field(gt=0, le=100_000)
    address_burst: int = Field(ge=1, le=100_000)


class CircuitBreaker(_Model):
    """Around the API's database calls: opens after `failure_threshold` consecutive failures,
    fails fast for `open_seconds`, then lets one probe through (closes on success)."""

    failure_threshold: int = Field(ge=1, le=1000)
    open_seconds: float = Field(gt=0, le=300)


class Guardrails(_Model):
    """The API tier's own guardrails (verified by the staging smoke through the edge)."""

    rate_limit: RateLimit
    circuit_breaker: CircuitBreaker


class Production(_Model):
    """Ownership of an environment by one release at a time (core/ownership.py)."""

    # A release waits this long for another release that owns production, then is refused.
    owner_wait_seconds: float = Field(default=120, ge=0, le=3600)
    # An owner whose heartbeat is older than this is dead: the reconciler takes over.
    owner_heartbeat_timeout_seconds: float = Field(default=30, ge=5, le=3600)
    # After the canary, the new version takes 100% while the previous one keeps running at 0%
    # for this long, judged on the absolute SLOs and the post-deploy smoke; a failure returns
    # production to the previous version (`rolled_back`).
    watch_seconds: float = Field(default=10, gt=0, le=3600)


EdgeKind = Literal["embedded", "varnish"]
MetricsKind = Literal["scrape", "prometheus"]
GraceSeconds = Annotated[int, Field(ge=0, le=7 * DAY_SECONDS)]


class EnvironmentParts(_Model):
    """The edge and the metrics source of one environment (core/platform/edges.py; the
    variables RELEASE_EDGE and RELEASE_METRICS override them for every environment)."""

    edge: EdgeKind = "embedded"
    metrics: MetricsKind = "scrape"


class PlatformParts(_Model):
    staging: EnvironmentParts = EnvironmentParts()
    production: EnvironmentParts = EnvironmentParts()
    # How long Varnish may serve an expired object while it refetches, per TTL class.
    edge_grace_seconds: dict[TtlClass, GraceSeconds] = Field(
        default_factory=lambda: {"dynamic": 5, "static": 3600}
    )


class ProductSpec(_Model):
    product: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    tiers: Tiers
    ttl_classes: dict[TtlClass, TtlSeconds]
    # Per TTL class, what a release's origin may declare (none: only the always-on rules).
    cache_policy: dict[TtlClass, CachePolicy] = Field(default_factory=dict)
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)
    slos: Slos
    canary: Canary
    queues: Queues
    guardrail: Guardrail
    # The API's rate limit and circuit breaker (the smoke fails a product without them).
    guardrails: Guardrails | None = None
    production: Production = Production()
    platform: PlatformParts = PlatformParts()
    migrations_dir: str = "migrations"
    expectations_dir: str = "expectations"
    service_dir: str = "service"
    contract_file: str = Field(default=CONTRACT_FILE, pattern=r"^[A-Za-z0-9_.-]+\.ya?ml$")

    # Set by load_spec; not part of the YAML.
    source_path: Path | None = Field(default=None, exclude=True)
    _contract: Contract | None = PrivateAttr(default=None)

    @property
    def contract(self) -> Contract:
        """The product's contract (contract.yaml), loaded and checked by `load_spec`."""
        if self._contract is None:
            raise SpecError(f"{self.contract_path}: the contract was not loaded (use load_spec)")
        return self._contract

    @property
    def contract_path(self) -> Path:
        return self.root / self.contract_file

    @property
    def suite_path(self) -> Path:
        """The data-quality suite the contract names."""
        return self.expectations_path / self.contract.data_quality.suite

    @property
    def root(self) -> Path:
        assert self.source_path is not None
        return self.source_path.parent

    @property
    def migrations_path(self) -> Path:
        return self.root / self.migrations_dir

    @property
    def expectations_path(self) -> Path:
        return self.root / self.expectations_dir

    @property
    def service_path(self) -> Path:
        return self.root / self.service_dir


def validate_product_id(product_id: object) -> str:
    """A product id is a folder name under products/, never a path; unknown ids list the
    known ones. Raises SpecError."""
    if not isinstance(product_id, str) or not PRODUCT_ID_RE.fullmatch(product_id):
        raise SpecError(
            f"product id {quote(product_id)} is refused: expected 1-63 lowercase letters, "
            f"digits and '-' (a product name, not a path); known products: {_known()}"
        )
    if not (product_dir(product_id) / "product.yaml").is_file():
        raise SpecError(
            f"unknown product {quote(product_id)}: {product_dir(product_id)}/product.yaml not "
            f"found; known products: {_known()}"
        )
    return product_id


def _known() -> str:
    # Listed only for an error: a scan of the products directory per load would make loading
    # N products cost N^2.
    return ", ".join(list_products()) or "(none)"


def load_spec(product_id_or_path: str | Path) -> ProductSpec:
    """Load and validate a product by id or by path to its product.yaml: the spec, then its
    contract (contract.yaml beside it). Raises SpecError naming file:line:column and field."""
    path = Path(product_id_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = product_dir(validate_product_id(str(product_id_or_path))) / "product.yaml"
    if not path.is_file():
        raise SpecError(
            f"{path}: product spec not found (unknown product?)",
            [Problem(str(path), 0, 0, "", "product spec not found")],
        )
    text, raw = _read_yaml(path, "product spec")
    spec = _validate(ProductSpec, path, text, raw, "product spec")
    found: list[tuple[tuple[Any, ...], str]] = []
    for index, endpoint in enumerate(spec.endpoints):
        if endpoint.ttl_class not in spec.ttl_classes:
            known = ", ".join(spec.ttl_classes) or "none"
            found.append(
                (
                    ("endpoints", index, "ttl_class"),
                    f"no TTL for class {endpoint.ttl_class!r} in ttl_classes (known: {known})",
                )
            )
    for ttl_class, policy in spec.cache_policy.items():
        ttl = spec.ttl_classes.get(ttl_class)
        if ttl is None:
            known = ", ".join(spec.ttl_classes) or "none"
            found.append(
                (("cache_policy", ttl_class), f"no TTL class {ttl_class!r} (known: {known})")
            )
            continue
        for field, broken in (
            (
                "max_ttl_seconds",
                policy.max_ttl_seconds is not None and ttl > policy.max_ttl_seconds,
            ),
            (
                "min_ttl_seconds",
                policy.min_ttl_seconds is not None and ttl < policy.min_ttl_seconds,
            ),
        ):
            if broken:
                found.append(
                    (
                        ("cache_policy", ttl_class, field),
                        f"the {ttl_class} TTL {ttl}s in ttl_classes breaks its own policy "
                        f"({field} {getattr(policy, field)})",
                    )
                )
    if spec.guardrails is not None:
        rps = spec.guardrails.rate_limit.address_requests_per_second
        if rps <= spec.canary.load_rps:
            found.append(
                (
                    ("guardrails", "rate_limit", "address_requests_per_second"),
                    f"{rps:g} must exceed canary.load_rps {spec.canary.load_rps:g} (the canary "
                    "load generator sends no client id: it is one address, never throttled)",
                )
            )
    if path.parent.name != spec.product:
        found.append(
            (("product",), f"{spec.product!r} does not match its folder {path.parent.name!r}")
        )
    _raise_found(path, text, "product spec", found)
    spec._contract = load_contract(spec)
    return spec


def load_contract(spec: ProductSpec) -> Contract:
    """The product's contract file, checked on its own and against the spec: every spec
    endpoint has a contract and every contract names a spec endpoint."""
    path = spec.contract_path
    if not path.is_file():
        raise SpecError(
            f"{path}: the product's contract is missing (the expected status and JSON Schema "
            "of each endpoint, the worker probes, the data-quality suite; `release new` "
            "writes one)",
            [Problem(str(path), 0, 0, "", "the product's contract is missing")],
        )
    text, raw = _read_yaml(path, "product contract")
    contract: Contract = _validate(Contract, path, text, raw, "product contract")
    found: list[tuple[tuple[Any, ...], str]] = []
    paths = [e.path for e in spec.endpoints]
    for endpoint_path in paths:
        if endpoint_path not in contract.endpoints:
            found.append((("endpoints",), f"no contract for the spec's endpoint {endpoint_path!r}"))
    for endpoint_path in contract.endpoints:
        if endpoint_path not in paths:
            found.append(
                (("endpoints", endpoint_path), "not an endpoint of the spec (product.yaml)")
            )
    if contract.guardrails is not None and contract.guardrails.probe_path not in paths:
        found.append(
            (
                ("guardrails", "probe_path"),
                f"{contract.guardrails.probe_path!r} is not an endpoint of the spec (product.yaml)",
            )
        )
    retry, first = contract.worker.probes.retry, spec.queues.ordered[0]
    if retry is not None and retry.fails >= first.max_attempts:
        found.append(
            (
                ("worker", "probes", "retry", "fails"),
                f"{retry.fails} failures leave no attempt to succeed: queue {first.name!r} "
                f"has max_attempts {first.max_attempts} (product.yaml)",
            )
        )
    _raise_found(path, text, "product contract", found)
    return contract


def read_contract(path: Path) -> Contract:
    """A contract file on its own (e.g. the one a release's artifact shipped)."""
    text, raw = _read_yaml(path, "product contract")
    contract: Contract = _validate(Contract, path, text, raw, "product contract")
    return contract


def _read_yaml(path: Path, what: str) -> tuple[str, Any]:
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
        raw = _parsed(data, text)
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(
            f"{path}: cannot read the {what}: {exc}",
            [Problem(str(path), 0, 0, "", f"cannot read the {what}: {exc}")],
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
        problem = Problem(str(path), line, column, "", f"not valid YAML: {reason}")
        raise SpecError(f"{problem}", [problem]) from None
    if not isinstance(raw, dict):
        problem = Problem(str(path), 1, 1, "", "expected a mapping at the top level")
        raise SpecError(str(problem), [problem])
    return text, raw


def _parsed(data: bytes, text: str) -> Any:
    """The YAML document, through a cache of its JSON by content hash under
    `$RELEASE_HOME/cache/yaml/`: the code location parses every product's spec and contract at
    every load, and building Python objects is most of YAML's cost. Only documents that
    survive a JSON round trip unchanged are cached; without a usable state directory, or for
    anything else, it is parsed as usual (a safe loader, libyaml's when present)."""
    import hashlib
    import json

    from dagster_project.core.settings import StateDirError, release_home

    try:
        cache = release_home() / "cache" / "yaml" / f"{hashlib.sha256(data).hexdigest()}.json"
    except StateDirError:
        return yaml.load(text, Loader=_YAML_LOADER)
    try:
        return json.loads(cache.read_bytes())
    except (OSError, ValueError):
        pass
    raw = yaml.load(text, Loader=_YAML_LOADER)
    try:
        encoded = json.dumps(raw)
        if json.loads(encoded) == raw:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.part")
            partial.write_text(encoded)
            os.replace(partial, cache)
    except (TypeError, ValueError, OSError):
        pass  # not JSON (dates, non-string keys), or a read-only cache: parse it next time
    return raw


def _validate(model: type[Any], path: Path, text: str, raw: dict[str, Any], what: str) -> Any:
    try:
        return model.model_validate({**raw, "source_path": path.resolve()})
    except ValidationError as exc:
        problems = _problems(path, exc, text)
        raise SpecError(_report(path, what, problems), problems) from None


def _raise_found(
    path: Path, text: str, what: str, found: list[tuple[tuple[Any, ...], str]]
) -> None:
    if not found:
        return
    root = _compose(text)
    problems = [
        Problem(str(path), *_position(root, loc, at_key=True), ".".join(map(str, loc)), message)
        for loc, message in found
    ]
    raise SpecError(_report(path, what, problems), problems)


def _report(path: Path, what: str, problems: list[Problem]) -> str:
    lines = [f"{path}: invalid {what} ({len(problems)} problem(s))"]
    lines += [f"  {problem}" for problem in problems]
    return "\n".join(lines)


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None


def _position(
    root: yaml.Node | None, loc: tuple[Any, ...], *, at_key: bool = False
) -> tuple[int, int]:
    """1-based line and column of the YAML node at a pydantic `loc` (field names and list
    indexes), or of the deepest node that exists on the way (a missing field points at the
    mapping that lacks it). `at_key`: the last part's key rather than its value."""
    node = root
    if node is None:
        return 1, 1
    for index, part in enumerate(loc):
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    # An unknown key is reported at the key itself, a bad value at the value.
                    last = at_key and index == len(loc) - 1
                    child = key if last else value
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part >= 0:
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node = child
    return node.start_mark.line + 1, node.start_mark.column + 1


def _problems(path: Path, exc: ValidationError, text: str = "") -> list[Problem]:
    root = _compose(text)
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p != "[key]")
        field = ".".join(str(p) for p in err["loc"] if p != "[key]") or "(top level)"
        line, column = _position(root, loc)
        given = err.get("input")
        shown = (
            f" (got {quote(given)})"
            if err["type"] != "missing"
            and isinstance(given, str | int | float)
            and not any(str(loc[0]) == s for s in _SECRET_FIELDS if loc)
            else ""
        )
        message = err["msg"].removeprefix("Value error, ")
        problems.append(Problem(str(path), line, column, field, f"{message}{shown}"))
    return problems


def locate(path: Path, loc: tuple[Any, ...]) -> tuple[int, int]:
    """1-based (line, column) of the node at `loc` (keys and list indexes) in a YAML file, or
    of the deepest node on the way; (1, 1) when the file does not parse."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return 1, 1
    return _position(_compose(text), loc)


def problems_of(exc: SpecError) -> list[Problem]:
    """The problems of a SpecError, or one problem holding its message."""
    return exc.problems or [Problem("", 0, 0, "", str(exc))]
