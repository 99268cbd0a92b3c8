"""Audit evidence that outlives the database, through the real path: signed checkpoints outside
Postgres (the session's embedded server), the content-addressed evidence store, the compliance
checklist item by item on a real Dagster instance with the real audit job, the audit ticket, and
the `release audit` CLI (verify, show, ticket, export) with every tampering case done the way a
superuser would (SQL with the triggers disabled, files rewritten), never by faking rows.

Tests that use the session's own trail (the CLI and the audit job read `release_control`) run in
a sandbox that puts the trail, its checkpoints, the production changes, the Dagster runs and the
release partitions back as they were, so later test files see an intact trail.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2.errors
import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project.cli import release_main
from dagster_project.core import audit, changes, checkpoints, database, evidence, registry
from dagster_project.core import checklist as items
from dagster_project.core.contracts import (
    AuditPayload,
    ChangeEvidence,
    Checkpoint,
    GateResult,
    MetricRow,
    Snapshot,
)
from dagster_project.core.guardrail import mask
from dagster_project.core.spec import ProductSpec, load_spec

pytestmark = pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")

MASKED = mask(GUARDRAIL_TOKEN)
MAIN = database.CONTROL_DB


# ------------------------------------------------------------------ helpers


def payload(release: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "timestamp": "2026-11-30T09:31:12.402+00:00",
        "identity": "ci:test",
        "artifact_sha256": "ab" * 32,
        "guardrail_token": GUARDRAIL_TOKEN,
        "product": PRODUCT,
        "release": release,
        "run_id": f"run-{release}",
        "change_id": f"{PRODUCT}/{release}/promoted/run-{release}",
        "outcome": "promoted",
        "approver": "ci:test",
        "audited_by": "ci:test",
        "smoke_verdict": "passed",
        "slo_verdict": "pass",
    }
    values.update(overrides)
    return AuditPayload.model_validate(values).stored()


def append(db: str, count: int, prefix: str | None = None) -> list[audit.AuditEntry]:
    prefix = prefix or f"t{uuid.uuid4().hex[:6]}"
    written = []
    for i in range(count):
        p = payload(f"{prefix}.{i}")
        written.append(audit.append(p["change_id"], p, database=db))
    return written


def as_owner(db: str, *statements: str, params: tuple[Any, ...] = ()) -> None:
    """SQL as the connecting superuser, the way an attacker with database access would."""
    with database.connection(db) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement, params if "%s" in statement else None)


def _rows(db: str, first: int) -> list[tuple[int, str, str]]:
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT seq, prev_hash, payload FROM audit.entries WHERE seq >= %s ORDER BY seq",
            (first,),
        )
        return cur.fetchall()


def rewrite_consistently(db: str, seq: int) -> None:
    """A superuser's rewrite: entry `seq` edited, every hash after it and the head recomputed,
    so the chain alone verifies."""
    rows = _rows(db, seq)
    prev = rows[0][1]
    with database.connection(db, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE audit.entries DISABLE TRIGGER USER")
        cur.execute("ALTER TABLE audit.head DISABLE TRIGGER USER")
        for number, _, text in rows:
            if number == seq:
                text = audit.canonical_json({**json.loads(text), "identity": "ci:mallory"})
            own = audit.entry_hash(prev, text)
            cur.execute(
                "UPDATE audit.entries SET prev_hash = %s, payload = %s, entry_hash = %s "
                "WHERE seq = %s",
                (prev, text, own, number),
            )
            prev = own
        cur.execute("UPDATE audit.head SET hash = %s WHERE id = 1", (prev,))
        cur.execute("ALTER TABLE audit.entries ENABLE TRIGGER USER")
        cur.execute("ALTER TABLE audit.head ENABLE TRIGGER USER")
        conn.commit()


def delete_tail(db: str, keep: int) -> None:
    """A superuser deletes the newest entries and moves the head back onto the last kept."""
    with database.connection(db, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE audit.entries DISABLE TRIGGER USER")
        cur.execute("ALTER TABLE audit.head DISABLE TRIGGER USER")
        cur.execute("DELETE FROM audit.entries WHERE seq > %s", (keep,))
        cur.execute(
            "UPDATE audit.head SET seq = %s, hash = coalesce((SELECT entry_hash FROM "
            "audit.entries WHERE seq = %s), %s) WHERE id = 1",
            (keep, keep, audit.GENESIS_HASH),
        )
        cur.execute("ALTER TABLE audit.entries ENABLE TRIGGER USER")
        cur.execute("ALTER TABLE audit.head ENABLE TRIGGER USER")
        conn.commit()


def keypair() -> tuple[str, str]:
    """(private key as base64 of its seed, public key as ed25519:<base64>)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed).decode(), checkpoints.public_text(key.public_key())


def checkpoint_file(db: str, seq: int) -> Path:
    return checkpoints.log_dir(db) / checkpoints.file_name(seq)


def replace_file(path: Path, text: str) -> None:
    """Rewrite a read-only file the way its owner can: unlink, write anew."""
    path.unlink(missing_ok=True)
    path.write_text(text)


def forge_checkpoint(db: str, seq: int, head_hash: str) -> Path:
    """A checkpoint for `seq` signed by an attacker's own key (not a trusted one)."""
    seed, _ = keypair()
    attacker = checkpoints.Signer(
        key=checkpoints.parse_private(seed.encode(), "test"),
        key_id="f" * 16,
        public="",
        source="attacker",
    )
    forged = attacker.sign(checkpoints.trail_name(db), seq, head_hash)
    path = checkpoint_file(db, seq)
    replace_file(path, forged.model_dump_json())
    return path


def break_signature(db: str, seq: int) -> Path:
    """The trusted checkpoint of `seq` with its signature flipped (head and key unchanged)."""
    path = checkpoint_file(db, seq)
    cp = Checkpoint.model_validate_json(path.read_text())
    raw = bytearray(base64.b64decode(cp.signature))
    raw[0] ^= 0xFF
    forged = cp.model_copy(update={"signature": base64.b64encode(bytes(raw)).decode()})
    replace_file(path, forged.model_dump_json())
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = release_main(list(argv))
    out, err = capsys.readouterr()
    assert GUARDRAIL_TOKEN not in out + err
    return code, out, err


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def audit_db() -> Iterator[str]:
    name = f"audit_e_{uuid.uuid4().hex[:10]}"
    audit.ensure_audit_schema(name)
    yield name
    database.drop_database(name)


@pytest.fixture(scope="module")
def spec() -> ProductSpec:
    return load_spec(PRODUCT)


@dataclass
class Sandbox:
    """The session's main trail, put back as it was afterwards."""

    instance: dg.DagsterInstance
    runs: list[str] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)


@contextlib.contextmanager
def trail_restored(db: str = MAIN) -> Iterator[None]:
    """Snapshot the trail (entries, head, checkpoint files, production changes) and put it
    back afterwards, as a superuser restores a backup; then it must verify again."""
    audit.ensure_audit_schema(db)
    changes.ensure_schema()
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT seq, prev_hash, payload, entry_hash, recorded_at, change_id, product, "
            "release, environment FROM audit.entries ORDER BY seq"
        )
        rows = cur.fetchall()
        cur.execute("SELECT seq, hash FROM audit.head WHERE id = 1")
        head = cur.fetchone()
        cur.execute("SELECT coalesce(max(id), 0) FROM platform.production_changes")
        (last_change,) = cur.fetchone()
    directory = checkpoints.log_dir(db)
    files = {p.name: p.read_bytes() for p in directory.glob("*")} if directory.is_dir() else {}
    try:
        yield
    finally:
        with database.connection(db, autocommit=False) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE audit.entries DISABLE TRIGGER USER")
            cur.execute("ALTER TABLE audit.head DISABLE TRIGGER USER")
            cur.execute("DELETE FROM audit.entries")
            for row in rows:
                cur.execute(
                    "INSERT INTO audit.entries (seq, prev_hash, payload, entry_hash, "
                    "recorded_at, change_id, product, release, environment) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    row,
                )
            cur.execute("UPDATE audit.head SET seq = %s, hash = %s WHERE id = 1", head)
            cur.execute("ALTER TABLE audit.entries ENABLE TRIGGER USER")
            cur.execute("ALTER TABLE audit.head ENABLE TRIGGER USER")
            cur.execute("DELETE FROM platform.production_changes WHERE id > %s", (last_change,))
            conn.commit()
        if directory.is_dir():
            for path in directory.glob("*"):
                if files.get(path.name) != path.read_bytes():
                    path.unlink()
        for name, data in files.items():
            path = directory / name
            if not path.exists():
                path.write_bytes(data)
                path.chmod(0o444)
        assert audit.verify(database=db, allow_empty=True).ok


@pytest.fixture
def sandbox(guardrail_token: str) -> Iterator[Sandbox]:
    from dagster_project.instance import get_instance
    from dagster_project.partitions import releases_partitions

    box = Sandbox(instance=get_instance())
    with trail_restored():
        yield box
    for run_id in box.runs:
        box.instance.delete_run(run_id)
    name = releases_partitions(PRODUCT).name
    for partition in box.partitions:
        box.instance.delete_dynamic_partition(name, partition)


# ------------------------------------------------------------------ checkpoints (own database)


@pytest.mark.slow
def test_each_append_signs_a_checkpoint_outside_the_database(audit_db: str) -> None:
    written = append(audit_db, 3)

    directory = checkpoints.log_dir(audit_db)
    assert not directory.is_relative_to(database.embedded_data_dir())
    assert sorted(p.name for p in directory.iterdir()) == [
        checkpoints.file_name(seq) for seq in (1, 2, 3)
    ]
    trusted, _ = checkpoints.trusted_keys()
    for entry in written:
        path = checkpoint_file(audit_db, entry.seq)
        assert path.stat().st_mode & 0o777 == 0o444  # written once, read-only
        cp = Checkpoint.model_validate_json(path.read_text())
        assert (cp.trail, cp.seq, cp.head_hash) == (
            database.physical_name(audit_db),
            entry.seq,
            entry.entry_hash,
        )
        assert checkpoints.signature_problem(cp, trusted) is None
    result = audit.verify(database=audit_db)
    assert result.ok, result
    assert (result.checkpoints_checked, result.checkpoint_seq, result.uncovered) == (3, 3, 0)
    text, code = audit.verify_output(result)
    assert code == 0 and "3 signed checkpoints verified, the newest covers seq 3" in text
    # Re-appending a known change writes nothing new.
    again = audit.append(written[0].change_id, written[0].payload, database=audit_db)
    assert not again.created and len(list(directory.iterdir())) == 3


@pytest.mark.slow
def test_a_consistent_rewrite_is_caught_and_never_signed_over(audit_db: str) -> None:
    append(audit_db, 5)
    rewrite_consistently(audit_db, 3)

    with database.connection(audit_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT seq, hash FROM audit.head")
        head_seq, head_hash = cur.fetchone()
    chain_only = audit.check_chain(audit.entries(database=audit_db), head_seq, head_hash)
    assert chain_only.ok  # the hash chain and its head alone cannot tell
    result = audit.verify(database=audit_db)
    assert (result.ok, result.reason, result.first_bad_seq, result.bad_checkpoint) == (
        False,
        audit.CHAIN_REWRITTEN,
        3,
        checkpoints.file_name(3),
    )
    # The next append lands in the database, but no checkpoint is signed over the rewrite.
    p = payload("after-rewrite")
    with pytest.raises(checkpoints.CheckpointRefused, match=checkpoints.file_name(5)):
        audit.append(p["change_id"], p, database=audit_db)
    assert not checkpoint_file(audit_db, 6).exists()
    assert audit.verify(database=audit_db).first_bad_seq == 3


@pytest.mark.slow
def test_entries_without_any_checkpoint_fail_until_one_is_signed(audit_db: str) -> None:
    append(audit_db, 2)
    for path in checkpoints.log_dir(audit_db).iterdir():
        path.unlink()

    result = audit.verify(database=audit_db)
    assert (result.ok, result.reason, result.first_bad_seq) == (False, audit.NO_CHECKPOINT, 1)
    assert audit.verify_output(result)[1] == 3
    signed = audit.record_checkpoint(database=audit_db)
    assert signed is not None and signed.seq == 2
    assert audit.verify(database=audit_db).ok


@pytest.mark.slow
def test_the_covering_checkpoint_proves_an_entry_and_names_a_forged_one(audit_db: str) -> None:
    first, second = append(audit_db, 2)
    checkpoint, problem = audit.covering(first.seq, first.entry_hash, database=audit_db)
    assert problem is None and checkpoint is not None and checkpoint.seq == 1
    assert audit.covering(first.seq, "0" * 64, database=audit_db)[1] is not None

    break_signature(audit_db, 1)  # seq 1 now relies on checkpoint 1 only: it is forged
    checkpoint, problem = audit.covering(first.seq, first.entry_hash, database=audit_db)
    assert problem == f"checkpoint {checkpoints.file_name(1)}: signature does not verify"
    assert audit.covering(second.seq, second.entry_hash, database=audit_db)[1] is None
    checkpoint_file(audit_db, 2).unlink()
    assert audit.covering(second.seq, second.entry_hash, database=audit_db)[1] == (
        "no checkpoint covers seq 2 yet"
    )


@pytest.mark.slow
def test_a_pinned_public_key_refuses_another_signing_key_before_anything_is_written(
    audit_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pinned = keypair()
    monkeypatch.setenv(checkpoints.ENV_PUBLIC_KEY, pinned)
    p = payload("refused")
    with pytest.raises(checkpoints.AuditKeyError, match=checkpoints.ENV_PUBLIC_KEY) as refused:
        audit.append(p["change_id"], p, database=audit_db)
    assert "is not a trusted key" in str(refused.value)
    assert audit.entries(database=audit_db) == []

    seed, public = keypair()  # a signing key from the environment, pinned: accepted
    monkeypatch.setenv(checkpoints.ENV_SIGNING_KEY, seed)
    monkeypatch.setenv(checkpoints.ENV_PUBLIC_KEY, public)
    (entry,) = append(audit_db, 1)
    cp = Checkpoint.model_validate_json(checkpoint_file(audit_db, entry.seq).read_text())
    assert cp.key_id == checkpoints.key_id(checkpoints.parse_public(public, "test"))
    assert seed not in checkpoint_file(audit_db, entry.seq).read_text()
    assert audit.verify(database=audit_db).ok
    monkeypatch.delenv(checkpoints.ENV_PUBLIC_KEY)  # the trust file knows the default key only
    result = audit.verify(database=audit_db)
    assert (result.reason, result.bad_checkpoint) == (
        audit.CHECKPOINT_FORGED,
        checkpoints.file_name(1),
    )


@pytest.mark.slow
def test_verify_without_a_trusted_key_is_an_environment_problem(
    audit_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    append(audit_db, 1)
    monkeypatch.setenv(checkpoints.ENV_TRUST_FILE, str(tmp_path / "missing.pub"))
    result = audit.verify(database=audit_db)
    text, code = audit.verify_output(result)
    assert (result.reason, code) == (audit.NO_TRUST, 2)
    assert checkpoints.ENV_PUBLIC_KEY in text
    monkeypatch.setenv(checkpoints.ENV_PUBLIC_KEY, "ed25519:not-base64!")
    text, code = audit.verify_output(audit.verify(database=audit_db))
    assert code == 2 and checkpoints.ENV_PUBLIC_KEY in text


def test_a_signing_key_file_must_be_private_and_outside_the_repository(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dagster_project.core.settings import PROJECT_ROOT

    seed, public = keypair()
    key_file = tmp_path / "audit.key"
    key_file.write_text(seed)
    key_file.chmod(0o644)
    monkeypatch.setenv(checkpoints.ENV_SIGNING_KEY_FILE, str(key_file))
    monkeypatch.setenv(checkpoints.ENV_PUBLIC_KEY, public)
    with pytest.raises(checkpoints.AuditKeyError, match="chmod 600") as refused:
        checkpoints.signer()
    assert str(key_file) in str(refused.value) and seed not in str(refused.value)
    key_file.chmod(0o600)
    assert checkpoints.signer().public == public

    inside = PROJECT_ROOT / "tests" / f".audit-{uuid.uuid4().hex[:6]}.key"
    monkeypatch.setenv(checkpoints.ENV_SIGNING_KEY_FILE, str(inside))
    with pytest.raises(checkpoints.AuditKeyError, match="inside the repository"):
        checkpoints.signer()
    monkeypatch.setenv(checkpoints.ENV_SIGNING_KEY_FILE, str(tmp_path / "absent.key"))
    with pytest.raises(checkpoints.AuditKeyError, match="no such file"):
        checkpoints.signer()
    monkeypatch.delenv(checkpoints.ENV_SIGNING_KEY_FILE)
    monkeypatch.setenv(checkpoints.ENV_SIGNING_KEY, "not a key")
    with pytest.raises(checkpoints.AuditKeyError, match=checkpoints.ENV_SIGNING_KEY):
        checkpoints.signer()


def test_a_key_is_made_on_first_use_and_trusted_from_then_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Zero setup: the quick start signs with a key it makes under the state directory."""
    monkeypatch.setenv("RELEASE_HOME", str(tmp_path))  # keys only: no database is touched here
    first = checkpoints.signer()
    key_file = tmp_path / "keys" / "audit-signing.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert first.public in (tmp_path / "keys" / "audit-trust.pub").read_text()
    assert checkpoints.signer().key_id == first.key_id  # the same key, every time
    key_file.chmod(0o600)
    replace_file(key_file, keypair()[0])  # someone swaps the key: the trust file refuses it
    key_file.chmod(0o600)
    with pytest.raises(checkpoints.AuditKeyError, match=r"audit-trust\.pub"):
        checkpoints.signer()


# ------------------------------------------------------------------ the evidence store


def test_evidence_is_stored_by_hash_and_never_overwritten() -> None:
    data = f"chart {uuid.uuid4()}".encode()
    path, sha = evidence.store_bytes(data, "png")
    assert path == evidence.root() / f"{sha}.png" and path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    before = path.stat()
    assert evidence.store_bytes(data, "png") == (path, sha)
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime == before.st_mtime

    other = f"chart {uuid.uuid4()}".encode()
    planted = evidence.path_for(evidence.store_bytes(other, "png")[1], "png")
    replace_file(planted, "tampered")
    with pytest.raises(evidence.EvidenceError, match="never overwritten"):
        evidence.store_bytes(other, "png")
    assert planted.read_text() == "tampered"  # left for the checklist to report
    assert "hashes to" in (evidence.check(planted, evidence.store_bytes(data, "png")[1]) or "")


def canary_report(version: str, errors: float) -> Any:
    from dagster_project.core.canary.analysis import CanaryReport, SeriesPoint
    from dagster_project.core.canary.judge import Verdict

    series = [
        SeriesPoint(
            t=float(t), step=1, track=track, requests=100, errors=e, p50_ms=20, p99_ms=80 + e
        )
        for t in range(5)
        for track, e in (("stable", 0.0), ("canary", errors))
    ]
    return CanaryReport(
        product=PRODUCT, env="production", version=version, series=series, verdict=Verdict.PASS
    )


def test_two_canaries_of_one_version_keep_both_sets_of_snapshots() -> None:
    from assets.canary import render_snapshots

    version = f"9.9.{uuid.uuid4().hex[:6]}"
    first = render_snapshots(canary_report(version, errors=1.0))
    second = render_snapshots(canary_report(version, errors=3.0))

    assert [s.name for s in first] == [s.name for s in second]
    assert {s.sha256 for s in first}.isdisjoint({s.sha256 for s in second})
    for snap in first + second:
        assert Path(snap.path) == evidence.path_for(snap.sha256, "png")
        assert evidence.check(snap.path, snap.sha256) is None
        assert Path(snap.path).read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------ the CLI on the session's trail


def _edit(db: str, seq: int) -> None:
    as_owner(
        db,
        "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
        "UPDATE audit.entries SET payload = replace(payload, 'ci:test', 'ci:mallory') "
        f"WHERE seq = {seq}",
        "ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change",
    )


def _delete(db: str, seq: int) -> None:
    as_owner(
        db,
        "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
        f"DELETE FROM audit.entries WHERE seq = {seq}",
        "ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change",
    )


def _reorder(db: str, seq: int) -> None:
    as_owner(
        db,
        "ALTER TABLE audit.entries DISABLE TRIGGER entries_no_change",
        # swap two neighbours through free numbers (the primary key is checked per row)
        f"UPDATE audit.entries SET seq = seq + 1000000 WHERE seq IN ({seq}, {seq + 1})",
        f"UPDATE audit.entries SET seq = {seq + 1} WHERE seq = {seq + 1000000}",
        f"UPDATE audit.entries SET seq = {seq} WHERE seq = {seq + 1000001}",
        "ALTER TABLE audit.entries ENABLE TRIGGER entries_no_change",
    )


def _truncate(db: str, seq: int) -> None:
    """Past the triggers (a superuser disables them): everything from `seq` on is gone and
    the head agrees, so the chain alone is intact."""
    delete_tail(db, seq - 1)


def _forge(db: str, seq: int) -> None:
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT entry_hash FROM audit.entries WHERE seq = %s", (seq,))
        (head_hash,) = cur.fetchone()
    forge_checkpoint(db, seq, head_hash)


# name -> (tamper(db, seq), reason printed, what else names the first bad item)
TAMPERING: dict[str, tuple[Callable[[str, int], None], str, str]] = {
    "edit": (_edit, audit.PAYLOAD_EDITED, ""),
    "delete": (_delete, audit.ROW_DELETED, ""),
    "reorder": (_reorder, audit.BROKEN_LINK, ""),
    "truncate": (_truncate, audit.TAIL_DELETED, "checkpoint {file}"),
    "consistent_rewrite": (rewrite_consistently, audit.CHAIN_REWRITTEN, "checkpoint {file}"),
    "forged_checkpoint": (_forge, audit.CHECKPOINT_FORGED, "checkpoint {file}"),
    "broken_signature": (
        lambda db, seq: break_signature(db, seq),
        audit.CHECKPOINT_FORGED,
        "checkpoint {file}",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", TAMPERING)
def test_cli_verify_names_the_first_bad_item(capsys: pytest.CaptureFixture[str], how: str) -> None:
    with trail_restored():
        written = append(MAIN, 4)
        assert cli(capsys, "audit", "verify")[0] == 0
        target = written[1].seq
        tamper, reason, also = TAMPERING[how]
        tamper(MAIN, target)

        code, out, err = cli(capsys, "audit", "verify")
        assert code == 3, (out, err)
        assert f"audit trail NOT intact at seq {target}" in err
        assert reason in err
        assert also.format(file=checkpoints.file_name(target)) in err
        code, out, _ = cli(capsys, "audit", "verify", "--json")
        shown = json.loads(out)
        assert (code, shown["ok"], shown["first_bad_seq"], shown["reason"]) == (
            3,
            False,
            target,
            reason,
        )


@pytest.mark.slow
def test_cli_checkpoint_signs_an_uncovered_head_and_refuses_a_rewritten_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with trail_restored():
        append(MAIN, 1)
        written = append(MAIN, 2)
        for entry in written:
            checkpoint_file(MAIN, entry.seq).unlink()  # a crash between append and checkpoint
        code, out, _ = cli(capsys, "audit", "verify")
        assert code == 0 and "2 newer entries await the next checkpoint" in out
        code, out, _ = cli(capsys, "audit", "checkpoint")
        assert (
            code == 0 and f"checkpoint seq {written[-1].seq} head {written[-1].entry_hash}" in out
        )
        assert cli(capsys, "audit", "verify")[0] == 0

        _, pinned = keypair()
        monkeypatch.setenv(checkpoints.ENV_PUBLIC_KEY, pinned)
        code, _, err = cli(capsys, "audit", "checkpoint")
        assert code == 2 and checkpoints.ENV_PUBLIC_KEY in err
        monkeypatch.delenv(checkpoints.ENV_PUBLIC_KEY)

        more = append(MAIN, 1)
        rewrite_consistently(MAIN, more[0].seq - 1)
        code, _, err = cli(capsys, "audit", "checkpoint")
        assert code == 3 and checkpoints.file_name(more[0].seq) in err


@pytest.mark.slow
def test_cli_a_truncate_attempt_is_refused_and_the_trail_stays_intact(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trail_restored():
        append(MAIN, 2)
        for table in ("audit.entries", "audit.head"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="TRUNCATE"):
                as_owner(MAIN, f"TRUNCATE {table}")
        code, out, _ = cli(capsys, "audit", "verify")
        assert code == 0 and "audit trail intact" in out and "signed checkpoints verified" in out


@pytest.mark.slow
def test_cli_verify_reports_the_checkpoints_and_show_masks_the_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trail_restored():
        written = append(MAIN, 2, prefix=f"show{uuid.uuid4().hex[:4]}")
        code, out, _ = cli(capsys, "audit", "verify")
        head = written[-1]
        assert code == 0
        assert f"head seq {head.seq} hash {head.entry_hash}" in out
        assert f"the newest covers seq {head.seq}" in out

        code, out, _ = cli(capsys, "audit", "show", PRODUCT)
        assert code == 0
        for entry in written:
            line = next(line for line in out.splitlines() if entry.release in line)
            assert line.split()[0] == str(entry.seq) and MASKED in line
        code, out, _ = cli(capsys, "audit", "show", PRODUCT, "--json")
        shown = {e["seq"]: e for e in json.loads(out)}
        assert shown[head.seq]["payload"]["guardrail_token"] == MASKED
        code, _, err = cli(capsys, "audit", "show", "no-such-product")
        assert code == 2 and "no-such-product" in err


@pytest.mark.slow
def test_cli_export_prints_stable_json_lines_with_the_covering_checkpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trail_restored():
        first, *rest = append(MAIN, 3)
        code, out, _ = cli(
            capsys, "audit", "export", "--since", str(first.seq), "--format", "jsonl"
        )
        assert code == 0
        lines = out.splitlines()
        records = [json.loads(line) for line in lines]
        assert lines == [audit.canonical_json(r) for r in records]  # canonical: sorted, compact
        *entries, last = records
        assert [e["seq"] for e in entries] == [e.seq for e in rest]
        for shown, entry in zip(entries, rest, strict=True):
            assert shown["format"] == audit.EXPORT_FORMAT and shown["type"] == "entry"
            assert (shown["entry_hash"], shown["prev_hash"]) == (entry.entry_hash, entry.prev_hash)
            assert shown["payload"]["guardrail_token"] == MASKED
            assert shown["covered_by_checkpoint"] is True
        assert last["type"] == "checkpoint" and last["entries"] == 2
        assert last["since"] == first.seq
        cp = Checkpoint.model_validate(last["checkpoint"])
        assert (cp.seq, cp.head_hash) == (rest[-1].seq, rest[-1].entry_hash)
        # A SIEM verifies it with the public key the line carries.
        key = checkpoints.parse_public(last["public_key"], "export")
        key.verify(base64.b64decode(cp.signature), cp.signed_text().encode())

        for bad in ("-1", "x"):
            with pytest.raises(SystemExit) as refused:
                release_main(["audit", "export", "--since", bad])
            assert refused.value.code == 2
        capsys.readouterr()


# ------------------------------------------------------------------ the checklist, the real path


@dataclass
class Staged:
    version: str
    sha: str
    run_id: str
    snapshots: list[Snapshot]
    change_id: str = ""


def deploy_run(box: Sandbox, spec: ProductSpec, version: str, sha: str, fail: str = "") -> str:
    """A real Dagster run on the session's instance that materialises the release's stages
    for the partition with the artifact's SHA (what the real stages' metadata carries), without
    a platform. `fail`: the stage that raises instead."""
    from assets.common import stage_key
    from dagster_project.partitions import releases_partitions

    partitions_def = releases_partitions(PRODUCT)
    if version not in box.partitions:
        box.instance.add_dynamic_partitions(partitions_def.name, [version])
        box.partitions.append(version)

    def stage(name: str) -> dg.AssetsDefinition:
        @dg.asset(key=stage_key(spec, name), partitions_def=partitions_def)
        def _stage() -> dg.MaterializeResult:
            if name == fail:
                raise RuntimeError(f"{name} failed")
            return dg.MaterializeResult(metadata={"artifact_sha256": sha})

        return _stage

    result = dg.materialize(
        [stage(name) for name in items.DEPLOY_STAGES],
        partition_key=version,
        instance=box.instance,
        raise_on_error=False,
    )
    box.runs.append(result.run_id)
    return result.run_id


def stage_release(
    box: Sandbox,
    spec: ProductSpec,
    *,
    version: str | None = None,
    outcome: str = "promoted",
    fail: str = "",
    **evidence_fields: Any,
) -> Staged:
    """A release pushed to the real registry, its snapshots in the evidence store, its deploy
    run on the instance and its production change recorded, as the stages leave them."""
    from assets.canary import render_snapshots

    version = version or f"8.{uuid.uuid4().hex[:8]}"
    artifact = registry.push(registry.build_artifact(spec, version, {}))
    snaps = render_snapshots(canary_report(f"{version} {outcome}", errors=2.0))
    run_id = deploy_run(box, spec, version, artifact.sha256, fail)
    fields: dict[str, Any] = {
        "approver": "ci:test",
        "smoke_verdict": "passed" if outcome != "aborted" else None,
        "slo_verdict": "pass" if outcome == "promoted" else "fail",
        "slo_steps": [
            MetricRow(
                step=1,
                weight=5,
                metric="error_rate",
                baseline=0.001,
                canary=0.002,
                threshold=0.01,
                p_value=0.41,
                verdict="pass",
            )
        ],
        "snapshots": snaps,
        "staging_checks": [GateResult(check=f"{PRODUCT}/staging_smoke:smoke", status="PASSED")],
    }
    fields.update(evidence_fields)
    change = changes.record(
        product=PRODUCT,
        release=version,
        outcome=outcome,
        artifact_sha256=artifact.sha256,
        previous_artifact_sha256=None,
        run_id=run_id,
        details=ChangeEvidence(**fields),
    )
    return Staged(version, artifact.sha256, run_id, snaps, change.change_id)


def audit_job(box: Sandbox, version: str) -> dg.ExecuteInProcessResult:
    """The code location's own audit job (the audit asset and its blocking compliance check,
    the real resources) on the session's instance."""
    from dagster_project.definitions import defs
    from dagster_project.jobs import audit_job_name

    job = defs.resolve_job_def(audit_job_name(PRODUCT))
    result = job.execute_in_process(
        instance=box.instance, partition_key=version, raise_on_error=False
    )
    box.runs.append(result.run_id)
    return result


def compliance_of(result: dg.ExecuteInProcessResult) -> tuple[bool, dict[str, tuple[Any, str]]]:
    (evaluation,) = [
        e for e in result.get_asset_check_evaluations() if e.check_name == "compliance"
    ]
    rows = evaluation.metadata["checklist"].value.records
    return evaluation.passed, {
        (r.data["change_id"], r.data["item"]): (r.data["passed"], r.data["detail"]) for r in rows
    }


@pytest.mark.slow
def test_a_complete_promotion_passes_compliance_and_gets_its_ticket(
    sandbox: Sandbox, spec: ProductSpec, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    staged = stage_release(sandbox, spec)
    result = audit_job(sandbox, staged.version)

    assert result.success
    ok, rows = compliance_of(result)
    assert ok, rows
    assert [item for (_, item), (passed, _) in rows.items() if passed is not True] == []
    report = result.asset_value([PRODUCT, "audit"])
    (ref,) = report.entries
    entry = audit.find(staged.change_id)
    assert entry is not None and ref.entry_hash == entry.entry_hash
    sign_off = ref.sign_off
    assert sign_off is not None and sign_off.checklist_passed
    assert sign_off.checkpoint is not None and sign_off.checkpoint.seq >= entry.seq
    html_path = Path(sign_off.ticket_html)
    assert html_path == evidence.path_for(sign_off.ticket_html_sha256, "html")
    assert evidence.check(html_path, sign_off.ticket_html_sha256) is None
    (materialization,) = result.get_asset_materialization_events()
    metadata = materialization.materialization.metadata
    assert metadata[f"ticket_seq_{entry.seq}"].value == str(html_path)
    # The entry names its snapshots by hash, in the evidence store.
    assert [s["sha256"] for s in entry.payload["snapshots"]] == [s.sha256 for s in staged.snapshots]

    # `release audit ticket` writes the sign-off document anew (the run has finished now).
    code, out, err = cli(capsys, "audit", "ticket", PRODUCT, staged.version, "--out", str(tmp_path))
    assert code == 0, (out, err)
    assert "ready to sign off" in out
    page = (tmp_path / f"{staged.version}-promoted-seq{entry.seq}.html").read_text()
    markdown = (tmp_path / f"{staged.version}-promoted-seq{entry.seq}.md").read_text()
    for snap in staged.snapshots:  # embedded, not linked: the page stands alone
        data = base64.b64encode(Path(snap.path).read_bytes()).decode()
        assert f"data:image/png;base64,{data}" in page
        assert snap.sha256 in markdown
    for text in (page, markdown):
        assert GUARDRAIL_TOKEN not in text and MASKED in text
        assert entry.entry_hash in text and "READY TO SIGN OFF" in text
        for item in (*items.DEPLOY_STAGES, items.ITEM_RUN, items.ITEM_CHECKPOINT, "PASSED"):
            assert item in text
    for name in audit.REQUIRED_FIELDS:
        assert f"| {name} |" in markdown
    assert f"| artifact_sha256 | {staged.sha} |" in markdown
    assert "| environment | production |" in markdown
    assert f"{PRODUCT}/staging_smoke:smoke" in markdown  # the gate table
    assert "| 1 | 5 | error_rate |" in markdown  # the canary steps

    code, _, err = cli(capsys, "audit", "ticket", PRODUCT, "0.0.404")
    assert code == 2 and "VERSION" in err and "0.0.404" in err


def _tamper_registry(staged: Staged) -> None:
    path = registry.stored_path(staged.sha)
    data = path.read_bytes()
    path.chmod(0o644)
    replace_file(path, "")
    path.write_bytes(data + b"tampered")


def _delete_snapshot(staged: Staged) -> None:
    Path(staged.snapshots[0].path).unlink()


def _append_first(token: str) -> Callable[[Staged], None]:
    """The entry written before the audit asset runs (the asset's append is idempotent and
    keeps it), with `token`: what an append-rights holder could have recorded."""

    def pre_append(staged: Staged) -> None:
        change = changes.get(staged.change_id)
        assert change is not None
        p = changes.audit_payload(change, audited_by="ci:test", token=token)
        audit.append(staged.change_id, p)

    return pre_append


def _forge_covering_checkpoint(staged: Staged) -> None:
    _append_first(GUARDRAIL_TOKEN)(staged)
    entry = audit.find(staged.change_id)
    assert entry is not None
    break_signature(MAIN, entry.seq)


# name -> (what the stage evidence says, what is done before the audit job, the failing item)
ITEM_FAILURES: dict[str, tuple[dict[str, Any], Callable[[Staged], None] | None, str]] = {
    "registry_bytes": ({}, _tamper_registry, items.ITEM_ARTIFACT),
    "deploy_run_failed": ({"fail": "promotion"}, None, items.ITEM_RUN),
    "stage_not_materialised": ({"fail": "staging_smoke"}, None, items.ITEM_RUN),
    "token_not_the_fingerprint": ({}, _append_first("tpt-forged-0000"), items.ITEM_TOKEN),
    "smoke_failed": ({"smoke_verdict": "failed"}, None, items.ITEM_SMOKE),
    "slo_failed": ({"slo_verdict": "fail"}, None, items.ITEM_SLO),
    "snapshot_missing": ({}, _delete_snapshot, items.ITEM_SNAPSHOTS),
    "checkpoint_forged": ({}, _forge_covering_checkpoint, items.ITEM_CHECKPOINT),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ITEM_FAILURES)
def test_each_checklist_item_fails_on_its_own_and_compliance_blocks(
    sandbox: Sandbox, spec: ProductSpec, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    fields, before, failing = ITEM_FAILURES[case]
    staged = stage_release(sandbox, spec, **fields)
    if before is not None:
        before(staged)

    result = audit_job(sandbox, staged.version)

    ok, rows = compliance_of(result)
    assert not ok
    assert not result.success  # blocking: the audit run fails on it
    assert [item for (_, item), (passed, _) in rows.items() if passed is False] == [failing]
    detail = rows[(staged.change_id, failing)][1]
    assert GUARDRAIL_TOKEN not in detail
    code, _, err = cli(capsys, "audit", "ticket", PRODUCT, staged.version)
    assert code == 3 and failing in err, err


@pytest.mark.slow
def test_an_aborted_first_canary_and_a_promoted_retry_pass_compliance(
    sandbox: Sandbox, spec: ProductSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    aborted = stage_release(
        sandbox, spec, outcome="aborted", reason="canary aborted: error rate 2.0% vs 0.0%"
    )
    promoted = stage_release(sandbox, spec, version=aborted.version)
    assert aborted.sha == promoted.sha and aborted.run_id != promoted.run_id

    result = audit_job(sandbox, promoted.version)

    ok, rows = compliance_of(result)
    assert ok and result.success, rows
    assert {change for change, _ in rows} == {aborted.change_id, promoted.change_id}
    not_applicable = {
        item for (c, item), (p, _) in rows.items() if c == aborted.change_id and p is None
    }
    assert not_applicable == {items.ITEM_RUN, items.ITEM_SMOKE, items.ITEM_SLO}
    assert rows[(aborted.change_id, items.ITEM_SNAPSHOTS)][0] is True  # its own evidence kept
    assert {s.sha256 for s in aborted.snapshots}.isdisjoint(s.sha256 for s in promoted.snapshots)
    code, out, _ = cli(capsys, "audit", "ticket", PRODUCT, promoted.version)
    assert code == 0 and "aborted" in out and "promoted" in out
    code, out, _ = cli(capsys, "audit", "verify")
    assert code == 0
