"""The code location: its graph, partitions and gates, and that it stays light to load."""

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from conftest import PRODUCT

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("great_expectations", "scipy", "sqlfluff", "matplotlib", "pandas")


def test_release_graph_is_the_designed_chain() -> None:
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    stages = ["build", "schema_migration_check", "staging_smoke", "canary", "promotion", "audit"]
    for upstream, downstream in itertools.pairwise(stages):
        parents = graph.get(dg.AssetKey([PRODUCT, downstream])).parent_keys
        assert dg.AssetKey([PRODUCT, upstream]) in parents, (upstream, downstream)
    for stage in stages:
        node = graph.get(dg.AssetKey([PRODUCT, stage]))
        assert isinstance(node.partitions_def, dg.DynamicPartitionsDefinition)


def test_gates_are_blocking_partitioned_checks() -> None:
    from dagster_project.definitions import defs

    specs = {
        (spec.asset_key.path[-1], spec.name): spec
        for checks in defs.asset_checks or []
        for spec in checks.check_specs
    }
    for asset, name in [
        ("build", "artifact_integrity"),
        ("schema_migration_check", "migration_lint"),
        ("schema_migration_check", "migration_safety"),
        ("schema_migration_check", "schema_drift"),
        ("schema_migration_check", "edge_vcl"),
        ("staging_smoke", "smoke"),
        ("staging_smoke", "edge_cache"),
        ("staging_smoke", "worker_dlq"),
        ("staging_smoke", "data_quality"),
        ("canary", "slo_regression"),
        ("canary", "schema_drift"),
        ("audit", "compliance"),
    ]:
        spec = specs[(asset, name)]
        assert spec.blocking, name
        assert isinstance(spec.partitions_def, dg.DynamicPartitionsDefinition), name


@pytest.mark.slow
def test_loading_the_code_location_imports_no_heavy_library() -> None:
    code = (
        "import sys; import dagster_project.definitions as d; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0] if node.level == 0 else "")
    return names


def test_core_never_imports_dagster_or_upper_layers() -> None:
    core = sorted((ROOT / "dagster_project" / "core").rglob("*.py"))
    assert core
    for path in core:
        bad = _imports(path) & {"dagster", "assets", "checks", "dagster_webserver"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        text = path.read_text()
        for upper in ("dagster_project.resources", "dagster_project.definitions"):
            assert upper not in text, f"{path.relative_to(ROOT)} imports {upper}"


def test_stages_and_gates_never_import_the_wiring() -> None:
    wiring = ("definitions", "sensors", "schedules", "cli", "deploy", "jobs", "instance")
    for path in sorted([*(ROOT / "assets").glob("*.py"), *(ROOT / "checks").glob("*.py")]):
        text = path.read_text()
        for module in wiring:
            assert f"dagster_project.{module}" not in text, f"{path.name} imports {module}"


def test_release_keys_with_bad_characters_are_refused_when_registered() -> None:
    import pytest

    from dagster_project.partitions import register_release

    instance = dg.DagsterInstance.ephemeral()
    for key in ("1,2", "1|2", "1 2", "1..2"):
        with pytest.raises(ValueError, match="refused"):
            register_release(instance, PRODUCT, key)
    assert register_release(instance, PRODUCT, "9.9.9") is True
    assert register_release(instance, PRODUCT, "9.9.9") is False


def test_every_job_runs_environment_steps_in_the_product_pool_and_in_process() -> None:
    """The implicit asset job (UI launches from the asset graph, backfills), the product's jobs
    (CLI, sensors, schedules) and the verification job: the step of every stage that touches
    staging or production is in the product's pool, and so is the verification; build, audit
    and the checks (which only judge a stage's output) are not. With `granularity: run` the
    queue counts a run's pools from any of its steps: a run of the whole release, or of any one
    environment stage, has the pool; a run of build or audit alone has none. Every job runs
    in-process (the Definitions' default executor)."""
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.op_concurrency_limits_counter import (
        compute_run_op_concurrency_info_for_snapshot,
    )
    from dagster._core.snap import snapshot_from_execution_plan

    from assets import POOLED_STAGES, release_pool
    from dagster_project.definitions import defs

    def run_pools(job: dg.JobDefinition) -> set[str]:
        plan = create_execution_plan(job)
        snapshot = snapshot_from_execution_plan(plan, job.get_job_snapshot_id())
        info = compute_run_op_concurrency_info_for_snapshot(snapshot)
        return set(info.all_pools or ()) if info else set()

    pool = release_pool(PRODUCT)
    slug = PRODUCT.replace("-", "_")
    assert set(POOLED_STAGES) == {"schema_migration_check", "staging_smoke", "canary", "promotion"}
    for name in [
        "__ASSET_JOB",
        f"release_{slug}",
        f"audit_{slug}",
        f"verify_production_job_{slug}",
    ]:
        job = defs.resolve_job_def(name)
        assert job.executor_def is dg.in_process_executor, name
        for step in create_execution_plan(job).steps:
            pooled = step.key.startswith("verify_production_") or step.key.removeprefix(
                f"{slug}__"
            ) in set(POOLED_STAGES)
            assert step.pool == (pool if pooled else None), (name, step.key, step.pool)
    assert pool in run_pools(defs.resolve_job_def(f"release_{slug}"))
    assert pool in run_pools(defs.resolve_job_def(f"verify_production_job_{slug}"))
    assert pool not in run_pools(defs.resolve_job_def(f"audit_{slug}"))
    asset_job = defs.resolve_job_def("__ASSET_JOB")
    for stage in ["build", *POOLED_STAGES, "audit"]:
        subset = asset_job.get_subset(asset_selection={dg.AssetKey([PRODUCT, stage])})
        assert (pool in run_pools(subset)) is (stage in POOLED_STAGES), stage


def test_gate_tables_are_native_sortable_tables() -> None:
    from assets.common import GATE_COLUMNS, table

    empty = table([], GATE_COLUMNS)
    assert empty.records == []
    assert [c.name for c in empty.schema.columns] == ["check", "status"]
    value = table([{"n": 1, "p": 0.5, "ok": True, "why": ["a"]}, {"n": 2, "p": float("nan")}])
    assert [(c.name, c.type) for c in value.schema.columns] == [
        ("n", "int"),
        ("p", "string"),
        ("ok", "bool"),
        ("why", "string"),
    ]
    assert value.records[0].data == {"n": 1, "p": "0.5", "ok": True, "why": "['a']"}
    assert value.records[1].data == {"n": 2, "p": "nan", "ok": None, "why": None}
