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
    field (its contract changes; every other endpoint's stays). Returns the products dir."""
    target = root / PRODUCT
    shutil.copytree(PROJECT_ROOT / "products" / PRODUCT, target)
    api = target / "service" / "api.py"
    text = api.read_text()
    anchor = '            "dead_letter": {"count": row["dead_letter"]},\n'
    assert text.count(anchor) == 1, "the summary handler changed: update contract_changed_product"
    api.write_text(text.replace(anchor, anchor + f'            "{field}": 2,\n'))
    return root
