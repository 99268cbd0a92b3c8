"""Schema drift through the real path: migrations applied with the history module to a real
environment database, the live schema altered by hand, the check run against a scratch copy
built on the same embedded Postgres."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_project.core import database
from dagster_project.core.migrations import catalog, drift, history

MIGRATIONS = {
    "0001_items.sql": """
CREATE TYPE job_status AS ENUM ('queued', 'running', 'done', 'failed');
CREATE TABLE items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    price_cents integer NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX items_name_idx ON items (name);
""",
    "0002_jobs.sql": """
CREATE TABLE jobs (
    job_key text PRIMARY KEY,
    status job_status NOT NULL DEFAULT 'queued',
    item_id bigint REFERENCES items (id),
    attempts integer NOT NULL DEFAULT 0
);
CREATE INDEX jobs_status_idx ON jobs (status) WHERE status <> 'done';
CREATE SEQUENCE ticket_seq START 100 INCREMENT 5;
CREATE VIEW item_prices AS SELECT id, price_cents / 100.0 AS price FROM items;
""",
    "0003_touch.sql": """
CREATE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER items_touch BEFORE UPDATE ON items
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
""",
    "0004_rls.sql": """
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
CREATE POLICY items_visible ON items FOR SELECT USING (price_cents >= 0);
CREATE MATERIALIZED VIEW job_counts AS SELECT status, count(*) AS n FROM jobs GROUP BY status;
""",
    "0005_more_kinds.sql": """
CREATE SCHEMA reporting;
CREATE DOMAIN reporting.cents AS bigint NOT NULL DEFAULT 0 CHECK (VALUE >= 0);
CREATE TYPE reporting.money_pair AS (amount reporting.cents, currency char(3));
CREATE TYPE reporting.price_range AS RANGE (subtype = bigint);
CREATE TABLE reporting.events (
    id bigserial,
    at timestamptz NOT NULL,
    label text COLLATE "C",
    total bigint GENERATED ALWAYS AS (id * 2) STORED,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE TABLE reporting.events_2025 PARTITION OF reporting.events
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE UNLOGGED TABLE reporting.cache (k text PRIMARY KEY, v jsonb) WITH (fillfactor = 70);
CREATE PROCEDURE reporting.purge_cache(older_than interval) LANGUAGE sql AS $$
    DELETE FROM reporting.cache WHERE v ? 'expired'
$$;
CREATE AGGREGATE reporting.total_cents (bigint) (sfunc = int8pl, stype = bigint);
ALTER TABLE reporting.cache ENABLE ROW LEVEL SECURITY;
ALTER TABLE reporting.cache FORCE ROW LEVEL SECURITY;
CREATE POLICY cache_insert ON reporting.cache FOR INSERT TO PUBLIC WITH CHECK (k <> '');
""",
}


KINDS_CREATED = (
    "table",
    "column",
    "constraint",
    "index",
    "sequence",
    "view",
    "materialized view",
    "function",
    "enum",
    "trigger",
    "policy",
    "extension",
)


def _write(directory: Path, names: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text(MIGRATIONS[name], encoding="utf-8")
    return directory


@pytest.fixture
def env() -> Iterator[str]:
    """A fresh environment database per test (the check must not depend on test order)."""
    name = f"drift_env_{secrets.token_hex(3)}"
    database.ensure_database(name)
    yield name
    database.drop_database(name)


def _execute(env: str, sql: str) -> None:
    with database.connection(env) as conn, conn.cursor() as cur:
        cur.execute(sql)


def _scratch_databases() -> list[str]:
    with database.connection("postgres") as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            (database.physical_name("scratch\\_") + "%",),
        )
        return [row[0] for row in cur.fetchall()]


def _migrated(env: str, tmp_path: Path, names: list[str] | None = None) -> Path:
    migrations = _write(tmp_path / "migrations", names or sorted(MIGRATIONS))
    applied = history.apply_pending(env, migrations, actor="test")
    assert [a["filename"] for a in applied] == (names or sorted(MIGRATIONS))
    return migrations


@pytest.mark.slow
def test_untouched_schema_has_no_drift(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path)
    report = drift.check_drift(env, migrations)
    assert report.items == [], report.as_markdown()
    assert report.applied_migrations == sorted(MIGRATIONS)
    # Every kind the migrations create is in the snapshot, so "no drift" means something.
    kinds = Counter(kind for kind, _name in catalog.snapshot_schema(env).objects)
    for kind in KINDS_CREATED:
        assert kinds.get(kind, 0) >= 1, kind
    assert report.expected_count == report.actual_count == sum(kinds.values())
    assert "No schema drift" in report.as_markdown()


@pytest.mark.slow
def test_no_false_positives_across_several_releases(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path, ["0001_items.sql", "0002_jobs.sql"])
    assert drift.check_drift(env, migrations).items == []
    # Pending files on disk are not drift: only applied ones define the expected schema.
    _write(migrations, ["0003_touch.sql", "0004_rls.sql", "0005_more_kinds.sql"])
    pending_report = drift.check_drift(env, migrations)
    assert pending_report.items == []
    assert pending_report.applied_migrations == ["0001_items.sql", "0002_jobs.sql"]
    # The next release applies them; still no drift.
    history.apply_pending(env, migrations, actor="test")
    report = drift.check_drift(env, migrations)
    assert report.items == [], report.as_markdown()
    assert len(report.applied_migrations) == 5


HAND_CHANGES = [
    (
        "added column",
        "ALTER TABLE items ADD COLUMN colour text",
        ("column", "public.items.colour", "unexpected"),
    ),
    (
        "dropped index",
        "DROP INDEX items_name_idx",
        ("index", "public.items_name_idx", "missing"),
    ),
    (
        "changed default",
        "ALTER TABLE items ALTER COLUMN price_cents SET DEFAULT 100",
        ("column", "public.items.price_cents", "changed"),
    ),
    (
        "dropped not null",
        "ALTER TABLE jobs ALTER COLUMN attempts DROP NOT NULL",
        ("column", "public.jobs.attempts", "changed"),
    ),
    (
        "extra table",
        "CREATE TABLE scratchpad (id int PRIMARY KEY, note text NOT NULL)",
        ("table", "public.scratchpad", "unexpected"),
    ),
    (
        "changed function body",
        """CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NEW;
END
$$""",
        ("function", "public.touch_updated_at()", "changed"),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("label", "alter_sql", "expected"), HAND_CHANGES, ids=[h[0] for h in HAND_CHANGES]
)
def test_hand_change_is_detected_and_named(
    env: str, tmp_path: Path, label: str, alter_sql: str, expected: tuple[str, str, str]
) -> None:
    migrations = _migrated(env, tmp_path)
    assert drift.check_drift(env, migrations).items == []
    _execute(env, alter_sql)
    report = drift.check_drift(env, migrations)
    assert report.items, label
    found = {(i.kind, i.object, i.change) for i in report.items}
    assert expected in found, (label, found)
    markdown = report.as_markdown()
    assert expected[1] in markdown and expected[2] in markdown
    assert report.summary().startswith(f"schema drift in {env}")


@pytest.mark.slow
def test_changed_items_show_only_the_differing_attributes(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path)
    _execute(env, "ALTER TABLE items ALTER COLUMN price_cents SET DEFAULT 100")
    _execute(env, "ALTER TABLE jobs ALTER COLUMN attempts DROP NOT NULL")
    items = {i.object: i for i in drift.check_drift(env, migrations).items}
    price = items["public.items.price_cents"]
    assert (price.expected, price.actual) == ({"default": "0"}, {"default": "100"})
    attempts = items["public.jobs.attempts"]
    assert (attempts.expected, attempts.actual) == ({"not_null": True}, {"not_null": False})
    # Postgres 18 records NOT NULL as a constraint too: it is reported missing.
    assert items["public.jobs.jobs_attempts_not_null"].change == "missing"


@pytest.mark.slow
def test_extra_table_is_one_item_not_one_per_column(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path)
    _execute(env, "CREATE TABLE scratchpad (id int PRIMARY KEY, note text NOT NULL)")
    items = drift.check_drift(env, migrations).items
    assert [(i.kind, i.object, i.change) for i in items] == [
        ("table", "public.scratchpad", "unexpected")
    ]


@pytest.mark.slow
def test_no_history_means_expected_is_empty(env: str, tmp_path: Path) -> None:
    _execute(env, "CREATE TABLE handmade (id int)")
    report = drift.check_drift(env, _write(tmp_path / "m", ["0001_items.sql"]))
    assert report.applied_migrations == []
    assert ("table", "public.handmade", "unexpected") in {
        (i.kind, i.object, i.change) for i in report.items
    }


@pytest.mark.slow
def test_release_meta_is_ignored(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path)
    _execute(env, "CREATE TABLE release_meta.anything_goes (id int)")
    assert drift.check_drift(env, migrations).items == []


@pytest.mark.slow
def test_edited_applied_migration_is_an_error(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path)
    (migrations / "0002_jobs.sql").write_text(MIGRATIONS["0002_jobs.sql"] + "\n-- edited\n")
    with pytest.raises(drift.DriftCheckError, match=r"0002_jobs\.sql changed after it was applied"):
        drift.check_drift(env, migrations)
    (migrations / "0002_jobs.sql").unlink()
    with pytest.raises(drift.DriftCheckError, match=r"0002_jobs\.sql is recorded as applied"):
        drift.check_drift(env, migrations)


@pytest.mark.slow
def test_migration_failing_in_scratch_is_an_error_and_scratch_is_dropped(
    env: str, tmp_path: Path
) -> None:
    # The migration only worked in the environment because of a table made by hand there.
    _execute(env, "CREATE TABLE legacy (id int)")
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_extend_legacy.sql").write_text(
        "CREATE TABLE fresh (id int);\n\nALTER TABLE legacy ADD COLUMN note text;\n"
    )
    history.apply_pending(env, migrations, actor="test")
    before = _scratch_databases()
    with pytest.raises(drift.DriftCheckError) as failure:
        drift.check_drift(env, migrations)
    message = str(failure.value)
    assert "0001_extend_legacy.sql line 3" in message
    assert 'relation "legacy" does not exist' in message
    assert _scratch_databases() == before == []


@pytest.mark.slow
def test_scratch_databases_are_dropped_after_success(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path)
    drift.check_drift(env, migrations)  # builds the expected schema in a scratch database
    assert _scratch_databases() == []


@pytest.mark.slow
def test_missing_environment_database_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(database.DatabaseUnavailable, match="drift_env_never_created"):
        drift.check_drift("drift_env_never_created", tmp_path)


@pytest.mark.slow
def test_unreachable_server_is_an_error_not_a_pass(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Port 9 on loopback: nothing listens, so the connection is refused at once.
    monkeypatch.setenv(database.ENV_URL, "postgresql://postgres@127.0.0.1:9/postgres")
    with pytest.raises(database.DatabaseUnavailable, match=r"127\.0\.0\.1:9"):
        drift.check_drift("staging", tmp_path)


def test_diff_is_pure_and_ordered() -> None:
    expected = catalog.SchemaSnapshot(
        "a",
        {
            ("table", "public.t"): {"row_level_security": False},
            ("column", "public.t.a"): {"type": "integer", "not_null": True, "default": None},
            ("index", "public.t_a_idx"): {"definition": "CREATE INDEX ...", "valid": True},
        },
        {("column", "public.t.a"): ("table", "public.t")},
    )
    actual = catalog.SchemaSnapshot(
        "b",
        {
            ("table", "public.t"): {"row_level_security": True},
            ("column", "public.t.a"): {"type": "integer", "not_null": True, "default": None},
            ("table", "public.u"): {"row_level_security": False},
            ("column", "public.u.b"): {"type": "text", "not_null": False, "default": None},
        },
        {("column", "public.u.b"): ("table", "public.u")},
    )
    items = drift.diff(expected, actual)
    assert [(i.change, i.kind, i.object) for i in items] == [
        ("missing", "index", "public.t_a_idx"),
        ("unexpected", "table", "public.u"),
        ("changed", "table", "public.t"),
    ]
    assert items[2].expected == {"row_level_security": False}
    assert items[2].actual == {"row_level_security": True}
    assert drift.diff(expected, expected) == []
    report = drift.DriftReport("staging", items, 3, 4, 0.1, [])
    markdown = report.as_markdown()
    assert markdown.count("\n") == 4  # header, rule, three rows
    assert "| missing | index | `public.t_a_idx` |" in markdown
    assert len(report.items) == 3


@pytest.mark.slow
def test_environment_name_in_content_is_not_drift(env: str, tmp_path: Path) -> None:
    # A table and a default spelled like the environment database must survive the
    # normalisation that maps the scratch database's name onto the environment's.
    physical = database.physical_name(env)
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_named.sql").write_text(
        f"CREATE TABLE {physical} (origin text NOT NULL DEFAULT '{physical}');\n"
        f"CREATE VIEW {physical}_v AS SELECT '{physical}'::text AS origin;\n"
    )
    history.apply_pending(env, migrations, actor="test")
    report = drift.check_drift(env, migrations)
    assert report.items == [], report.as_markdown()
    assert ("table", f"public.{physical}") in catalog.snapshot_schema(env).objects


@pytest.mark.slow
def test_scratch_name_is_written_as_the_environment_name(env: str) -> None:
    with catalog.scratch_database(env) as scratch:
        scratch_physical = database.physical_name(scratch)
        _execute(scratch, f"CREATE VIEW v AS SELECT '{scratch_physical}'::text AS source")
        plain = catalog.snapshot_schema(scratch)
        aliased = catalog.snapshot_schema(scratch, database_alias=env)
    assert scratch_physical in plain.objects[("view", "public.v")]["definition"]
    definition = aliased.objects[("view", "public.v")]["definition"]
    assert scratch_physical not in definition
    assert database.physical_name(env) in definition
    assert aliased.database == database.physical_name(env)
    assert _scratch_databases() == []


@pytest.mark.slow
def test_changed_function_body_shows_the_differing_line(env: str, tmp_path: Path) -> None:
    migrations = _migrated(env, tmp_path)
    _execute(env, HAND_CHANGES[-1][1])
    report = drift.check_drift(env, migrations)
    markdown = report.as_markdown()
    assert "definition line 6: NEW.updated_at := now();" in markdown
    assert "definition line 6: RETURN NEW;" in markdown
    function = next(i for i in report.items if i.kind == "function")
    assert function.expected is not None and "NEW.updated_at" in function.expected["definition"]


@pytest.mark.slow
def test_no_transaction_migration_rebuilds_in_scratch_without_drift(tmp_path) -> None:
    """A CONCURRENTLY index file (marked no-transaction) applies in scratch as it did live."""
    from dagster_project.core import database
    from dagster_project.core.migrations import drift, history

    env = "drift_notx"
    database.ensure_database(env)
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_table.sql").write_text("CREATE TABLE t (id BIGINT PRIMARY KEY, v TEXT);\n")
    (migrations / "0002_index.sql").write_text(
        "-- migration: no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS t_v_idx ON t (v);\n"
    )
    history.apply_pending(env, migrations, "test")
    report = drift.check_drift(env, migrations)
    assert report.items == [], report.as_markdown()
    assert report.expected_count == report.actual_count > 0
    database.drop_database(env)
