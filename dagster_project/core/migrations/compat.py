"""Backward compatibility for the canary: pending migrations must not break the stable version.

During a canary the stable version keeps serving on the *migrated* production schema, and
rollback never runs down-migrations. So a pending migration that drops, renames or retypes
something the stable version relies on, or makes its inserts fail (a new NOT NULL column
without default), must block before any traffic shifts.

What the stable version relies on: the relations (tables, views) and columns that the
applied migrations create. Rather than parse DDL (and miss CASCADE, `IF EXISTS`, schema
qualification, ...), the check asks Postgres: it builds the applied schema in a scratch
database on the same server (`catalog.scratch_database`: each applied file in its own
transaction, as it was applied), then runs the pending files one statement at a time and
compares a pg_catalog snapshot (`catalog.snapshot_connection`, reduced to relations and
their columns) before and after each statement. Every change to a relied-on object is
attributed to the exact file and line that caused it. A pending statement that fails on the
scratch database would fail in production too, and blocks as well.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from dagster_project.core import database
from dagster_project.core.migrations import catalog
from dagster_project.core.migrations.history import MigrationFile, Statement, split_statements

EXPAND_THEN_CONTRACT = (
    "During the canary the stable version runs on the migrated schema, so this breaks it "
    "and a rollback cannot undo it. Use expand-then-contract: add the new column or table, "
    "ship code that writes both, backfill, then drop the old one in a later release."
)

# Relations the running version can read or write (snapshot kinds): tables, partitioned
# tables, views, materialized views, foreign tables.
_RELATION_KINDS = frozenset(
    {"table", "partitioned table", "view", "materialized view", "foreign table"}
)

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
    try:
        # Pending statements run in autocommit, one at a time, with a snapshot after each.
        with (
            catalog.scratch_database("compat", applied) as scratch,
            database.connection(scratch) as conn,
        ):
            return _check_pending(conn, _snapshot(conn), pending)
    except catalog.ScratchBuildError as exc:
        return [
            Finding(
                str(exc.path),
                exc.line or 1,
                "cannot-build-stable-schema",
                f"the applied migration fails on a scratch database: {exc.error}; "
                "the stable schema cannot be reconstructed, so compatibility "
                "cannot be judged",
            )
        ]


def _path(item: Path | str | MigrationFile) -> Path:
    return item.path if isinstance(item, MigrationFile) else Path(item)


def _execute(conn: psycopg2.extensions.connection, statement: Statement) -> str | None:
    try:
        with conn.cursor() as cur:
            cur.execute(statement.text)
    except psycopg2.Error as exc:
        return (exc.diag.message_primary or str(exc)).strip()
    return None


def _snapshot(conn: psycopg2.extensions.connection) -> Snapshot:
    """Relations and their columns, from the shared pg_catalog snapshot."""
    full = catalog.snapshot_connection(conn)
    snapshot: Snapshot = {}
    for key in full.objects:
        if key[0] in _RELATION_KINDS:  # a relation without columns still exists
            schema, relation = full.names[key]
            snapshot[(schema, relation)] = {}
    for key, attrs in full.objects.items():
        parent = full.parents.get(key)
        if key[0] != "column" or parent is None or parent[0] not in _RELATION_KINDS:
            continue
        schema, relation, column = full.names[key]
        snapshot[(schema, relation)][column] = Column(
            attrs["type"],
            attrs["not_null"],
            # Identity and generated columns fill themselves on insert, like a default.
            attrs["default"] is not None or "identity" in attrs or "generated" in attrs,
        )
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
