"""The artifact registry: deterministic, content-addressed release artifacts.

An artifact is a `tar.gz` of the product's `service/`, `migrations/`, `expectations/`, its
`product.yaml`, its `contract.yaml` and a `manifest.json` (product, version, settings, source
file hashes). The
archive is byte-for-byte reproducible (sorted entries, zeroed mtimes and owners, normalised
modes, gzip mtime 0), so the same source and manifest always give the same SHA-256.

`push` stores it under `$RELEASE_HOME/registry/staging/sha256/<sha>.tar.gz` and indexes it in
`release_control.registry.artifacts`; `fetch`, `verify` and `extract` read it back, and
`unpacked` extracts it once into the state directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from psycopg2.extras import Json

from dagster_project.core import control_schema, database, knobs
from dagster_project.core.settings import release_home, validate_release_key
from dagster_project.core.spec import ProductSpec

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SETTING_KEYS = knobs.SETTING_KEYS
MAX_EXTRA_LATENCY_MS = knobs.KNOBS["extra_latency_ms"].maximum
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

SettingValue = str | int | float


class ArtifactNotFound(LookupError):
    """No artifact with this SHA-256 in the registry; the message names the SHA."""


class UnsafeArtifact(ValueError):
    """The archive holds a member that would land outside the extraction directory."""


@dataclass(frozen=True)
class Artifact:
    product: str
    version: str
    sha256: str
    path: Path
    manifest: dict[str, Any] = field(compare=False)

    @property
    def settings(self) -> dict[str, SettingValue]:
        return dict(self.manifest.get("settings", {}))

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


# --- settings ---------------------------------------------------------------------------------


def validate_settings(settings: dict[str, SettingValue] | None) -> dict[str, SettingValue]:
    """Check the release knobs and return them in canonical form (so `0.5` and `"0.5"` give the
    same artifact). Raises ValueError (`knobs.KnobError`) naming the offending key; the schema
    is `core/knobs.py`, shared with the CLI and the build asset."""
    return knobs.validate(settings)


# --- build ------------------------------------------------------------------------------------


def _source_files(spec: ProductSpec) -> dict[str, Path]:
    """Archive name -> file on disk, for everything that ships in the artifact."""
    files: dict[str, Path] = {"product.yaml": spec.root / "product.yaml"}
    if spec.contract_path.is_file():  # what the release promises its clients (core/contract.py)
        files[spec.contract_file] = spec.contract_path
    for arc_dir, source_dir in (
        ("service", spec.service_path),
        ("migrations", spec.migrations_path),
        ("expectations", spec.expectations_path),
    ):
        if not source_dir.is_dir():
            if arc_dir == "service":
                raise FileNotFoundError(f"{source_dir}: the product's service source is missing")
            continue  # a product may have no migrations or expectations yet
        for path in sorted(source_dir.rglob("*")):
            relative = path.relative_to(source_dir)
            if any(part in SKIPPED_DIRS for part in relative.parts):
                continue
            if path.suffix in SKIPPED_SUFFIXES or not path.is_file():
                continue
            files[f"{arc_dir}/{relative.as_posix()}"] = path
    return files


def _sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _tar_member(name: str, size: int, executable: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if executable else 0o644
    info.type = tarfile.REGTYPE
    return info


def build_artifact(
    spec: ProductSpec, version: str, settings: dict[str, SettingValue] | None = None
) -> Artifact:
    """Package the product source at `version` with `settings` into a reproducible tar.gz.

    The file is written to `$RELEASE_HOME/registry/builds/`; `push` puts it in the store.
    """
    validate_release_key(version)
    canonical_settings = validate_settings(settings)
    files = _source_files(spec)
    manifest = {
        "format": MANIFEST_FORMAT,
        "product": spec.product,
        "version": version,
        "settings": canonical_settings,
        "files": {name: _sha256_file(path) for name, path in files.items()},
    }
    manifest_bytes = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()

    builds = release_home() / "registry" / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=builds, suffix=".tar.gz.part")
    tmp_path = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            # filename="" keeps the build path out of the gzip header; mtime=0 the build time.
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name in sorted([*files, MANIFEST_NAME]):
                if name == MANIFEST_NAME:
                    data, executable = manifest_bytes, False
                else:
                    path = files[name]
                    data, executable = path.read_bytes(), os.access(path, os.X_OK)
                tar.addfile(_tar_member(name, len(data), executable), io.BytesIO(data))
        sha = _sha256_file(tmp_path)
        final = builds / f"{sha}.tar.gz"
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)
    return Artifact(
        product=spec.product, version=version, sha256=sha, path=final, manifest=manifest
    )


# --- store and index --------------------------------------------------------------------------


def store_dir() -> Path:
    return release_home() / "registry" / "staging" / "sha256"


def stored_path(sha256: str) -> Path:
    return store_dir() / f"{_checked_sha(sha256)}.tar.gz"


def _checked_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise ValueError(f"artifact SHA-256 {sha256!r} is not 64 lowercase hex characters")
    return sha256


def push(artifact: Artifact) -> Artifact:
    """Store the artifact content-addressed and index it; pushing the same SHA again is a no-op.

    Refuses a file whose content no longer matches `artifact.sha256`.
    """
    actual = _sha256_file(artifact.path)
    if actual != artifact.sha256:
        raise ValueError(
            f"artifact {artifact.path} has SHA-256 {actual}, not {artifact.sha256}: "
            "refusing to push"
        )
    target = stored_path(artifact.sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not (target.is_file() and _sha256_file(target) == artifact.sha256):
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
        shutil.copyfile(artifact.path, tmp)
        os.replace(tmp, target)  # atomic: readers never see a half-written artifact
    control_schema.ensure()  # registry.artifacts: sql/control/0004_registry.sql
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO registry.artifacts (sha256, product, version, manifest, size_bytes) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING",
            (
                artifact.sha256,
                artifact.product,
                artifact.version,
                Json(artifact.manifest),
                target.stat().st_size,
            ),
        )
    return Artifact(
        product=artifact.product,
        version=artifact.version,
        sha256=artifact.sha256,
        path=target,
        manifest=artifact.manifest,
    )


def fetch(sha256: str) -> Artifact:
    """The indexed artifact with this SHA-256; ArtifactNotFound naming the SHA otherwise."""
    _checked_sha(sha256)
    control_schema.ensure()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT product, version, manifest FROM registry.artifacts WHERE sha256 = %s",
            (sha256,),
        )
        row = cur.fetchone()
    if row is None:
        raise ArtifactNotFound(f"artifact sha256:{sha256} is not in the registry index")
    path = stored_path(sha256)
    if not path.is_file():
        raise ArtifactNotFound(f"artifact sha256:{sha256} is indexed but its file {path} is gone")
    product, version, manifest = row
    return Artifact(product=product, version=version, sha256=sha256, path=path, manifest=manifest)


def verify(sha256: str) -> bool:
    """Recompute the stored file's SHA-256: True only if the file exists and matches its name.

    Raises ArtifactNotFound if the SHA was never pushed (nothing to verify is not a pass).
    """
    path = stored_path(sha256)
    control_schema.ensure()
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM registry.artifacts WHERE sha256 = %s", (sha256,))
        indexed = cur.fetchone() is not None
    if not indexed:
        raise ArtifactNotFound(f"artifact sha256:{sha256} is not in the registry index")
    return path.is_file() and _sha256_file(path) == sha256


# --- extract ----------------------------------------------------------------------------------


def extract(artifact: Artifact, dest: Path | str) -> Path:
    """Unpack into `dest` after checking the file's SHA-256; refuses absolute paths, `..`,
    links and special files. Returns `dest` (the artifact root: service/, manifest.json, ...)."""
    dest = Path(dest).resolve()
    actual = _sha256_file(artifact.path)
    if actual != artifact.sha256:
        raise UnsafeArtifact(
            f"artifact {artifact.path} has SHA-256 {actual}, expected {artifact.sha256}: "
            "refusing to extract a modified artifact"
        )
    with tarfile.open(artifact.path, mode="r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts:
                raise UnsafeArtifact(
                    f"artifact {artifact.sha256}: member {member.name!r} would escape {dest}"
                )
            if not (member.isfile() or member.isdir()):
                raise UnsafeArtifact(
                    f"artifact {artifact.sha256}: member {member.name!r} is not a regular file"
                )
        dest.mkdir(parents=True, exist_ok=True)
        # The "data" filter re-checks the same rules inside the standard library.
        tar.extractall(dest, members=members, filter="data")
    return dest


def unpack_dir() -> Path:
    return release_home() / "deployments"


def unpacked(sha256: str) -> Path:
    """The pushed artifact's files, extracted once per state directory into
    `$RELEASE_HOME/deployments/<sha>/` (read-only use: migrations are read from it and the
    platform runs services in it). The SHA-256 is checked before extracting, into a temporary
    sibling that is renamed into place, so the directory is complete whenever it exists; a
    concurrent extraction that loses the rename discards its copy."""
    target = unpack_dir() / _checked_sha(sha256)
    if target.is_dir():
        return target
    artifact = fetch(sha256)  # only pushed artifacts
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{sha256}.", suffix=".partial", dir=target.parent))
    try:
        extract(artifact, partial)
        if not (partial / MANIFEST_NAME).is_file():
            raise UnsafeArtifact(
                f"artifact {artifact.path}: no {MANIFEST_NAME} at the archive root"
            )
        partial.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():
                raise
            # another process renamed its copy into place first: use that one
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful rename
    return target
