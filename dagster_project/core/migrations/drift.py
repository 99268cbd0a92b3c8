"""Schema drift: compare the schema an environment's migrations define with the live one.

The expected schema is built by applying, to a scratch database on the same server, the
migration files the environment's history records as applied. Both databases are then
snapshotted from pg_catalog with a handful of set-based queries (one per object kind, never
one per table, so 1,000 tables cost about what 10 do) and compared object by object.

A snapshot is a flat mapping `(kind, qualified name) -> attributes`. Attributes are what
Postgres itself prints (format_type, pg_get_expr, pg_get_*def), so a difference reads the way
a DBA would write it. Objects created by extensions, internal triggers and the schemas in
`DEFAULT_EXCLUDED_SCHEMAS` are left out; the database's own name is normalised away so the
scratch copy compares equal to the environment database.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from dagster_project.core import database
from dagster_project.core.migrations import history
from dagster_project.core.migrations.history import HISTORY_SCHEMA, HISTORY_TABLE

DEFAULT_EXCLUDED_SCHEMAS: tuple[str, ...] = (
    HISTORY_SCHEMA,
    "pg_catalog",
    "information_schema",
    "pg_toast",
)

ObjectKey = tuple[str, str]  # (kind, qualified name)


class DriftCheckError(RuntimeError):
    """The drift check could not decide (scratch build failed, history unreadable, ...).

    Callers treat it as blocking: an error is never a pass."""


@dataclass(frozen=True)
class SchemaSnapshot:
    """Every schema object of one database, keyed by `(kind, qualified name)`."""

    database: str
    objects: dict[ObjectKey, dict[str, Any]]
    # Child -> owning relation (columns, indexes, constraints, triggers, policies, owned
    # sequences), so a missing table is reported once rather than once per column.
    parents: dict[ObjectKey, ObjectKey] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.objects)


@dataclass(frozen=True)
class DriftItem:
    kind: str  # table, column, constraint, index, sequence, view, function, enum, ...
    object: str  # qualified name, e.g. public.items.price_cents
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
# Snapshot
# --------------------------------------------------------------------------------------------

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
          AND c.relkind IN ('r', 'p', 'f', 'm', 'c')
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
    relation_keys: dict[tuple[str, str], ObjectKey] = {}

    def put(key: ObjectKey, attrs: dict[str, Any], parent: ObjectKey | None = None) -> None:
        key = (key[0], norm(key[1]))
        objects[key] = {k: norm(v) for k, v in attrs.items()}
        if parent is not None:
            parents[key] = (parent[0], norm(parent[1]))

    with conn.cursor() as cur:
        # One snapshot for all queries, so a concurrent DDL cannot half-appear.
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            rows = _fetch_all(cur, params)
        finally:
            cur.execute("ROLLBACK")

    for (nspname,) in rows["schemas"]:
        put(("schema", _q(nspname)), {})
    for extname, version, nspname in rows["extensions"]:
        put(("extension", _q(extname)), {"version": version, "schema": nspname})
    for (nsp, rel, relkind, persistence, rls, force_rls, partkey, partbound, options,
         viewdef, inherits) in rows["relations"]:  # fmt: skip
        kind = _RELKIND_NAMES[relkind]
        key = (kind, _q(nsp, rel))
        relation_keys[(nsp, rel)] = key
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
        put(key, attrs)
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
        put(("column", _q(nsp, rel, col)), attrs, relation_keys.get((nsp, rel)))
    for nsp, owner, conname, contype, definition, validated, on in rows["constraints"]:
        parent = relation_keys.get((nsp, owner)) if on == "relation" else ("domain", _q(nsp, owner))
        put(
            ("constraint", _q(nsp, owner, conname)),
            {"definition": definition, "validated": validated, "type": contype},
            parent,
        )
    for nsp, table, index, definition, valid, _primary, _unique in rows["indexes"]:
        put(
            ("index", _q(nsp, index)),
            {"definition": definition, "valid": valid},
            relation_keys.get((nsp, table)),
        )
    for (nsp, seq, seq_type, start, increment, minimum, maximum, cache, cycle, owner_nsp,
         owner_rel) in rows["sequences"]:  # fmt: skip
        put(
            ("sequence", _q(nsp, seq)),
            {"type": seq_type, "start": start, "increment": increment, "min": minimum,
             "max": maximum, "cache": cache, "cycle": cycle},
            relation_keys.get((owner_nsp, owner_rel)) if owner_rel else None,
        )  # fmt: skip
    for nsp, name, args, prokind, definition, result in rows["functions"]:
        kind = {"p": "procedure", "a": "aggregate", "w": "window function"}.get(prokind, "function")
        attrs = {"returns": result}
        if definition is not None:
            attrs["definition"] = definition
        put((kind, f"{_q(nsp, name)}({args})"), attrs)
    for nsp, name, typtype, labels, base, notnull, default, subtype in rows["types"]:
        if typtype == "e":
            put(("enum", _q(nsp, name)), {"labels": list(labels or [])})
        elif typtype == "d":
            put(("domain", _q(nsp, name)), {"type": base, "not_null": notnull, "default": default})
        else:
            put(("range type", _q(nsp, name)), {"subtype": subtype})
    for nsp, rel, tgname, definition, enabled in rows["triggers"]:
        put(
            ("trigger", _q(nsp, rel, tgname)),
            {"definition": definition, "enabled": enabled},
            relation_keys.get((nsp, rel)),
        )
    for nsp, rel, polname, cmd, permissive, roles, using, check in rows["policies"]:
        put(
            ("policy", _q(nsp, rel, polname)),
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
    return SchemaSnapshot(database=database_alias or physical_db, objects=objects, parents=parents)


def _fetch_all(cur: psycopg2.extensions.cursor, params: dict[str, Any]) -> dict[str, list]:
    rows: dict[str, list] = {}
    for name, sql in _QUERIES.items():
        try:
            cur.execute(sql, params)
        except psycopg2.Error as exc:
            raise DriftCheckError(
                f"schema snapshot query {name!r} failed: {str(exc).strip()}"
            ) from exc
        rows[name] = cur.fetchall()
    return rows


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


@contextlib.contextmanager
def scratch_database(env: str) -> Iterator[str]:
    """A fresh logical database `scratch_<env>_<random>`, dropped on exit whatever happens."""
    name = f"scratch_{re.sub(r'[^a-z0-9_]', '_', env.lower())}_{secrets.token_hex(4)}"
    database.ensure_database(name)
    try:
        yield name
    finally:
        database.drop_database(name)


def apply_sql_files(db: str, files: Sequence[Path]) -> None:
    """Apply each file in its own transaction, in order; the first failure names the file.

    A file marked `-- migration: no-transaction` (CREATE INDEX CONCURRENTLY) runs statement by
    statement in autocommit, exactly as `history.apply_pending` ran it on the environment.
    """
    with database.connection(db, autocommit=False) as conn:
        for path in files:
            sql = path.read_text(encoding="utf-8")
            try:
                if history.is_no_transaction(sql):
                    conn.autocommit = True
                    try:
                        with conn.cursor() as cur:
                            for statement in history.split_statements(sql):
                                cur.execute(statement.text)
                    finally:
                        conn.autocommit = False
                    continue
                with conn.cursor() as cur:
                    cur.execute(sql)
                conn.commit()
            except psycopg2.Error as exc:
                conn.rollback()
                line = history.line_of_position(sql, exc.diag.statement_position)
                if line is None:
                    line = history.locate_failing_statement(conn, sql)
                where = f" line {line}" if line else ""
                raise DriftCheckError(
                    f"migration {path}{where} failed in the scratch database "
                    f"{database.physical_name(db)!r}: {str(exc).strip()}"
                ) from exc


def _build_expected(
    env: str, migrations_dir: Path, excluded: tuple[str, ...]
) -> tuple[SchemaSnapshot, list[Path]]:
    # No history table means nothing was ever applied: the expected schema is empty.
    files = _migration_files(migrations_dir, applied_migrations(env) or [])
    with scratch_database(env) as scratch:
        apply_sql_files(scratch, files)
        return snapshot_schema(scratch, excluded, database_alias=env), files


def check_drift(
    env: str,
    migrations_dir: Path | str,
    exclude_schemas: Iterable[str] = DEFAULT_EXCLUDED_SCHEMAS,
) -> DriftReport:
    """Compare the live schema of `env` with the one its applied migrations define.

    A report with items blocks; an error raises (DatabaseUnavailable, DriftCheckError)."""
    started = time.perf_counter()
    excluded = tuple(exclude_schemas)
    expected, files = _build_expected(env, Path(migrations_dir), excluded)
    actual = snapshot_schema(env, excluded)
    return DriftReport(
        env=env,
        items=diff(expected, actual),
        expected_count=len(expected),
        actual_count=len(actual),
        seconds=time.perf_counter() - started,
        applied_migrations=[p.name for p in files],
    )
