"""Where the project keeps its state, and where products live.

Everything is derived from environment variables so that every process (CLI, Dagster
run workers, the webserver, platform processes) agrees without passing paths around.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dagster_project.core.knobs import quote  # a 10,000-character key is never echoed whole

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRODUCTS_ENV = "RELEASE_PRODUCTS_DIR"

# Release keys become Dagster partition keys and file names: keep them boring.
RELEASE_KEY_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")


class StateDirError(OSError):
    """The state directory cannot be created or written; the message names the variable."""


def release_home() -> Path:
    """The state directory (default `.release/` in the project), created on demand."""
    home = Path(os.environ.get("RELEASE_HOME") or PROJECT_ROOT / ".release").resolve()
    return _writable_dir(home, "RELEASE_HOME")


def dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or release_home() / "dagster").resolve()
    return _writable_dir(home, "DAGSTER_HOME")


def _writable_dir(path: Path, variable: str) -> Path:
    # Checked here, once, so a bad directory is one clear line instead of a traceback from
    # whichever later step first writes a file there.
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(
            f"{variable}: cannot create the state directory {path}: {exc.strerror or exc}; "
            f"set {variable} to a directory this user can create and write"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateDirError(
            f"{variable}: the state directory {path} is not writable by this user; "
            f"set {variable} to a writable directory"
        )
    return path


BAKE_SCALE_ENV = "RELEASE_BAKE_SCALE"


def bake_scale() -> float:
    """`RELEASE_BAKE_SCALE` (default 1): a factor on the canary steps' bake times, for tests
    and demos, without editing the spec. Never on the evidence: a step whose sample is short
    still extends until it is big enough, and the promotion's watch keeps its length. Raises
    ValueError naming the variable when it is not a number in (0, 1]."""
    raw = os.environ.get(BAKE_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # nan fails both
        raise ValueError(
            f"{BAKE_SCALE_ENV}: {quote(raw, 40)} is not a number in (0, 1] (a factor on the "
            "spec's bake times, e.g. 0.5; unset it for the spec's own)"
        )
    return value


def products_dir() -> Path:
    """Where the product folders live: `$RELEASE_PRODUCTS_DIR`, else `<project>/products/`.
    Read at every call, so a process (or a test) that sets the variable sees its products."""
    return Path(os.environ.get(PRODUCTS_ENV) or PROJECT_ROOT / "products")


def product_dir(product_id: str) -> Path:
    return products_dir() / product_id


def list_products() -> list[str]:
    """Every folder under `products_dir()` holding a `product.yaml` (valid or not); hidden
    ones (`.name`, e.g. a folder `release new` is still writing) are not products."""
    root = products_dir()
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and (p / "product.yaml").is_file()
    )


def validate_release_key(key: str) -> str:
    """Refuse keys Dagster or the file system would mangle (commas, pipes, spaces, `..`)."""
    if not isinstance(key, str) or not key:
        raise ValueError(
            "release key '' is refused: it is empty; use 1-64 characters from letters, digits, "
            "'.', '_', '+', '-' (e.g. 1.4.0), or leave --release out for the source's hash"
        )
    problems = [
        why
        for bad, why in ((",", "a comma"), ("|", "a pipe"), (" ", "a space"), ("..", "'..'"))
        if bad in key
    ]
    if problems:
        raise ValueError(f"release key {quote(key)} is refused: it contains {', '.join(problems)}")
    if not RELEASE_KEY_RE.fullmatch(key):  # match() would pass a trailing newline
        raise ValueError(
            f"release key {quote(key)} is refused: use 1-64 characters from letters, digits, "
            "'.', '_', '+', '-', starting with a letter or digit (e.g. 1.4.0)"
        )
    return key
