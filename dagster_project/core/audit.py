"""The tamper-evident audit trail of production changes, and its verifier.

Storage (database `release_control`, schema `audit`):

- `audit.entries`: one row per production change. `seq` is assigned by the append function,
  not by a database sequence, so the numbers are contiguous and a gap means a deleted row.
  `payload` is the canonical JSON text of the entry, stored verbatim; `entry_hash` is
  `sha256(prev_hash || payload)` (hex, over UTF-8), `prev_hash` the previous entry's hash
  (`GENESIS_HASH` for seq 1). `product`, `release`, `environment` and `change_id` are copied
  out of the payload for lookups; `change_id` is UNIQUE so a change is audited exactly once.
- `audit.head`: a single row (id = 1) holding the last seq and hash. Appends lock it
  (`SELECT ... FOR UPDATE`), which serialises them: no two entries can share a predecessor.
- `audit.append(change_id, payload)`: the only writer (SECURITY DEFINER). Re-appending a
  known change_id returns the stored entry with `created = false`.
- Triggers reject UPDATE, DELETE and TRUNCATE on both tables, and direct INSERTs or head
  updates that do not come from `audit.append` (it flags its own writes with a
  transaction-local setting). They stop mistakes and ordinary SQL, even by the owner; an
  attacker with superuser rights can disable them, which is what `verify()` is for.
- Role `release_pipeline` (NOLOGIN): USAGE on the schema, SELECT on both tables, EXECUTE on
  `audit.append`, nothing else. Every connection this module opens runs `SET ROLE
  release_pipeline` before touching the trail, so the pipeline's own code can only append and
  read. The connecting user must be a member of the role; `ensure_audit_schema()` grants it.

Signed checkpoints outside the database (`core/checkpoints.py`): after every append the
trail's head (seq, hash, time) is signed with an Ed25519 key and written to a write-once file
outside Postgres, so a superuser who rewrites the chain and the head together, deletes the tail,
or forges a checkpoint is caught by `verify()`, which names the first bad seq or checkpoint.

The guardrail token is recorded in the payload (the one place it is kept) and masked in
everything this module prints or raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.extensions

from dagster_project.core import checkpoints, control_schema
from dagster_project.core import database as db
from dagster_project.core.contracts import AuditPayload, Checkpoint
from dagster_project.core.guardrail import mask, scrub

PIPELINE_ROLE = "release_pipeline"
GENESIS_HASH = "0" * 64

# The architecture note's five required fields of every production deployment's audit entry.
REQUIRED_FIELDS: tuple[str, ...] = (
    "timestamp",
    "identity",
    "artifact_sha256",
    "environment",
    "guardrail_token",
)
OUTCOMES: tuple[str, ...] = ("promoted", "aborted", "rolled_back")
# Optional fields that are copied into lookup columns and therefore must be strings.
_STRING_FIELDS: tuple[str, ...] = ("product", "release", "environment", "change_id")

# Verify reasons (stable strings: the CLI's JSON output and tests rely on them).
PAYLOAD_EDITED = "payload edited"
ROW_DELETED = "row deleted (gap)"
BROKEN_LINK = "reordered / broken link"
HEAD_MISMATCH = "head mismatch"
PAYLOAD_INVALID = "payload invalid"
LOOKUP_EDITED = "lookup columns edited"
EMPTY_TRAIL = "empty trail"
NO_TRAIL = "no audit trail"
UNREADABLE = "audit trail unreadable"
# ... and against the signed checkpoints outside the database.
NO_CHECKPOINT = "no checkpoint"
CHECKPOINT_INVALID = "checkpoint invalid"
CHECKPOINT_FORGED = "checkpoint signature invalid"
CHAIN_REWRITTEN = "chain rewritten (a checkpoint's head is not in the chain)"
TAIL_DELETED = "entries deleted (a checkpoint covers more than the trail holds)"
NO_TRUST = "no trusted checkpoint key"


class AuditError(RuntimeError):
    """An append or read failed; the message names the database and never holds the token."""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    change_id: str
    product: str | None
    release: str | None
    environment: str | None
    recorded_at: datetime
    prev_hash: str
    entry_hash: str
    # The canonical JSON as stored (it holds the token): kept out of repr so that logging
    # an entry never prints the secret. Use `masked(entry)` for display.
    payload_text: str = field(repr=False)
    created: bool = False  # True only for the call that wrote it

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_text)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries_checked: int  # entries found intact before the first bad one (all, when ok)
    first_bad_seq: int | None
    reason: str | None  # one of the reason constants above; None when ok
    detail: str = ""
    head_seq: int | None = None
    head_hash: str | None = None
    checkpoints_checked: int = 0  # signatures and heads verified
    checkpoint_seq: int | None = None  # the newest verified checkpoint covers up to this seq
    uncovered: int = 0  # newest entries no checkpoint covers yet (the next append signs them)
    bad_checkpoint: str | None = None  # the checkpoint file at fault, when one is


# --------------------------------------------------------------------------- schema

_COLUMNS = (
    "seq, change_id, product, release, environment, recorded_at, prev_hash, entry_hash, payload"
)


def ensure_audit_schema(database: str = db.CONTROL_DB) -> None:
    """The schema, triggers, append function and role: sql/control/0005_audit.sql, applied with
    the rest of the control schema (once per process; idempotent, safe to race). The file
    spells out REQUIRED_FIELDS, GENESIS_HASH and PIPELINE_ROLE (a test keeps them in step)."""
    control_schema.ensure(database)


# --------------------------------------------------------------------------- payloads


def canonical_json(payload: Mapping[str, Any]) -> str:
    """The exact text that is stored and hashed; Python and the verifier agree on it."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(prev_hash: str, payload_text: str) -> str:
    """sha256(prev_hash || payload) as the append function computes it."""
    return hashlib.sha256((prev_hash + payload_text).encode("utf-8")).hexdigest()


def validate_payload(payload: Mapping[str, Any]) -> None:
    """Refuse a payload without the five required fields; errors name the field, never values."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"audit payload must be a mapping, got {type(payload).__name__}")
    for name in REQUIRED_FIELDS:
        value = payload.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"audit payload field {name!r} is missing or empty")
        if not isinstance(value, str):
            raise ValueError(
                f"audit payload field {name!r} must be a string, got {type(value).__name__}"
            )
    for name in _STRING_FIELDS:
        if name in payload and not isinstance(payload[name], str):
            raise ValueError(
                f"audit payload field {name!r} must be a string, got {type(payload[name]).__name__}"
            )
    try:
        datetime.fromisoformat(payload["timestamp"])
    except ValueError:
        raise ValueError(
            "audit payload field 'timestamp' is not an ISO-8601 date-time "
            "(e.g. 2025-01-31T12:00:00+00:00)"
        ) from None
    outcome = payload.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"audit payload field 'outcome' must be one of {list(OUTCOMES)}")
    for name, value in payload.items():
        if not isinstance(name, str):
            raise ValueError(f"audit payload keys must be strings, got {type(name).__name__}")
        _check_json_value(value, name)


def _check_json_value(value: Any, where: str) -> None:
    # json.dumps' own errors do not say which field is at fault; this does.
    if isinstance(value, str):
        if "\x00" in value:  # Postgres text cannot hold NUL; refuse it here, by name
            raise ValueError(f"audit payload field {where!r} contains a NUL character")
        return
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit payload field {where!r} is not a finite number")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit payload field {where!r} has a non-string key")
            _check_json_value(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
        return
    raise ValueError(
        f"audit payload field {where!r} is not JSON-serialisable ({type(value).__name__})"
    )


# --------------------------------------------------------------------------- append / read


def append(
    change_id: str, payload: AuditPayload | Mapping[str, Any], *, database: str = db.CONTROL_DB
) -> AuditEntry:
    """Record one production change. Idempotent on `change_id`: a second call returns the
    stored entry with `created=False` (the new payload is not written).

    `change_id` identifies the production change (e.g. `<product>:<release>:<run id>`); it is
    also stored in the payload, so it is covered by the hash. Then the head is signed into the
    checkpoint log (`record_checkpoint`); the signing key is checked before anything is written.
    """
    if not isinstance(change_id, str) or not change_id.strip():
        raise ValueError("audit change_id is missing or empty")
    if isinstance(payload, AuditPayload):
        payload = payload.stored()
    validate_payload(payload)
    if payload.get("change_id", change_id) != change_id:
        raise ValueError("audit payload field 'change_id' differs from the change_id argument")
    token = payload["guardrail_token"]
    text = canonical_json({**payload, "change_id": change_id})
    ensure_audit_schema(database)
    key = checkpoints.signer()  # an unusable or untrusted key refuses before the append
    with _pipeline_connection(database) as conn:
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '30s'")  # a stuck appender surfaces as an error
                cur.execute("SELECT * FROM audit.append(%s, %s)", (change_id, text))
                row = cur.fetchone()
        except psycopg2.Error as exc:
            # `from None`: the driver's exception may quote the statement, which holds the token.
            message = (
                f"audit append of change {change_id!r} to {db.server().display_url(database)} "
                f"failed: {str(exc).strip()}"
            )
            raise AuditError(scrub(message, token)) from None
        assert row is not None
        entry = _entry(row[:9], created=bool(row[9]))
        record_checkpoint(database=database, key=key, conn=conn)
    return entry


def record_checkpoint(
    *,
    database: str = db.CONTROL_DB,
    key: checkpoints.Signer | None = None,
    conn: psycopg2.extensions.connection | None = None,
) -> Checkpoint | None:
    """Sign the trail's current head into the checkpoint log, once the entries since the newest
    valid checkpoint are checked to extend it (the chain links on from its head): a trail that
    no longer matches it raises CheckpointRefused naming both, and nothing is signed. Returns
    the checkpoint covering the head (None for an empty trail)."""
    key = key or checkpoints.signer()
    base = checkpoints.newest_valid(database, checkpoints.trusted_keys()[0])
    start = base.seq + 1 if base else 1
    try:
        with _snapshot(database, conn) as cur:
            cur.execute("SELECT seq, hash FROM audit.head WHERE id = 1")
            head_seq, head_hash = cur.fetchone() or (0, GENESIS_HASH)
            if base is not None and base.seq >= head_seq:
                if base.seq == head_seq and base.head_hash == head_hash:
                    return base
                raise checkpoints.CheckpointRefused(
                    f"the trail's head (seq {head_seq}) does not match checkpoint "
                    f"{checkpoints.file_name(base.seq)} (seq {base.seq}): no checkpoint signed; "
                    "run release audit verify"
                )
            if head_seq == 0:
                return None
            cur.execute(
                f"SELECT {_COLUMNS} FROM audit.entries WHERE seq >= %s ORDER BY seq", (start,)
            )
            rows = [_entry(r) for r in cur.fetchall()]
    except psycopg2.Error as exc:
        raise AuditError(
            f"reading the audit trail in {db.server().display_url(database)} to sign a "
            f"checkpoint failed: {str(exc).strip()}"
        ) from None
    result = check_chain(
        rows, head_seq, head_hash, first_seq=start, first_prev=base.head_hash if base else None
    )
    if not result.ok:
        since = f"checkpoint {checkpoints.file_name(base.seq)}" if base else "the genesis"
        raise checkpoints.CheckpointRefused(
            f"the trail does not extend {since} at seq {result.first_bad_seq}: {result.reason} "
            f"- {result.detail}; no checkpoint signed; run release audit verify"
        )
    return checkpoints.write(
        database, key.sign(checkpoints.trail_name(database), head_seq, head_hash)
    )


def covering(
    seq: int, entry_hash_: str, *, database: str = db.CONTROL_DB
) -> tuple[Checkpoint | None, str | None]:
    """The checkpoint that covers entry `seq` (the first at or after it), and None when it
    verifies: its signature by a trusted key, and the chain from the entry (with this hash) to
    the checkpoint's head. Otherwise what is wrong, naming the checkpoint."""
    try:
        trusted, _ = checkpoints.trusted_keys()
    except checkpoints.AuditKeyError as exc:
        return None, str(exc)
    later = [i for i in checkpoints.read_log(database) if i.checkpoint and i.checkpoint.seq >= seq]
    if not later:
        return None, f"no checkpoint covers seq {seq} yet"
    item, cp = later[0], later[0].checkpoint
    assert cp is not None
    problem = item.problem or checkpoints.signature_problem(cp, trusted)
    if problem:
        return cp, f"{item.label}: {problem}"
    try:
        with _snapshot(database) as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM audit.entries WHERE seq BETWEEN %s AND %s ORDER BY seq",
                (seq, cp.seq),
            )
            rows = [_entry(r) for r in cur.fetchall()]
    except psycopg2.Error as exc:
        return cp, f"the trail cannot be read: {str(exc).strip()}"
    if not rows or rows[0].seq != seq or rows[0].entry_hash != entry_hash_:
        return cp, f"entry seq {seq} is no longer in the trail with hash {entry_hash_[:16]}"
    result = check_chain(rows, cp.seq, cp.head_hash, first_seq=seq, first_prev=rows[0].prev_hash)
    if not result.ok:
        return cp, (
            f"{item.label} (seq {cp.seq}) does not cover seq {seq}: {result.reason} at seq "
            f"{result.first_bad_seq}"
        )
    return cp, None


def find(change_id: str, *, database: str = db.CONTROL_DB) -> AuditEntry | None:
    """The entry recorded for `change_id`, or None."""
    rows = _select(
        f"SELECT {_COLUMNS} FROM audit.entries WHERE change_id = %s", (change_id,), database
    )
    return rows[0] if rows else None


def entries(product: str | None = None, *, database: str = db.CONTROL_DB) -> list[AuditEntry]:
    """All entries in seq order, optionally only those of one product."""
    if product is None:
        return _select(f"SELECT {_COLUMNS} FROM audit.entries ORDER BY seq", (), database)
    return _select(
        f"SELECT {_COLUMNS} FROM audit.entries WHERE product = %s ORDER BY seq",
        (product,),
        database,
    )


def masked(entry: AuditEntry) -> dict[str, Any]:
    """A JSON-able view of the entry for display: the token masked wherever it appears."""
    payload = entry.payload
    token = payload.get("guardrail_token")
    token = token if isinstance(token, str) and token else None
    shown = _scrub_values(payload, token)
    if "guardrail_token" in shown:
        shown["guardrail_token"] = mask(token)
    return {
        "seq": entry.seq,
        "change_id": scrub(entry.change_id, token),
        "product": entry.product,
        "release": entry.release,
        "environment": entry.environment,
        "recorded_at": entry.recorded_at.isoformat(),
        "prev_hash": entry.prev_hash,
        "entry_hash": entry.entry_hash,
        "payload": shown,
    }


def _scrub_values(value: Any, token: str | None) -> Any:
    if isinstance(value, str):
        return scrub(value, token)
    if isinstance(value, dict):
        return {scrub(k, token): _scrub_values(v, token) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_values(v, token) for v in value]
    return value


@contextlib.contextmanager
def _pipeline_connection(database: str) -> Iterator[psycopg2.extensions.connection]:
    """A connection acting as `release_pipeline` (append and read only), closed on exit."""
    with db.connection(database) as conn:
        with conn.cursor() as cur:
            cur.execute(f"SET ROLE {PIPELINE_ROLE}")
        yield conn


@contextlib.contextmanager
def _snapshot(
    database: str, conn: psycopg2.extensions.connection | None = None
) -> Iterator[psycopg2.extensions.cursor]:
    """A read-only cursor on one REPEATABLE READ snapshot, acting as `release_pipeline`:
    head and entries read through it agree even while others append. On `conn` (an open
    autocommit pipeline connection) when given, else on a connection of its own."""
    if conn is not None:
        with conn.cursor() as cur:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield cur
            finally:
                cur.execute("ROLLBACK")
        return
    ensure_audit_schema(database)
    with db.connection(database, autocommit=False) as conn:
        conn.set_session(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=True
        )
        with conn.cursor() as cur:
            cur.execute(f"SET ROLE {PIPELINE_ROLE}")
            yield cur
        conn.rollback()


def _select(sql: str, params: tuple[Any, ...], database: str) -> list[AuditEntry]:
    ensure_audit_schema(database)
    try:
        with _pipeline_connection(database) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return [_entry(row) for row in cur.fetchall()]
    except psycopg2.Error as exc:
        raise AuditError(
            f"reading the audit trail in {db.server().display_url(database)} failed: "
            f"{str(exc).strip()}"
        ) from None


def _entry(row: tuple[Any, ...], *, created: bool = False) -> AuditEntry:
    seq, change_id, product, release, environment, recorded_at, prev, own, payload = row
    return AuditEntry(
        seq=int(seq),
        change_id=change_id,
        product=product,
        release=release,
        environment=environment,
        recorded_at=recorded_at,
        prev_hash=prev,
        entry_hash=own,
        payload_text=payload,
        created=created,
    )


# --------------------------------------------------------------------------- verify


def verify(*, database: str = db.CONTROL_DB, allow_empty: bool = False) -> VerifyResult:
    """Recompute the chain from seq 1 and compare it with the head; then the checkpoints
    outside the database. Names the first bad seq (or checkpoint).

    Checks, per entry in seq order: contiguity (a gap is a deleted row), the entry's hash
    over prev_hash + payload (an edited payload), the link to the previous entry's hash
    (reordering, or an edit whose hash was recomputed), the payload's canonical form and
    required fields, and the lookup columns against the payload. Then the head must name the
    last entry. Then every checkpoint's signature, then that each checkpoint's head is the
    chain's hash at its seq (a consistent rewrite of chain and head) and within the trail (a
    deleted tail). Fails closed: an empty trail (unless `allow_empty`), a missing schema, a
    read error, entries without any checkpoint or checkpoints without a trusted key are not ok.
    """
    try:
        log = checkpoints.read_log(database)  # first: each names a head committed before it
        result, hashes = _verify(
            database, allow_empty, {i.checkpoint.seq for i in log if i.checkpoint}
        )
    except (psycopg2.Error, db.DatabaseUnavailable, OSError) as exc:
        return VerifyResult(False, 0, None, UNREADABLE, str(exc).strip())
    if result.ok or (result.reason == EMPTY_TRAIL and log):
        return check_log(result, log, hashes, database)
    return result


def check_log(
    chain: VerifyResult, log: list[checkpoints.LogItem], hashes: dict[int, str], database: str
) -> VerifyResult:
    """The checkpoints against a chain that verified (`hashes`: its entry hash by seq)."""
    entries = chain.head_seq or 0

    def bad(
        reason: str, detail: str, seq: int | None = None, name: str | None = None, good: int = 0
    ) -> VerifyResult:
        return dataclasses.replace(
            chain,
            ok=False,
            entries_checked=good,
            first_bad_seq=seq,
            reason=reason,
            detail=detail,
            bad_checkpoint=name,
            checkpoint_seq=good or None,
        )

    where = checkpoints.log_dir(database)
    if not log:
        if entries == 0:
            return chain
        return bad(
            NO_CHECKPOINT,
            f"no signed checkpoint in {where} covers the {entries} entries; after checking "
            "the trail, `release audit checkpoint` signs its current head",
            seq=1,
        )
    try:
        trusted, source = checkpoints.trusted_keys()
    except checkpoints.AuditKeyError as exc:
        return bad(NO_TRUST, str(exc))
    if not trusted:
        return bad(
            NO_TRUST,
            f"no trusted public key ({source}): set {checkpoints.ENV_PUBLIC_KEY} or restore "
            "the trust file to check the checkpoints",
        )
    for item in log:  # every signature first
        assert item.checkpoint is not None or item.problem
        problem = item.problem or checkpoints.signature_problem(item.checkpoint, trusted)
        if problem:
            reason = CHECKPOINT_INVALID if item.problem else CHECKPOINT_FORGED
            seq = item.checkpoint.seq if item.checkpoint else None
            return bad(reason, f"{item.label} in {where}: {problem}", seq=seq, name=item.name)
    good = 0
    for item in log:  # then each head against the chain
        cp = item.checkpoint
        assert cp is not None
        if cp.seq > entries:
            return bad(
                TAIL_DELETED,
                f"{item.label} covers seq {cp.seq} but the trail ends at seq {entries}: entries "
                f"{entries + 1}..{cp.seq} were deleted (and the head rewritten)",
                seq=entries + 1,
                name=item.name,
                good=good,
            )
        if hashes.get(cp.seq) != cp.head_hash:
            span = f"seq {good + 1}" if good + 1 == cp.seq else f"a seq from {good + 1} to {cp.seq}"
            return bad(
                CHAIN_REWRITTEN,
                f"{item.label} signed head {cp.head_hash[:16]} for seq {cp.seq}, the chain has "
                f"{str(hashes.get(cp.seq))[:16]}: chain and head were rewritten from {span}",
                seq=good + 1,
                name=item.name,
                good=good,
            )
        good = cp.seq
    return dataclasses.replace(
        chain, checkpoints_checked=len(log), checkpoint_seq=good, uncovered=entries - good
    )


def _verify(
    database: str, allow_empty: bool, wanted: set[int]
) -> tuple[VerifyResult, dict[int, str]]:
    with db.connection(database, autocommit=False) as conn:
        # One snapshot for head and entries, so concurrent appends cannot look like damage.
        conn.set_session(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=True
        )
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('audit.entries'), to_regclass('audit.head')")
            if None in cur.fetchone():
                where = db.server().display_url(database)
                return VerifyResult(
                    False, 0, None, NO_TRAIL, f"schema audit does not exist in {where}"
                ), {}
            cur.execute(f"SET ROLE {PIPELINE_ROLE}")
            cur.execute("SELECT seq, hash FROM audit.head WHERE id = 1")
            head = cur.fetchone()
        if head is None:
            missing = VerifyResult(False, 0, None, HEAD_MISMATCH, "the audit.head row is missing")
            return missing, {}
        head_seq, head_hash = int(head[0]), head[1]
        hashes: dict[int, str] = {}

        def kept(row: tuple[Any, ...]) -> AuditEntry:
            entry = _entry(row)
            if entry.seq in wanted:  # the checkpoints' seqs, checked against the chain after
                hashes[entry.seq] = entry.entry_hash
            return entry

        with conn.cursor(name="audit_verify") as rows:
            rows.itersize = 2000  # stream: the trail grows with every release
            rows.execute(f"SELECT {_COLUMNS} FROM audit.entries ORDER BY seq")
            result = check_chain((kept(r) for r in rows), head_seq, head_hash, allow_empty)
        conn.rollback()
    return result, hashes


def check_chain(
    chain: Iterable[AuditEntry],
    head_seq: int,
    head_hash: str,
    allow_empty: bool = False,
    *,
    first_seq: int = 1,
    first_prev: str | None = None,
) -> VerifyResult:
    """The verifier's logic over entries in seq order (pure; `verify()` feeds it from SQL).
    From seq 1, or from `first_seq` linking to `first_prev` (a part of the chain)."""
    expected_seq, expected_prev, checked = first_seq, first_prev or GENESIS_HASH, 0

    def bad(seq: int | None, reason: str, detail: str) -> VerifyResult:
        return VerifyResult(False, checked, seq, reason, detail, head_seq, head_hash)

    for entry in chain:
        if entry.seq != expected_seq:
            if entry.seq > expected_seq:
                return bad(
                    expected_seq,
                    ROW_DELETED,
                    f"seq {expected_seq} is missing (next present is {entry.seq})",
                )
            return bad(entry.seq, BROKEN_LINK, f"seq {entry.seq} appears out of order")
        if entry_hash(entry.prev_hash, entry.payload_text) != entry.entry_hash:
            return bad(
                entry.seq,
                PAYLOAD_EDITED,
                f"seq {entry.seq}: entry_hash does not match sha256(prev_hash || payload)",
            )
        if entry.prev_hash != expected_prev:
            return bad(
                entry.seq,
                BROKEN_LINK,
                f"seq {entry.seq}: prev_hash does not match the entry_hash of seq {entry.seq - 1}",
            )
        problem = _payload_problem(entry)
        if problem:
            reason, detail = problem
            return bad(entry.seq, reason, f"seq {entry.seq}: {detail}")
        expected_seq, expected_prev = entry.seq + 1, entry.entry_hash
        checked += 1

    last_seq = expected_seq - 1
    if head_seq > last_seq:
        return bad(
            last_seq + 1,
            ROW_DELETED,
            f"the head records {head_seq} entries but the table ends at seq {last_seq}",
        )
    if head_seq < last_seq:
        return bad(
            head_seq + 1,
            HEAD_MISMATCH,
            f"entries after seq {head_seq} were not appended through audit.append "
            f"(the head records {head_seq}, the table ends at {last_seq})",
        )
    if head_hash != expected_prev:
        return bad(
            last_seq or None,
            HEAD_MISMATCH,
            f"the head hash does not match the entry_hash of seq {last_seq}",
        )
    if checked == 0 and not allow_empty:
        return bad(None, EMPTY_TRAIL, "the audit trail has no entries: nothing to verify")
    return VerifyResult(True, checked, None, None, "", head_seq, head_hash)


def _payload_problem(entry: AuditEntry) -> tuple[str, str] | None:
    # Only reachable when someone rewrote a payload *and* its hash chain consistently from
    # here on, or wrote rows bypassing audit.append: the hash alone cannot tell.
    try:
        payload = json.loads(entry.payload_text)
    except ValueError:
        return PAYLOAD_INVALID, "payload is not valid JSON"
    if not isinstance(payload, dict):
        return PAYLOAD_INVALID, "payload is not a JSON object"
    if canonical_json(payload) != entry.payload_text:
        return PAYLOAD_INVALID, "payload is not in canonical JSON form"
    missing = [f for f in REQUIRED_FIELDS if not payload.get(f)]
    if missing:
        return PAYLOAD_INVALID, f"required field(s) missing: {', '.join(missing)}"
    for column in ("change_id", "product", "release", "environment"):
        if getattr(entry, column) != payload.get(column):
            return LOOKUP_EDITED, f"column {column} disagrees with the payload"
    return None


# --------------------------------------------------------------------------- CLI helpers


VERIFY_UNREADABLE_EXIT = 2  # the trail could not be read: an environment problem, not tampering
VERIFY_NOT_INTACT_EXIT = 3  # the chain does not verify (or there is none): a failed check


def verify_output(result: VerifyResult, as_json: bool = False) -> tuple[str, int]:
    """Text (or JSON) and exit code for `release audit verify`: 0 intact, 2 the trail cannot
    be read (database unreachable, named) or no trusted checkpoint key is configured, 3 not
    intact (names the first bad entry or checkpoint)."""
    unreadable = not result.ok and result.reason == UNREADABLE
    untrusted = not result.ok and result.reason == NO_TRUST
    code = (
        0
        if result.ok
        else VERIFY_UNREADABLE_EXIT
        if unreadable or untrusted
        else VERIFY_NOT_INTACT_EXIT
    )
    if as_json:
        return json.dumps(asdict(result), indent=2), code
    if result.ok:
        covered = (
            f"; {result.checkpoints_checked} signed checkpoints verified, the newest covers "
            f"seq {result.checkpoint_seq}"
            if result.checkpoints_checked
            else ""
        )
        if result.uncovered:
            covered += f" ({result.uncovered} newer entries await the next checkpoint)"
        return (
            f"audit trail intact: {result.entries_checked} entries verified, "
            f"head seq {result.head_seq} hash {result.head_hash}{covered}",
            code,
        )
    if untrusted:
        return f"{NO_TRUST}: the checkpoints cannot be checked: {result.detail}", code
    if unreadable:
        return (
            f"{UNREADABLE}: cannot read the trail, so it was not verified (this says nothing "
            f"about tampering): {result.detail}; check that the database is up "
            f"(release platform status) and {db.ENV_URL} if set",
            code,
        )
    where = f" at seq {result.first_bad_seq}" if result.first_bad_seq is not None else ""
    if result.bad_checkpoint:
        where += f" (checkpoint {result.bad_checkpoint})"
    detail = f" - {result.detail}" if result.detail else ""
    return (
        f"audit trail NOT intact{where}: {result.reason}{detail} "
        f"({result.entries_checked} entries verified before it)",
        code,
    )


EXPORT_FORMAT = "release-audit-export/1"


def export_lines(since: int = 0, *, database: str = db.CONTROL_DB) -> Iterator[str]:
    """`release audit export`: JSON Lines for a SIEM, one canonical JSON object per line (keys
    sorted, compact, UTF-8), every line with `"format": EXPORT_FORMAT` and a `type`:

    - `entry`, one per entry with seq > `since`, in seq order: seq, change_id, product,
      release, environment, recorded_at, prev_hash, entry_hash, payload (token masked; so the
      hashes are for correlation, recomputing them needs the stored payload), and
      `covered_by_checkpoint` (the checkpoint line covers it).
    - `checkpoint`, last: the newest checkpoint whose signature verifies (`checkpoint`: trail,
      seq, head_hash, time, key_id, signature, format; or null), the trusted `public_key`
      (`ed25519:<base64>`) that verifies it over the canonical JSON of the checkpoint without
      its signature, `since` and the number of `entries` exported.
    """
    rows = _select(
        f"SELECT {_COLUMNS} FROM audit.entries WHERE seq > %s ORDER BY seq", (since,), database
    )
    trusted, _ = checkpoints.trusted_keys()
    newest = checkpoints.newest_valid(database, trusted)
    base = {"format": EXPORT_FORMAT}
    for entry in rows:
        covered = newest is not None and newest.seq >= entry.seq
        yield canonical_json(
            {**base, "type": "entry", **masked(entry), "covered_by_checkpoint": covered}
        )
    yield canonical_json(
        {
            **base,
            "type": "checkpoint",
            "checkpoint": newest.model_dump(mode="json") if newest else None,
            "public_key": checkpoints.public_text(trusted[newest.key_id]) if newest else None,
            "since": since,
            "entries": len(rows),
        }
    )


def show_output(
    product: str, as_json: bool = False, *, database: str = db.CONTROL_DB
) -> tuple[str, int]:
    """Text (or JSON) and exit code for `release audit show PRODUCT`, token masked."""
    shown = [masked(e) for e in entries(product, database=database)]
    if as_json:
        return json.dumps(shown, indent=2, ensure_ascii=False), 0
    if not shown:
        return f"no audit entries for product {product}", 0
    header = ("seq", "recorded_at", "release", "env", "outcome", "identity", "artifact", "token")
    table = [header] + [
        (
            str(e["seq"]),
            e["recorded_at"][:19],
            str(e["release"]),
            str(e["environment"]),
            str(e["payload"].get("outcome", e["payload"].get("kind", "-"))),
            str(e["payload"].get("identity", "-")),
            str(e["payload"].get("artifact_sha256", "-"))[:12],
            str(e["payload"].get("guardrail_token", "-")),
        )
        for e in shown
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    return "\n".join([f"audit entries for {product}:", *lines]), 0
