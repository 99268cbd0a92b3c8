"""Schema drift at scale: our pg_catalog snapshot + diff against `results` (migra's successor).

    .venv/bin/python benchmarks/bench_drift.py [--tables 1000] [--columns 10] [--repeat 3]

Builds a schema of N tables x M columns (identity primary key, NOT NULL columns, defaults,
a check constraint, a secondary index per table, a foreign key every tenth table) as one
migration file, applies it through the history module to a "live" database and directly to
an "expected" database, then alters the live one by hand in three ways (added column,
dropped index, changed default). Both tools compare the same two databases; the end-to-end
`check_drift` (scratch rebuild from the applied migration + both snapshots + diff) is timed
as well. Runs on a private embedded Postgres under /tmp, stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A private server before anything touches the database module (it reads RELEASE_HOME).
_HOME = Path(tempfile.mkdtemp(prefix="bdrift", dir="/tmp"))
os.environ["RELEASE_HOME"] = str(_HOME)
os.environ.pop("RELEASE_DATABASE_URL", None)
os.environ.pop("RELEASE_DB_PREFIX", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagster_project.core import database  # noqa: E402
from dagster_project.core.migrations import catalog, drift, history  # noqa: E402

TYPES = ["text", "integer", "bigint", "numeric(12,2)", "timestamptz", "boolean", "jsonb", "uuid"]


def hand_changes(tables: int) -> list[str]:
    return [
        "ALTER TABLE t0007 ADD COLUMN extra_note text",
        f"DROP INDEX t{tables // 2:04d}_c1_idx",
        f"ALTER TABLE t{tables - 1:04d} ALTER COLUMN c2 SET DEFAULT 42",
    ]


def schema_sql(tables: int, columns: int) -> str:
    statements = []
    for t in range(tables):
        cols = ["id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY"]
        for c in range(1, columns):
            col_type = TYPES[(t + c) % len(TYPES)]
            col = f"c{c} {col_type}"
            if c % 3 == 0:
                col += " NOT NULL"
            if col_type == "integer" or c == 2:
                col = f"c{c} integer DEFAULT {c}" if c == 2 else col + " DEFAULT 0"
            cols.append(col)
        if t % 10 == 9:
            cols.append(f"parent_id bigint REFERENCES t{t - 1:04d} (id)")
        statements.append(f"CREATE TABLE t{t:04d} (\n    " + ",\n    ".join(cols) + "\n);")
        statements.append(f"CREATE INDEX t{t:04d}_c1_idx ON t{t:04d} (c1);")
    return "\n".join(statements) + "\n"


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    seconds: list[float] = []
    result: Any = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def ours(expected_db: str, live_db: str) -> list[drift.DriftItem]:
    return drift.diff(catalog.snapshot_schema(expected_db), catalog.snapshot_schema(live_db))


def migra_successor(expected_db: str, live_db: str) -> str:
    import results
    from results.dbdiff import Migration

    server = database.server()
    migration = Migration(
        results.db(server.dsn(expected_db)),
        results.db(server.dsn(live_db)),
        exclude_schema=history.HISTORY_SCHEMA,  # same exclusion as ours: the history table
    )
    migration.set_safety(False)
    migration.add_all_changes_ordered()
    return migration.sql


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=1000)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    try:
        started = time.perf_counter()
        migrations = _HOME / "migrations"
        migrations.mkdir()
        (migrations / "0001_bench_schema.sql").write_text(schema_sql(args.tables, args.columns))
        for name in ("bench_live", "bench_expected"):
            database.ensure_database(name)
        history.apply_pending("bench_live", migrations, actor="bench")
        catalog.apply_files("bench_expected", [migrations / "0001_bench_schema.sql"])
        with database.connection("bench_live") as conn, conn.cursor() as cur:
            for sql in hand_changes(args.tables):
                cur.execute(sql)
        with database.connection("bench_live") as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FILTER (WHERE c.relkind = 'r'), "
                "(SELECT count(*) FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid "
                " JOIN pg_namespace rn ON rn.oid = r.relnamespace "
                " WHERE rn.nspname = 'public' AND r.relkind = 'r' AND a.attnum > 0 "
                " AND NOT a.attisdropped), "
                "count(*) FILTER (WHERE c.relkind = 'i') "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public'"
            )
            tables, columns, indexes = cur.fetchone()
        print(
            f"schema: {tables} tables, {columns} columns, {indexes} indexes "
            f"(built in {time.perf_counter() - started:.1f} s); hand changes on the live "
            f"copy: {len(hand_changes(args.tables))}"
        )

        rows: list[tuple[str, list[float], str]] = []
        our_seconds, items = timed(lambda: ours("bench_expected", "bench_live"), args.repeat)
        rows.append(("ours: snapshot x2 + diff", our_seconds, f"{len(items)} differences"))

        try:
            migra_seconds, sql = timed(
                lambda: migra_successor("bench_expected", "bench_live"), args.repeat
            )
            statements = [s for s in sql.split(";") if s.strip()]
            rows.append(
                ("results (migra successor) diff", migra_seconds, f"{len(statements)} statements")
            )
        except Exception as exc:  # report exactly why the comparison could not run
            migra_seconds = []
            print(f"results could not run: {type(exc).__name__}: {exc}")

        check_seconds, report = timed(lambda: drift.check_drift("bench_live", migrations), 1)
        rows.append(
            ("ours: check_drift end to end*", check_seconds, f"{len(report.items)} differences")
        )

        print(f"\n{'tool':<34} {'median s':>9} {'min s':>8} {'runs':>5}  found")
        for label, seconds, found in rows:
            print(
                f"{label:<34} {statistics.median(seconds):>9.3f} {min(seconds):>8.3f} "
                f"{len(seconds):>5}  {found}"
            )
        if migra_seconds:
            ratio = statistics.median(migra_seconds) / statistics.median(our_seconds)
            print(f"\nratio results / ours (median, same two databases): {ratio:.1f}x")
        print(
            "* includes creating the scratch database, applying the migration to it, both "
            "snapshots, the diff and dropping the scratch database"
        )
        for item in items:
            print(f"  {item.change:<10} {item.kind:<8} {item.object}")
        return 0
    finally:
        database.stop_embedded()
        shutil.rmtree(_HOME, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
