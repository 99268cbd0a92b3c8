"""Which endpoints changed their contract between two releases.

Promotion purges the edge selectively: only the surrogate keys of endpoints whose contract
(expected status, content type and JSON Schema, from each release's `contract.yaml`) differs
between the old and the new version (the architecture note: "purge selectively on schema or
contract changes"). Both contracts come from the artifacts, so the comparison is of what each
release promises, not of a sample of answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagster_project.core.spec import Contract, ProductSpec, SpecError, read_contract


def artifact_contract(root: Path, contract_file: str) -> Contract | None:
    """The contract an unpacked artifact shipped; None when it shipped none (built before
    contracts were packaged) or one that no longer reads: its endpoints count as changed."""
    path = root / contract_file
    if not path.is_file():
        return None
    try:
        return read_contract(path)
    except SpecError:
        return None


def changed_surrogate_keys(
    spec: ProductSpec, old: Contract | None, new: Contract
) -> list[dict[str, Any]]:
    """Endpoints of the spec whose contract differs between `old` and `new` (all of them when
    the old contract is unknown), with their surrogate keys."""
    changed = []
    for endpoint in spec.endpoints:
        before = old.for_path(endpoint.path) if old is not None else None
        after = new.for_path(endpoint.path)
        if before is None or after is None or before.model_dump() != after.model_dump():
            changed.append({"path": endpoint.path, "surrogate_keys": list(endpoint.surrogate_keys)})
    return changed


def changed_between(spec: ProductSpec, old_sha256: str, new_sha256: str) -> list[dict[str, Any]]:
    """`changed_surrogate_keys` for two pushed artifacts (by SHA-256): the old release's
    contract against the new one's (the current folder's when the new artifact has none)."""
    from dagster_project.core import registry

    def shipped(sha256: str) -> Contract | None:
        try:
            return artifact_contract(registry.unpacked(sha256), spec.contract_file)
        except (registry.ArtifactNotFound, OSError):
            return None

    return changed_surrogate_keys(spec, shipped(old_sha256), shipped(new_sha256) or spec.contract)
