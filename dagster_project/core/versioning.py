"""The default release version of a product's current source: a fingerprint of its files, so
the same source is the same release (and redeploying it is a no-op)."""

from __future__ import annotations

import hashlib

from dagster_project.core.spec import ProductSpec

_IGNORED_PARTS = {"__pycache__", ".pytest_cache"}


def source_fingerprint(spec: ProductSpec) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in spec.root.rglob("*") if p.is_file()):
        relative = path.relative_to(spec.root)
        if _IGNORED_PARTS & set(relative.parts) or path.suffix == ".pyc":
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def default_release_version(spec: ProductSpec) -> str:
    return "src-" + source_fingerprint(spec)[:12]
