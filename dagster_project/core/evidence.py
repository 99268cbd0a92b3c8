"""The evidence store: every file an audit entry points to, kept by content hash.

`$RELEASE_HOME/evidence/sha256/<sha256>.<ext>`: monitoring snapshots, audit tickets. A file is
written once, atomically (a temporary sibling hard-linked into place, which fails if the name
exists), made read-only, and never overwritten or deleted by a later run: two canaries of the
same version keep both sets of snapshots, and an entry names its files by hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

from dagster_project.core.settings import release_home

_EXT_RE = re.compile(r"^[a-z0-9]{1,10}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class EvidenceError(RuntimeError):
    """The store holds a different file under an evidence hash; the message names the path."""


def root() -> Path:
    path = release_home() / "evidence" / "sha256"
    path.mkdir(parents=True, exist_ok=True)
    return path


def path_for(sha256: str, ext: str) -> Path:
    if not _SHA_RE.fullmatch(sha256) or not _EXT_RE.fullmatch(ext):
        raise ValueError(f"evidence name needs a sha256 and a short extension, got {ext!r}")
    return root() / f"{sha256}.{ext}"


def store_bytes(data: bytes, ext: str) -> tuple[Path, str]:
    """Store `data` under its SHA-256; returns (path, sha256). Storing the same bytes again is
    a no-op; the existing file is never replaced."""
    digest = hashlib.sha256(data).hexdigest()
    target = path_for(digest, ext)
    if not target.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{digest[:12]}-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o444)
            with contextlib.suppress(FileExistsError):  # another writer stored it first
                os.link(tmp, target)
        finally:
            os.unlink(tmp)
    problem = check(target, digest)
    if problem:
        raise EvidenceError(f"evidence store: {problem}; it is never overwritten")
    return target, digest


def store_file(path: str | Path) -> tuple[Path, str]:
    """Store a file's bytes (its extension kept); returns (stored path, sha256)."""
    source = Path(path)
    return store_bytes(source.read_bytes(), source.suffix.lstrip(".").lower() or "bin")


def check(path: str | Path, sha256: str) -> str | None:
    """None when `path` is a file whose bytes hash to `sha256`; else what is wrong."""
    file = Path(path)
    if not file.is_file():
        return f"{file} is missing"
    actual = hashlib.sha256(file.read_bytes()).hexdigest()
    if actual != sha256:
        return f"{file} hashes to {actual[:16]}, not the recorded {sha256[:16]}"
    return None
