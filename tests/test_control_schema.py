"""The project's own tables from versioned SQL files (core/control_schema.py), the one advisory
lock scheme, and the atomic artifact unpack cache, against the session's real Postgres."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_project.core import audit, control_schema, database, registry
from dagster_project.core.spec import load_spec

PRODUCT = "4pnihc40q-yj"


@pytest.fixture
def scratch_db() -> Iterator[str]:
    name = f"scratch_cs_{uuid.uuid4().hex[:10]}"
    yield name
    database.drop_database(name)


def _forget(name: str, kind: str = "control") -> None:
    """Make this process apply the set again (as a fresh process would)."""
    database.applied_schemas.discard((database.server().dsn(name), kind))


def _versions(name: str, kind: str = "control") -> list[tuple[int, str, str]]:
    with database.connection(name) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT version, filename, sha256 FROM {control_schema.VERSION_TABLE} "
            "WHERE schema_set = %s ORDER BY version",
            (kind,),
        )
        return cur.fetchall()


def _tables(name: str) -> set[str]:
    with database.connection(name) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        return {row[0] for row in cur.fetchall()}


@pytest.mark.slow
def test_applying_twice_is_a_no_op_and_the_version_table_lists_every_file(
    scratch_db: str,
) -> None:
    files = control_schema.files("control")
    assert [f.filename for f in files] == [
        "0001_platform.sql",
        "0002_owners.sql",
        "0003_production_changes.sql",
        "0004_registry.sql",
        "0005_audit.sql",
    ]
    assert control_schema.ensure(scratch_db) == [f.filename for f in files]
    assert control_schema.ensure(scratch_db) == []  # cached in this process
    _forget(scratch_db)
    assert control_schema.ensure(scratch_db) == []  # and recorded in the database
    assert _versions(scratch_db) == [(f.version, f.filename, f.sha256) for f in files]
    assert {
        "platform.environments",
        "platform.processes",
        "platform.owners",
        "platform.production_changes",
        "registry.artifacts",
        "audit.entries",
        "audit.head",
        control_schema.VERSION_TABLE,
    } <= _tables(scratch_db)


@pytest.mark.slow
def test_environment_databases_get_the_migration_history_table(scratch_db: str) -> None:
    from dagster_project.core.migrations import history

    assert history.applied_migrations(scratch_db) == []  # creates database and table
    files = control_schema.files("environment")
    assert [f.filename for f in files] == ["0001_migration_history.sql"]
    assert _versions(scratch_db, "environment") == [
        (f.version, f.filename, f.sha256) for f in files
    ]
    assert _versions(scratch_db, "control") == []
    assert history.HISTORY_TABLE in _tables(scratch_db)
    assert not any(t.startswith(("platform.", "audit.")) for t in _tables(scratch_db))


@pytest.mark.slow
def test_a_dropped_database_is_set_up_again(scratch_db: str) -> None:
    assert control_schema.ensure(scratch_db)
    database.drop_database(scratch_db)
    assert control_schema.ensure(scratch_db)  # not served from the per-process cache


@pytest.mark.slow
def test_concurrent_threads_apply_each_file_once(scratch_db: str) -> None:
    database.ensure_database(scratch_db)
    barrier = threading.Barrier(6)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def apply() -> None:
        barrier.wait()
        try:
            results.append(control_schema.ensure(scratch_db))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=apply) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    applied = [name for result in results for name in result]
    assert sorted(applied) == [f.filename for f in control_schema.files("control")]
    assert len(_versions(scratch_db)) == len(control_schema.files("control"))


@pytest.mark.slow
def test_concurrent_processes_apply_each_file_once(scratch_db: str) -> None:
    script = (
        "import json, sys\n"
        "from dagster_project.core import control_schema\n"
        "print(json.dumps({'control': control_schema.ensure(sys.argv[1]),"
        " 'environment': control_schema.ensure_environment(sys.argv[1])}))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, scratch_db],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    for kind in ("control", "environment"):
        applied = [name for output in outputs for name in output[kind]]
        assert sorted(applied) == [f.filename for f in control_schema.files(kind)], kind
        # Both sets share the version table, one row per file of each.
        assert len(_versions(scratch_db, kind)) == len(control_schema.files(kind))


@pytest.mark.slow
def test_an_edited_applied_file_is_refused_naming_it(
    scratch_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(control_schema.SQL_DIR, tmp_path / "sql")
    monkeypatch.setattr(control_schema, "SQL_DIR", tmp_path / "sql")
    control_schema.ensure(scratch_db)

    # A new file is simply applied next.
    (tmp_path / "sql" / "control" / "0006_extra.sql").write_text(
        "CREATE TABLE platform.extra (id int);\n"
    )
    _forget(scratch_db)
    assert control_schema.ensure(scratch_db) == ["0006_extra.sql"]

    edited = tmp_path / "sql" / "control" / "0002_owners.sql"
    edited.write_text(edited.read_text() + "-- an afterthought\n")
    _forget(scratch_db)
    with pytest.raises(control_schema.SchemaError, match=r"0002_owners\.sql was edited"):
        control_schema.ensure(scratch_db)

    edited.unlink()
    _forget(scratch_db)
    with pytest.raises(control_schema.SchemaError, match=r"0002_owners\.sql .*no longer"):
        control_schema.ensure(scratch_db)


@pytest.mark.slow
def test_a_failing_file_is_named_and_leaves_nothing_applied(
    scratch_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "0001_ok.sql").write_text("CREATE TABLE ok (id int);\n")
    (tmp_path / "control" / "0002_bad.sql").write_text("CREATE TABLE bad (id nosuchtype);\n")
    monkeypatch.setattr(control_schema, "SQL_DIR", tmp_path)
    with pytest.raises(control_schema.SchemaError, match=r"0002_bad\.sql failed"):
        control_schema.ensure(scratch_db)
    assert "public.ok" not in _tables(scratch_db)  # one transaction


def test_the_audit_file_spells_out_the_python_constants() -> None:
    sql = (control_schema.SQL_DIR / "control" / "0005_audit.sql").read_text()
    assert "ARRAY[" + ", ".join(f"'{f}'" for f in audit.REQUIRED_FIELDS) + "]" in sql
    assert f"'{audit.GENESIS_HASH}'" in sql
    assert f"GRANT {audit.PIPELINE_ROLE} TO" in sql


@pytest.mark.slow
def test_advisory_keys_are_stable_signed_bigints(scratch_db: str) -> None:
    key = database.advisory_key("control-schema")
    assert key == database.advisory_key("control-schema")
    assert key != database.advisory_key("migrations")
    assert -(2**63) <= key < 2**63
    database.ensure_database(scratch_db)
    with (
        database.advisory_lock("test-lock", scratch_db),
        database.connection(scratch_db) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT pg_try_advisory_lock(%s)", (database.advisory_key("test-lock"),))
        assert cur.fetchone()[0] is False  # held by the block above


# ------------------------------------------------------------------ the artifact unpack cache


@pytest.fixture
def pushed() -> registry.Artifact:
    spec = load_spec(PRODUCT)
    version = f"0.0.{secrets.randbelow(10**9)}"  # a SHA of its own: never unpacked before
    return registry.push(registry.build_artifact(spec, version, {}))


@pytest.mark.slow
def test_concurrent_unpacks_give_one_complete_directory(
    pushed: registry.Artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = 4
    extracted = threading.Barrier(workers)
    real_extract = registry.extract

    def extract_then_wait(artifact: registry.Artifact, dest: Path) -> Path:
        result = real_extract(artifact, dest)
        extracted.wait(timeout=60)  # every worker has a full copy before any renames
        return result

    monkeypatch.setattr(registry, "extract", extract_then_wait)
    results: list[Path] = []
    errors: list[BaseException] = []

    def unpack() -> None:
        try:
            results.append(registry.unpacked(pushed.sha256))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=unpack) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    target = registry.unpack_dir() / pushed.sha256
    assert results == [target] * workers
    with tarfile.open(pushed.path) as tar:
        expected = {m.name for m in tar.getmembers() if m.isfile()}
    found = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert found == expected
    assert json.loads((target / "manifest.json").read_text())["version"] == pushed.version
    assert not [
        p for p in registry.unpack_dir().iterdir() if pushed.sha256 in p.name and p != target
    ]  # the losers' copies are gone
    # Cached: a second call neither fetches nor extracts.
    monkeypatch.setattr(registry, "extract", None)
    assert registry.unpacked(pushed.sha256) == target


@pytest.mark.slow
def test_a_modified_artifact_is_not_unpacked(pushed: registry.Artifact) -> None:
    pushed.path.write_bytes(pushed.path.read_bytes() + b"tampered")
    with pytest.raises(registry.UnsafeArtifact, match="refusing to extract a modified artifact"):
        registry.unpacked(pushed.sha256)
    assert not [p for p in registry.unpack_dir().iterdir() if pushed.sha256 in p.name]
