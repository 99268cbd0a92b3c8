"""The product spec (`products/<id>/product.yaml`), validated with pydantic.

A bad spec fails with `SpecError` naming the file, the line and column, the field path and
the reason, for every problem at once. Every number has a range, so a negative TTL or a
zero bake time fails here, before any work, not in a later stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dagster_project.core.knobs import quote
from dagster_project.core.settings import list_products, product_dir

TtlClass = Literal["dynamic", "static"]
PRODUCT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DAY_SECONDS = 86_400
HOUR_MS = 3_600_000
# A TTL of at least a second and at most a year: 0 or less would never cache (or crash the edge).
TtlSeconds = Annotated[int, Field(gt=0, le=365 * DAY_SECONDS)]
# Fields whose input is never quoted back: someone may have pasted the token itself there.
_SECRET_FIELDS = ("guardrail",)


class SpecError(ValueError):
    """An invalid or missing product spec; the message names file, field and reason."""


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


class Slos(_Model):
    success_rate_min: float = Field(gt=0, le=1)
    p99_latency_ms_max: float = Field(gt=0, le=60_000)
    max_error_rate_increase: float = Field(ge=0, le=1)
    max_latency_shift_ratio: float = Field(ge=1, le=100)


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


class Queues(_Model):
    high: Queue
    low: Queue
    dead_letter: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")


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
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)
    slos: Slos
    canary: Canary
    queues: Queues
    guardrail: Guardrail
    production: Production = Production()
    platform: PlatformParts = PlatformParts()
    migrations_dir: str = "migrations"
    expectations_dir: str = "expectations"
    service_dir: str = "service"

    # Set by load_spec; not part of the YAML.
    source_path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _ttl_for_every_class(self) -> ProductSpec:
        missing = sorted({e.ttl_class for e in self.endpoints} - set(self.ttl_classes))
        if missing:
            raise ValueError(f"ttl_classes has no TTL for {missing}")
        return self

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
    known = ", ".join(list_products()) or "(none)"
    if not isinstance(product_id, str) or not PRODUCT_ID_RE.fullmatch(product_id):
        raise SpecError(
            f"product id {quote(product_id)} is refused: expected 1-63 lowercase letters, "
            f"digits and '-' (a product name, not a path); known products: {known}"
        )
    if not (product_dir(product_id) / "product.yaml").is_file():
        raise SpecError(
            f"unknown product {quote(product_id)}: {product_dir(product_id)}/product.yaml not "
            f"found; known products: {known}"
        )
    return product_id


def load_spec(product_id_or_path: str | Path) -> ProductSpec:
    """Load and validate a spec by product id or by path to a product.yaml."""
    path = Path(product_id_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = product_dir(validate_product_id(str(product_id_or_path))) / "product.yaml"
    if not path.is_file():
        raise SpecError(f"{path}: product spec not found (unknown product?)")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the product spec: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    try:
        spec = ProductSpec.model_validate({**raw, "source_path": path.resolve()})
    except ValidationError as exc:
        raise SpecError(_format_errors(path, exc, text)) from None
    if path.parent.name != spec.product:
        line, column = _position(_compose(text), ("product",))
        raise SpecError(
            f"{path}:{line}:{column}: field 'product': {spec.product!r} does not match its "
            f"folder {path.parent.name!r}"
        )
    return spec


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _position(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[int, int]:
    """1-based line and column of the YAML node at a pydantic `loc` (field names and list
    indexes), or of the deepest node that exists on the way (a missing field points at the
    mapping that lacks it)."""
    node = root
    if node is None:
        return 1, 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    # An unknown key is reported at the key itself, a bad value at the value.
                    child = value
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part >= 0:
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node = child
    return node.start_mark.line + 1, node.start_mark.column + 1


def _format_errors(path: Path, exc: ValidationError, text: str = "") -> str:
    root = _compose(text)
    lines = [f"{path}: invalid product spec ({exc.error_count()} problem(s))"]
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
        lines.append(f"  {path}:{line}:{column}: field '{field}': {message}{shown}")
    return "\n".join(lines)
