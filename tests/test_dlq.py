"""The dead-letter workflow (`release dlq list|replay`, core/dlq.py): real Postgres, the real
sample worker in its own process, the CLI in child processes, the real audit trail.

The products are copies of the sample (`dlqt-sample`, same guardrail fingerprint) and a
scaffolded second product (`dlqt-scaffold`, other table and column names) in a private
products directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagster_project.core import audit, database, dlq, registry
from dagster_project.core.migrations import history
from dagster_project.core.settings import PROJECT_ROOT
from dagster_project.core.spec import ProductSpec, SpecError, load_spec
from tests.conftest import GUARDRAIL_TOKEN

SAMPLE = "4pnihc40q-yj"
PRODUCT = "dlqt-sample"
SCAFFOLDED = "dlqt-scaffold"
RELEASE = "from dagster_project.cli import release_main; raise SystemExit(release_main())"
JOB_TIMEOUT_S = 30.0


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def products_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("dlq-products")
    target = root / PRODUCT
    shutil.copytree(PROJECT_ROOT / "products" / SAMPLE, target)
    spec_file = target / "product.yaml"
    text = spec_file.read_text()
    assert f"product: {SAMPLE}\n" in text
    spec_file.write_text(text.replace(f"product: {SAMPLE}\n", f"product: {PRODUCT}\n", 1))
    previous = os.environ.get("RELEASE_PRODUCTS_DIR")
    os.environ["RELEASE_PRODUCTS_DIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("RELEASE_PRODUCTS_DIR", None)
    else:
        os.environ["RELEASE_PRODUCTS_DIR"] = previous


@pytest.fixture(scope="module")
def spec(products_dir: Path) -> ProductSpec:
    return load_spec(PRODUCT)


def migrated(spec: ProductSpec, env: str) -> str:
    """The product's environment database, fresh, with its migrations applied."""
    name = database.environment_database(spec.product, env)
    database.drop_database(name)
    database.ensure_database(name)
    history.apply_pending(name, spec.migrations_path, actor="test_dlq")
    return name


def sql(db: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str]:
    child = dict(os.environ)
    child.pop("GUARDRAIL_TOKEN", None)
    for name, value in (env or {}).items():
        if value is None:
            child.pop(name, None)
        else:
            child[name] = value
    done = subprocess.run(
        [sys.executable, "-c", RELEASE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child,
        cwd=PROJECT_ROOT,
    )
    return done.returncode, done.stdout + done.stderr


def insert_dead(db: str, key: str, *, error: str = "poison payload: refused by design") -> None:
    """A job exactly as the sample worker leaves one after max_attempts (jobs + dead_letter)."""
    sql(
        db,
        "INSERT INTO jobs (job_key, queue, payload, status, attempts, last_error) "
        "VALUES (%s, 'high', '{\"poison\": true}', 'dead', 4, %s)",
        (key, error),
    )
    sql(
        db,
        "INSERT INTO dead_letter (job_key, queue, payload, attempts, last_error) "
        "VALUES (%s, 'high', '{\"poison\": true}', 4, %s)",
        (key, error),
    )


def snapshot(db: str) -> tuple[list[tuple[Any, ...]], ...]:
    return (
        sql(
            db, "SELECT job_key, status, attempts, next_attempt_at, last_error FROM jobs ORDER BY 1"
        ),
        sql(db, "SELECT * FROM dead_letter ORDER BY 1"),
        sql(db, "SELECT * FROM job_results ORDER BY 1"),
    )


class Worker:
    """The sample's real worker, from a built artifact, in its own process."""

    def __init__(self, spec: ProductSpec, root: Path, db: str, version: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
        env.pop("PYTHONPATH", None)
        env.update(
            SERVICE_DATABASE_URL=database.server().dsn(db),
            SERVICE_VERSION=version,
            SERVICE_TRACK="stable",
            SERVICE_MANIFEST=str(root / "manifest.json"),
            SERVICE_PRODUCT_SPEC=str(root / "product.yaml"),
        )
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(root / "service" / "worker.py")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def start_worker(spec: ProductSpec, tmp_path: Path) -> Iterator[Any]:
    started: list[Worker] = []

    def _start(db: str, version: str, settings: dict[str, Any]) -> Worker:
        pushed = registry.push(registry.build_artifact(spec, version, settings))
        root = registry.extract(registry.fetch(pushed.sha256), tmp_path / f"artifact-{version}")
        worker = Worker(spec, root, db, version, tmp_path / f"worker-{version}.log")
        started.append(worker)
        return worker

    yield _start
    for worker in started:
        worker.stop()


def wait_for(db: str, key: str, status: str, worker: Worker) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            pytest.fail(f"the worker exited:\n{worker.log.read_text()}")
        rows = sql(db, "SELECT status FROM jobs WHERE job_key = %s", (key,))
        if rows and rows[0][0] == status:
            return
        time.sleep(0.05)
    pytest.fail(f"job {key} not {status} after {JOB_TIMEOUT_S}s: {rows}\n{worker.log.read_text()}")


# --- pure: arguments and the contract -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("dlq", "replay", PRODUCT, "--env", "staging"), "--job KEY or --all"),
        (
            ("dlq", "replay", PRODUCT, "--env", "staging", "--job", "k", "--all"),
            "--job KEY or --all",
        ),
        (("dlq", "list", PRODUCT, "--env", "qa"), "--env"),
        (("dlq", "replay", PRODUCT, "--job", "k"), "--env"),
        (("dlq", "list", "no-such-product", "--env", "staging"), "no-such-product"),
        (("dlq", "list", "../etc", "--env", "staging"), "product id"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(
    products_dir: Path, args: tuple[str, ...], needle: str
) -> None:
    code, out = run_cli(*args)
    assert code == 2, out
    assert needle in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_contract_without_the_replay_section_is_named(products_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "products"
    shutil.copytree(products_dir / PRODUCT, root / PRODUCT)
    contract = root / PRODUCT / "contract.yaml"
    text = contract.read_text()
    start = text.index("  replay:\n")
    end = text.index("\n", text.index("    jobs_table: {", start)) + 1
    contract.write_text(text[:start] + text[end:])
    code, out = run_cli(
        "dlq", "list", PRODUCT, "--env", "staging", env={"RELEASE_PRODUCTS_DIR": str(root)}
    )
    assert code == 2, out
    assert "worker.replay" in out and "contract.yaml" in out
    assert "Traceback" not in out


def test_a_bad_replay_field_names_file_line_and_field(products_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "products"
    shutil.copytree(products_dir / PRODUCT, root / PRODUCT)
    contract = root / PRODUCT / "contract.yaml"
    contract.write_text(
        contract.read_text().replace("jobs_table: {table: jobs,", "jobs_table: {table: Jobs-Table,")
    )
    with pytest.raises(SpecError) as caught:
        load_spec(root / PRODUCT / "product.yaml")
    message = str(caught.value) + " ".join(str(p) for p in caught.value.problems)
    assert "worker.replay.jobs_table.table" in message
    line = next(
        n for n, text in enumerate(contract.read_text().splitlines(), 1) if "Jobs-Table" in text
    )
    assert f"contract.yaml:{line}:" in message


@pytest.mark.slow
def test_database_down_exits_2_naming_it(products_dir: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:9/postgres"  # discard port: nothing listens
    code, out = run_cli(
        "dlq", "list", PRODUCT, "--env", "staging", env={"RELEASE_DATABASE_URL": url}
    )
    assert code == 2, out
    assert "not reachable" in out and "staging" in out
    assert "Traceback" not in out


# --- real: the worker dead-letters, list and replay in staging ------------------------------------


@pytest.mark.slow
def test_staging_list_and_replay_with_the_real_worker(spec: ProductSpec, start_worker: Any) -> None:
    db = migrated(spec, "staging")
    broken = start_worker(db, "9.0.0-dlqt", {"fail_jobs_matching": "^dlqt-doomed-"})
    jobs = {
        "dlqt-doomed-1": {"values": [1, 2, 3]},
        "dlqt-doomed-2": {"values": [4]},
        "dlqt-poison-1": {"poison": True},
        "dlqt-ok-1": {"values": [5]},
    }
    for key, payload in jobs.items():
        sql(
            db,
            "INSERT INTO jobs (job_key, queue, payload) VALUES (%s, 'high', %s::JSONB)",
            (key, json.dumps(payload)),
        )
    for key in ("dlqt-doomed-1", "dlqt-doomed-2", "dlqt-poison-1"):
        wait_for(db, key, "dead", broken)
    wait_for(db, "dlqt-ok-1", "done", broken)
    broken.stop()

    code, out = run_cli("dlq", "list", PRODUCT, "--env", "staging", "--json")
    assert code == 0, out
    listed = {job["key"]: job for job in json.loads(out)["dead"]}
    assert set(listed) == {"dlqt-doomed-1", "dlqt-doomed-2", "dlqt-poison-1"}
    assert listed["dlqt-doomed-1"]["attempts"] == 4 and listed["dlqt-doomed-1"]["queue"] == "high"
    assert "fail_jobs_matching" in listed["dlqt-doomed-1"]["latest_error"]
    assert "poison" in listed["dlqt-poison-1"]["latest_error"]
    assert all(job["age_seconds"] >= 0 and job["dead_since"] for job in listed.values())
    code, out = run_cli("dlq", "list", PRODUCT, "--env", "staging")
    assert code == 0 and "dlqt-poison-1" in out, out

    before = snapshot(db)
    code, out = run_cli("dlq", "replay", PRODUCT, "--env", "staging", "--all", "--dry-run")
    assert code == 0, out
    assert "would replay dlqt-doomed-1" in out and "nothing changed" in out
    assert snapshot(db) == before

    code, out = run_cli("dlq", "replay", PRODUCT, "--env", "staging", "--job", "dlqt-doomed-1")
    assert code == 0, out
    assert "replayed dlqt-doomed-1" in out
    assert sql(db, "SELECT status, attempts FROM jobs WHERE job_key = 'dlqt-doomed-1'") == [
        ("queued", 0)
    ]
    assert sql(db, "SELECT count(*) FROM dead_letter WHERE job_key = 'dlqt-doomed-1'") == [(0,)]

    code, out = run_cli("dlq", "replay", PRODUCT, "--env", "staging", "--job", "dlqt-doomed-1")
    assert code == 3, out
    assert "dlqt-doomed-1" in out and "already replayed" in out
    code, out = run_cli("dlq", "replay", PRODUCT, "--env", "staging", "--job", "dlqt-ok-1")
    assert code == 3 and "dlqt-ok-1" in out, out
    code, out = run_cli("dlq", "replay", PRODUCT, "--env", "staging", "--job", "dlqt-nope")
    assert code == 2 and "--job 'dlqt-nope'" in out and "Traceback" not in out, out

    fixed = start_worker(db, "9.0.1-dlqt", {})  # the fixed release: no fail_jobs_matching
    wait_for(db, "dlqt-doomed-1", "done", fixed)
    code, out = run_cli("dlq", "replay", PRODUCT, "--env", "staging", "--all")
    assert code == 0, out
    assert "replayed dlqt-doomed-2" in out and "replayed dlqt-poison-1" in out
    wait_for(db, "dlqt-doomed-2", "done", fixed)
    wait_for(db, "dlqt-poison-1", "dead", fixed)  # still poison: back after max_attempts
    fixed.stop()

    results = dict(sql(db, "SELECT job_key, count(*) FROM job_results GROUP BY job_key"))
    assert results == {"dlqt-doomed-1": 1, "dlqt-doomed-2": 1, "dlqt-ok-1": 1}
    attempts = sql(
        db,
        "SELECT settled_as, count(*) FROM job_attempts WHERE job_key = 'dlqt-doomed-1' "
        "GROUP BY settled_as ORDER BY settled_as",
    )
    assert attempts == [("dead", 1), ("done", 1), ("retry", 3)]  # ran exactly once more
    assert sql(db, "SELECT count(*) FROM dead_letter") == [(1,)]
    assert sql(db, "SELECT attempts FROM jobs WHERE job_key = 'dlqt-poison-1'") == [(4,)]
    assert dlq.depth(spec, "staging").depth == 1


@pytest.mark.slow
def test_a_concurrent_double_replay_queues_the_job_once(spec: ProductSpec) -> None:
    db = migrated(spec, "staging")
    insert_dead(db, "dlqt-race-1")
    outcomes: list[str] = []
    blocker = database.connect(db, autocommit=False)
    try:
        with blocker.cursor() as cur:  # hold the job so both replays meet at its row lock
            cur.execute("SELECT 1 FROM jobs WHERE job_key = 'dlqt-race-1' FOR UPDATE")

        def attempt() -> None:
            try:
                outcomes.append(
                    "replayed" if dlq.replay(spec, "staging", ["dlqt-race-1"]).replayed else "none"
                )
            except dlq.DlqRefused:
                outcomes.append("refused")

        threads = [threading.Thread(target=attempt) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        assert outcomes == []  # every replay waits for the job's row lock
    finally:
        blocker.rollback()
        blocker.close()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(outcomes) == ["refused", "refused", "replayed"]
    assert sql(db, "SELECT status, attempts FROM jobs") == [("queued", 0)]
    assert sql(db, "SELECT count(*) FROM dead_letter") == [(0,)]


@pytest.mark.slow
def test_a_scaffolded_product_with_other_names_lists_and_replays(products_dir: Path) -> None:
    from dagster_project.core.scaffold import create_product

    if not (products_dir / SCAFFOLDED).exists():
        create_product(SCAFFOLDED, root=products_dir)
    spec = load_spec(SCAFFOLDED)
    assert spec.queues.dead_letter != "dead_letter"
    db = migrated(spec, "staging")
    sql(
        db,
        "INSERT INTO tasks (task_key, lane, task_input, state, tries, failure) "
        "VALUES ('t-1', 'urgent', '{\"explode\": true}', 'parked', 3, 'exploded')",
    )
    sql(
        db,
        "INSERT INTO parked_tasks (task_key, lane, task_input, tries, failure) "
        "VALUES ('t-1', 'urgent', '{\"explode\": true}', 3, 'exploded')",
    )
    [dead] = dlq.list_dead(spec, "staging")
    assert (dead.key, dead.queue, dead.attempts, dead.latest_error) == (
        "t-1",
        "urgent",
        3,
        "exploded",
    )
    assert dlq.replay(spec, "staging", None).replayed == ["t-1"]
    assert sql(db, "SELECT state, tries, failure FROM tasks") == [("queued", 0, None)]
    assert sql(db, "SELECT count(*) FROM parked_tasks") == [(0,)]


# --- production: the token and the audit trail ---------------------------------------------


@pytest.mark.slow
def test_production_replay_needs_the_token_and_is_audited_once(spec: ProductSpec) -> None:
    db = migrated(spec, "production")
    insert_dead(db, "dlqt-prod-1")
    before = snapshot(db)
    args = ("dlq", "replay", PRODUCT, "--env", "production", "--job", "dlqt-prod-1")

    code, out = run_cli(*args)
    assert code == 4 and "GUARDRAIL_TOKEN" in out and "Traceback" not in out, out
    code, out = run_cli(*args, env={"GUARDRAIL_TOKEN": "tpt-wrong-token"})
    assert code == 4 and "GUARDRAIL_TOKEN" in out and "tpt-wrong-token" not in out, out
    code, out = run_cli(*args, "--dry-run")
    assert code == 0 and "would replay dlqt-prod-1" in out, out
    assert snapshot(db) == before
    assert [e for e in audit.entries(PRODUCT) if e.payload.get("kind") == "dlq_replay"] == []

    code, out = run_cli(*args, env={"GUARDRAIL_TOKEN": GUARDRAIL_TOKEN, "RELEASE_ACTOR": "dlqt"})
    assert code == 0, out
    assert "replayed dlqt-prod-1" in out and "audit entry seq" in out
    assert GUARDRAIL_TOKEN not in out
    assert sql(db, "SELECT status, attempts FROM jobs") == [("queued", 0)]

    code, out = run_cli(*args, env={"GUARDRAIL_TOKEN": GUARDRAIL_TOKEN})
    assert code == 3 and "already replayed" in out, out

    entries = [e for e in audit.entries(PRODUCT) if e.payload.get("kind") == "dlq_replay"]
    assert len(entries) == 1
    payload = entries[0].payload
    assert payload["replayed"] == ["dlqt-prod-1"]
    assert payload["identity"] == "ci:dlqt" and payload["environment"] == "production"
    assert payload["guardrail_token"] == GUARDRAIL_TOKEN  # the one place it is kept
    code, out = run_cli("audit", "show", PRODUCT)
    assert code == 0 and "dlq_replay" in out and GUARDRAIL_TOKEN not in out, out
    code, out = run_cli("audit", "verify")
    assert code == 0, out


@pytest.mark.slow
def test_release_status_shows_the_dead_letter_depth(spec: ProductSpec) -> None:
    db = migrated(spec, "staging")
    insert_dead(db, "dlqt-status-1")
    code, out = run_cli("status", PRODUCT, "--json")
    assert code == 0, out
    environments = json.loads(out)["environments"]
    staging = environments["staging"]["dead_letter"]
    assert staging["depth"] == 1 and staging["oldest_age_seconds"] >= 0
    assert "depth" in environments["production"]["dead_letter"]


@pytest.mark.slow
def test_validate_names_a_replay_column_the_migrations_lack(
    products_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "products"
    shutil.copytree(products_dir / PRODUCT, root / PRODUCT)
    contract = root / PRODUCT / "contract.yaml"
    text = contract.read_text()
    assert "due_column: next_attempt_at," in text
    contract.write_text(text.replace("due_column: next_attempt_at,", "due_column: due_soon,"))
    code, out = run_cli("validate", PRODUCT, env={"RELEASE_PRODUCTS_DIR": str(root)})
    assert code == 2, out
    assert "worker.replay.jobs_table.due_column" in out and "due_soon" in out
