"""The staging registry of release artifacts (content-addressed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:
    from dagster_project.core.registry import Artifact
    from dagster_project.core.spec import ProductSpec


class RegistryResource(dg.ConfigurableResource):
    def build_and_push(self, spec: ProductSpec, version: str, settings: dict[str, Any]) -> Artifact:
        from dagster_project.core import registry

        return registry.push(registry.build_artifact(spec, version, settings))

    def fetch(self, sha256: str) -> Artifact:
        from dagster_project.core import registry

        return registry.fetch(sha256)

    def verify(self, sha256: str) -> bool:
        from dagster_project.core import registry

        return registry.verify(sha256)

    def unpacked(self, sha256: str) -> Path:
        """The artifact's files, extracted once under the state directory (read-only use)."""
        from dagster_project.core import registry

        return registry.unpacked(sha256)
