"""The audit trail through the real path: a real Postgres (the session's embedded server), the
real schema, triggers, role and append function. Each test gets its own database, so chains
do not leak between tests; tampering is done the way an attacker with database access would
(owner/superuser SQL, disabling triggers), never by faking rows in Python."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project.core import audit, database, identity
from dagster_project.core.guardrail import mask

MASKED_TOKEN = mask(GUARDRAIL_TOKEN)


@pytest.fixture
def audit_db() -> Iterator[str]:
    name = f"audit_t_{uuid.uuid4().hex[:10]}"
    audit.ensure_audit_schema(name)
    yield name
    database.drop_database(name)


def make_payload(release: str = "1.0.0", **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "timestamp": "2025-01-31T12:00:00+00:00",
        "identity": "ci:alice",
        "artifact_sha256": "ab" * 32,
        "environment": "production",
        "guardrail_token": GUARDRAIL_TOKEN,
        "product": PRODUCT,
        "release": release,
        "run_id": f"run-{release}",
        "outcome": "promoted",
        "approver": "ci:Zoë",  # non-ASCII: Python and Postgres must hash the same UTF-8 bytes
        "smoke_verdict": "pass",
        "slo_verdict": {"verdict": "pass", "success_rate": 0.998, "p99_ms": 212.5},
        "previous_artifact_sha256": "cd" * 32,
        "snapshots": [{"path": "snapshots/step-5.png", "sha256": "ef" * 32}],
        "waivers": [],
    }
    payload.update(overrides)
    return payload


def append_releases(db: str, count: int) -> list[audit.AuditEntry]:
    return [
        audit.append(f"{PRODUCT}:1.0.{i}", make_payload(f"1.0.{i}"), database=db)
        for i in range(count)
    ]


def as_owner(db: str, *statements: str) -> None:
    """Run SQL as the connecting superuser/owner, the way an attacker with DB access would."""
    with database.connection(db) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)


# ------------------------------------------------------------------ append and verify


@pytest.mark.slow
def test_append_chains_entries_and_verify_passes(audit_db: str) -> None:
    written = append_releases(audit_db, 3)

    assert [e.seq for e in written] == [1, 2, 3]
    assert all(e.created for e in written)
    assert written[0].prev_hash == audit.GENESIS_HASH
    for before, after in itertools.pairwise(written):
        assert after.prev_hash == before.entry_hash
    for entry in written:
        # The database's hash is reproducible in Python from the stored canonical text.
        assert entry.entry_hash == audit.entry_hash(entry.prev_hash, entry.payload_text)
        assert entry.payload_text == audit.canonical_json(entry.payload)
        assert entry.payload["change_id"] == entry.change_id
    assert (written[1].product, written[1].release, written[1].environment) == (
        PRODUCT,
        "1.0.1",
        "production",
    )

    result = audit.verify(database=audit_db)
    assert result.ok, result
    assert (result.entries_checked, result.head_seq, result.head_hash) == (
        3,
        3,
        written[-1].entry_hash,
    )
    text, code = audit.verify_output(result)
    assert code == 0
    assert "intact" in text and "3 entries" in text
    as_json, code = audit.verify_output(result, as_json=True)
    assert code == 0 and json.loads(as_json)["ok"] is True


@pytest.mark.slow
def test_reappending_a_change_returns_the_existing_entry(audit_db: str) -> None:
    first = audit.append("chg-1", make_payload(), database=audit_db)
    again = audit.append("chg-1", make_payload(outcome="aborted"), database=audit_db)

    assert first.created and not again.created
    assert (again.seq, again.entry_hash, again.payload_text) == (
        first.seq,
        first.entry_hash,
        first.payload_text,
    )
    assert again.payload["outcome"] == "promoted"  # the first record stands
    assert [e.seq for e in audit.entries(database=audit_db)] == [1]
    assert audit.find("chg-1", database=audit_db) == dataclasses.replace(first, created=False)
    assert audit.find("chg-unknown", database=audit_db) is None


@pytest.mark.slow
def test_entries_filter_by_product(audit_db: str) -> None:
    audit.append("a-1", make_payload("1.0.0"), database=audit_db)
    audit.append("b-1", make_payload("2.0.0", product="other-product"), database=audit_db)
    audit.append("a-2", make_payload("1.1.0"), database=audit_db)

    assert [e.change_id for e in audit.entries(PRODUCT, database=audit_db)] == ["a-1", "a-2"]
    assert [e.change_id for e in audit.entries("other-product", database=audit_db)] == ["b-1"]
    assert len(audit.entries(database=audit_db)) == 3


# ------------------------------------------------------------------ tampering is detected


@pytest.mark.slow
def test_edited_payload_is_named_by_seq(audit_db: str) -> None:
    append_releases(audit_db, 5)
    as_owner(
        audit_db,
        "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
        "UPDATE audit.entries SET payload = replace(payload, '\"promoted\"', '\"aborted\"') "
        "WHERE seq = 3",
        "ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change",
    )

    result = audit.verify(database=audit_db)
    assert not result.ok
    assert (result.first_bad_seq, result.reason, result.entries_checked) == (
        3,
        audit.PAYLOAD_EDITED,
        2,
    )
    text, code = audit.verify_output(result)
    assert code != 0
    assert "seq 3" in text and audit.PAYLOAD_EDITED in text
    assert json.loads(audit.verify_output(result, as_json=True)[0])["first_bad_seq"] == 3


@pytest.mark.slow
def test_edit_with_recomputed_hash_breaks_the_next_link(audit_db: str) -> None:
    written = append_releases(audit_db, 4)
    forged = audit.canonical_json({**written[1].payload, "outcome": "aborted"})
    forged_hash = audit.entry_hash(written[1].prev_hash, forged)
    with database.connection(audit_db) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change")
        cur.execute(
            "UPDATE audit.entries SET payload = %s, entry_hash = %s WHERE seq = 2",
            (forged, forged_hash),
        )
        cur.execute("ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change")

    result = audit.verify(database=audit_db)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 3, audit.BROKEN_LINK)


@pytest.mark.slow
@pytest.mark.parametrize(("deleted", "first_bad"), [(3, 3), (1, 1), (5, 5)])
def test_deleted_row_is_named_by_seq(audit_db: str, deleted: int, first_bad: int) -> None:
    append_releases(audit_db, 5)
    as_owner(
        audit_db,
        "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
        f"DELETE FROM audit.entries WHERE seq = {deleted}",
        "ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change",
    )

    result = audit.verify(database=audit_db)
    assert (result.ok, result.first_bad_seq, result.reason) == (
        False,
        first_bad,
        audit.ROW_DELETED,
    )
    text, code = audit.verify_output(result)
    assert code != 0 and f"seq {first_bad}" in text


@pytest.mark.slow
def test_reordered_rows_are_detected(audit_db: str) -> None:
    append_releases(audit_db, 4)
    as_owner(
        audit_db,
        "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
        # swap seq 2 and 3 (through a free number: the primary key is checked per row)
        "UPDATE audit.entries SET seq = 1000 WHERE seq = 2",
        "UPDATE audit.entries SET seq = 2 WHERE seq = 3",
        "UPDATE audit.entries SET seq = 3 WHERE seq = 1000",
        "ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change",
    )

    result = audit.verify(database=audit_db)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 2, audit.BROKEN_LINK)


@pytest.mark.slow
def test_tampered_head_and_lookup_columns_are_detected(audit_db: str) -> None:
    append_releases(audit_db, 2)
    as_owner(
        audit_db,
        "ALTER TABLE audit.head DISABLE TRIGGER head_write_guard",
        "UPDATE audit.head SET hash = repeat('f', 64)",
        "ALTER TABLE audit.head ENABLE TRIGGER head_write_guard",
    )
    result = audit.verify(database=audit_db)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 2, audit.HEAD_MISMATCH)

    other = f"audit_t_{uuid.uuid4().hex[:10]}"
    audit.ensure_audit_schema(other)
    try:
        append_releases(other, 2)
        # Hiding an entry from `release audit show` by editing its unhashed lookup column.
        as_owner(
            other,
            "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
            "UPDATE audit.entries SET product = 'someone-else' WHERE seq = 1",
            "ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change",
        )
        result = audit.verify(database=other)
        assert (result.ok, result.first_bad_seq, result.reason) == (
            False,
            1,
            audit.LOOKUP_EDITED,
        )
    finally:
        database.drop_database(other)


# ------------------------------------------------------------------ the trail refuses changes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("UPDATE audit.entries SET payload = '{}' WHERE seq = 1", "UPDATE is not allowed"),
        ("DELETE FROM audit.entries WHERE seq = 1", "DELETE is not allowed"),
        ("TRUNCATE audit.entries", "TRUNCATE is not allowed"),
        ("UPDATE audit.head SET seq = 5", "direct UPDATE is not allowed"),
        ("DELETE FROM audit.head", "DELETE is not allowed"),
        ("TRUNCATE audit.head", "TRUNCATE is not allowed"),
        (
            "INSERT INTO audit.entries (seq, prev_hash, payload, entry_hash, change_id) "
            "VALUES (2, 'x', '{}', 'y', 'forged')",
            "direct INSERT is not allowed",
        ),
        # Even faking the append function's flag, the head only advances onto a linked entry.
        (
            "BEGIN; SET LOCAL audit.writer = 'append'; UPDATE audit.head SET seq = 5; COMMIT",
            "may only advance by one",
        ),
    ],
)
def test_owner_sql_is_refused_by_triggers(audit_db: str, statement: str, refusal: str) -> None:
    append_releases(audit_db, 1)
    with pytest.raises(psycopg2.errors.InsufficientPrivilege, match=refusal):
        as_owner(audit_db, statement)
    assert audit.verify(database=audit_db).ok


@pytest.mark.slow
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit.entries SET payload = '{}' WHERE seq = 1",
        "DELETE FROM audit.entries WHERE seq = 1",
        "TRUNCATE audit.entries",
        "INSERT INTO audit.entries (seq, prev_hash, payload, entry_hash, change_id) "
        "VALUES (2, 'x', '{}', 'y', 'forged')",
        "UPDATE audit.head SET seq = 5",
        "DELETE FROM audit.head",
        "INSERT INTO audit.head VALUES (2, 0, 'x')",
        "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
        "CREATE TABLE audit.sneaky (id int)",
    ],
)
def test_pipeline_role_can_only_append_and_read(audit_db: str, statement: str) -> None:
    append_releases(audit_db, 1)
    with database.connection(audit_db) as conn, conn.cursor() as cur:
        cur.execute(f"SET ROLE {audit.PIPELINE_ROLE}")
        with pytest.raises((psycopg2.errors.InsufficientPrivilege,)) as refused:
            cur.execute(statement)
        assert "permission denied" in str(refused.value) or "must be owner" in str(refused.value)
        # ...while reading and appending through the function work for the same role.
        cur.execute("SELECT count(*) FROM audit.entries")
        assert cur.fetchone() == (1,)
        text = audit.canonical_json({**make_payload("9.9.9"), "change_id": "via-role"})
        cur.execute("SELECT seq, created FROM audit.append(%s, %s)", ("via-role", text))
        assert cur.fetchone() == (2, True)
    assert audit.verify(database=audit_db).ok


@pytest.mark.slow
def test_append_function_checks_required_fields_itself(audit_db: str) -> None:
    # Defence in depth: SQL callers bypassing the Python validation are refused too.
    payload = {**make_payload(), "change_id": "raw"}
    del payload["guardrail_token"]
    with database.connection(audit_db) as conn, conn.cursor() as cur:
        cur.execute(f"SET ROLE {audit.PIPELINE_ROLE}")
        with pytest.raises(psycopg2.errors.InvalidParameterValue, match="guardrail_token"):
            cur.execute(
                "SELECT * FROM audit.append(%s, %s)", ("raw", audit.canonical_json(payload))
            )
        with pytest.raises(psycopg2.errors.InvalidParameterValue, match="not valid JSON"):
            cur.execute("SELECT * FROM audit.append(%s, %s)", ("raw", "{not json"))
    assert audit.entries(database=audit_db) == []


# ------------------------------------------------------------------ concurrency


@pytest.mark.slow
def test_twenty_concurrent_appends_stay_gap_free_and_unforked(audit_db: str) -> None:
    count = 20
    barrier = threading.Barrier(count)
    results: list[audit.AuditEntry] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            entry = audit.append(f"chg-{i}", make_payload(f"1.0.{i}"), database=audit_db)
            with lock:
                results.append(entry)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert all(e.created for e in results)
    stored = audit.entries(database=audit_db)
    assert [e.seq for e in stored] == list(range(1, count + 1))
    assert sorted(e.change_id for e in stored) == sorted(f"chg-{i}" for i in range(count))
    assert stored[0].prev_hash == audit.GENESIS_HASH
    for before, after in itertools.pairwise(stored):
        assert after.prev_hash == before.entry_hash
    result = audit.verify(database=audit_db)
    assert (result.ok, result.entries_checked, result.head_seq) == (True, count, count)


@pytest.mark.slow
def test_concurrent_appends_of_one_change_write_one_entry(audit_db: str) -> None:
    count = 6
    barrier = threading.Barrier(count)
    results: list[audit.AuditEntry] = []

    def worker() -> None:
        barrier.wait(timeout=30)
        results.append(audit.append("same-change", make_payload(), database=audit_db))

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(results) == count
    assert sum(e.created for e in results) == 1
    assert {e.seq for e in results} == {1}
    assert len(audit.entries(database=audit_db)) == 1


# ------------------------------------------------------------------ bad input and fail-closed


@pytest.mark.slow
@pytest.mark.parametrize("field", audit.REQUIRED_FIELDS)
@pytest.mark.parametrize("how", ["missing", "empty", "blank"])
def test_missing_required_field_is_refused_by_name(audit_db: str, field: str, how: str) -> None:
    payload = make_payload()
    if how == "missing":
        del payload[field]
    else:
        payload[field] = "" if how == "empty" else "   "
    with pytest.raises(ValueError, match=f"'{field}' is missing or empty") as refused:
        audit.append("chg-x", payload, database=audit_db)
    assert GUARDRAIL_TOKEN not in str(refused.value)
    assert audit.entries(database=audit_db) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"timestamp": "yesterday"}, "'timestamp' is not an ISO-8601"),
        ({"outcome": "maybe"}, "'outcome' must be one of"),
        ({"release": 7}, "'release' must be a string"),
        ({"slo_verdict": {"p99_ms": float("nan")}}, "'slo_verdict.p99_ms' is not a finite"),
        ({"snapshots": [{"path": object()}]}, "'snapshots[0].path' is not JSON-serialisable"),
        ({"waivers": ["a\x00b"]}, "'waivers[0]' contains a NUL"),
        ({"change_id": "another"}, "'change_id' differs"),
        ({"guardrail_token": 12345678}, "'guardrail_token' must be a string"),
    ],
)
def test_bad_payload_is_refused_naming_the_field(
    audit_db: str, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError) as refused:
        audit.append("chg-x", make_payload(**overrides), database=audit_db)
    assert named in str(refused.value)
    assert GUARDRAIL_TOKEN not in str(refused.value)
    assert "12345678" not in str(refused.value)


@pytest.mark.slow
def test_verify_fails_closed(audit_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = audit.verify(database=audit_db)
    assert (empty.ok, empty.reason) == (False, audit.EMPTY_TRAIL)
    assert audit.verify_output(empty)[1] != 0
    assert audit.verify(database=audit_db, allow_empty=True).ok

    bare = f"audit_t_{uuid.uuid4().hex[:10]}"
    database.ensure_database(bare)  # a database without the audit schema
    try:
        result = audit.verify(database=bare)
        assert (result.ok, result.reason) == (False, audit.NO_TRAIL)
        assert "schema audit" in result.detail
    finally:
        database.drop_database(bare)

    monkeypatch.setenv("RELEASE_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/postgres")
    unreachable = audit.verify(database=audit_db)
    assert (unreachable.ok, unreachable.reason) == (False, audit.UNREADABLE)
    assert "127.0.0.1:1" in unreachable.detail
    text, code = audit.verify_output(unreachable)
    assert code != 0 and audit.UNREADABLE in text


# ------------------------------------------------------------------ token hygiene


@pytest.mark.slow
def test_token_is_stored_but_masked_everywhere_else(audit_db: str) -> None:
    entry = audit.append("chg-1", make_payload(note=f"echo {GUARDRAIL_TOKEN}"), database=audit_db)
    audit.append("chg-2", make_payload("1.0.1", outcome="aborted"), database=audit_db)

    # The trail is the one place the token is kept...
    with database.connection(audit_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT payload FROM audit.entries WHERE seq = 1")
        (stored,) = cur.fetchone()
    assert json.loads(stored)["guardrail_token"] == GUARDRAIL_TOKEN

    # ...and nothing derived from it for display or logging shows it.
    shown = audit.masked(entry)
    assert shown["payload"]["guardrail_token"] == MASKED_TOKEN
    assert GUARDRAIL_TOKEN not in json.dumps(shown, ensure_ascii=False)
    assert GUARDRAIL_TOKEN not in repr(entry)
    for as_json in (False, True):
        text, code = audit.show_output(PRODUCT, as_json, database=audit_db)
        assert code == 0
        assert GUARDRAIL_TOKEN not in text
        assert MASKED_TOKEN in text
    table, _ = audit.show_output(PRODUCT, database=audit_db)
    assert "promoted" in table and "aborted" in table
    assert len(table.splitlines()) == 2 + 2  # title, header, one line per change
    assert audit.show_output("no-such-product", database=audit_db)[0].startswith("no audit")


@pytest.mark.slow
def test_database_errors_from_append_never_carry_the_token(audit_db: str) -> None:
    # A server-side failure that quotes the payload (the worst case) must come out scrubbed.
    as_owner(
        audit_db,
        "CREATE OR REPLACE FUNCTION audit.append(p_change_id text, p_payload text) "
        "RETURNS TABLE (seq bigint, change_id text, product text, release text, "
        "environment text, recorded_at timestamptz, prev_hash text, entry_hash text, "
        "payload text, created boolean) LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'broken: %', p_payload; END $$",
    )
    with pytest.raises(audit.AuditError) as failed:
        audit.append("chg-1", make_payload(), database=audit_db)
    message = str(failed.value)
    assert GUARDRAIL_TOKEN not in message
    assert MASKED_TOKEN in message and "chg-1" in message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__


# ------------------------------------------------------------------ identity


@pytest.fixture
def clean_identity_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for variable in (identity.ENV_RELEASE_ACTOR, *(v for v, _ in identity.CI_ACTOR_VARIABLES)):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_identity_precedence(clean_identity_env: pytest.MonkeyPatch) -> None:
    import getpass

    env = clean_identity_env
    assert identity.approver_identity() == f"user:{getpass.getuser()}"
    assert identity.resolve_identity().source == "os-user"

    env.setenv("GITLAB_USER_LOGIN", "gina")
    assert identity.approver_identity() == "ci:gitlab:gina"
    env.setenv("GITHUB_ACTOR", "octo")
    assert identity.approver_identity() == "ci:github:octo"
    env.setenv("RELEASE_ACTOR", "alice")
    assert identity.resolve_identity() == identity.Identity("ci:alice", "RELEASE_ACTOR")
    env.setenv("RELEASE_ACTOR", "svc:deploybot")
    assert identity.approver_identity() == "svc:deploybot"
    env.setenv("RELEASE_ACTOR", "   ")  # blank counts as unset
    assert identity.approver_identity() == "ci:github:octo"


def test_identity_refuses_unprintable_values(clean_identity_env: pytest.MonkeyPatch) -> None:
    clean_identity_env.setenv("RELEASE_ACTOR", "alice\nroot")
    with pytest.raises(ValueError, match="RELEASE_ACTOR"):
        identity.approver_identity()
