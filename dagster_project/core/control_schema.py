"""The project's own tables, created by one mechanism from versioned SQL files.

`sql/control/NNNN_name.sql` build the control database (`release_control`: schemas `platform`,
`registry`, `audit`); `sql/environment/NNNN_name.sql` the bookkeeping of each environment
database (`release_meta.migration_history`). `ensure(database, kind)` applies the files of a
set that the database has not seen, in version order, each once, and records them in
`release_meta.control_schema_versions` (schema_set, version, filename, sha256, applied_at).
All of it runs in one transaction under the advisory lock `control-schema` (concurrent
CREATE ... IF NOT EXISTS races on the catalog), so any number of processes may call it at once.
A file edited after it was applied, or an applied file that is gone, is refused naming the
file: add a new file instead. Each process does the work once per database
(`database.applied_schemas`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dagster_project.core import database

Kind = Literal["control", "environment"]
SQL_DIR = Path(__file__).parent / "sql"
VERSION_TABLE = "release_meta.control_schema_versions"
LOCK_NAME = "control-schema"
FILE_NAME_RE = re.compile(r"^(?P<version>\d{4})_[a-z0-9_]+\.sql$")

_VERSION_TABLE_DDL = f"""
CREATE SCHEMA IF NOT EXISTS release_meta;
CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
    schema_set text        NOT NULL,
    version    integer     NOT NULL,
    filename   text        NOT NULL,
    sha256     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_set, version)
);
"""


class SchemaError(RuntimeError):
    """A schema file could not be applied, or differs from the one applied; names the file."""


@dataclass(frozen=True)
class SchemaFile:
    version: int
    filename: str
    sql: str
    sha256: str


def files(kind: Kind) -> list[SchemaFile]:
    """The set's files in version order (a misnamed file or a repeated version is an error)."""
    found: dict[int, SchemaFile] = {}
    for path in sorted((SQL_DIR / kind).glob("*.sql")):
        match = FILE_NAME_RE.match(path.name)
        if match is None:
            raise SchemaError(f"schema file {path} is misnamed: expected NNNN_name.sql")
        version = int(match["version"])
        if version in found:
            raise SchemaError(
                f"schema files {found[version].filename} and {path.name} share version {version}"
            )
        data = path.read_bytes()
        found[version] = SchemaFile(
            version, path.name, data.decode("utf-8"), hashlib.sha256(data).hexdigest()
        )
    return [found[version] for version in sorted(found)]


def ensure(database_name: str = database.CONTROL_DB, kind: Kind = "control") -> list[str]:
    """Apply the set's pending files to the database (created if missing); returns the file
    names applied by this call (none when another process or an earlier call did it)."""
    key = (database.server().dsn(database_name), kind)
    if key in database.applied_schemas:
        return []
    schema_files = files(kind)
    database.ensure_database(database_name)
    applied: list[str] = []
    with database.connection(database_name, autocommit=False) as conn:
        with conn.cursor() as cur:
            database.advisory_xact_lock(cur, LOCK_NAME)
            cur.execute(_VERSION_TABLE_DDL)
            cur.execute(
                f"SELECT version, filename, sha256 FROM {VERSION_TABLE} WHERE schema_set = %s",
                (kind,),
            )
            recorded = {int(version): (name, sha) for version, name, sha in cur.fetchall()}
            problems = _problems(kind, database_name, schema_files, recorded)
            if problems:
                raise SchemaError("; ".join(problems))
            for schema_file in schema_files:
                if schema_file.version in recorded:
                    continue
                try:
                    cur.execute(schema_file.sql)
                except Exception as exc:
                    raise SchemaError(
                        f"{kind} schema file {schema_file.filename} failed on database "
                        f"{database.physical_name(database_name)!r}: {str(exc).strip()}"
                    ) from exc
                cur.execute(
                    f"INSERT INTO {VERSION_TABLE} (schema_set, version, filename, sha256) "
                    "VALUES (%s, %s, %s, %s)",
                    (kind, schema_file.version, schema_file.filename, schema_file.sha256),
                )
                applied.append(schema_file.filename)
        conn.commit()
    database.applied_schemas.add(key)
    return applied


def ensure_environment(env: str) -> list[str]:
    """`ensure` for an environment database (`staging`, `production`, or a test's)."""
    return ensure(env, "environment")


def _problems(
    kind: Kind,
    database_name: str,
    schema_files: list[SchemaFile],
    recorded: dict[int, tuple[str, str]],
) -> list[str]:
    where = f"database {database.physical_name(database_name)!r}"
    on_disk = {f.version: f for f in schema_files}
    problems = []
    for version, (name, sha) in sorted(recorded.items()):
        current = on_disk.get(version)
        if current is None:
            problems.append(
                f"{kind} schema file {name} was applied to {where} but is no longer in "
                f"{SQL_DIR / kind} (this code is older than the database)"
            )
        elif current.sha256 != sha:
            problems.append(
                f"{kind} schema file {current.filename} was edited after it was applied to "
                f"{where} (sha256 {sha[:12]}… applied, {current.sha256[:12]}… on disk): "
                "restore it and put the change in a new file"
            )
    return problems
