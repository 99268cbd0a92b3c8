"""The artifact registry through the real path: real files, real tarballs, the index table in
the session's Postgres."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from dagster_project.core import database, registry
from dagster_project.core.spec import ProductSpec, load_spec

PRODUCT = "4pnihc40q-yj"


@pytest.fixture(scope="module")
def spec() -> ProductSpec:
    return load_spec(PRODUCT)


@pytest.fixture
def product_copy(tmp_path: Path, spec: ProductSpec) -> ProductSpec:
    """A private copy of the product folder, free to modify."""
    root = tmp_path / PRODUCT
    shutil.copytree(spec.root, root, ignore=shutil.ignore_patterns("__pycache__"))
    return load_spec(root / "product.yaml")


def test_same_source_and_settings_give_the_same_sha(spec: ProductSpec) -> None:
    first = registry.build_artifact(spec, "1.0.0", {"error_rate": 0.25})
    second = registry.build_artifact(spec, "1.0.0", {"error_rate": "0.25"})  # canonicalised
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert registry._sha256_file(first.path) == first.sha256
    assert first.manifest["settings"] == {"error_rate": 0.25}


def test_file_times_and_bytecode_do_not_change_the_sha(product_copy: ProductSpec) -> None:
    before = registry.build_artifact(product_copy, "1.0.0", {})
    api = product_copy.service_path / "api.py"
    os.utime(api, (1_000_000, 1_000_000))
    cache = product_copy.service_path / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "api.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (product_copy.service_path / "stray.pyc").write_bytes(b"\x00bytecode")
    after = registry.build_artifact(product_copy, "1.0.0", {})
    assert after.sha256 == before.sha256
    with tarfile.open(after.path) as tar:
        names = tar.getnames()
        assert names == sorted(names)
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid) == (0, 0, 0), member.name
            assert (member.uname, member.gname) == ("", ""), member.name
            assert member.mode in (0o644, 0o755), member.name


def test_different_settings_version_or_source_give_a_different_sha(
    product_copy: ProductSpec,
) -> None:
    base = registry.build_artifact(product_copy, "1.0.0", {})
    slower = registry.build_artifact(product_copy, "1.0.0", {"extra_latency_ms": 100})
    newer = registry.build_artifact(product_copy, "1.0.1", {})
    (product_copy.service_path / "api.py").write_text(
        (product_copy.service_path / "api.py").read_text() + "\n# changed\n"
    )
    edited = registry.build_artifact(product_copy, "1.0.0", {})
    assert len({base.sha256, slower.sha256, newer.sha256, edited.sha256}) == 4


def test_manifest_lists_every_shipped_file_with_its_hash(spec: ProductSpec, tmp_path: Path) -> None:
    artifact = registry.build_artifact(spec, "2.0.0", {"fail_jobs_matching": "^doomed-"})
    root = registry.extract(artifact, tmp_path / "x")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["product"] == PRODUCT
    assert manifest["version"] == "2.0.0"
    assert manifest["settings"] == {"fail_jobs_matching": "^doomed-"}
    for required in (
        "product.yaml",
        "service/api.py",
        "service/worker.py",
        "service/static/app.js",
        "migrations/0001_initial.sql",
    ):
        assert required in manifest["files"], required
    for name, digest in manifest["files"].items():
        assert registry._sha256_file(root / name) == digest, name


@pytest.mark.slow
def test_push_fetch_verify_roundtrip_and_idempotent_index(spec: ProductSpec) -> None:
    built = registry.build_artifact(spec, "3.0.0", {"error_rate": 0.1})
    pushed = registry.push(built)
    again = registry.push(registry.build_artifact(spec, "3.0.0", {"error_rate": 0.1}))
    assert pushed == again
    assert pushed.path == registry.store_dir() / f"{built.sha256}.tar.gz"
    assert pushed.path.is_file()
    assert registry.verify(built.sha256) is True

    fetched = registry.fetch(built.sha256)
    assert (fetched.product, fetched.version, fetched.sha256) == (PRODUCT, "3.0.0", built.sha256)
    assert fetched.manifest == built.manifest
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), min(size_bytes) FROM registry.artifacts WHERE sha256 = %s",
            (built.sha256,),
        )
        count, size = cur.fetchone()
    assert count == 1
    assert size == pushed.path.stat().st_size


@pytest.mark.slow
def test_verify_detects_a_tampered_or_missing_file(spec: ProductSpec) -> None:
    pushed = registry.push(registry.build_artifact(spec, "4.0.0", {"extra_latency_ms": 5}))
    assert registry.verify(pushed.sha256) is True
    data = bytearray(pushed.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pushed.path.write_bytes(bytes(data))
    assert registry.verify(pushed.sha256) is False
    with pytest.raises(registry.UnsafeArtifact, match="refusing to extract a modified artifact"):
        registry.extract(pushed, pushed.path.parent / "never")
    pushed.path.unlink()
    assert registry.verify(pushed.sha256) is False
    with pytest.raises(registry.ArtifactNotFound, match=pushed.sha256):
        registry.fetch(pushed.sha256)


def test_push_refuses_a_file_that_does_not_match_its_sha(spec: ProductSpec) -> None:
    built = registry.build_artifact(spec, "4.1.0", {})
    built.path.write_bytes(built.path.read_bytes() + b"junk")
    with pytest.raises(ValueError, match="refusing to push"):
        registry.push(built)


@pytest.mark.slow
def test_unknown_sha_is_named_in_the_error() -> None:
    missing = "ab" * 32
    with pytest.raises(registry.ArtifactNotFound, match=missing):
        registry.fetch(missing)
    with pytest.raises(registry.ArtifactNotFound, match=missing):
        registry.verify(missing)
    with pytest.raises(ValueError, match="not-a-sha"):
        registry.fetch("not-a-sha")


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": -0.1}, "error_rate"),
        ({"error_rate": "lots"}, "error_rate"),
        ({"error_rate": True}, "error_rate"),
        ({"extra_latency_ms": -1}, "extra_latency_ms"),
        ({"extra_latency_ms": float("nan")}, "extra_latency_ms"),
        ({"fail_jobs_matching": "([unclosed"}, "fail_jobs_matching"),
        ({"fail_jobs_matching": ""}, "fail_jobs_matching"),
        ({"error_rate": 0.1, "turbo": 1}, "turbo"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(
    spec: ProductSpec, settings: dict, key: str
) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        registry.build_artifact(spec, "5.0.0", settings)


def test_bad_version_is_refused(spec: ProductSpec) -> None:
    with pytest.raises(ValueError, match="a comma"):
        registry.build_artifact(spec, "1.0, 2", {})


def _hand_made_artifact(
    tmp_path: Path, member: tarfile.TarInfo, data: bytes = b""
) -> registry.Artifact:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    sha = registry._sha256_file(path)
    return registry.Artifact(product=PRODUCT, version="6.6.6", sha256=sha, path=path, manifest={})


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/evil.txt", "service/../../up.txt"])
def test_extract_refuses_members_escaping_the_destination(tmp_path: Path, name: str) -> None:
    artifact = _hand_made_artifact(tmp_path, tarfile.TarInfo(name), b"owned")
    dest = tmp_path / "dest"
    with pytest.raises(registry.UnsafeArtifact, match="would escape"):
        registry.extract(artifact, dest)
    assert not (tmp_path / "escape.txt").exists()
    assert not dest.exists() or not any(dest.iterdir())


def test_extract_refuses_links(tmp_path: Path) -> None:
    link = tarfile.TarInfo("service/passwd")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    artifact = _hand_made_artifact(tmp_path, link)
    with pytest.raises(registry.UnsafeArtifact, match="not a regular file"):
        registry.extract(artifact, tmp_path / "dest")
