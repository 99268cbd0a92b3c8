"""Backward compatibility for the canary: pending migrations must not break the stable version.

During a canary the stable version keeps serving on the *migrated* production schema, and
rollback never runs down-migrations. So a pending migration that drops, renames or retypes
something the stable version relies on, or makes its inserts fail (a new NOT NULL column
without default), must block before any traffic shifts.

What the stable version relies on: the relations (tables, views) and columns that the
applied migrations create. Rather than parse DDL (and miss CASCADE, `IF EXISTS`, schema
qualification, ...), the check asks Postgres: it builds the applied schema in a scratch
database on the same server, then runs the pending files one statement at a time and
compares a pg_catalog snapshot before and after each statement. Every change to a relied-on
object is attributed to the exact file and line that caused it. A pending statement that
fails on the scratch database would fail in production too, and blocks as well.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from dagster_project.core import database
from dagster_project.core.migrations.history import MigrationFile, Statement, split_statements

EXPAND_THEN_CONTRACT = (
    "During the canary the stable version runs on the migrated schema, so this breaks it "
    "and a rollback cannot undo it. Use expand-then-contract: add the new column or table, "
    "ship code that writes both, backfill, then drop the old one in a later release."
)

# Relations the running version can read or write: tables, partitioned tables, views,
# materialized views, foreign tables. Identity/generated columns fill themselves on insert.
_SNAPSHOT_SQL = """
SELECT n.nspname, c.relname, a.attname,
       format_type(a.atttypid, a.atttypmod),
       a.attnotnull,
       ad.adbin IS NOT NULL OR a.attidentity <> '' OR a.attgenerated <> ''
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'release_meta')
  AND n.nspname NOT LIKE 'pg\\_%'
"""

_RENAME_TABLE_RE = re.compile(
    r"^ALTER\s+(?:TABLE|VIEW|MATERIALIZED\s+VIEW|FOREIGN\s+TABLE)\b.*\bRENAME\s+TO\b",
    re.IGNORECASE | re.DOTALL,
)
_RENAME_COLUMN_RE = re.compile(r"\bRENAME\s+(?:COLUMN\s+)?(?!TO\b)\S+\s+TO\b", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Column:
    type: str
    not_null: bool
    fills_itself: bool  # has a default, or is identity/generated


Relation = tuple[str, str]  # (schema, name)
Snapshot = dict[Relation, dict[str, Column]]


def check_backward_compat(
    applied_files: Sequence[Path | str | MigrationFile],
    pending_files: Sequence[Path | str | MigrationFile],
) -> list[Finding]:
    """Findings for every pending statement that would break the stable version; [] is a pass.

    Needs the project's Postgres server (a scratch database is created and dropped).
    """
    applied = [_path(f) for f in applied_files]
    pending = [_path(f) for f in pending_files]
    if not pending:
        return []
    scratch = f"scratch_compat_{uuid.uuid4().hex[:12]}"
    database.ensure_database(scratch)
    try:
        with database.connection(scratch) as conn:
            for path in applied:
                failure = _run_file(conn, path)
                if failure is not None:
                    line, error = failure
                    return [
                        Finding(
                            str(path),
                            line,
                            "cannot-build-stable-schema",
                            f"the applied migration fails on a scratch database: {error}; "
                            "the stable schema cannot be reconstructed, so compatibility "
                            "cannot be judged",
                        )
                    ]
            stable = _snapshot(conn)
            return _check_pending(conn, stable, pending)
    finally:
        database.drop_database(scratch)


def _path(item: Path | str | MigrationFile) -> Path:
    return item.path if isinstance(item, MigrationFile) else Path(item)


def _run_file(conn: psycopg2.extensions.connection, path: Path) -> tuple[int, str] | None:
    """Run each statement (autocommit, so CONCURRENTLY works); (line, error) of a failure."""
    for statement in split_statements(path.read_text(encoding="utf-8")):
        error = _execute(conn, statement)
        if error is not None:
            return statement.line, error
    return None


def _execute(conn: psycopg2.extensions.connection, statement: Statement) -> str | None:
    try:
        with conn.cursor() as cur:
            cur.execute(statement.text)
    except psycopg2.Error as exc:
        return (exc.diag.message_primary or str(exc)).strip()
    return None


def _snapshot(conn: psycopg2.extensions.connection) -> Snapshot:
    snapshot: Snapshot = {}
    with conn.cursor() as cur:
        cur.execute(_SNAPSHOT_SQL)
        for schema, relation, column, type_name, not_null, fills_itself in cur.fetchall():
            columns = snapshot.setdefault((schema, relation), {})
            if column is not None:  # a relation without columns still exists
                columns[column] = Column(type_name, not_null, fills_itself)
    return snapshot


def _check_pending(
    conn: psycopg2.extensions.connection, stable: Snapshot, pending: list[Path]
) -> list[Finding]:
    findings: list[Finding] = []
    before = stable
    for path in pending:
        for statement in split_statements(path.read_text(encoding="utf-8")):
            error = _execute(conn, statement)
            if error is not None:
                findings.append(
                    Finding(
                        str(path),
                        statement.line,
                        "pending-migration-fails",
                        f"the statement fails on the applied schema: {error}",
                    )
                )
                return findings  # later statements would be judged on a half-applied schema
            after = _snapshot(conn)
            findings.extend(_compare(stable, before, after, str(path), statement))
            before = after
    return findings


def _compare(
    stable: Snapshot, before: Snapshot, after: Snapshot, file: str, statement: Statement
) -> list[Finding]:
    """What one statement did to relations and columns the stable version relies on."""
    findings: list[Finding] = []

    def add(rule: str, what: str) -> None:
        findings.append(Finding(file, statement.line, rule, f"{what}. {EXPAND_THEN_CONTRACT}"))

    for relation, columns_before in before.items():
        name = _display(relation)
        if relation not in stable:
            continue  # created by a pending migration: the stable version cannot use it
        columns_after = after.get(relation)
        if columns_after is None:
            if _RENAME_TABLE_RE.search(statement.text):
                add("renames-table-in-use", f"renames {name}, which the stable version uses")
            else:
                add("drops-table-in-use", f"drops {name}, which the stable version uses")
            continue
        for column, old in columns_before.items():
            subject = f"{name}.{column}"
            new = columns_after.get(column)
            if column not in stable[relation]:
                continue
            if new is None:
                if _RENAME_COLUMN_RE.search(statement.text):
                    add(
                        "renames-column-in-use",
                        f"renames column {subject}, which the stable version reads and writes",
                    )
                else:
                    add(
                        "drops-column-in-use",
                        f"drops column {subject}, which the stable version reads and writes",
                    )
            elif new.type != old.type:
                add(
                    "changes-column-type",
                    f"changes the type of {subject} from {old.type} to {new.type}, which the "
                    "stable version relies on",
                )
            elif new.not_null and not old.not_null and not new.fills_itself:
                add(
                    "sets-not-null",
                    f"makes {subject} NOT NULL without a default; the stable version's inserts "
                    "that leave it out will fail",
                )
            elif new.not_null and old.fills_itself and not new.fills_itself:
                add(
                    "drops-default-of-required-column",
                    f"drops the default of NOT NULL column {subject}; the stable version's "
                    "inserts that leave it out will fail",
                )
        for column, new in columns_after.items():
            if column in columns_before or not new.not_null or new.fills_itself:
                continue
            add(
                "adds-required-column",
                f"adds column {name}.{column} NOT NULL without a default; the stable version "
                "does not write it, so its inserts will fail",
            )
    return findings


def _display(relation: Relation) -> str:
    schema, name = relation
    return name if schema == "public" else f"{schema}.{name}"
