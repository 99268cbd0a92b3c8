"""Signed checkpoints of the audit trail, kept outside the database.

The trail's hash chain and its head live in one database, so someone who can rewrite both (a
superuser) is not caught by the chain alone. After every append, `audit.append` signs a
checkpoint - the trail, the head's seq and hash, the time - with an Ed25519 key and writes it to
the checkpoint log, one write-once file per checkpoint:

    $RELEASE_AUDIT_CHECKPOINT_DIR (default $RELEASE_HOME/audit/checkpoints)/<trail>/<seq>.json

(`<trail>` is the audit database's name, `<seq>` twelve digits). A file is created once
(hard-linked into place, which fails if the name exists), read-only, and never rewritten: the
directory may be a mounted object-store bucket with object lock (see README). `audit.verify`
checks every checkpoint's signature against the trusted public keys and that its head is in the
chain, as CloudTrail's digest files and Certificate Transparency's signed tree heads do.

Keys (never printed; errors name the variable or file):
- signing: `RELEASE_AUDIT_SIGNING_KEY` (PEM PKCS#8, or base64 of the 32-byte seed), else the file
  `RELEASE_AUDIT_SIGNING_KEY_FILE` (mode 0600, outside the repository), else a key generated on
  first use at `$RELEASE_HOME/keys/audit-signing.key` (0600).
- trusted public keys: `RELEASE_AUDIT_PUBLIC_KEY` (`ed25519:<base64>` or PEM) when set, else the
  trust file `RELEASE_AUDIT_TRUST_FILE` (default `$RELEASE_HOME/keys/audit-trust.pub`, one
  `ed25519:<base64>` per line; several lines when a key was rotated). A signing key whose public
  key is not trusted is refused. With nothing pinned, the first signing key is written to the
  trust file (trust on first use).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster_project.core import database as db
from dagster_project.core.contracts import Checkpoint, ContractError
from dagster_project.core.settings import PROJECT_ROOT, release_home

ENV_SIGNING_KEY = "RELEASE_AUDIT_SIGNING_KEY"
ENV_SIGNING_KEY_FILE = "RELEASE_AUDIT_SIGNING_KEY_FILE"
ENV_PUBLIC_KEY = "RELEASE_AUDIT_PUBLIC_KEY"
ENV_TRUST_FILE = "RELEASE_AUDIT_TRUST_FILE"
ENV_CHECKPOINT_DIR = "RELEASE_AUDIT_CHECKPOINT_DIR"
KEY_PREFIX = "ed25519:"


class AuditKeyError(ValueError):
    """A signing or public key cannot be used; names the variable or file, never key bytes."""


class CheckpointRefused(RuntimeError):
    """The trail no longer matches its last checkpoint (or the log holds another head for the
    seq): no checkpoint is signed on top of it. Names the checkpoint and the seq."""


@dataclass(frozen=True)
class Signer:
    key: Any = None  # Ed25519PrivateKey (cryptography is imported where it is used)
    key_id: str = ""
    public: str = ""  # ed25519:<base64>
    source: str = ""  # the variable or file it came from

    def sign(self, trail: str, seq: int, head_hash: str) -> Checkpoint:
        unsigned = Checkpoint(
            trail=trail,
            seq=seq,
            head_hash=head_hash,
            time=datetime.now(UTC).isoformat(timespec="milliseconds"),
            key_id=self.key_id,
        )
        signature = self.key.sign(unsigned.signed_text().encode("utf-8"))
        return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


@dataclass(frozen=True)
class LogItem:
    """One file of the checkpoint log: its checkpoint, or why it cannot be read."""

    name: str
    checkpoint: Checkpoint | None
    problem: str | None = None

    @property
    def label(self) -> str:
        return f"checkpoint {self.name}"


# --------------------------------------------------------------------------- keys


def keys_dir() -> Path:
    path = release_home() / "keys"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def trust_file() -> Path:
    return Path(os.environ.get(ENV_TRUST_FILE) or keys_dir() / "audit-trust.pub")


def default_key_file() -> Path:
    return keys_dir() / "audit-signing.key"


def public_text(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_public(text: str, where: str) -> Any:
    """An Ed25519 public key from `ed25519:<base64>` (or bare base64) or PEM."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    value = text.strip()
    try:
        if value.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(value.encode())
        else:
            raw = base64.b64decode(value.removeprefix(KEY_PREFIX), validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
        raise AuditKeyError(
            f"{where}: not an Ed25519 public key (expected ed25519:<base64 of 32 bytes> or PEM)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{where}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def parse_private(data: bytes, where: str) -> Any:
    """An Ed25519 private key from PEM PKCS#8, or base64 of the 32-byte seed."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    value = data.strip()
    try:
        if value.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(value, password=None)
        else:
            raw = base64.b64decode(value.removeprefix(KEY_PREFIX.encode()), validate=True)
            key = Ed25519PrivateKey.from_private_bytes(raw)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
        raise AuditKeyError(
            f"{where}: not an Ed25519 private key (expected PEM PKCS#8 without a password, or "
            "base64 of the 32-byte seed)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"{where}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def trusted_keys() -> tuple[dict[str, Any], str]:
    """The trusted public keys by key id, and where they came from ({} when nothing is
    pinned yet)."""
    pinned = os.environ.get(ENV_PUBLIC_KEY)
    if pinned:
        key = parse_public(pinned, ENV_PUBLIC_KEY)
        return {key_id(key): key}, ENV_PUBLIC_KEY
    path = trust_file()
    where = f"trust file {path}"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}, where
    except OSError as exc:
        raise AuditKeyError(f"{where} cannot be read: {exc.strerror or exc}") from None
    keys = {}
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            key = parse_public(line, f"{path}:{number}")
            keys[key_id(key)] = key
    return keys, where


def signer() -> Signer:
    """The checkpoint signing key (see the module doc), checked against the trusted keys."""
    key, source = _signing_key()
    public = key.public_key()
    found = Signer(key=key, key_id=key_id(public), public=public_text(public), source=source)
    trusted, where = trusted_keys()
    if not trusted and not os.environ.get(ENV_PUBLIC_KEY):
        _write_once(trust_file(), f"# audit checkpoint keys (first use)\n{found.public}\n", 0o644)
        trusted, where = trusted_keys()  # another process may have pinned its key first
    if found.key_id not in trusted:
        raise AuditKeyError(
            f"{source}: the audit signing key (key id {found.key_id}) is not a trusted key of "
            f"{where}: checkpoints are not signed with it; use the matching private key, or "
            f"add its public key {found.public} to {where}"
        )
    return found


def _signing_key() -> tuple[Any, str]:
    value = os.environ.get(ENV_SIGNING_KEY)
    if value:
        return parse_private(value.encode(), ENV_SIGNING_KEY), ENV_SIGNING_KEY
    named = os.environ.get(ENV_SIGNING_KEY_FILE)
    if named:
        path = Path(named).expanduser().resolve()
        where = f"{ENV_SIGNING_KEY_FILE} ({path})"
        home = release_home()
        if path.is_relative_to(PROJECT_ROOT) and not path.is_relative_to(home):
            raise AuditKeyError(f"{where}: a signing key inside the repository is refused")
        return _read_key_file(path, where), where
    path = default_key_file()
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_once(path, pem.decode(), 0o600)  # a concurrent first use keeps one key
    return _read_key_file(path, f"signing key file {path}"), f"signing key file {path}"


def _read_key_file(path: Path, where: str) -> Any:
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise AuditKeyError(
                f"{where}: readable by group or others (mode {mode & 0o777:o}); chmod 600 it"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditKeyError(f"{where}: no such file") from None
    except OSError as exc:
        raise AuditKeyError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    return parse_private(data, where)


# --------------------------------------------------------------------------- the log


def log_dir(database: str) -> Path:
    base = os.environ.get(ENV_CHECKPOINT_DIR)
    root = Path(base) if base else release_home() / "audit" / "checkpoints"
    return root / db.physical_name(database)


def trail_name(database: str) -> str:
    return db.physical_name(database)


def file_name(seq: int) -> str:
    return f"{seq:012d}.json"


def read_log(database: str) -> list[LogItem]:
    """Every checkpoint file of the trail, in seq order (file-name order)."""
    directory = log_dir(database)
    return [_read_item(directory, name, database) for name in _names(directory)]


def _names(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []


def _read_item(directory: Path, name: str, database: str) -> LogItem:
    try:
        checkpoint = Checkpoint.model_validate_json((directory / name).read_bytes())
    except (ValueError, ContractError) as exc:
        first = str(exc).splitlines()[0][:200]
        return LogItem(name, None, f"not a checkpoint ({first})")
    if name != file_name(checkpoint.seq):
        return LogItem(name, checkpoint, f"names seq {checkpoint.seq}: file renamed")
    if checkpoint.trail != trail_name(database):
        return LogItem(name, checkpoint, f"belongs to trail {checkpoint.trail!r}")
    return LogItem(name, checkpoint)


def signature_problem(checkpoint: Checkpoint, trusted: dict[str, Any]) -> str | None:
    """None when the checkpoint is signed by a trusted key; else why not."""
    from cryptography.exceptions import InvalidSignature

    key = trusted.get(checkpoint.key_id)
    if key is None:
        return f"signed by key id {checkpoint.key_id}, which is not trusted"
    try:
        key.verify(base64.b64decode(checkpoint.signature), checkpoint.signed_text().encode())
    except (InvalidSignature, ValueError, binascii.Error):
        return "signature does not verify"
    return None


def newest_valid(database: str, trusted: dict[str, Any]) -> Checkpoint | None:
    """The newest checkpoint of the log that a trusted key signed (None: there is none)."""
    directory = log_dir(database)
    for name in reversed(_names(directory)):  # newest first: one file read, as a rule
        item = _read_item(directory, name, database)
        cp = item.checkpoint
        if cp and not item.problem and not signature_problem(cp, trusted):
            return cp
    return None


def write(database: str, checkpoint: Checkpoint) -> Checkpoint:
    """Add the checkpoint to the log; a checkpoint already there for its seq is kept (and
    returned) when it says the same head, else AuditKeyError never overwrites it."""
    directory = log_dir(database)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name(checkpoint.seq)
    text = checkpoint.model_dump_json() + "\n"
    if _write_once(path, text, 0o444):
        return checkpoint
    existing = Checkpoint.model_validate_json(path.read_bytes())
    if existing.head_hash != checkpoint.head_hash:
        raise CheckpointRefused(
            f"checkpoint {path} already records another head for seq {checkpoint.seq}"
        )
    return existing


def _write_once(path: Path, text: str, mode: int) -> bool:
    """Create `path` atomically with `text`; False when it already exists (never replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
