"""Helpers for the tests of the real edge and metrics source (Varnish, Prometheus).

Where a binary is missing the test skips with a reason naming the Debian package; under CI
(`CI=true`) that skip is a failure instead, so CI never passes without running them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dagster_project.core.platform import prometheus, varnish

PRODUCT = "4pnihc40q-yj"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}: .ci/run installs it as root; install it here")
    pytest.skip(reason)


def require_varnish() -> None:
    missing = varnish.binaries_missing()
    if missing:
        _skip_or_fail(f"needs {', '.join(missing)}: {varnish.install_hint()}")


def require_prometheus() -> None:
    if prometheus.binary_missing():
        _skip_or_fail(f"needs the prometheus binary: {prometheus.install_hint()}")


def contract_changed_product(root: Path, field: str = "schema_version") -> Path:
    """A copy of the product under `root/<product>` whose `/v1/summary` answers one more
    field and promises it in its contract.yaml (that endpoint's contract changes; every
    other endpoint's stays). Returns the products dir."""
    target = root / PRODUCT
    shutil.copytree(PROJECT_ROOT / "products" / PRODUCT, target)
    _replace_once(
        target / "service" / "api.py",
        '            "dead_letter": {"count": row["dead_letter"]},\n',
        f'            "{field}": 2,\n',
    )
    _replace_once(
        target / "contract.yaml",
        "      required: [items, jobs, dead_letter]\n      properties:\n",
        f"        {field}: {{type: integer}}\n",
    )
    return root


def _replace_once(path: Path, anchor: str, added: str) -> None:
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path} changed: update contract_changed_product"
    path.write_text(text.replace(anchor, anchor + added))
