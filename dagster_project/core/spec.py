"""The product spec (`products/<id>/product.yaml`), validated with pydantic.

A bad spec fails with `SpecError` naming the file, the field path and the reason.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dagster_project.core.settings import product_dir

TtlClass = Literal["dynamic", "static"]


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
    load_weight: int = Field(default=1, ge=0)


class Slos(_Model):
    success_rate_min: float = Field(gt=0, le=1)
    p99_latency_ms_max: float = Field(gt=0)
    max_error_rate_increase: float = Field(ge=0, le=1)
    max_latency_shift_ratio: float = Field(ge=1)


class CanaryStep(_Model):
    weight: int = Field(gt=0, lt=100)
    bake_seconds: float = Field(gt=0)


class Canary(_Model):
    steps: tuple[CanaryStep, ...] = Field(min_length=1)
    load_rps: float = Field(gt=0, le=1000)
    min_requests_per_side: int = Field(ge=1)
    min_latency_samples: int = Field(ge=50)
    max_step_extension_seconds: float = Field(ge=0)
    max_consecutive_metric_errors: int = Field(ge=1)

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
    backoff_initial_ms: int = Field(ge=0)
    backoff_multiplier: float = Field(ge=1)
    backoff_max_ms: int = Field(ge=0)


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


class ProductSpec(_Model):
    product: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    tiers: Tiers
    ttl_classes: dict[TtlClass, int]
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)
    slos: Slos
    canary: Canary
    queues: Queues
    guardrail: Guardrail
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

    @cached_property
    def ttl_by_path(self) -> dict[str, int]:
        return {e.path: self.ttl_classes[e.ttl_class] for e in self.endpoints}


def load_spec(product_id_or_path: str | Path) -> ProductSpec:
    """Load and validate a spec by product id or by path to a product.yaml."""
    path = Path(product_id_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = product_dir(str(product_id_or_path)) / "product.yaml"
    if not path.is_file():
        raise SpecError(f"{path}: product spec not found (unknown product?)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    try:
        spec = ProductSpec.model_validate({**raw, "source_path": path.resolve()})
    except ValidationError as exc:
        raise SpecError(_format_errors(path, exc)) from None
    if path.parent.name != spec.product:
        raise SpecError(
            f"{path}: field 'product': {spec.product!r} does not match its folder "
            f"{path.parent.name!r}"
        )
    return spec


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid product spec"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  field '{field}': {err['msg']}")
    return "\n".join(lines)
