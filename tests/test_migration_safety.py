"""Migration safety through the real squawk binary and the project's own rules, plus the
backward-compatibility check for the canary."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagster_project.core.migrations import compat, safety

TIMEOUTS = "SET lock_timeout = '2s';\nSET statement_timeout = '5min';\n"
NO_TX = "-- migration: no-transaction\n"

# (rule, failing migration, passing migration). Each body is checked as a pending file that
# runs after a schema with `orders(id bigint, note text, customer_id bigint)` and `customers`.
# Drops and renames have no safe spelling: their passing form is the same statement with a
# reasoned waiver (the contract step of expand-then-contract), asserted as waived below.
RULE_CASES: list[tuple[str, str, str]] = [
    (
        "require-concurrent-index-creation",
        TIMEOUTS + "CREATE INDEX orders_note ON orders (note);\n",
        NO_TX
        + TIMEOUTS
        + "CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_note ON orders (note);\n",
    ),
    (
        "adding-required-field",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN status text NOT NULL;\n",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';\n",
    ),
    (
        "changing-column-type",
        TIMEOUTS + "ALTER TABLE orders ALTER COLUMN customer_id TYPE numeric;\n",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN customer_ref numeric;\n",
    ),
    (
        "adding-field-with-default",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN token uuid DEFAULT gen_random_uuid();\n",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN created_at timestamptz DEFAULT now();\n",
    ),
    (
        "ban-drop-column",
        TIMEOUTS + "ALTER TABLE orders DROP COLUMN note;\n",
        TIMEOUTS + "-- safety: allow ban-drop-column because release 1.3 stopped reading note\n"
        "ALTER TABLE orders DROP COLUMN note;\n",
    ),
    (
        "ban-drop-table",
        TIMEOUTS + "DROP TABLE customers;\n",
        TIMEOUTS + "-- safety: allow ban-drop-table because unused since release 1.2\n"
        "DROP TABLE customers;\n",
    ),
    (
        "renaming-column",
        TIMEOUTS + "ALTER TABLE orders RENAME COLUMN note TO remark;\n",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN remark text;\n",
    ),
    (
        "renaming-table",
        TIMEOUTS + "ALTER TABLE customers RENAME TO clients;\n",
        TIMEOUTS + "CREATE TABLE clients (id bigint PRIMARY KEY, name text);\n",
    ),
    (
        "adding-foreign-key-constraint",
        TIMEOUTS + "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk "
        "FOREIGN KEY (customer_id) REFERENCES customers (id);\n",
        TIMEOUTS + "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk "
        "FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;\n",
    ),
    (
        "constraint-missing-not-valid",
        TIMEOUTS + "ALTER TABLE orders ADD CONSTRAINT orders_id_positive CHECK (id > 0);\n",
        TIMEOUTS
        + "ALTER TABLE orders ADD CONSTRAINT orders_id_positive CHECK (id > 0) NOT VALID;\n",
    ),
    (
        "disallowed-unique-constraint",
        TIMEOUTS + "ALTER TABLE orders ADD CONSTRAINT orders_note_key UNIQUE (note);\n",
        TIMEOUTS + "ALTER TABLE orders ADD CONSTRAINT orders_note_key "
        "UNIQUE USING INDEX orders_note_idx;\n",
    ),
    (
        "require-lock-timeout",
        "SET statement_timeout = '5min';\nALTER TABLE orders ADD COLUMN status text;\n",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN status text;\n",
    ),
    # Own rules (squawk 2.x has none of these).
    ("ban-vacuum-full", TIMEOUTS + "VACUUM FULL orders;\n", TIMEOUTS + "ANALYZE orders;\n"),
    (
        "ban-cluster",
        TIMEOUTS + "CLUSTER orders USING orders_pkey;\n",
        TIMEOUTS + "ANALYZE orders;\n",
    ),
    (
        "require-concurrent-refresh",
        TIMEOUTS + "REFRESH MATERIALIZED VIEW order_totals;\n",
        TIMEOUTS + "REFRESH MATERIALIZED VIEW CONCURRENTLY order_totals;\n",
    ),
    (
        "ban-lock-table",
        TIMEOUTS + "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE;\n"
        "ALTER TABLE orders ADD COLUMN status text;\n",
        TIMEOUTS + "ALTER TABLE orders ADD COLUMN status text;\n",
    ),
    (
        "ban-truncate",
        TIMEOUTS + "TRUNCATE orders;\n",
        TIMEOUTS + "DELETE FROM orders WHERE id < 0;\n",
    ),
    (
        "ban-table-rewrite",
        TIMEOUTS + "ALTER TABLE orders SET UNLOGGED;\n",
        TIMEOUTS + "ALTER TABLE orders SET (fillfactor = 90);\n",
    ),
    (
        "ban-unbounded-dml",
        TIMEOUTS + "UPDATE orders SET note = 'WHERE';\n",
        TIMEOUTS + "CREATE TABLE audit_notes (id bigint PRIMARY KEY, note text);\n"
        "UPDATE audit_notes SET note = 'x';\nUPDATE orders SET note = '' WHERE note IS NULL;\n",
    ),
]


def write(directory: Path, name: str, sql: str) -> Path:
    path = directory / name
    path.write_text(sql, encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "failing", "passing"), RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_rule_fails_the_unsafe_form_and_passes_the_safe_one(
    tmp_path: Path, rule: str, failing: str, passing: str
) -> None:
    bad = write(tmp_path, "0005_unsafe.sql", failing)
    good = write(tmp_path, "0006_safe.sql", passing)
    bad_report = safety.check_safety([bad])
    assert bad_report.errors == []
    assert not bad_report.ok
    hits = [f for f in bad_report.findings if f.rule == rule]
    assert hits, f"{rule} not reported; got {[f.rule for f in bad_report.findings]}"
    assert all(f.file == str(bad) and f.line >= 1 and f.message for f in hits)

    good_report = safety.check_safety([good])
    assert good_report.errors == []
    assert good_report.findings == [], [str(f) for f in good_report.findings]
    assert good_report.ok
    assert all(w.rule == rule for w in good_report.waivers)


@pytest.mark.slow
def test_finding_line_points_at_the_statement(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "0007_drop.sql",
        TIMEOUTS + "\nALTER TABLE orders ADD COLUMN status text;\n\nALTER TABLE orders\n"
        "    DROP COLUMN note;\n",
    )
    report = safety.check_safety([path])
    # squawk points at the DROP COLUMN clause, inside the statement that starts on line 6.
    assert [(f.rule, f.line) for f in report.findings] == [("ban-drop-column", 7)]
    assert report.findings[0].source == "squawk"
    # ... and a waiver above the statement's first line still covers it.
    waived = path.read_text().replace(
        "ALTER TABLE orders\n",
        "-- safety: allow ban-drop-column because unused\nALTER TABLE orders\n",
    )
    path.write_text(waived)
    report = safety.check_safety([path])
    assert report.findings == [] and [(w.rule, w.line) for w in report.waivers] == [
        ("ban-drop-column", 8)
    ]


@pytest.mark.slow
def test_waiver_with_reason_is_accepted_and_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "0008_contract.sql",
        TIMEOUTS
        + "-- safety: allow ban-drop-column because 1.3 stopped reading note (expand in 0004)\n"
        "ALTER TABLE orders DROP COLUMN note;\n"
        "ALTER TABLE orders DROP COLUMN customer_id;\n",
    )
    report = safety.check_safety([path])
    assert [(w.rule, w.file, w.line) for w in report.waivers] == [("ban-drop-column", str(path), 4)]
    assert report.waivers[0].reason == "1.3 stopped reading note (expand in 0004)"
    # The waiver covers its own statement only: the next drop still blocks.
    assert [(f.rule, f.line) for f in report.findings] == [("ban-drop-column", 5)]
    assert report.as_dict()["waivers"][0]["reason"].startswith("1.3 stopped")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("comment", "rule"),
    [
        ("-- safety: allow ban-drop-column", "waiver-without-reason"),
        ("-- safety: allow ban-drop-column because   ", "waiver-without-reason"),
        ("-- safety: please let this through", "invalid-waiver"),
    ],
)
def test_waiver_without_reason_is_refused(tmp_path: Path, comment: str, rule: str) -> None:
    path = write(
        tmp_path, "0009_drop.sql", TIMEOUTS + f"{comment}\nALTER TABLE orders DROP COLUMN note;\n"
    )
    report = safety.check_safety([path])
    assert report.waivers == []
    assert {(f.rule, f.line) for f in report.findings} == {(rule, 3), ("ban-drop-column", 4)}
    assert not report.ok


@pytest.mark.slow
def test_waiver_for_another_rule_does_not_apply(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "0010_drop.sql",
        TIMEOUTS + "-- safety: allow ban-drop-table because wrong rule\n"
        "ALTER TABLE orders DROP COLUMN note;\n",
    )
    report = safety.check_safety([path])
    assert [f.rule for f in report.findings] == ["ban-drop-column"]
    assert report.waivers == []


@pytest.mark.slow
def test_syntax_error_is_a_finding_not_a_pass(tmp_path: Path) -> None:
    path = write(tmp_path, "0011_typo.sql", TIMEOUTS + "ALTER TABEL orders ADD COLUMN x text;\n")
    report = safety.check_safety([path])
    assert "syntax-error" in {f.rule for f in report.findings}
    assert not report.ok


def test_missing_squawk_binary_is_an_error_that_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "0012_ok.sql", TIMEOUTS + "ALTER TABLE orders ADD COLUMN x text;\n")
    monkeypatch.setattr(safety, "squawk_binary", lambda: tmp_path / "no-such-squawk")
    report = safety.check_safety([path])
    assert report.findings == []
    assert len(report.errors) == 1 and "no-such-squawk" in report.errors[0]
    assert not report.ok


@pytest.mark.slow
def test_squawk_crash_is_an_error_that_blocks(tmp_path: Path) -> None:
    path = write(tmp_path, "0013_ok.sql", TIMEOUTS + "ALTER TABLE orders ADD COLUMN x text;\n")
    # An invalid --pg-version makes the real squawk exit with status 2.
    report = safety.check_safety([path], pg_version="not-a-version")
    assert report.errors and "status 2" in report.errors[0]
    assert not report.ok


def test_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    report = safety.check_safety([tmp_path / "0014_missing.sql"])
    assert report.errors and "0014_missing.sql" in report.errors[0]
    assert not report.ok


@pytest.mark.slow
def test_server_pg_version_reads_the_real_server() -> None:
    version = safety.server_pg_version()
    major = int(version.split(".")[0])
    assert major >= 12
    path_independent = safety.check_safety([], pg_version=version)
    assert path_independent.ok and path_independent.files == []


# --- backward compatibility for the canary --------------------------------------------------

BASE_SCHEMA = (
    "CREATE TABLE orders (\n    id bigint PRIMARY KEY,\n    note text,\n"
    "    customer_id bigint\n);\n"
    "CREATE TABLE customers (id bigint PRIMARY KEY, name text);\n"
)


def compat_findings(tmp_path: Path, pending_sql: str) -> list[compat.Finding]:
    applied = write(tmp_path, "0001_base.sql", BASE_SCHEMA)
    pending = write(tmp_path, "0002_change.sql", TIMEOUTS + pending_sql)
    return compat.check_backward_compat([applied], [pending])


@pytest.mark.slow
def test_dropping_a_used_column_blocks_with_expand_then_contract(tmp_path: Path) -> None:
    findings = compat_findings(tmp_path, "ALTER TABLE orders DROP COLUMN note;\n")
    assert [(f.rule, f.file.endswith("0002_change.sql"), f.line) for f in findings] == [
        ("drops-column-in-use", True, 3)
    ]
    assert "orders.note" in findings[0].message
    assert "expand-then-contract" in findings[0].message
    assert "backfill" in findings[0].message


@pytest.mark.slow
def test_adding_a_nullable_column_passes(tmp_path: Path) -> None:
    assert compat_findings(tmp_path, "ALTER TABLE orders ADD COLUMN status text;\n") == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sql", "rule", "subject"),
    [
        ("DROP TABLE customers;\n", "drops-table-in-use", "customers"),
        (
            "ALTER TABLE orders RENAME COLUMN note TO remark;\n",
            "renames-column-in-use",
            "orders.note",
        ),
        ("ALTER TABLE customers RENAME TO clients;\n", "renames-table-in-use", "customers"),
        (
            "ALTER TABLE orders ALTER COLUMN customer_id TYPE text;\n",
            "changes-column-type",
            "orders.customer_id",
        ),
        (
            "ALTER TABLE orders ADD COLUMN status text NOT NULL;\n",
            "adds-required-column",
            "orders.status",
        ),
        ("ALTER TABLE orders ALTER COLUMN note SET NOT NULL;\n", "sets-not-null", "orders.note"),
        (
            "ALTER TABLE public.orders DROP COLUMN IF EXISTS customer_id CASCADE;\n",
            "drops-column-in-use",
            "orders.customer_id",
        ),
    ],
)
def test_breaking_changes_block(tmp_path: Path, sql: str, rule: str, subject: str) -> None:
    findings = compat_findings(tmp_path, sql)
    assert [f.rule for f in findings] == [rule]
    assert subject in findings[0].message


@pytest.mark.slow
@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';\n",
        "CREATE TABLE clients (id bigint PRIMARY KEY);\nALTER TABLE clients RENAME TO accounts;\n",
        "CREATE TABLE scratch (id bigint, tmp text);\nALTER TABLE scratch DROP COLUMN tmp;\n",
        "ALTER TABLE orders ADD COLUMN tmp text;\nALTER TABLE orders DROP COLUMN tmp;\n",
        "CREATE INDEX orders_note ON orders (note);\n",
        "ALTER TABLE orders ALTER COLUMN note SET DEFAULT 'none';\n",
    ],
)
def test_expand_only_changes_pass(tmp_path: Path, sql: str) -> None:
    assert compat_findings(tmp_path, sql) == []


@pytest.mark.slow
def test_pending_statement_that_fails_blocks(tmp_path: Path) -> None:
    # A typo must not look like a pass: it would fail in production too.
    findings = compat_findings(tmp_path, "ALTER TABLE ordrs DROP COLUMN note;\n")
    assert [(f.rule, f.line) for f in findings] == [("pending-migration-fails", 3)]
    assert "ordrs" in findings[0].message


@pytest.mark.slow
def test_broken_applied_migration_blocks(tmp_path: Path) -> None:
    applied = write(tmp_path, "0001_base.sql", "CREATE TABEL orders (id bigint);\n")
    pending = write(tmp_path, "0002_change.sql", "ALTER TABLE orders ADD COLUMN x text;\n")
    findings = compat.check_backward_compat([applied], [pending])
    assert [(f.rule, f.line) for f in findings] == [("cannot-build-stable-schema", 1)]


@pytest.mark.slow
def test_scratch_database_is_dropped(tmp_path: Path) -> None:
    from dagster_project.core import database

    compat_findings(tmp_path, "ALTER TABLE orders ADD COLUMN status text;\n")
    with database.connection("postgres") as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
            (database.physical_name("scratch_compat_") + "%",),
        )
        assert cur.fetchone() == (0,)
