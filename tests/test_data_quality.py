"""The data-quality gate through the real path: the product's own migrations and suite file,
Great Expectations 1.x against tables in the embedded Postgres.

Great Expectations costs ~15 s to import once per session; the tests that need it share
one database per scenario and keep the number of validations small."""

from __future__ import annotations

import json
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_project.core import data_quality, database
from dagster_project.core.migrations import history
from dagster_project.core.settings import product_dir

PRODUCT = "4pnihc40q-yj"
SUITE = data_quality.default_suite_path(PRODUCT)

# What the staging smoke run leaves behind: processed jobs, their results, one dead letter.
GOOD_ROWS = """
INSERT INTO jobs (job_key, queue, status, attempts) VALUES
    ('smoke-1', 'high', 'done', 1), ('smoke-2', 'low', 'done', 1), ('poison-1', 'high', 'dead', 4);
INSERT INTO job_results (job_key, result) VALUES
    ('smoke-1', '{"ok": true}'), ('smoke-2', '{"ok": true}');
INSERT INTO dead_letter (job_key, queue, payload, attempts, last_error) VALUES
    ('poison-1', 'high', '{}', 4, 'poison message');
"""


@pytest.fixture
def product_db() -> Iterator[str]:
    """A database migrated with the product's real migrations and holding good rows."""
    name = f"dq_{secrets.token_hex(3)}"
    database.ensure_database(name)
    history.apply_pending(name, product_dir(PRODUCT) / "migrations", actor="test")
    _execute(name, GOOD_ROWS)
    yield name
    database.drop_database(name)


def _execute(db: str, sql: str) -> None:
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(sql)


def test_product_suite_file_is_versioned_and_covers_the_written_tables() -> None:
    suite = data_quality.load_suite(SUITE)
    assert suite.version >= 1
    assert set(suite.tables) == {"items", "jobs", "job_results", "dead_letter"}
    assert all(t.min_rows >= 1 for t in suite.tables.values())


@pytest.mark.slow
def test_good_rows_pass_with_every_expectation_reported(product_db: str) -> None:
    report = data_quality.validate_tables(product_db, SUITE)
    assert report.success, report.reasons
    suite = data_quality.load_suite(SUITE)
    declared = sum(len(t.expectations) for t in suite.tables.values())
    # Each table also gets its row-count expectation.
    assert report.evaluated == declared + len(suite.tables) == len(report.results)
    assert report.rows == {"items": 5, "jobs": 3, "job_results": 2, "dead_letter": 1}
    assert all(r["success"] for r in report.results)
    assert {(r["table"], r["expectation"], r["column"]) for r in report.results} >= {
        ("items", "expect_column_values_to_be_unique", "id"),
        ("items", "expect_column_values_to_be_between", "price_cents"),
        ("jobs", "expect_column_values_to_be_in_set", "status"),
        ("job_results", "expect_column_values_to_not_be_null", "result"),
        ("dead_letter", "expect_column_values_to_be_between", "attempts"),
    }
    assert report.version == suite.version
    assert "**FAIL**" not in report.as_markdown()


@pytest.mark.slow
def test_failing_expectations_fail_and_are_named(product_db: str) -> None:
    # A constraint lost in production would let such rows in; the suite must still catch them.
    _execute(product_db, "ALTER TABLE items DROP CONSTRAINT items_price_cents_check")
    _execute(product_db, "INSERT INTO items (name, price_cents) VALUES ('refund', -250)")
    _execute(product_db, "UPDATE dead_letter SET attempts = 0")
    report = data_quality.validate_tables(product_db, SUITE)
    assert not report.success
    failed = {(r["table"], r["expectation"], r["column"]) for r in report.failures}
    assert failed == {
        ("items", "expect_column_values_to_be_between", "price_cents"),
        ("dead_letter", "expect_column_values_to_be_between", "attempts"),
    }
    price = next(r for r in report.failures if r["table"] == "items")
    assert "1 of 6 rows unexpected" in price["observed"] and "-250" in price["observed"]
    assert any("items.price_cents" in reason for reason in report.reasons)
    assert "**FAIL**" in report.as_markdown()


@pytest.mark.slow
def test_empty_table_does_not_pass(product_db: str) -> None:
    _execute(product_db, "DELETE FROM dead_letter")
    report = data_quality.validate_tables(product_db, SUITE)
    assert not report.success
    assert report.rows["dead_letter"] == 0
    assert "table dead_letter has 0 rows; the suite needs at least 1" in report.reasons
    # The column expectations on the empty table "pass" vacuously in GE; the gate does not.
    assert [r["expectation"] for r in report.failures] == ["expect_table_row_count_to_be_between"]


@pytest.mark.slow
def test_missing_table_and_missing_column_do_not_pass(product_db: str, tmp_path: Path) -> None:
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(
        json.dumps(
            {
                "name": "broken",
                "version": 2,
                "tables": {
                    "items": {
                        "expectations": [
                            {
                                "type": "expect_column_values_to_not_be_null",
                                "kwargs": {"column": "colour"},
                            }
                        ]
                    },
                    "no_such_table": {
                        "expectations": [
                            {
                                "type": "expect_column_values_to_not_be_null",
                                "kwargs": {"column": "id"},
                            }
                        ]
                    },
                },
            }
        )
    )
    report = data_quality.validate_tables(product_db, suite_path)
    assert not report.success
    by_table = {(r["table"], r["expectation"]): r for r in report.failures}
    colour = by_table[("items", "expect_column_values_to_not_be_null")]
    assert "colour" in colour["error"]
    assert ("no_such_table", "load_table") in by_table
    assert any("public.no_such_table could not be validated" in r for r in report.reasons)


@pytest.mark.slow
def test_all_tables_empty_is_not_a_pass(tmp_path: Path) -> None:
    name = f"dq_empty_{secrets.token_hex(3)}"
    database.ensure_database(name)
    try:
        _execute(name, "CREATE TABLE items (id int, price_cents int)")
        suite_path = tmp_path / "suite.json"
        suite_path.write_text(
            json.dumps(
                {
                    "name": "tiny",
                    "version": 1,
                    "tables": {
                        "items": {
                            "expectations": [
                                {
                                    "type": "expect_column_values_to_be_between",
                                    "kwargs": {"column": "price_cents", "min_value": 0},
                                }
                            ]
                        }
                    },
                }
            )
        )
        report = data_quality.validate_tables(name, suite_path)
        assert not report.success
        assert report.rows == {"items": 0}
        assert report.summary().startswith("suite tiny v1 failed: table items has 0 rows")
    finally:
        database.drop_database(name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"suite\.json line 1 column 2: invalid JSON"),
        ('{"name": "s", "tables": {}}', r"version: Field required"),
        (
            '{"name": "s", "version": 1, "tables": {"t": {"min_rows": 0, "expectations": '
            '[{"type": "expect_column_values_to_not_be_null"}]}}}',
            r"tables\.t\.min_rows: Input should be greater than or equal to 1",
        ),
        (
            '{"name": "s", "version": 1, "tables": {"t": {"expectations": '
            '[{"type": "drop table t"}]}}}',
            r"tables\.t\.expectations\.0\.type: String should match pattern",
        ),
        ('{"name": "s", "version": 1, "tables": {"t": {"expectations": []}}}',
         r"tables\.t\.expectations: List should have at least 1 item"),
    ],
)  # fmt: skip
def test_invalid_suite_file_names_file_and_field(
    tmp_path: Path, content: str, message: str
) -> None:
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(content)
    with pytest.raises(data_quality.DataQualityError, match=message) as failure:
        data_quality.load_suite(suite_path)
    assert str(suite_path) in str(failure.value)


@pytest.mark.slow
def test_unknown_expectation_type_is_an_error(product_db: str, tmp_path: Path) -> None:
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(
        '{"name": "s", "version": 1, "tables": {"items": {"expectations": '
        '[{"type": "expect_prices_to_be_cheap", "kwargs": {}}]}}}'
    )
    with pytest.raises(data_quality.DataQualityError, match=r"tables\.items\.expectations\.0"):
        data_quality.validate_tables(product_db, suite_path)


def test_missing_suite_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(data_quality.DataQualityError, match=r"nowhere\.json cannot be read"):
        data_quality.load_suite(tmp_path / "nowhere.json")


@pytest.mark.slow
def test_unreachable_database_is_an_error_not_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(database.ENV_URL, "postgresql://postgres@127.0.0.1:9/postgres")
    with pytest.raises(database.DatabaseUnavailable, match=r"127\.0\.0\.1:9"):
        data_quality.validate_tables("staging", SUITE)


# -- the gate's own process ------------------------------------------------------------------


@pytest.mark.slow
def test_the_gate_in_its_own_process_gives_the_in_process_verdicts(
    product_db: str, tmp_path: Path
) -> None:
    """The validator the staging stage starts ahead (by run id) answers like validate_tables
    would in-process, is used once, and exits."""
    data_quality.start_validator("run-a")
    started = data_quality._validators["run-a"].proc
    report = data_quality.validate_in_child("run-a", product_db, SUITE)
    assert report.success, report.reasons
    assert report.rows == {"items": 5, "jobs": 3, "job_results": 2, "dead_letter": 1}
    assert "run-a" not in data_quality._validators
    assert started.poll() == 0  # it answered and exited
    # A failing table is named the same way through the child.
    _execute(product_db, "DELETE FROM dead_letter")
    failed = data_quality.validate_in_child("run-b", product_db, SUITE)  # none started: new
    assert not failed.success
    assert "table dead_letter has 0 rows; the suite needs at least 1" in failed.reasons


@pytest.mark.slow
def test_the_gate_process_raises_its_errors_here(
    product_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(
        '{"name": "s", "version": 1, "tables": {"items": {"expectations": '
        '[{"type": "expect_prices_to_be_cheap", "kwargs": {}}]}}}'
    )
    with pytest.raises(data_quality.DataQualityError, match=r"tables\.items\.expectations\.0"):
        data_quality.validate_in_child("run-c", product_db, suite_path)
    monkeypatch.setenv(database.ENV_URL, "postgresql://postgres@127.0.0.1:9/postgres")
    with pytest.raises(database.DatabaseUnavailable, match=r"127\.0\.0\.1:9"):
        data_quality.validate_in_child("run-d", "staging", SUITE)


@pytest.mark.slow
def test_a_validator_never_asked_exits_when_its_parent_goes() -> None:
    validator = data_quality.Validator()
    assert validator.proc.stdin is not None
    validator.proc.stdin.close()  # what the parent's death does to the pipe
    assert validator.proc.wait(timeout=60) == 0


def _kl_suite(tmp_path: Path, threshold: float) -> Path:
    """jobs.queue is high, low, high (GOOD_ROWS): KL divergence 0.057 from an even split."""
    kl = {
        "type": "expect_column_kl_divergence_to_be_less_than",
        "kwargs": {
            "column": "queue",
            "partition_object": {"values": ["high", "low"], "weights": [0.5, 0.5]},
            "threshold": threshold,
        },
    }
    path = tmp_path / f"kl-{threshold}.json"
    path.write_text(
        json.dumps({"name": "kl", "version": 1, "tables": {"jobs": {"expectations": [kl]}}})
    )
    return path


@pytest.mark.slow
def test_an_expectation_that_needs_the_deferred_modules_gives_the_in_process_verdicts(
    product_db: str, tmp_path: Path
) -> None:
    """The validator defers altair and scipy.stats (`_DeferredImports`); the KL-divergence
    expectation calls scipy.stats.entropy, so it loads them when it runs, with the verdicts
    the same as in this process (where they are imported normally)."""
    assert data_quality.validate_tables(product_db, _kl_suite(tmp_path, 0.1)).success
    # One child (each pays the GE import): failing on the computed divergence shows that
    # scipy.stats ran there; its reasons, with the observed value, match this process's.
    suite = _kl_suite(tmp_path, 0.01)
    here = data_quality.validate_tables(product_db, suite)
    child = data_quality.validate_in_child("run-kl", product_db, suite)
    assert (here.success, child.success) == (False, False), (here.reasons, child.reasons)
    assert child.reasons == here.reasons
    assert child.results == here.results
    assert [r.get("error") for r in child.results] == [None, None]


@pytest.mark.slow
def test_the_validator_imports_great_expectations_without_the_deferred_modules() -> None:
    """What the deferral saves (~75 MB of the validator's memory) stays saved: a Great
    Expectations upgrade that used altair or scipy.stats at import time would run them."""
    import subprocess
    import sys

    probe = (
        "import sys; from dagster_project.core.data_quality import _import_great_expectations; "
        "_import_great_expectations(); assert 'great_expectations.core' in sys.modules; "
        "print(sorted(m for m in sys.modules if m.startswith(('altair.', 'scipy.stats.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout[-2000:]


def _wait_for(path: Path, proc: subprocess.Popen[bytes], seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the platform validator exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"no socket at {path} within {seconds:.0f}s"
        time.sleep(0.1)


@pytest.mark.slow
def test_the_platform_validator_imports_once_answers_each_in_a_child_and_falls_back(
    product_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve_platform` (what LocalPlatform.up runs under supervisord) gives the in-process
    verdicts, errors and reasons; no per-run child is started while it listens. Once it is
    gone (its socket left behind), a gate validates in a child of its own."""
    product = f"dq-{secrets.token_hex(2)}"  # its own socket: nothing else uses this one
    socket_path = data_quality.platform_socket(product)
    server = subprocess.Popen(data_quality.platform_argv(product))
    try:
        _wait_for(socket_path, server)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600

        def no_child(*args: object, **kwargs: object) -> None:
            raise AssertionError("a per-run validator was started while the platform's listens")

        with monkeypatch.context() as patch:
            patch.setattr(data_quality, "Validator", no_child)
            data_quality.start_validator("run-p", product)  # the platform's serves: none
            report = data_quality.validate_in_child("run-p", product_db, SUITE, product=product)
            assert (
                report.success
                and report.rows == data_quality.validate_tables(product_db, SUITE).rows
            )
            _execute(product_db, "DELETE FROM dead_letter")
            failed = data_quality.validate_in_child("run-q", product_db, SUITE, product=product)
            assert not failed.success
            assert "table dead_letter has 0 rows; the suite needs at least 1" in failed.reasons
            bad_suite = tmp_path / "suite.json"
            bad_suite.write_text(
                '{"name": "s", "version": 1, "tables": {"items": {"expectations": '
                '[{"type": "expect_prices_to_be_cheap", "kwargs": {}}]}}}'
            )
            with pytest.raises(data_quality.DataQualityError, match=r"tables\.items\.expect"):
                data_quality.validate_in_child("run-r", product_db, bad_suite, product=product)
        # Each validation ran in a forked child: the server itself is still the one started.
        assert server.poll() is None
        server.kill()
        server.wait(timeout=10)
        assert socket_path.exists()  # killed: it could not remove its socket
        fallback = data_quality.validate_in_child("run-s", product_db, SUITE, product=product)
        assert fallback.reasons == failed.reasons
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)
        socket_path.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_stopped_platform_validator_removes_its_socket() -> None:
    product = f"dq-{secrets.token_hex(2)}"
    socket_path = data_quality.platform_socket(product)
    server = subprocess.Popen(data_quality.platform_argv(product))
    try:
        _wait_for(socket_path, server)
        server.send_signal(signal.SIGTERM)  # what supervisord sends
        assert server.wait(timeout=10) == 0
        assert not socket_path.exists()
    finally:
        if server.poll() is None:
            server.kill()
        socket_path.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_validation_killed_midway_blocks_the_gate_naming_the_validator(product_db: str) -> None:
    """The forked child answering a gate dies mid-validation: the gate gets an error naming the
    platform's validator (it blocks), never a pass and never a second validation elsewhere."""
    import threading

    import psutil

    product = f"dq-{secrets.token_hex(2)}"
    socket_path = data_quality.platform_socket(product)
    server = subprocess.Popen(data_quality.platform_argv(product))
    outcome: list[object] = []
    try:
        _wait_for(socket_path, server)
        # The validation's reads wait on this lock, so the child is caught mid-validation.
        with database.connection(product_db, autocommit=False) as locker, locker.cursor() as cur:
            cur.execute("LOCK TABLE dead_letter IN ACCESS EXCLUSIVE MODE")

            def gate() -> None:
                try:
                    outcome.append(
                        data_quality.validate_in_child("run-k", product_db, SUITE, product=product)
                    )
                except Exception as exc:  # what the gate would raise
                    outcome.append(exc)

            asking = threading.Thread(target=gate)
            asking.start()
            deadline = time.monotonic() + 60
            while not (children := psutil.Process(server.pid).children()):
                assert time.monotonic() < deadline, "no validation child was forked"
                time.sleep(0.05)
            children[0].kill()
            asking.join(timeout=60)
            locker.rollback()
        assert len(outcome) == 1 and isinstance(outcome[0], data_quality.DataQualityError)
        assert str(socket_path) in str(outcome[0])
        assert "without an answer" in str(outcome[0])
        assert server.poll() is None  # the validator itself serves on
    finally:
        server.terminate()
        server.wait(timeout=10)
        socket_path.unlink(missing_ok=True)
