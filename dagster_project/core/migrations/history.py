"""Which migrations an environment has applied, and applying the pending ones.

Each environment database keeps `release_meta.migration_history`: one row per attempt
(version, file name, SHA-256, time, actor, outcome, duration, error). `plan()` compares the
files on disk with the applied rows; anything that would make the recorded history a lie
(an applied file edited or deleted, an unapplied file older than the newest applied one)
is a *problem* and blocks. `apply_pending()` runs each pending file in its own transaction
together with its history row, serialised across processes by an advisory lock.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from dagster_project.core import control_schema, database

# `0001_create_orders.sql`: a numeric version, an underscore, a description.
MIGRATION_NAME_RE = re.compile(r"^(?P<version>\d{4,})_(?P<description>[a-z0-9][a-z0-9_]*)\.sql$")

# `CREATE INDEX CONCURRENTLY` and friends cannot run inside a transaction block. A file that
# carries this line is run statement by statement in autocommit mode instead (so a failure can
# leave earlier statements applied: write them with IF NOT EXISTS so a re-run completes them).
NO_TRANSACTION_MARKER = "-- migration: no-transaction"

HISTORY_SCHEMA = "release_meta"
HISTORY_TABLE = f"{HISTORY_SCHEMA}.migration_history"

# The advisory lock every applier of an environment database takes (`database.advisory_key`;
# locks are per database, so environments do not block each other). The table itself is
# created by core/control_schema.py from sql/environment/0001_migration_history.sql.
_LOCK_NAME = "migrations"


class MigrationError(RuntimeError):
    """A migration could not be planned or applied; the message names the file (and line)."""


@dataclass(frozen=True)
class MigrationFile:
    version: str
    filename: str
    path: Path
    sha256: str

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def in_transaction(self) -> bool:
        """False when the file opts out of the wrapping transaction (NO_TRANSACTION_MARKER)."""
        return not is_no_transaction(self.sql)


def is_no_transaction(sql: str) -> bool:
    return any(line.strip().lower() == NO_TRANSACTION_MARKER for line in sql.splitlines())


@dataclass(frozen=True)
class AppliedMigration:
    version: str
    filename: str
    sha256: str
    applied_at: datetime
    actor: str


@dataclass
class MigrationPlan:
    env: str
    applied: list[AppliedMigration] = field(default_factory=list)
    pending: list[MigrationFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary for check metadata and CLI output."""
        return {
            "env": self.env,
            "applied": [a.filename for a in self.applied],
            "pending": [p.filename for p in self.pending],
            "problems": list(self.problems),
        }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_migrations(migrations_dir: Path | str) -> list[MigrationFile]:
    """The `NNNN_description.sql` files in `migrations_dir`, in version order.

    Any other `.sql` name, or two files with the same version, raises `MigrationError`
    naming the file: a misnamed migration would otherwise be silently skipped.
    """
    directory = Path(migrations_dir)
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    files: list[MigrationFile] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_NAME_RE.match(path.name)
        if match is None:
            raise MigrationError(
                f"migration file {path} is misnamed: expected NNNN_description.sql "
                "(at least four digits, an underscore, lower-case letters/digits/underscores)"
            )
        version = match["version"]
        if version in seen:
            raise MigrationError(
                f"migration files {seen[version]} and {path.name} share version {version}"
            )
        seen[version] = path.name
        files.append(MigrationFile(version, path.name, path, file_sha256(path)))
    return sorted(files, key=lambda f: int(f.version))


def applied_migrations(env: str) -> list[AppliedMigration]:
    """The applied rows of `env`, oldest version first (creates the table on demand)."""
    control_schema.ensure_environment(env)  # the database and its history table
    with database.connection(env) as conn:
        return _applied_rows(conn)


def _applied_rows(conn: psycopg2.extensions.connection) -> list[AppliedMigration]:
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT version, filename, sha256, applied_at, actor FROM {HISTORY_TABLE} "
            "WHERE outcome = 'applied'"
        )
        rows = [AppliedMigration(*row) for row in cur.fetchall()]
    return sorted(rows, key=lambda a: int(a.version))


def history(env: str) -> list[dict[str, Any]]:
    """Every recorded attempt (applied and failed), oldest first, JSON-able."""
    control_schema.ensure_environment(env)
    with database.connection(env) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT version, filename, sha256, applied_at, actor, outcome, duration_ms, error "
            f"FROM {HISTORY_TABLE} ORDER BY id"
        )
        names = [d.name for d in cur.description]
        rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    for row in rows:
        row["applied_at"] = row["applied_at"].isoformat()
    return rows


def compare(env: str, files: list[MigrationFile], applied: list[AppliedMigration]) -> MigrationPlan:
    """Pure comparison of files on disk with applied history (no database access)."""
    on_disk = {f.version: f for f in files}
    applied_versions = {a.version for a in applied}
    result = MigrationPlan(env=env, applied=list(applied))
    for row in applied:
        current = on_disk.get(row.version)
        if current is None:
            result.problems.append(
                f"{row.filename}: applied to {env} on {row.applied_at:%Y-%m-%d %H:%M} but the "
                "file is gone; applied migrations must stay in the repository"
            )
        elif current.sha256 != row.sha256 or current.filename != row.filename:
            result.problems.append(
                f"{current.filename}: changed after it was applied to {env} (recorded "
                f"{row.filename} sha256 {row.sha256[:12]}, now {current.filename} sha256 "
                f"{current.sha256[:12]}); write a new migration instead of editing an applied one"
            )
    newest_applied = max((int(a.version) for a in applied), default=-1)
    for f in files:
        if f.version in applied_versions:
            continue
        if int(f.version) < newest_applied:
            result.problems.append(
                f"{f.filename}: not applied to {env} but older than the newest applied "
                f"migration (version {newest_applied:04d}); renumber it after the applied ones"
            )
        else:
            result.pending.append(f)
    return result


def plan(env: str, migrations_dir: Path | str) -> MigrationPlan:
    """Applied, pending and problems for `env` against the files in `migrations_dir`."""
    return compare(env, read_migrations(migrations_dir), applied_migrations(env))


def apply_pending(env: str, migrations_dir: Path | str, actor: str) -> list[dict[str, Any]]:
    """Apply the pending migrations of `env` in order; returns one dict per applied file.

    Refuses (MigrationError) when the plan has problems. Each file runs in its own
    transaction with its history row; a failing file is rolled back, recorded as 'failed'
    and raised with its file name and line. Concurrent callers queue on an advisory lock
    and re-plan under it, so a second caller applies nothing twice.
    """
    if not actor:
        raise MigrationError("apply_pending needs an actor (who applies the migrations)")
    files = read_migrations(migrations_dir)
    control_schema.ensure_environment(env)
    applied_now: list[dict[str, Any]] = []
    with database.connection(env, autocommit=False) as conn:
        while True:
            with conn.cursor() as cur:
                database.advisory_xact_lock(cur, _LOCK_NAME)
            current = compare(env, files, _applied_rows(conn))
            if current.problems:
                conn.rollback()
                raise MigrationError(f"refusing to migrate {env}: " + "; ".join(current.problems))
            if not current.pending:
                conn.rollback()
                return applied_now
            applied_now.append(_apply_one(conn, env, current.pending[0], actor))


def _apply_one(
    conn: psycopg2.extensions.connection, env: str, migration: MigrationFile, actor: str
) -> dict[str, Any]:
    """Run one file inside the already-open transaction (which holds the advisory lock)."""
    sql = migration.sql
    if file_sha256(migration.path) != migration.sha256:
        conn.rollback()
        raise MigrationError(f"{migration.filename}: changed on disk while migrating {env}")
    if not migration.in_transaction:
        return _apply_one_without_transaction(conn, env, migration, actor, sql)
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    except psycopg2.Error as exc:
        duration_ms = int((time.monotonic() - started) * 1000)
        conn.rollback()
        line = line_of_position(sql, exc.diag.statement_position)
        if line is None:
            line = locate_failing_statement(conn, sql)
        message = _describe_failure(migration, line, exc)
        _record(conn, migration, actor, "failed", duration_ms, message)
        conn.commit()
        raise MigrationError(message) from exc
    duration_ms = int((time.monotonic() - started) * 1000)
    applied_at = _record(conn, migration, actor, "applied", duration_ms, None)
    conn.commit()
    return _applied_summary(env, migration, actor, applied_at, duration_ms)


def _apply_one_without_transaction(
    conn: psycopg2.extensions.connection,
    env: str,
    migration: MigrationFile,
    actor: str,
    sql: str,
) -> dict[str, Any]:
    """Run a no-transaction file statement by statement; other appliers stay queued behind a
    session-level advisory lock (the transaction-level one ends with the first commit)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (database.advisory_key(_LOCK_NAME),))
    conn.commit()
    conn.autocommit = True
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            for statement in split_statements(sql):
                try:
                    cur.execute(statement.text)
                except psycopg2.Error as exc:
                    duration_ms = int((time.monotonic() - started) * 1000)
                    message = (
                        _describe_failure(migration, statement.line, exc)
                        + " (no-transaction migration: statements above this line stay applied)"
                    )
                    _record(conn, migration, actor, "failed", duration_ms, message)
                    raise MigrationError(message) from exc
        duration_ms = int((time.monotonic() - started) * 1000)
        applied_at = _record(conn, migration, actor, "applied", duration_ms, None)
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (database.advisory_key(_LOCK_NAME),))
        conn.autocommit = False
    return _applied_summary(env, migration, actor, applied_at, duration_ms)


def _applied_summary(
    env: str, migration: MigrationFile, actor: str, applied_at: datetime, duration_ms: int
) -> dict[str, Any]:
    return {
        "env": env,
        "version": migration.version,
        "filename": migration.filename,
        "sha256": migration.sha256,
        "applied_at": applied_at.isoformat(),
        "actor": actor,
        "outcome": "applied",
        "duration_ms": duration_ms,
    }


def _record(
    conn: psycopg2.extensions.connection,
    migration: MigrationFile,
    actor: str,
    outcome: str,
    duration_ms: int,
    error: str | None,
) -> datetime:
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {HISTORY_TABLE} "
            "(version, filename, sha256, actor, outcome, duration_ms, error) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING applied_at",
            (
                migration.version,
                migration.filename,
                migration.sha256,
                actor,
                outcome,
                duration_ms,
                error,
            ),
        )
        row = cur.fetchone()
    assert row is not None  # INSERT ... RETURNING always yields the row
    return row[0]


def locate_failing_statement(conn: psycopg2.extensions.connection, sql: str) -> int | None:
    """For errors Postgres reports without a position (a failing cast, a duplicate key while
    building a unique index), re-run the file statement by statement in a transaction that is
    always rolled back, and return the first line of the statement that fails."""
    try:
        with conn.cursor() as cur:
            for statement in split_statements(sql):
                try:
                    cur.execute(statement.text)
                except psycopg2.Error:
                    return statement.line
        return None
    finally:
        conn.rollback()


def _describe_failure(migration: MigrationFile, line: int | None, exc: psycopg2.Error) -> str:
    """`0003_x.sql line 7: syntax error at or near "TABEL"` from a Postgres error."""
    diag = exc.diag
    first_line = (diag.message_primary or str(exc)).strip().splitlines()[0]
    where = f"{migration.filename} line {line}" if line else migration.filename
    detail = f" ({diag.sqlstate})" if diag.sqlstate else ""
    if diag.sqlstate == "25001":  # active_sql_transaction: e.g. CREATE INDEX CONCURRENTLY
        detail += f"; put the line '{NO_TRANSACTION_MARKER}' in the file to run it outside one"
    return f"{where}: {first_line}{detail}"


def line_of_position(sql: str, position: str | int | None) -> int | None:
    """Postgres reports a 1-based character offset into the statement text; as a line number.

    The whole file is sent as one query string, so the offset is into the file.
    """
    if position in (None, ""):
        return None
    offset = int(position)
    return sql[: max(offset - 1, 0)].count("\n") + 1


@dataclass(frozen=True)
class Statement:
    text: str  # the statement without its terminating semicolon
    line: int  # 1-based line of its first non-blank, non-comment character
    end_line: int  # 1-based line of its last character
    # `--` comment lines directly above it (no blank line between), as (line, text).
    comments_above: tuple[tuple[int, str], ...] = ()


# Tokens that can hide a semicolon: quoted strings/identifiers, dollar quotes, comments.
SQL_TOKEN_RE = re.compile(
    r"""
      (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*.*?\*/)
    | (?P<string>(?:[EeBbXxUu]&?)?'(?:[^']|'')*')
    | (?P<ident>"(?:[^"]|"")*")
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$)
    | (?P<semicolon>;)
    """,
    re.VERBOSE | re.DOTALL,
)


def split_statements(sql: str) -> list[Statement]:
    """Split a migration into statements, with line numbers and the comments above each.

    A small lexer rather than a full parser: it only has to know where a `;` is not a
    terminator (inside quotes, dollar-quoted bodies and comments). Statements that are only
    comments are dropped.
    """
    statements: list[Statement] = []
    start = 0
    for match in SQL_TOKEN_RE.finditer(sql):
        if match.lastgroup == "semicolon":
            _append_statement(statements, sql, start, match.start())
            start = match.end()
    _append_statement(statements, sql, start, len(sql))
    return statements


def _append_statement(statements: list[Statement], sql: str, start: int, end: int) -> None:
    first_line = sql[:start].count("\n") + 1
    leading_comments: list[tuple[int, str]] = []
    body: list[tuple[int, str]] = []
    for offset, raw in enumerate(sql[start:end].split("\n")):
        stripped = raw.strip()
        if not body:
            if not stripped:
                leading_comments.clear()  # a blank line detaches comments from the statement
                continue
            if stripped.startswith("--"):
                leading_comments.append((first_line + offset, stripped))
                continue
        body.append((first_line + offset, raw))
    while body and not body[-1][1].strip():
        body.pop()
    if body:
        text = "\n".join(raw for _, raw in body).strip()
        statements.append(Statement(text, body[0][0], body[-1][0], tuple(leading_comments)))
