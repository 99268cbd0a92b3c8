"""The layer contract, run by ruff's banned-API rule (TID251) inside the test suite, so in CI.

dagster_project/core imports no Dagster (dagster_project/core/ruff.toml) and nothing outside the
tests imports Dagster's private `dagster._core` except `assets.common.gate_rows`, the one place
that reads it; the last tests fail loudly if a Dagster upgrade moves what that function uses.
"""

import inspect
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff_tid251(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "TID251", "--no-cache", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_layer_contract_holds() -> None:
    result = _ruff_tid251(".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("dagster_project/core/example.py", "import dagster\n"),
        ("dagster_project/core/migrations/example.py", "from dagster import AssetKey\n"),
        ("checks/example.py", "from dagster._core.events import DagsterEvent\n"),
        ("dagster_project/example.py", "import dagster._core.instance\n"),
        ("assets/example.py", "def f():\n    from dagster._core.event_api import X\n"),
        ("dagster_project/core/platform/example.py", "from hishel._async_rfc import f\n"),
        ("benchmarks/example.py", "from hishel._utils import generate_http_date\n"),
    ],
)
def test_the_layer_contract_refuses_a_violation(path: str, source: str) -> None:
    # The configuration for a path is the one ruff would use for a real file there.
    result = _ruff_tid251("--stdin-filename", path, "-", stdin=source)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TID251" in result.stdout


@pytest.mark.slow
def test_the_layer_contract_allows_dagster_above_the_core() -> None:
    result = _ruff_tid251("--stdin-filename", "assets/example.py", "-", stdin="import dagster\n")
    assert result.returncode == 0, result.stdout + result.stderr


def test_gate_rows_is_the_only_exception_to_the_contract() -> None:
    """`# noqa: TID251` lets a banned import through; only assets/common.py (gate_rows) may
    carry it (deploy runs its job through the public `dg.build_reconstructable_job`)."""
    marked = {
        str(path.relative_to(ROOT))
        for top in ("assets", "checks", "dagster_project", "benchmarks")
        for path in (ROOT / top).rglob("*.py")
        if "noqa: TID251" in path.read_text(encoding="utf-8")
    }
    assert marked <= {"assets/common.py"}, marked


def test_the_private_dagster_api_gate_rows_reads_is_still_there() -> None:
    """If this fails after a Dagster upgrade, fix assets.common.gate_rows (and only it)."""
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecord,
        AssetCheckExecutionRecordStatus,
    )
    from dagster._core.storage.event_log.base import EventLogStorage

    assert PartitionKeyFilter(key="1.0.0").key == "1.0.0"
    assert AssetCheckExecutionRecordStatus.SUCCEEDED.value == "SUCCEEDED"
    assert {s.value for s in AssetCheckExecutionRecordStatus} >= {"PLANNED", "FAILED"}
    method = EventLogStorage.get_latest_asset_check_execution_by_key
    assert "partition_filter" in inspect.signature(method).parameters
    for field in ("key", "status", "event"):
        assert field in AssetCheckExecutionRecord._fields, field
    # _evaluated_artifact reads the evaluation's target materialization by storage id.
    evaluation = inspect.signature(dg.AssetCheckEvaluation).parameters
    assert "target_materialization_data" in evaluation


def test_gate_rows_runs_against_a_real_instance() -> None:
    from assets.common import gate_rows

    key = dg.AssetCheckKey(dg.AssetKey(["product", "build"]), "artifact_integrity")
    with dg.DagsterInstance.ephemeral() as instance:
        rows = gate_rows(instance, [key], "1.0.0", "0" * 64)
    assert [(r.check, r.status, r.passed) for r in rows] == [
        (key.to_user_string(), "NEVER_EVALUATED", False)
    ]
