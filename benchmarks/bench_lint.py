"""Lint of 200 generated migration files with sqlfluff: cold (empty cache, includes loading
sqlfluff and the postgres dialect) and warm (every file answered from the content cache).

Run: .venv/bin/python benchmarks/bench_lint.py [--files N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate_migrations(directory: Path, count: int) -> list[Path]:
    """Migrations shaped like real ones: tables, added columns, indexes, constraints; every
    seventh file has lower-case keywords so the linter has findings to report."""
    paths: list[Path] = []
    for n in range(1, count + 1):
        table = f"table_{n:04d}"
        sql = (
            "SET lock_timeout = '2s';\n\n"
            f"CREATE TABLE {table} (\n"
            "    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
            "    name TEXT NOT NULL,\n"
            "    amount NUMERIC(12, 2) DEFAULT 0,\n"
            "    created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n"
            ");\n\n"
            f"ALTER TABLE {table} ADD COLUMN note TEXT;\n\n"
            f"CREATE INDEX {table}_created_at ON {table} (created_at);\n\n"
            f"ALTER TABLE {table}\n"
            f"    ADD CONSTRAINT {table}_amount_positive CHECK (amount >= 0) NOT VALID;\n"
        )
        if n % 7 == 0:
            sql += f"\ncomment on table {table} is 'generated for the benchmark';\n"
        path = directory / f"{n:04d}_create_{table}.sql"
        path.write_text(sql, encoding="utf-8")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_lint_") as tmp:
        # A private state directory: the cache starts empty, and nothing of the user's is touched.
        os.environ["RELEASE_HOME"] = str(Path(tmp) / "home")
        from dagster_project.core.migrations.lint import lint_migrations

        paths = generate_migrations(Path(tmp), args.files)
        cold = lint_migrations(paths)
        warm = lint_migrations(paths)
        if cold.findings != warm.findings or warm.cached != len(paths):
            raise SystemExit("warm run disagrees with cold run: the cache is broken")
        print(f"sqlfluff lint of {len(paths)} migration files (one in-process Linter)")
        print(f"{'run':<6} {'seconds':>9} {'files cached':>13} {'findings':>9}")
        print(f"{'cold':<6} {cold.seconds:>9.3f} {cold.cached:>13} {len(cold.findings):>9}")
        print(f"{'warm':<6} {warm.seconds:>9.3f} {warm.cached:>13} {len(warm.findings):>9}")
        print(
            f"warm is {cold.seconds / warm.seconds:,.0f}x faster than cold "
            f"({cold.seconds / len(paths) * 1000:.1f} ms/file cold, "
            f"{warm.seconds / len(paths) * 1000:.2f} ms/file warm)"
        )


if __name__ == "__main__":
    main()
