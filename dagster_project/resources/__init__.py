"""ConfigurableResources binding the core to Dagster, chosen per deployment in one place.

`RELEASE_DEPLOYMENT` picks the set: `local` (default: the embedded platform on 127.0.0.1) or
`prometheus` (the same platform adapter, metrics read through a Prometheus server's HTTP API at
`RELEASE_PROMETHEUS_URL`). A real cluster adapter plugs in here.
"""

from __future__ import annotations

import os
from typing import Any

from dagster_project.resources.approval import ApprovalResource
from dagster_project.resources.audit import AuditResource
from dagster_project.resources.metrics import MetricsResource
from dagster_project.resources.platform import PlatformResource
from dagster_project.resources.registry import RegistryResource

__all__ = [
    "ApprovalResource",
    "AuditResource",
    "MetricsResource",
    "PlatformResource",
    "RegistryResource",
    "resources_for_deployment",
]


def resources_for_deployment(name: str | None = None) -> dict[str, Any]:
    deployment = name or os.environ.get("RELEASE_DEPLOYMENT", "local")
    if deployment == "local":
        metrics = MetricsResource(kind="local")
    elif deployment == "prometheus":
        metrics = MetricsResource(
            kind="prometheus", prometheus_url=os.environ.get("RELEASE_PROMETHEUS_URL", "")
        )
    else:
        raise ValueError(f"RELEASE_DEPLOYMENT={deployment!r} is not one of 'local', 'prometheus'")
    return {
        "platform": PlatformResource(kind="local"),
        "registry": RegistryResource(),
        "metrics": metrics,
        "approval": ApprovalResource(),
        "audit_trail": AuditResource(),
    }
