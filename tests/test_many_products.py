"""A second product, end to end, from the same code location (issue 12's done-when).

`release new` writes a product the package has never seen (its own tiers, endpoints, TTL
classes, queues, tables and migrations) into a products directory beside the sample; both are
released by the real `deploy` entry point in child processes, at the same time; then the new
product is blocked by a bad release, promoted again with a second migration and a changed
contract, and audited. Each product keeps its own partitions, jobs, sensors, schedules,
databases, ports and audit entries, and the sample keeps working. Slow: real platform, real
canaries (bake times scaled down with RELEASE_BAKE_SCALE)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project.core import database, httpclient
from dagster_project.core.settings import product_dir

pytestmark = pytest.mark.slow

SECOND = "second-shop"
BAKE_SCALE = "0.4"


@dataclass
class Released:
    code: int
    output: str
    started: float
    ended: float

    @property
    def run_id(self) -> str | None:
        found = re.findall(r"^run ([0-9a-f-]{36}) ", self.output, re.M)
        return found[-1] if found else None


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The sample (linked) and nothing else; RELEASE_PRODUCTS_DIR points here for the module."""
    root = tmp_path_factory.mktemp("products")
    (root / PRODUCT).symlink_to(product_dir(PRODUCT), target_is_directory=True)
    previous = os.environ.get("RELEASE_PRODUCTS_DIR")
    os.environ["RELEASE_PRODUCTS_DIR"] = str(root)
    try:
        yield root
    finally:
        from dagster_project.core.platform.local import LocalPlatform

        for product in (SECOND, PRODUCT):
            if (root / product / "product.yaml").is_file():
                LocalPlatform(product).down()
        if previous is None:
            os.environ.pop("RELEASE_PRODUCTS_DIR", None)
        else:
            os.environ["RELEASE_PRODUCTS_DIR"] = previous


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GUARDRAIL_TOKEN"}
    return {**env, "RELEASE_BAKE_SCALE": BAKE_SCALE, **extra}


def _cli(entry: str, *argv: str, token: str | None = None) -> subprocess.Popen[str]:
    code = f"from dagster_project.cli import {entry}; raise SystemExit({entry}())"
    env = _env(**({"GUARDRAIL_TOKEN": token} if token else {}))
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _finish(process: subprocess.Popen[str], started: float) -> Released:
    output, _ = process.communicate(timeout=900)
    released = Released(process.returncode, output, started, time.monotonic())
    print(output[-4000:])
    return released


def release(cli: str, *argv: str, token: str | None = None) -> tuple[int, str]:
    done = _finish(_cli(cli, *argv, token=token), time.monotonic())
    return done.code, done.output


@pytest.fixture(scope="module")
def token(products: Path) -> str:
    code, output = release("release_main", "new", SECOND)  # no token exists yet
    assert code == 0, output
    (line,) = [x for x in output.splitlines() if x.startswith("GUARDRAIL_TOKEN=")]
    return line.removeprefix("GUARDRAIL_TOKEN=")


@pytest.fixture(scope="module")
def first_releases(products: Path, token: str) -> dict[str, Released]:
    """Both products released by `deploy` in two processes started together."""
    started = time.monotonic()
    sample = _cli("deploy_main", PRODUCT, "--release", "many-1.0.0", token=GUARDRAIL_TOKEN)
    second = _cli("deploy_main", SECOND, "--release", "d-1.0.0", token=token)
    return {SECOND: _finish(second, started), PRODUCT: _finish(sample, started)}


def _production(product: str) -> dict[str, Any]:
    from dagster_project.core.platform.local import LocalPlatform

    return LocalPlatform(product).current("production")


def _query(product: str, env: str, sql: str, *params: str) -> set[str]:
    db = database.environment_database(product, env)  # the product's own database
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return {row[0] for row in cur.fetchall()}


def _tables(product: str, env: str) -> set[str]:
    return _query(product, env, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")


def _served(product: str, path: str, n: int = 20) -> dict[str, int]:
    from dagster_project.core.platform.local import LocalPlatform

    edge = LocalPlatform(product).edge_url("production")
    counts: dict[str, int] = {}
    with httpclient.client(timeout=5, trust_env=False) as client:
        for i in range(n):
            response = client.get(f"{edge}{path}?probe={i}")
            key = f"{response.status_code} {response.headers.get('x-release', '?')}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_the_new_product_validates(products: Path, token: str) -> None:
    code, output = release("release_main", "validate", SECOND, "--json")
    assert code == 0, output
    assert json.loads(output[output.index("{") :])["valid"] is True


def test_one_code_location_serves_both_products(products: Path, token: str) -> None:
    from dagster_project.definitions import build_definitions

    defs = build_definitions()
    repo = defs.get_repository_def()
    groups = {g for a in defs.assets or [] for g in a.group_names_by_key.values()}  # type: ignore[union-attr]
    assert {"release_4pnihc40q_yj", "release_second_shop"} <= groups
    names = {j.name for j in repo.get_all_jobs()} | {s.name for s in repo.sensor_defs}
    names |= {s.name for s in repo.schedule_defs}
    for slug in ("4pnihc40q_yj", "second_shop"):
        for name in ("release_", "audit_", "audit_sensor_", "reconcile_sensor_", "release_sensor_",
                     "nightly_release_train_", "post_deploy_verification_"):  # fmt: skip
            assert f"{name}{slug}" in names


def test_two_products_release_at_the_same_time_without_waiting(
    first_releases: dict[str, Released],
) -> None:
    from dagster_project.instance import get_instance

    for product, done in first_releases.items():
        assert done.code == 0, f"{product}: {done.output[-3000:]}"
        assert "promoted and audited" in done.output
        assert "owned by" not in done.output
    instance = get_instance()
    windows = []
    for done in first_releases.values():
        assert done.run_id is not None
        stats = instance.get_run_stats(done.run_id)
        windows.append((stats.start_time, stats.end_time))
    (a_start, a_end), (b_start, b_end) = windows
    overlap = min(a_end, b_end) - max(a_start, b_start)
    shorter = min(a_end - a_start, b_end - b_start)
    # Had one waited for the other, their runs would barely overlap.
    assert overlap > 0.6 * shorter, (windows, overlap, shorter)
    assert _production(SECOND)["stable"]["version"] == "d-1.0.0"
    assert _production(PRODUCT)["stable"]["version"] == "many-1.0.0"


def test_each_product_has_its_own_databases_ports_and_partitions(
    first_releases: dict[str, Released],
) -> None:
    from dagster_project.core.platform.local import LocalPlatform
    from dagster_project.instance import get_instance
    from dagster_project.partitions import releases_partitions_name

    for env in ("staging", "production"):
        assert {"records", "tasks", "task_results", "parked_tasks"} <= _tables(SECOND, env)
        assert "records" not in _tables(PRODUCT, env)
        assert not {"items", "jobs"} & _tables(SECOND, env)
    edges = {
        (product, env): LocalPlatform(product).edge_url(env)
        for product in (PRODUCT, SECOND)
        for env in ("staging", "production")
    }
    assert len(set(edges.values())) == 4, edges
    instance = get_instance()
    assert instance.get_dynamic_partitions(releases_partitions_name(SECOND)) == ["d-1.0.0"]
    assert "d-1.0.0" not in instance.get_dynamic_partitions(releases_partitions_name(PRODUCT))
    status = subprocess.run(
        [sys.executable, "-m", "dagster_project.cli", "platform", "status", "--json"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    listed = json.loads(status.stdout)
    for product in (PRODUCT, SECOND):
        assert listed[product]["production"]["healthy"] is True
        database_url = listed[product]["production"]["database"]
        assert database.environment_database(product, "production") in database_url


def test_a_bad_release_of_the_new_product_is_blocked_and_touches_nothing(
    first_releases: dict[str, Released], token: str
) -> None:
    sample_before = _production(PRODUCT)
    code, output = release(
        "deploy_main", SECOND, "--release", "d-1.1.0-bad", "--set", "error_rate=0.2", token=token
    )
    assert code == 3, output
    assert "blocked by" in output and "slo_regression" in output
    assert _production(SECOND)["stable"]["version"] == "d-1.0.0"
    assert "canary" not in _production(SECOND)
    assert _served(SECOND, "/api/records") == {"200 d-1.0.0": 20}
    assert _production(PRODUCT) == sample_before


def test_a_second_migration_and_a_changed_contract_are_released_and_purged_selectively(
    products: Path, first_releases: dict[str, Released], token: str
) -> None:
    from dagster_project.core import changes

    folder = products / SECOND
    (folder / "migrations" / "0002_record_notes.sql").write_text(
        "SET lock_timeout = '5s';\nSET statement_timeout = '60s';\n"
        "ALTER TABLE records ADD COLUMN IF NOT EXISTS note TEXT;\n"
    )
    contract = folder / "contract.yaml"
    text = contract.read_text()
    old = "        parked: {type: integer, minimum: 0}\n"
    assert text.count(old) == 1
    contract.write_text(text.replace(old, old + "        note: {type: string}\n"))
    code, output = release("deploy_main", SECOND, "--release", "d-1.2.0", token=token)
    assert code == 0, output
    assert _production(SECOND)["stable"]["version"] == "d-1.2.0"
    columns = "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
    assert "note" in _query(SECOND, "production", columns, "records")
    assert "note" in _query(SECOND, "staging", columns, "records")
    (promoted,) = [c for c in changes.for_release(SECOND, "d-1.2.0") if c.outcome == "promoted"]
    purged = [(p.path, list(p.surrogate_keys)) for p in promoted.details.purged]
    assert purged == [("/api/stats", ["stats"])]  # only the endpoint whose contract changed


def test_audit_entries_are_per_product_and_the_trail_verifies(
    first_releases: dict[str, Released],
) -> None:
    from dagster_project.core import audit

    mine = audit.entries(SECOND)
    outcomes = sorted((e.release, e.payload["outcome"]) for e in mine)
    assert ("d-1.0.0", "promoted") in outcomes and ("d-1.1.0-bad", "aborted") in outcomes
    assert all(e.payload["product"] == SECOND for e in mine)
    assert not [e for e in audit.entries(PRODUCT) if e.release in ("d-1.0.0", "d-1.1.0-bad")]
    code, output = release("release_main", "audit", "show", SECOND, "--json")
    assert code == 0, output
    code, output = release("release_main", "audit", "verify")
    assert code == 0, output


def test_the_sample_keeps_working(first_releases: dict[str, Released]) -> None:
    assert _production(PRODUCT)["stable"]["version"] == "many-1.0.0"
    assert _served(PRODUCT, "/v1/items") == {"200 many-1.0.0": 20}
