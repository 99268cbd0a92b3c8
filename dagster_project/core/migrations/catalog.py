"""The pg_catalog snapshot and the scratch database, shared by the drift and compatibility checks.

`snapshot_schema` / `snapshot_connection` read every schema object of one database with a
handful of set-based pg_catalog queries (one per object kind, never one per table, so 1,000
tables cost about what 10 do), inside one read-only REPEATABLE READ transaction so the result
is consistent. A snapshot is a flat mapping `(kind, qualified name) -> attributes`; the
attributes are what Postgres itself prints (format_type, pg_get_expr, pg_get_*def), so a
difference reads the way a DBA would write it. Objects created by extensions, internal
triggers and the schemas in `DEFAULT_EXCLUDED_SCHEMAS` are left out; a scratch database's name
can be written as another database's (`database_alias`) so a scratch copy compares equal.

`scratch_database(label, files)` creates a fresh logical database `scratch_<label>_<random>`
on the project's server, applies the given migration files, yields its name, and drops it
on exit whatever happens (an error in the build or in the caller's block included).

Transaction behaviour of the build, chosen to match `history.apply_pending` on a real
environment, so a file that applied there rebuilds here and one that failed there fails here:
each file runs in its own transaction (committed when the whole file succeeded, rolled back
otherwise); a file marked `-- migration: no-transaction` (CREATE INDEX CONCURRENTLY) runs
statement by statement in autocommit instead. The first failing file stops the build with a
`ScratchBuildError` naming the file and line.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from dagster_project.core import database
from dagster_project.core.migrations import history
from dagster_project.core.migrations.history import HISTORY_SCHEMA

DEFAULT_EXCLUDED_SCHEMAS: tuple[str, ...] = (
    HISTORY_SCHEMA,
    "pg_catalog",
    "information_schema",
    "pg_toast",
)

ObjectKey = tuple[str, str]  # (kind, qualified name)


class CatalogError(RuntimeError):
    """A snapshot could not be taken or a scratch database could not be built."""


class ScratchBuildError(CatalogError):
    """A migration file failed while building a scratch database; names the file and line."""

    def __init__(self, message: str, *, path: Path, line: int | None, error: str) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.error = error  # Postgres's primary message, e.g. 'relation "x" does not exist'


@dataclass(frozen=True)
class SchemaSnapshot:
    """Every schema object of one database, keyed by `(kind, qualified name)`."""

    database: str
    objects: dict[ObjectKey, dict[str, Any]]
    # Child -> owning relation (columns, indexes, constraints, triggers, policies, owned
    # sequences), so a missing table is reported once rather than once per column.
    parents: dict[ObjectKey, ObjectKey] = field(default_factory=dict)
    # Key -> the unquoted name parts, e.g. ("public", "orders", "total_cents") for a column
    # (the qualified name in the key quotes parts where Postgres would need it).
    names: dict[ObjectKey, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.objects)


# Shared filters: `%(excluded)s` is a tuple of schema names; pg_toast/pg_temp variants are
# per-session artefacts, never part of a schema.
_SCHEMA_FILTER = """
    n.nspname NOT IN %(excluded)s
    AND n.nspname NOT LIKE 'pg\\_toast%%'
    AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
"""


def _not_extension_member(oid: str, catalog: str) -> str:
    """Objects that belong to an extension are the extension's business, not the migrations'."""
    return f"""
    NOT EXISTS (
        SELECT 1 FROM pg_depend d
        WHERE d.classid = {catalog}::regclass AND d.objid = {oid} AND d.deptype = 'e'
    )"""


_RELKIND_NAMES = {
    "r": "table",
    "p": "partitioned table",
    "f": "foreign table",
    "m": "materialized view",
    "v": "view",
    "c": "composite type",
}

_QUERIES: dict[str, str] = {
    "schemas": f"""
        SELECT n.nspname
        FROM pg_namespace n
        WHERE {_SCHEMA_FILTER}
          AND {_not_extension_member("n.oid", "'pg_namespace'")}
    """,
    "extensions": """
        SELECT e.extname, e.extversion, n.nspname
        FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    """,
    "relations": f"""
        SELECT n.nspname, c.relname, c.relkind, c.relpersistence,
               c.relrowsecurity, c.relforcerowsecurity,
               CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
               CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END,
               c.reloptions,
               CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid, true) END,
               ih.parents
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN LATERAL (
            SELECT string_agg(format('%%I.%%I', pn.nspname, p.relname), ', '
                              ORDER BY i.inhseqno) AS parents
            FROM pg_inherits i
            JOIN pg_class p ON p.oid = i.inhparent
            JOIN pg_namespace pn ON pn.oid = p.relnamespace
            WHERE i.inhrelid = c.oid
        ) ih ON true
        WHERE c.relkind IN ('r', 'p', 'f', 'm', 'v', 'c')
          AND {_SCHEMA_FILTER}
          AND {_not_extension_member("c.oid", "'pg_class'")}
          AND NOT (c.relkind = 'c' AND EXISTS (
              SELECT 1 FROM pg_type t WHERE t.typrelid = c.oid AND EXISTS (
                  SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                  AND d.objid = t.oid AND d.deptype = 'e')))
    """,
    "columns": f"""
        SELECT n.nspname, c.relname, a.attname,
               format_type(a.atttypid, a.atttypmod),
               a.attnotnull,
               pg_get_expr(ad.adbin, ad.adrelid),
               a.attidentity, a.attgenerated,
               CASE WHEN a.attcollation <> t.typcollation THEN co.collname END
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
        LEFT JOIN pg_collation co ON co.oid = a.attcollation
        WHERE a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p', 'f', 'm', 'v', 'c')
          AND {_SCHEMA_FILTER}
          AND {_not_extension_member("c.oid", "'pg_class'")}
    """,
    "constraints": f"""
        SELECT n.nspname, coalesce(c.relname, t.typname), co.conname, co.contype,
               pg_get_constraintdef(co.oid), co.convalidated,
               CASE WHEN co.conrelid <> 0 THEN 'relation' ELSE 'domain' END
        FROM pg_constraint co
        JOIN pg_namespace n ON n.oid = co.connamespace
        LEFT JOIN pg_class c ON c.oid = co.conrelid AND co.conrelid <> 0
        LEFT JOIN pg_type t ON t.oid = co.contypid AND co.contypid <> 0
        WHERE {_SCHEMA_FILTER}
          AND (c.oid IS NOT NULL OR t.oid IS NOT NULL)
          AND {
        _not_extension_member(
            "coalesce(c.oid, t.oid)",
            "(CASE WHEN c.oid IS NOT NULL THEN 'pg_class' ELSE 'pg_type' END)",
        )
    }
    """,
    "indexes": f"""
        SELECT n.nspname, t.relname, i.relname, pg_get_indexdef(i.oid),
               x.indisvalid, x.indisprimary, x.indisunique
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = i.relnamespace
        WHERE {_SCHEMA_FILTER}
          AND {_not_extension_member("t.oid", "'pg_class'")}
    """,
    "sequences": f"""
        SELECT n.nspname, c.relname, format_type(s.seqtypid, NULL), s.seqstart,
               s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
               own.nspname, own.relname
        FROM pg_sequence s
        JOIN pg_class c ON c.oid = s.seqrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN LATERAL (
            SELECT tn.nspname, tc.relname
            FROM pg_depend d
            JOIN pg_class tc ON tc.oid = d.refobjid
            JOIN pg_namespace tn ON tn.oid = tc.relnamespace
            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
              AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
            LIMIT 1
        ) own ON true
        WHERE {_SCHEMA_FILTER}
          AND {_not_extension_member("c.oid", "'pg_class'")}
    """,
    "functions": f"""
        SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prokind,
               CASE WHEN p.prokind IN ('f', 'p', 'w') THEN pg_get_functiondef(p.oid) END,
               pg_get_function_result(p.oid)
        FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {_SCHEMA_FILTER}
          AND {_not_extension_member("p.oid", "'pg_proc'")}
          -- Constructors Postgres generates for range types belong to the type.
          AND NOT EXISTS (
              SELECT 1 FROM pg_depend d
              WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'i'
          )
    """,
    "types": f"""
        SELECT n.nspname, t.typname, t.typtype,
               CASE WHEN t.typtype = 'e' THEN (
                   SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
                   FROM pg_enum e WHERE e.enumtypid = t.oid) END,
               CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END,
               CASE WHEN t.typtype = 'd' THEN t.typnotnull END,
               t.typdefault,
               CASE WHEN t.typtype = 'r' THEN format_type(r.rngsubtype, NULL) END
        FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        LEFT JOIN pg_range r ON r.rngtypid = t.oid
        WHERE t.typtype IN ('e', 'd', 'r')
          AND {_SCHEMA_FILTER}
          AND {_not_extension_member("t.oid", "'pg_type'")}
    """,
    "triggers": f"""
        SELECT n.nspname, c.relname, tg.tgname, pg_get_triggerdef(tg.oid), tg.tgenabled
        FROM pg_trigger tg
        JOIN pg_class c ON c.oid = tg.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT tg.tgisinternal
          AND {_SCHEMA_FILTER}
          AND {_not_extension_member("c.oid", "'pg_class'")}
    """,
    "policies": f"""
        SELECT n.nspname, c.relname, pol.polname, pol.polcmd, pol.polpermissive,
               CASE WHEN pol.polroles = '{{0}}' THEN ARRAY['public']
                    ELSE ARRAY(SELECT r.rolname::text FROM pg_roles r
                               WHERE r.oid = ANY(pol.polroles) ORDER BY r.rolname) END,
               pg_get_expr(pol.polqual, pol.polrelid),
               pg_get_expr(pol.polwithcheck, pol.polrelid)
        FROM pg_policy pol
        JOIN pg_class c ON c.oid = pol.polrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_SCHEMA_FILTER}
    """,
}


def _q(*parts: str) -> str:
    """Qualified name for display and keys (quoted only where Postgres would need it)."""
    return ".".join(p if re.fullmatch(r"[a-z_][a-z0-9_$]*", p) else f'"{p}"' for p in parts)


# Names Postgres derives from OIDs (toast tables, internal RI triggers) differ between two
# otherwise identical databases; they are excluded above, and normalised here as a backstop.
_OID_NAME_RE = re.compile(r"\b(pg_toast_|RI_ConstraintTrigger_[ac]_)\d+\b")


class _Normaliser:
    """Rewrites the scratch database's (random) name to the environment's, and OID suffixes.

    Only the scratch side is rewritten: its name is random, so it cannot collide with real
    content, whereas rewriting the environment's name ("staging") could touch a legitimate
    default or table called that and invent drift."""

    def __init__(self, physical_db: str, alias: str | None) -> None:
        self._alias = alias
        renaming = alias is not None and alias != physical_db and physical_db
        self._db_re = re.compile(rf"\b{re.escape(physical_db)}\b") if renaming else None

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            if self._db_re is not None:
                value = self._db_re.sub(str(self._alias), value)
            return _OID_NAME_RE.sub(r"\1<oid>", value)
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


def snapshot_schema(
    db: str,
    exclude_schemas: Iterable[str] = DEFAULT_EXCLUDED_SCHEMAS,
    *,
    database_alias: str | None = None,
) -> SchemaSnapshot:
    """Snapshot every schema object of logical database `db` from pg_catalog.

    `database_alias` (a logical name): write that database's name wherever `db`'s own name
    appears in names or definitions, so a scratch copy compares equal to the original."""
    alias = database.physical_name(database_alias) if database_alias else None
    with database.connection(db) as conn:
        return snapshot_connection(conn, exclude_schemas, database_alias=alias)


def snapshot_connection(
    conn: psycopg2.extensions.connection,
    exclude_schemas: Iterable[str] = DEFAULT_EXCLUDED_SCHEMAS,
    *,
    database_alias: str | None = None,
) -> SchemaSnapshot:
    """Snapshot through an open connection (one read-only transaction, so it is consistent).

    `database_alias` here is a physical database name (see `snapshot_schema`)."""
    params = {"excluded": tuple(exclude_schemas) or ("",)}
    physical_db = conn.get_dsn_parameters().get("dbname", "")
    norm = _Normaliser(physical_db, database_alias)
    objects: dict[ObjectKey, dict[str, Any]] = {}
    parents: dict[ObjectKey, ObjectKey] = {}
    names: dict[ObjectKey, tuple[str, ...]] = {}
    relation_keys: dict[tuple[str, str], ObjectKey] = {}

    def put(
        kind: str,
        parts: tuple[str, ...],
        attrs: dict[str, Any],
        parent: ObjectKey | None = None,
        *,
        suffix: str = "",
    ) -> ObjectKey:
        key = (kind, norm(_q(*parts) + suffix))
        objects[key] = {k: norm(v) for k, v in attrs.items()}
        names[key] = tuple(norm(p) for p in parts)
        if parent is not None:
            parents[key] = (parent[0], norm(parent[1]))
        return key

    with conn.cursor() as cur:
        # One snapshot for all queries, so a concurrent DDL cannot half-appear.
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            rows = _fetch_all(cur, params)
        finally:
            cur.execute("ROLLBACK")

    for (nspname,) in rows["schemas"]:
        put("schema", (nspname,), {})
    for extname, version, nspname in rows["extensions"]:
        put("extension", (extname,), {"version": version, "schema": nspname})
    for (nsp, rel, relkind, persistence, rls, force_rls, partkey, partbound, options,
         viewdef, inherits) in rows["relations"]:  # fmt: skip
        kind = _RELKIND_NAMES[relkind]
        attrs: dict[str, Any] = {}
        if relkind in ("v", "m"):
            attrs["definition"] = viewdef
        if relkind in ("r", "p", "f"):
            attrs["row_level_security"] = rls
            attrs["force_row_level_security"] = force_rls
            if persistence == "u":
                attrs["unlogged"] = True
        if partkey:
            attrs["partition_key"] = partkey
        if partbound:
            attrs["partition_of"] = inherits
            attrs["partition_bound"] = partbound
        elif inherits:
            attrs["inherits"] = inherits
        if options:
            attrs["options"] = sorted(options)
        relation_keys[(nsp, rel)] = put(kind, (nsp, rel), attrs)
    for nsp, rel, col, col_type, notnull, default, identity, generated, collation in rows[
        "columns"
    ]:
        attrs = {"type": col_type, "not_null": notnull, "default": default}
        if identity:
            attrs["identity"] = {"a": "always", "d": "by default"}.get(identity, identity)
        if generated:
            attrs["generated"] = {"s": "stored", "v": "virtual"}.get(generated, generated)
            attrs["default"] = None
            attrs["generation_expression"] = default
        if collation:
            attrs["collation"] = collation
        put("column", (nsp, rel, col), attrs, relation_keys.get((nsp, rel)))
    for nsp, owner, conname, contype, definition, validated, on in rows["constraints"]:
        parent = relation_keys.get((nsp, owner)) if on == "relation" else ("domain", _q(nsp, owner))
        put(
            "constraint",
            (nsp, owner, conname),
            {"definition": definition, "validated": validated, "type": contype},
            parent,
        )
    for nsp, table, index, definition, valid, _primary, _unique in rows["indexes"]:
        put(
            "index",
            (nsp, index),
            {"definition": definition, "valid": valid},
            relation_keys.get((nsp, table)),
        )
    for (nsp, seq, seq_type, start, increment, minimum, maximum, cache, cycle, owner_nsp,
         owner_rel) in rows["sequences"]:  # fmt: skip
        put(
            "sequence",
            (nsp, seq),
            {"type": seq_type, "start": start, "increment": increment, "min": minimum,
             "max": maximum, "cache": cache, "cycle": cycle},
            relation_keys.get((owner_nsp, owner_rel)) if owner_rel else None,
        )  # fmt: skip
    for nsp, name, args, prokind, definition, result in rows["functions"]:
        kind = {"p": "procedure", "a": "aggregate", "w": "window function"}.get(prokind, "function")
        attrs = {"returns": result}
        if definition is not None:
            attrs["definition"] = definition
        put(kind, (nsp, name), attrs, suffix=f"({args})")
    for nsp, name, typtype, labels, base, notnull, default, subtype in rows["types"]:
        if typtype == "e":
            put("enum", (nsp, name), {"labels": list(labels or [])})
        elif typtype == "d":
            put("domain", (nsp, name), {"type": base, "not_null": notnull, "default": default})
        else:
            put("range type", (nsp, name), {"subtype": subtype})
    for nsp, rel, tgname, definition, enabled in rows["triggers"]:
        put(
            "trigger",
            (nsp, rel, tgname),
            {"definition": definition, "enabled": enabled},
            relation_keys.get((nsp, rel)),
        )
    for nsp, rel, polname, cmd, permissive, roles, using, check in rows["policies"]:
        put(
            "policy",
            (nsp, rel, polname),
            {
                "command": {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}.get(
                    cmd, "ALL"
                ),
                "permissive": permissive,
                "roles": list(roles),
                "using": using,
                "with_check": check,
            },
            relation_keys.get((nsp, rel)),
        )
    return SchemaSnapshot(
        database=database_alias or physical_db, objects=objects, parents=parents, names=names
    )


def _fetch_all(cur: psycopg2.extensions.cursor, params: dict[str, Any]) -> dict[str, list]:
    rows: dict[str, list] = {}
    for name, sql in _QUERIES.items():
        try:
            cur.execute(sql, params)
        except psycopg2.Error as exc:
            message = f"schema snapshot query {name!r} failed: {str(exc).strip()}"
            raise CatalogError(message) from exc
        rows[name] = cur.fetchall()
    return rows


# --------------------------------------------------------------------------------------------
# Scratch database
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(label: str, files: Sequence[Path] = ()) -> Iterator[str]:
    """A fresh logical database `scratch_<label>_<random>` with `files` applied, in order.

    Yields its logical name; dropped on exit whatever happens (a failing file, an error in the
    caller's block). Each file runs in its own transaction, as `history.apply_pending` runs it
    on an environment (see the module docstring); the first failure raises `ScratchBuildError`
    naming the file and line."""
    slug = re.sub(r"[^a-z0-9_]", "_", label.lower())[:32]
    name = f"scratch_{slug}_{secrets.token_hex(4)}"
    database.ensure_database(name)
    try:
        apply_files(name, files)
        yield name
    finally:
        database.drop_database(name)


def apply_files(db: str, files: Sequence[Path]) -> None:
    """Apply each file in its own transaction, in order; the first failure raises
    `ScratchBuildError` with the file and line. A file marked `-- migration: no-transaction`
    runs statement by statement in autocommit, as `history.apply_pending` runs it."""
    with database.connection(db, autocommit=False) as conn:
        for path in files:
            sql = path.read_text(encoding="utf-8")
            if history.is_no_transaction(sql):
                _apply_without_transaction(conn, db, path, sql)
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                conn.commit()
            except psycopg2.Error as exc:
                conn.rollback()
                line = history.line_of_position(sql, exc.diag.statement_position)
                if line is None:
                    line = history.locate_failing_statement(conn, sql)
                raise _build_error(db, path, line, exc) from exc


def _apply_without_transaction(
    conn: psycopg2.extensions.connection, db: str, path: Path, sql: str
) -> None:
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in history.split_statements(sql):
                try:
                    cur.execute(statement.text)
                except psycopg2.Error as exc:
                    raise _build_error(db, path, statement.line, exc) from exc
    finally:
        conn.autocommit = False


def _build_error(db: str, path: Path, line: int | None, exc: psycopg2.Error) -> ScratchBuildError:
    error = (exc.diag.message_primary or str(exc)).strip()
    where = f" line {line}" if line else ""
    return ScratchBuildError(
        f"migration {path}{where} failed in the scratch database "
        f"{database.physical_name(db)!r}: {str(exc).strip()}",
        path=path,
        line=line,
        error=error,
    )
