"""Schema drift: compare the schema an environment's migrations define with the live one.

The expected schema is built by applying, to a scratch database on the same server, the
migration files the environment's history records as applied (`catalog.scratch_database`:
each file in its own transaction, as they were applied). Both databases are then snapshotted
from pg_catalog (`catalog.snapshot_schema`: set-based queries, `(kind, qualified name) ->
attributes`, the scratch database's name written as the environment's) and compared object by
object here.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from dagster_project.core import database
from dagster_project.core.migrations import catalog
from dagster_project.core.migrations.catalog import DEFAULT_EXCLUDED_SCHEMAS, SchemaSnapshot
from dagster_project.core.migrations.history import HISTORY_TABLE


class DriftCheckError(RuntimeError):
    """The drift check could not decide (scratch build failed, history unreadable, ...).

    Callers treat it as blocking: an error is never a pass."""


@dataclass(frozen=True)
class DriftItem:
    kind: str  # table, column, constraint, index, sequence, view, function, enum, ...
    object: str  # qualified name, e.g. public.orders.total_cents
    change: str  # missing | unexpected | changed
    expected: dict[str, Any] | None  # changed: only the attributes that differ
    actual: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "object": self.object,
            "change": self.change,
            "expected": self.expected,
            "actual": self.actual,
        }


@dataclass(frozen=True)
class DriftReport:
    env: str
    items: list[DriftItem]
    expected_count: int  # objects in the schema the migrations define
    actual_count: int  # objects in the live schema
    seconds: float
    applied_migrations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.items:
            return (
                f"no schema drift in {self.env}: {self.actual_count} objects match the "
                f"{len(self.applied_migrations)} applied migration(s)"
            )
        counts = {c: sum(1 for i in self.items if i.change == c) for c in _CHANGE_ORDER}
        parts = ", ".join(f"{n} {c}" for c, n in counts.items() if n)
        return f"schema drift in {self.env}: {len(self.items)} difference(s) ({parts})"

    def as_markdown(self) -> str:
        """A table of the differences, for Dagster metadata (`MetadataValue.md`)."""
        if not self.items:
            return f"No schema drift: {self.actual_count} objects match the migrations."
        lines = [
            "| change | kind | object | expected (migrations) | actual (live) |",
            "|---|---|---|---|---|",
        ]
        for item in self.items:
            expected, actual = item.expected, item.actual
            if expected is not None and actual is not None:
                expected, actual = _first_differing_lines(expected, actual)
            lines.append(
                f"| {item.change} | {item.kind} | `{_md_escape(item.object)}` | "
                f"{_md_cell(expected)} | {_md_cell(actual)} |"
            )
        return "\n".join(lines)


_CHANGE_ORDER = ("missing", "unexpected", "changed")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _first_differing_lines(
    expected: dict[str, Any], actual: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """For multi-line values (function bodies, view definitions) show the first line that
    differs, with its number, instead of two truncated and identical-looking prefixes."""
    want, have = dict(expected), dict(actual)
    for key in want.keys() & have.keys():
        a, b = want[key], have[key]
        if not (isinstance(a, str) and isinstance(b, str) and "\n" in a + b):
            continue
        a_lines, b_lines = a.splitlines(), b.splitlines()
        for number in range(1, max(len(a_lines), len(b_lines)) + 1):
            line_a = a_lines[number - 1] if number <= len(a_lines) else "(no line)"
            line_b = b_lines[number - 1] if number <= len(b_lines) else "(no line)"
            if line_a != line_b:
                want[f"{key} line {number}"] = line_a
                have[f"{key} line {number}"] = line_b
                del want[key], have[key]
                break
    return want, have


def _md_cell(attrs: dict[str, Any] | None) -> str:
    if attrs is None:
        return "—"
    text = "; ".join(f"{k}: {_compact(v)}" for k, v in attrs.items())
    if len(text) > 300:  # function bodies and view definitions: keep the table readable
        text = text[:297] + "..."
    return _md_escape(text) or "—"


def _compact(value: Any) -> str:
    if value is None:
        return "null"
    return re.sub(r"\s+", " ", str(value)).strip()


# --------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------


def diff(expected: SchemaSnapshot, actual: SchemaSnapshot) -> list[DriftItem]:
    """Differences, sorted by change then kind then name.

    Children (columns, indexes, ...) of a relation that is itself missing or unexpected are
    folded into that one item."""
    only_expected = expected.objects.keys() - actual.objects.keys()
    only_actual = actual.objects.keys() - expected.objects.keys()
    items: list[DriftItem] = []
    for key in only_expected:
        if expected.parents.get(key) in only_expected:
            continue
        items.append(DriftItem(key[0], key[1], "missing", expected.objects[key], None))
    for key in only_actual:
        if actual.parents.get(key) in only_actual:
            continue
        items.append(DriftItem(key[0], key[1], "unexpected", None, actual.objects[key]))
    for key in expected.objects.keys() & actual.objects.keys():
        want, have = expected.objects[key], actual.objects[key]
        if want == have:
            continue
        changed = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        items.append(
            DriftItem(
                key[0],
                key[1],
                "changed",
                {k: want.get(k) for k in changed},
                {k: have.get(k) for k in changed},
            )
        )
    order = {c: i for i, c in enumerate(_CHANGE_ORDER)}
    items.sort(key=lambda i: (order[i.change], i.kind, i.object))
    return items


# --------------------------------------------------------------------------------------------
# Expected schema and the check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppliedMigration:
    version: str
    filename: str
    sha256: str | None


def applied_migrations(env: str) -> list[AppliedMigration] | None:
    """The migrations the environment's history records as applied, in version order.

    Read directly (never created here: the check must not change the database it checks).
    None when the environment has no history table, i.e. nothing was ever applied."""
    with database.connection(env) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (HISTORY_TABLE,))
        row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        try:
            cur.execute(
                f"SELECT version::text, filename, sha256 FROM {HISTORY_TABLE} "
                "WHERE outcome = 'applied'"
            )
        except psycopg2.Error as exc:
            raise DriftCheckError(
                f"cannot read {HISTORY_TABLE} in database {database.physical_name(env)!r}: "
                f"{str(exc).strip()}"
            ) from exc
        applied = [AppliedMigration(*r) for r in cur.fetchall()]
    # Versions are numeric strings (0001, 0002, ... 10000): order by number, then name.
    return sorted(applied, key=lambda m: (int(m.version) if m.version.isdigit() else 0,
                                          m.version, m.filename))  # fmt: skip


def _migration_files(migrations_dir: Path, applied: Sequence[AppliedMigration]) -> list[Path]:
    files: list[Path] = []
    for migration in applied:
        path = migrations_dir / migration.filename
        if not path.is_file():
            raise DriftCheckError(
                f"migration {migration.filename} is recorded as applied but missing from "
                f"{migrations_dir}; the expected schema cannot be rebuilt"
            )
        if migration.sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != migration.sha256:
            raise DriftCheckError(
                f"migration {path} changed after it was applied (SHA-256 differs from the "
                "history); the expected schema cannot be rebuilt from it"
            )
        files.append(path)
    return files


def _build_expected(
    env: str, migrations_dir: Path, excluded: tuple[str, ...]
) -> tuple[SchemaSnapshot, list[Path]]:
    # No history table means nothing was ever applied: the expected schema is empty.
    files = _migration_files(migrations_dir, applied_migrations(env) or [])
    with catalog.scratch_database(env, files) as scratch:
        return catalog.snapshot_schema(scratch, excluded, database_alias=env), files


def check_drift(
    env: str,
    migrations_dir: Path | str,
    exclude_schemas: Iterable[str] = DEFAULT_EXCLUDED_SCHEMAS,
) -> DriftReport:
    """Compare the live schema of `env` with the one its applied migrations define.

    A report with items blocks; an error raises (DatabaseUnavailable, DriftCheckError)."""
    started = time.perf_counter()
    excluded = tuple(exclude_schemas)
    try:
        expected, files = _build_expected(env, Path(migrations_dir), excluded)
        actual = catalog.snapshot_schema(env, excluded)
    except catalog.CatalogError as exc:  # a scratch build or a snapshot query failed
        raise DriftCheckError(str(exc)) from exc
    return DriftReport(
        env=env,
        items=diff(expected, actual),
        expected_count=len(expected),
        actual_count=len(actual),
        seconds=time.perf_counter() - started,
        applied_migrations=[p.name for p in files],
    )
