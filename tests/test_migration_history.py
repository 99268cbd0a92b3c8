"""Migration history against the session's real Postgres: apply, record, refuse tampering."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_project.core import database
from dagster_project.core.migrations import history
from dagster_project.core.migrations.history import MigrationError

_env_numbers = itertools.count()


@pytest.fixture
def env() -> Iterator[str]:
    """A fresh environment database per test (dropped afterwards)."""
    name = f"mh_env_{next(_env_numbers)}"
    database.drop_database(name)
    yield name
    database.drop_database(name)


def write(directory: Path, name: str, sql: str) -> Path:
    path = directory / name
    path.write_text(sql, encoding="utf-8")
    return path


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    write(tmp_path, "0001_create_orders.sql", "CREATE TABLE orders (id bigint PRIMARY KEY);\n")
    write(tmp_path, "0002_add_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
    return tmp_path


def test_read_migrations_orders_by_version_and_names_bad_files(tmp_path: Path) -> None:
    write(tmp_path, "0010_b.sql", "SELECT 1;")
    write(tmp_path, "0002_a.sql", "SELECT 1;")
    assert [f.version for f in history.read_migrations(tmp_path)] == ["0002", "0010"]
    write(tmp_path, "3_bad-name.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match=r"3_bad-name.sql"):
        history.read_migrations(tmp_path)


def test_duplicate_version_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "SELECT 1;")
    write(tmp_path, "0001_b.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match=r"0001_a.sql and 0001_b.sql"):
        history.read_migrations(tmp_path)


@pytest.mark.slow
def test_apply_records_checksum_actor_outcome_and_is_idempotent(env: str, migrations: Path) -> None:
    before = history.plan(env, migrations)
    assert [p.filename for p in before.pending] == ["0001_create_orders.sql", "0002_add_note.sql"]
    assert before.problems == [] and before.applied == []

    applied = history.apply_pending(env, migrations, actor="ci@example")
    assert [a["filename"] for a in applied] == ["0001_create_orders.sql", "0002_add_note.sql"]

    rows = history.history(env)
    assert [(r["version"], r["outcome"], r["actor"]) for r in rows] == [
        ("0001", "applied", "ci@example"),
        ("0002", "applied", "ci@example"),
    ]
    assert rows[0]["sha256"] == history.file_sha256(migrations / "0001_create_orders.sql")
    assert rows[0]["applied_at"]
    with database.connection(env) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'orders' ORDER BY ordinal_position"
        )
        assert [r[0] for r in cur.fetchall()] == ["id", "note"]

    assert history.apply_pending(env, migrations, actor="ci@example") == []
    assert len(history.history(env)) == 2
    after = history.plan(env, migrations)
    assert after.pending == [] and after.problems == [] and len(after.applied) == 2


@pytest.mark.slow
def test_new_file_is_pending_not_a_problem(env: str, migrations: Path) -> None:
    history.apply_pending(env, migrations, actor="ci")
    write(migrations, "0003_add_index.sql", "CREATE INDEX orders_note ON orders (note);\n")
    result = history.plan(env, migrations)
    assert [p.filename for p in result.pending] == ["0003_add_index.sql"]
    assert result.problems == []


@pytest.mark.slow
def test_edited_applied_file_blocks(env: str, migrations: Path) -> None:
    history.apply_pending(env, migrations, actor="ci")
    write(migrations, "0002_add_note.sql", "ALTER TABLE orders ADD COLUMN note varchar(10);\n")
    result = history.plan(env, migrations)
    assert not result.ok
    assert "0002_add_note.sql: changed after it was applied" in result.problems[0]
    with pytest.raises(MigrationError, match=r"0002_add_note.sql: changed after it was applied"):
        history.apply_pending(env, migrations, actor="ci")


@pytest.mark.slow
def test_deleted_applied_file_blocks(env: str, migrations: Path) -> None:
    history.apply_pending(env, migrations, actor="ci")
    (migrations / "0002_add_note.sql").unlink()
    result = history.plan(env, migrations)
    assert len(result.problems) == 1 and "0002_add_note.sql" in result.problems[0]
    assert "gone" in result.problems[0]
    with pytest.raises(MigrationError, match=r"0002_add_note.sql"):
        history.apply_pending(env, migrations, actor="ci")


@pytest.mark.slow
def test_unapplied_file_older_than_newest_applied_blocks(env: str, migrations: Path) -> None:
    history.apply_pending(env, migrations, actor="ci")
    write(migrations, "00015_late.sql", "SELECT 1;")  # version 15 > 2: fine, pending
    assert [p.filename for p in history.plan(env, migrations).pending] == ["00015_late.sql"]
    (migrations / "00015_late.sql").unlink()
    write(migrations, "0000_backdated.sql", "CREATE TABLE backdated (id int);\n")
    result = history.plan(env, migrations)
    assert result.pending == []
    assert len(result.problems) == 1
    assert "0000_backdated.sql: not applied" in result.problems[0]
    with pytest.raises(MigrationError, match=r"0000_backdated.sql"):
        history.apply_pending(env, migrations, actor="ci")


@pytest.mark.slow
def test_syntax_error_names_file_and_line_and_records_failure(env: str, migrations: Path) -> None:
    history.apply_pending(env, migrations, actor="ci")
    write(
        migrations,
        "0003_broken.sql",
        "-- adds a table\nCREATE TABLE ok_table (id int);\n\nCREATE TABEL broken (id int);\n",
    )
    with pytest.raises(MigrationError, match=r"0003_broken.sql line 4: syntax error"):
        history.apply_pending(env, migrations, actor="ci")
    rows = history.history(env)
    assert rows[-1]["filename"] == "0003_broken.sql"
    assert rows[-1]["outcome"] == "failed"
    assert "line 4" in rows[-1]["error"]
    # The whole file rolled back: the statement before the broken one left nothing behind.
    with database.connection(env) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.ok_table')")
        assert cur.fetchone() == (None,)
    # A failed attempt is not 'applied': the file is still pending.
    assert [p.filename for p in history.plan(env, migrations).pending] == ["0003_broken.sql"]


@pytest.mark.slow
def test_runtime_error_without_position_still_names_the_line(env: str, migrations: Path) -> None:
    history.apply_pending(env, migrations, actor="ci")
    write(
        migrations,
        "0003_bad_cast.sql",
        "INSERT INTO orders (id, note) VALUES (1, 'x');\n"
        "ALTER TABLE orders\n    ALTER COLUMN note TYPE integer USING note::integer;\n",
    )
    with pytest.raises(MigrationError, match=r"0003_bad_cast.sql line 2: invalid input syntax"):
        history.apply_pending(env, migrations, actor="ci")


@pytest.mark.slow
def test_concurrent_index_needs_and_honours_the_no_transaction_marker(
    env: str, migrations: Path
) -> None:
    history.apply_pending(env, migrations, actor="ci")
    index_sql = (
        "SET lock_timeout = '2s';\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_note ON orders (note);\n"
    )
    write(migrations, "0003_index.sql", index_sql)
    with pytest.raises(MigrationError, match=r"0003_index.sql line 2: .*no-transaction"):
        history.apply_pending(env, migrations, actor="ci")
    write(migrations, "0003_index.sql", "-- migration: no-transaction\n" + index_sql)
    applied = history.apply_pending(env, migrations, actor="ci")
    assert [a["filename"] for a in applied] == ["0003_index.sql"]
    with database.connection(env) as conn, conn.cursor() as cur:
        cur.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_note'::regclass")
        assert cur.fetchone() == (True,)
    assert [r["outcome"] for r in history.history(env)][-2:] == ["failed", "applied"]


@pytest.mark.slow
def test_concurrent_appliers_apply_each_file_once(env: str, migrations: Path) -> None:
    write(migrations, "0003_slow.sql", "SELECT pg_sleep(0.3);\nCREATE TABLE slow (id int);\n")
    results: list[list[dict[str, object]]] = []
    errors: list[BaseException] = []

    def run(actor: str) -> None:
        try:
            results.append(history.apply_pending(env, migrations, actor=actor))
        except BaseException as exc:  # surfaced below with the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"worker-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    # The lock is taken per file, so the two may share the work; never a file twice.
    applied_files = sorted(a["filename"] for r in results for a in r)
    assert applied_files == ["0001_create_orders.sql", "0002_add_note.sql", "0003_slow.sql"]
    assert [r["outcome"] for r in history.history(env)] == ["applied"] * 3


def test_split_statements_respects_quotes_and_comments() -> None:
    sql = (
        "-- file header\n\n"
        "-- safety: allow x because y\n"
        "CREATE TABLE a (x text DEFAULT ';');\n"
        "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;\n"
        "/* note; */ SELECT 'it''s;';\n"
    )
    statements = history.split_statements(sql)
    assert [(s.line, s.end_line, s.comments_above) for s in statements] == [
        (4, 4, ((3, "-- safety: allow x because y"),)),
        (5, 5, ()),
        (6, 6, ()),
    ]
    multi_line = history.split_statements("ALTER TABLE a\n    ADD COLUMN b text\n;\n")
    assert [(s.line, s.end_line) for s in multi_line] == [(1, 2)]
    assert statements[1].text.endswith("LANGUAGE sql")
