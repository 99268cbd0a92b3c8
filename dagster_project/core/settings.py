"""Where the project keeps its state, and where products live.

Everything is derived from environment variables so that every process (CLI, Dagster
run workers, the webserver, platform processes) agrees without passing paths around.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRODUCTS_DIR = Path(os.environ.get("RELEASE_PRODUCTS_DIR", PROJECT_ROOT / "products"))

# Release keys become Dagster partition keys and file names: keep them boring.
RELEASE_KEY_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")


def release_home() -> Path:
    """The state directory (default `.release/` in the project), created on demand."""
    home = Path(os.environ.get("RELEASE_HOME") or PROJECT_ROOT / ".release").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or release_home() / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def product_dir(product_id: str) -> Path:
    return PRODUCTS_DIR / product_id


def list_products() -> list[str]:
    if not PRODUCTS_DIR.is_dir():
        return []
    return sorted(p.name for p in PRODUCTS_DIR.iterdir() if (p / "product.yaml").is_file())


def validate_release_key(key: str) -> str:
    """Refuse keys Dagster or the file system would mangle (commas, pipes, spaces, `..`)."""
    problems = [
        why
        for bad, why in ((",", "a comma"), ("|", "a pipe"), (" ", "a space"), ("..", "'..'"))
        if bad in key
    ]
    if problems:
        raise ValueError(f"release key {key!r} is refused: it contains {', '.join(problems)}")
    if not RELEASE_KEY_RE.match(key):
        raise ValueError(
            f"release key {key!r} is refused: use 1-64 characters from letters, digits, "
            "'.', '_', '+', '-', starting with a letter or digit (e.g. 1.4.0)"
        )
    return key
