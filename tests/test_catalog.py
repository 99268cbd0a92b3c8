"""The shared pg_catalog snapshot and scratch-database builder (core/migrations/catalog.py),
on the session's embedded Postgres: what drift and compatibility both stand on."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_project.core import database, settings
from dagster_project.core.migrations import catalog, history

PRODUCT = "4pnihc40q-yj"


def _product_migrations() -> list[Path]:
    directory = settings.product_dir(PRODUCT) / "migrations"
    return [m.path for m in history.read_migrations(directory)]


def _scratch_databases() -> list[str]:
    with database.connection("postgres") as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            (database.physical_name("scratch\\_") + "%",),
        )
        return [row[0] for row in cur.fetchall()]


def _write(directory: Path, files: dict[str, str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sql in files.items():
        path = directory / name
        path.write_text(sql, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def db() -> Iterator[str]:
    name = f"catalog_test_{secrets.token_hex(3)}"
    database.ensure_database(name)
    yield name
    database.drop_database(name)


@pytest.mark.slow
def test_two_builds_of_the_product_schema_snapshot_equal() -> None:
    files = _product_migrations()
    assert files, "the product has migrations"
    snapshots = []
    for _ in range(2):
        with catalog.scratch_database("catalog_test", files) as scratch:
            assert scratch.startswith("scratch_catalog_test_")
            snapshots.append(catalog.snapshot_schema(scratch, database_alias="catalog_test"))
    first, second = snapshots
    assert first.objects == second.objects
    assert first.parents == second.parents
    assert first.names == second.names
    assert first.database == second.database == database.physical_name("catalog_test")
    # Not trivially equal: the product's tables, columns and indexes are all there.
    assert ("table", "public.items") in first.objects
    price = ("column", "public.items.price_cents")
    assert first.objects[price]["type"] == "bigint"
    assert first.parents[price] == ("table", "public.items")
    assert first.names[price] == ("public", "items", "price_cents")
    assert ("index", "public.jobs_dequeue_idx") in first.objects
    assert _scratch_databases() == []


@pytest.mark.slow
def test_scratch_database_is_dropped_after_an_error_in_the_block() -> None:
    with (
        pytest.raises(ZeroDivisionError),
        catalog.scratch_database("catalog_test", _product_migrations()) as scratch,
    ):
        assert database.physical_name(scratch) in _scratch_databases()
        _ = 1 / 0
    assert _scratch_databases() == []


@pytest.mark.slow
def test_failing_migration_names_file_and_line_and_scratch_is_dropped(tmp_path: Path) -> None:
    files = _write(
        tmp_path,
        {
            "0001_ok.sql": "CREATE TABLE a (id int);\n",
            "0002_broken.sql": "CREATE TABLE b (id int);\n\nALTER TABLE gone ADD COLUMN x int;\n",
        },
    )
    entered = False
    with (
        pytest.raises(catalog.ScratchBuildError) as failure,
        catalog.scratch_database("catalog_test", files),
    ):
        entered = True
    assert not entered  # the build failed before the block
    error = failure.value
    assert error.path == files[1]
    assert error.line == 3
    assert error.error == 'relation "gone" does not exist'
    assert "0002_broken.sql line 3" in str(error)
    assert isinstance(error, catalog.CatalogError)
    assert _scratch_databases() == []


@pytest.mark.slow
def test_each_file_is_its_own_transaction(db: str, tmp_path: Path) -> None:
    """As history.apply_pending: earlier files stay committed, the failing one is rolled back
    whole, and a no-transaction file runs statement by statement (CONCURRENTLY works)."""
    files = _write(
        tmp_path,
        {
            "0001_a.sql": "CREATE TABLE a (id int);\n",
            "0002_index.sql": (
                "-- migration: no-transaction\nCREATE INDEX CONCURRENTLY a_id_idx ON a (id);\n"
            ),
            "0003_half.sql": "CREATE TABLE b (id int);\nCREATE TABLE a (id int);\n",
        },
    )
    with pytest.raises(catalog.ScratchBuildError, match=r"0003_half\.sql line 2"):
        catalog.apply_files(db, files)
    objects = catalog.snapshot_schema(db).objects
    assert ("table", "public.a") in objects
    assert ("index", "public.a_id_idx") in objects
    assert ("table", "public.b") not in objects  # rolled back with the rest of 0003


@pytest.mark.slow
def test_view_columns_are_in_the_snapshot(db: str) -> None:
    # The compatibility check relies on them: the stable version reads views too.
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id int NOT NULL, note text); CREATE VIEW v AS SELECT * FROM t")
    snapshot = catalog.snapshot_schema(db)
    assert snapshot.parents[("column", "public.v.note")] == ("view", "public.v")
    assert snapshot.objects[("column", "public.v.id")]["type"] == "integer"
