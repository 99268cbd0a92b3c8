"""Configuration of the sample service (API and worker), read from the environment the
platform sets. Ships inside the artifact and runs on its own: standard library and PyYAML only.

Variables:
  SERVICE_DATABASE_URL   libpq URI of the environment database (required; `?host=` socket URLs ok)
  SERVICE_VERSION        release version served (required)
  SERVICE_TRACK          stable | canary (default stable)
  SERVICE_MANIFEST       the artifact's manifest.json (default: <artifact>/manifest.json if present)
  SERVICE_PRODUCT_SPEC   product.yaml (default: <artifact>/product.yaml)
  SERVICE_FAULT_INJECTION  1: the API's fault drill endpoint is on (the platform sets it on
                         staging only; see README.md)

A bad value stops the process with a `ConfigError` naming the variable, file and field.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ARTIFACT_ROOT = Path(__file__).resolve().parent.parent
TRACKS = ("stable", "canary")
QUEUE_NAMES = ("high", "low")
KNOWN_SETTINGS = (
    "error_rate",
    "extra_latency_ms",
    "fail_jobs_matching",
    "job_latency_ms",
    "dynamic_max_age",
    "guardrails_off",
)


class ConfigError(ValueError):
    """Invalid service configuration; the message names the variable, file and field."""


@dataclass(frozen=True)
class Knobs:
    """Release knobs from the manifest's `settings`: make a release bad on demand."""

    error_rate: float = 0.0
    extra_latency_ms: float = 0.0
    fail_jobs_matching: re.Pattern[str] | None = None
    job_latency_ms: float = 0.0  # the worker sleeps this long in every job (a slow release)
    # Seconds of max-age the API declares on `dynamic` endpoints instead of their class TTL.
    dynamic_max_age: int | None = None
    # A release without its own guardrails: no rate limit, a breaker that never opens.
    guardrails_off: bool = False


@dataclass(frozen=True)
class QueuePolicy:
    name: str
    max_attempts: int
    backoff_initial_ms: int
    backoff_multiplier: float
    backoff_max_ms: int

    def backoff_ms(self, attempt: int) -> float:
        """Delay before retrying after failed attempt number `attempt` (1-based)."""
        delay = self.backoff_initial_ms * self.backoff_multiplier ** (attempt - 1)
        return min(delay, self.backoff_max_ms)


@dataclass(frozen=True)
class EndpointPolicy:
    path: str
    ttl_seconds: int
    surrogate_keys: tuple[str, ...]
    ttl_class: str = ""
    immutable: bool = False  # the spec's cache_policy for the class asks for `immutable`


@dataclass(frozen=True)
class GuardrailPolicy:
    """product.yaml `guardrails`: the API's rate limit per client and its circuit breaker."""

    requests_per_second: float  # per client id
    burst: int
    address_requests_per_second: float  # per address (requests without a client id)
    address_burst: int
    failure_threshold: int
    open_seconds: float


@dataclass(frozen=True)
class ServiceConfig:
    database_url: str
    version: str
    track: str
    product: str
    api_tier: str
    worker_tier: str
    knobs: Knobs
    endpoints: dict[str, EndpointPolicy] = field(default_factory=dict)
    queues: dict[str, QueuePolicy] = field(default_factory=dict)
    guardrails: GuardrailPolicy | None = None  # None: the spec declares none
    fault_injection: bool = False  # SERVICE_FAULT_INJECTION=1 (staging drills only)

    def display_database(self) -> str:
        """The database URL without its password, for logs and readiness answers."""
        parts = urlsplit(self.database_url)
        if parts.password is None:
            return self.database_url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()


def load_config(environ: dict[str, str] | None = None) -> ServiceConfig:
    env = os.environ if environ is None else environ
    database_url = _required(env, "SERVICE_DATABASE_URL")
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("SERVICE_DATABASE_URL: expected a libpq URI starting with postgresql://")
    version = _required(env, "SERVICE_VERSION")
    track = env.get("SERVICE_TRACK", "stable") or "stable"
    if track not in TRACKS:
        raise ConfigError(f"SERVICE_TRACK: {track!r} is not one of {', '.join(TRACKS)}")

    manifest_path = _path(env, "SERVICE_MANIFEST", ARTIFACT_ROOT / "manifest.json")
    settings: dict[str, Any] = {}
    if manifest_path is not None:
        manifest = _read_json(manifest_path, "SERVICE_MANIFEST")
        settings = manifest.get("settings") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{manifest_path}: field 'settings' must be a mapping")
    knobs = parse_knobs(settings, source=str(manifest_path))

    spec_path = _path(env, "SERVICE_PRODUCT_SPEC", ARTIFACT_ROOT / "product.yaml")
    if spec_path is None:
        raise ConfigError(
            "SERVICE_PRODUCT_SPEC: not set and no product.yaml beside the service "
            f"({ARTIFACT_ROOT / 'product.yaml'})"
        )
    spec = _read_yaml(spec_path)
    fault_injection = env.get("SERVICE_FAULT_INJECTION", "") or "0"
    if fault_injection not in ("0", "1"):
        raise ConfigError(f"SERVICE_FAULT_INJECTION: expected 0 or 1, got {fault_injection!r}")
    return ServiceConfig(
        database_url=database_url,
        version=version,
        track=track,
        product=str(spec.get("product", "")),
        api_tier=str(_get(spec, spec_path, "tiers", "api", "name")),
        worker_tier=str(_get(spec, spec_path, "tiers", "worker", "name")),
        knobs=knobs,
        endpoints=_endpoints(spec, spec_path),
        queues=_queues(spec, spec_path),
        guardrails=_guardrails(spec, spec_path),
        fault_injection=fault_injection == "1",
    )


def parse_knobs(settings: dict[str, Any], *, source: str = "settings") -> Knobs:
    unknown = sorted(set(settings) - set(KNOWN_SETTINGS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {unknown}; known: {', '.join(KNOWN_SETTINGS)}"
        )
    error_rate = _number(settings, "error_rate", 0.0, source)
    if not 0.0 <= error_rate <= 1.0:
        raise ConfigError(f"{source}: setting 'error_rate' must be within [0, 1], got {error_rate}")
    extra_latency_ms = _number(settings, "extra_latency_ms", 0.0, source)
    if extra_latency_ms < 0:
        raise ConfigError(
            f"{source}: setting 'extra_latency_ms' must be >= 0, got {extra_latency_ms}"
        )
    job_latency_ms = _number(settings, "job_latency_ms", 0.0, source)
    if job_latency_ms < 0:
        raise ConfigError(f"{source}: setting 'job_latency_ms' must be >= 0, got {job_latency_ms}")
    pattern = settings.get("fail_jobs_matching")
    compiled = None
    if pattern not in (None, ""):
        try:
            compiled = re.compile(str(pattern))
        except re.error as exc:
            raise ConfigError(
                f"{source}: setting 'fail_jobs_matching' is not a valid regex: {exc}"
            ) from None
    dynamic_max_age = None
    if settings.get("dynamic_max_age") not in (None, ""):
        dynamic_max_age = int(_number(settings, "dynamic_max_age", 0.0, source))
        if dynamic_max_age < 1:
            raise ConfigError(
                f"{source}: setting 'dynamic_max_age' must be >= 1, got {dynamic_max_age}"
            )
    guardrails_off = _number(settings, "guardrails_off", 0.0, source)
    if not 0.0 <= guardrails_off <= 1.0:
        raise ConfigError(
            f"{source}: setting 'guardrails_off' must be within [0, 1], got {guardrails_off}"
        )
    return Knobs(
        guardrails_off=guardrails_off > 0,
        error_rate=error_rate,
        extra_latency_ms=extra_latency_ms,
        fail_jobs_matching=compiled,
        job_latency_ms=job_latency_ms,
        dynamic_max_age=dynamic_max_age,
    )


def _required(env: Any, name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"{name}: environment variable is not set")
    return value


def _path(env: Any, name: str, default: Path) -> Path | None:
    """The file named by `name`; a set-but-missing file is an error, an absent default is None."""
    value = env.get(name, "")
    if value:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{name}: file {path} does not exist")
        return path
    return default if default.is_file() else None


def _read_json(path: Path, variable: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{variable}: {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{variable}: {path} must hold a JSON object")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"SERVICE_PRODUCT_SPEC: {path} is not readable YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"SERVICE_PRODUCT_SPEC: {path} must hold a mapping")
    return data


def _get(data: dict[str, Any], path: Path, *keys: str) -> Any:
    node: Any = data
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"{path}: field '{'.'.join(keys[: depth + 1])}' is missing")
        node = node[key]
    return node


def _number(settings: dict[str, Any], key: str, default: float, source: str) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool):
        raise ConfigError(f"{source}: setting '{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: setting '{key}' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{source}: setting '{key}' must be finite, got {value!r}")
    return number


def _endpoints(spec: dict[str, Any], path: Path) -> dict[str, EndpointPolicy]:
    ttl_classes = _get(spec, path, "ttl_classes")
    endpoints: dict[str, EndpointPolicy] = {}
    for index, entry in enumerate(_get(spec, path, "endpoints")):
        where = f"{path}: field 'endpoints.{index}"
        if not isinstance(entry, dict) or "path" not in entry or "ttl_class" not in entry:
            raise ConfigError(f"{where}': needs 'path' and 'ttl_class'")
        ttl_class = entry["ttl_class"]
        if ttl_class not in ttl_classes:
            raise ConfigError(f"{where}.ttl_class': no TTL for class {ttl_class!r} in ttl_classes")
        class_policy = (spec.get("cache_policy") or {}).get(ttl_class) or {}
        endpoints[entry["path"]] = EndpointPolicy(
            path=entry["path"],
            ttl_class=str(ttl_class),
            immutable=bool(class_policy.get("immutable", False)),
            ttl_seconds=int(ttl_classes[ttl_class]),
            surrogate_keys=tuple(str(k) for k in entry.get("surrogate_keys") or ()),
        )
    return endpoints


def _queues(spec: dict[str, Any], path: Path) -> dict[str, QueuePolicy]:
    queues: dict[str, QueuePolicy] = {}
    for name in QUEUE_NAMES:
        raw = _get(spec, path, "queues", name)
        try:
            queues[name] = QueuePolicy(
                name=name,
                max_attempts=int(raw["max_attempts"]),
                backoff_initial_ms=int(raw["backoff_initial_ms"]),
                backoff_multiplier=float(raw["backoff_multiplier"]),
                backoff_max_ms=int(raw["backoff_max_ms"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{path}: field 'queues.{name}' is incomplete or invalid: {exc}"
            ) from None
    return queues


def _guardrails(spec: dict[str, Any], path: Path) -> GuardrailPolicy | None:
    raw = spec.get("guardrails")
    if raw is None:
        return None
    where = f"{path}: field 'guardrails"
    try:
        limit, breaker = raw["rate_limit"], raw["circuit_breaker"]
        policy = GuardrailPolicy(
            requests_per_second=float(limit["requests_per_second"]),
            burst=int(limit["burst"]),
            address_requests_per_second=float(limit["address_requests_per_second"]),
            address_burst=int(limit["address_burst"]),
            failure_threshold=int(breaker["failure_threshold"]),
            open_seconds=float(breaker["open_seconds"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}' is incomplete or invalid: {exc}") from None
    for name, value in (
        ("rate_limit.requests_per_second", policy.requests_per_second),
        ("rate_limit.burst", policy.burst),
        ("rate_limit.address_requests_per_second", policy.address_requests_per_second),
        ("rate_limit.address_burst", policy.address_burst),
        ("circuit_breaker.failure_threshold", policy.failure_threshold),
        ("circuit_breaker.open_seconds", policy.open_seconds),
    ):
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}.{name}': must be a positive number, got {value}")
    return policy
