"""The sample service through the real path: artifacts built and extracted by the registry, the
API served by uvicorn and the worker as their own processes, over a real Postgres database
migrated with the product's migration files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dagster_project.core import database, httpclient, registry
from dagster_project.core.spec import ProductSpec, load_spec

PRODUCT = "4pnihc40q-yj"
SERVICE_DB = "svc_test"
EMPTY_DB = "svc_test_empty"
START_TIMEOUT_S = 20.0
JOB_TIMEOUT_S = 20.0


# --- fixtures: database, artifacts, processes ------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> ProductSpec:
    return load_spec(PRODUCT)


def apply_migrations(db: str, migrations_dir: Path) -> None:
    """Plain execution in file-name order, one transaction per file (the pipeline's runner,
    with its history table, is tested elsewhere)."""
    with database.connection(db, autocommit=False) as conn:
        for path in sorted(migrations_dir.glob("*.sql")):
            with conn, conn.cursor() as cur:
                cur.execute(path.read_text())


@pytest.fixture(scope="module")
def service_dsn(spec: ProductSpec) -> Iterator[str]:
    database.drop_database(SERVICE_DB)
    database.ensure_database(SERVICE_DB)
    apply_migrations(SERVICE_DB, spec.migrations_path)
    yield database.server().dsn(SERVICE_DB)
    database.drop_database(SERVICE_DB)


@pytest.fixture(scope="module")
def empty_dsn() -> Iterator[str]:
    database.drop_database(EMPTY_DB)
    database.ensure_database(EMPTY_DB)
    yield database.server().dsn(EMPTY_DB)
    database.drop_database(EMPTY_DB)


@dataclass
class Deployed:
    root: Path
    version: str
    track: str
    url: str = ""


@pytest.fixture(scope="module")
def deploy_artifact(
    spec: ProductSpec, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, dict[str, Any]], Deployed]:
    """Build, push, fetch and extract an artifact, as the platform would."""

    def _deploy(version: str, settings: dict[str, Any], track: str = "stable") -> Deployed:
        pushed = registry.push(registry.build_artifact(spec, version, settings))
        fetched = registry.fetch(pushed.sha256)
        root = registry.extract(fetched, tmp_path_factory.mktemp(f"artifact-{version}"))
        return Deployed(root=root, version=version, track=track)

    return _deploy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(deployed: Deployed, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.pop("PYTHONPATH", None)  # the service must run from the artifact alone
    env.update(
        SERVICE_DATABASE_URL=dsn,
        SERVICE_VERSION=deployed.version,
        SERVICE_TRACK=deployed.track,
        SERVICE_MANIFEST=str(deployed.root / "manifest.json"),
        SERVICE_PRODUCT_SPEC=str(deployed.root / "product.yaml"),
    )
    return env


class Processes:
    """Subprocesses started by a test, always reaped (SIGTERM, then SIGKILL)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.log_dir
            )
        self.started.append((proc, log))
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return next(log.read_text() for p, log in self.started if p is proc)

    def stop_all(self) -> None:
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("svc-logs"))
    yield procs
    procs.stop_all()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def start_api(procs: Processes, deployed: Deployed, dsn: str) -> Deployed:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "api:app", "--app-dir", str(deployed.root / "service")]
    proc = procs.start(
        f"api-{deployed.version}",
        [*args, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        service_env(deployed, dsn),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"api {deployed.version} exited early:\n{procs.log_of(proc)}")
        try:
            if httpclient.get(f"{url}/healthz", timeout=1).status_code == 200:
                deployed.url = url
                return deployed
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"api {deployed.version} not healthy in {START_TIMEOUT_S}s:\n{procs.log_of(proc)}")


def start_worker(procs: Processes, deployed: Deployed, dsn: str) -> subprocess.Popen[bytes]:
    return procs.start(
        f"worker-{deployed.version}",
        [sys.executable, str(deployed.root / "service" / "worker.py")],
        service_env(deployed, dsn),
    )


@pytest.fixture(scope="module")
def api(
    deploy_artifact: Callable[..., Deployed], module_processes: Processes, service_dsn: str
) -> Deployed:
    deployed = deploy_artifact("1.0.0", {"fail_jobs_matching": "^doomed-"})
    return start_api(module_processes, deployed, service_dsn)


@pytest.fixture(scope="module")
def faulty_api(
    deploy_artifact: Callable[..., Deployed], module_processes: Processes, service_dsn: str
) -> Deployed:
    deployed = deploy_artifact("1.1.0-bad", {"error_rate": 1.0}, track="canary")
    return start_api(module_processes, deployed, service_dsn)


@pytest.fixture(scope="module")
def slow_api(
    deploy_artifact: Callable[..., Deployed], module_processes: Processes, service_dsn: str
) -> Deployed:
    deployed = deploy_artifact("1.2.0-slow", {"extra_latency_ms": 100, "error_rate": 0.5})
    deployed.track = "canary"
    return start_api(module_processes, deployed, service_dsn)


def sql(query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with database.connection(SERVICE_DB) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = httpclient.get(f"{url}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests_total(url: str, deployed: Deployed, path: str, status: str) -> float:
    labels = {"version": deployed.version, "track": deployed.track, "path": path, "status": status}
    return scrape(url).get(("http_requests_total", tuple(sorted(labels.items()))), 0.0)


def wait_for_job(url: str, key: str, states: tuple[str, ...] = ("done", "dead")) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = httpclient.get(f"{url}/v1/jobs/{key}", timeout=5).json()
        if job.get("status") in states:
            return job
        time.sleep(0.05)
    pytest.fail(f"job {key} not in {states} after {JOB_TIMEOUT_S}s: {job}")


def enqueue(url: str, key: str, priority: str, payload: dict[str, Any]) -> httpx.Response:
    body = {"key": key, "priority": priority, "payload": payload}
    return httpclient.post(f"{url}/v1/jobs", json=body, timeout=5)


# --- probes, data endpoints, headers, metrics -----------------------------------------------


@pytest.mark.slow
def test_probes_answer_when_database_and_schema_are_present(api: Deployed) -> None:
    health = httpclient.get(f"{api.url}/healthz", timeout=5)
    ready = httpclient.get(f"{api.url}/readyz", timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": "1.0.0", "track": "stable"}
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert ready.headers["X-Release"] == "1.0.0"


@pytest.mark.slow
def test_readyz_is_503_without_schema_but_the_process_is_alive(
    deploy_artifact: Callable[..., Deployed], processes: Processes, empty_dsn: str
) -> None:
    deployed = start_api(processes, deploy_artifact("1.0.0", {}), empty_dsn)
    assert httpclient.get(f"{deployed.url}/healthz", timeout=5).status_code == 200
    ready = httpclient.get(f"{deployed.url}/readyz", timeout=5)
    assert ready.status_code == 503
    reason = ready.json()["reason"]
    assert "missing table(s) items, jobs, job_results, dead_letter" in reason
    assert EMPTY_DB in reason


@pytest.mark.slow
def test_readyz_is_503_when_the_database_is_unreachable(
    deploy_artifact: Callable[..., Deployed], processes: Processes
) -> None:
    dsn = database.server().dsn("svc_test_does_not_exist")
    deployed = start_api(processes, deploy_artifact("1.0.0", {}), dsn)
    ready = httpclient.get(f"{deployed.url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert "svc_test_does_not_exist" in ready.json()["reason"]
    assert httpclient.get(f"{deployed.url}/v1/items", timeout=10).status_code == 503


@pytest.mark.slow
def test_items_come_from_postgres_with_release_and_cache_headers(api: Deployed) -> None:
    rows = sql("SELECT id, name, price_cents FROM items ORDER BY id")
    assert len(rows) >= 3  # seeded by 0002_seed_items.sql
    response = httpclient.get(f"{api.url}/v1/items", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert [(i["id"], i["name"], i["price_cents"]) for i in body["items"]] == rows
    assert body["count"] == len(rows)
    assert response.headers["X-Release"] == "1.0.0"
    assert response.headers["X-Track"] == "stable"
    assert response.headers["Surrogate-Key"] == "items"
    assert response.headers["Cache-Control"] == "public, max-age=5"  # ttl class dynamic


@pytest.mark.slow
def test_single_item_and_its_surrogate_keys(api: Deployed) -> None:
    sql("UPDATE items SET price_cents = 451 WHERE id = 1")
    one = httpclient.get(f"{api.url}/v1/items/1", timeout=5)
    assert one.status_code == 200
    assert one.json()["id"] == 1
    assert one.json()["price_cents"] == 451  # read live from the database
    assert one.headers["Surrogate-Key"] == "items item-1"
    assert one.headers["Cache-Control"] == "public, max-age=5"
    other = httpclient.get(f"{api.url}/v1/items/2", timeout=5)
    assert other.headers["Surrogate-Key"] == "items item-2"
    assert other.headers["Cache-Control"] == "public, max-age=5"
    missing = httpclient.get(f"{api.url}/v1/items/99999", timeout=5)
    assert missing.status_code == 404
    assert "99999" in missing.json()["error"]
    assert missing.headers["Cache-Control"] == "no-store"  # errors are never cached


@pytest.mark.slow
def test_summary_counts_match_the_database(api: Deployed) -> None:
    response = httpclient.get(f"{api.url}/v1/summary", timeout=5)
    assert response.status_code == 200
    body = response.json()
    (items, results, dead) = sql(
        "SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM job_results), "
        "(SELECT count(*) FROM dead_letter)"
    )[0]
    assert body["items"]["count"] == items
    assert body["job_results"]["count"] == results
    assert body["dead_letter"]["count"] == dead
    assert set(body["jobs"]) == {"queued", "running", "done", "dead"}
    assert response.headers["Surrogate-Key"] == "summary"


@pytest.mark.slow
def test_static_asset_is_served_with_the_long_ttl(api: Deployed) -> None:
    response = httpclient.get(f"{api.url}/static/app.js", timeout=5)
    assert response.status_code == 200
    assert "summary" in response.text
    # the spec's cache_policy for the static class asks for `immutable`
    assert response.headers["Cache-Control"] == "public, max-age=86400, immutable"
    assert response.headers["Surrogate-Key"] == "static"
    assert response.headers["X-Release"] == "1.0.0"


@pytest.mark.slow
def test_non_spec_endpoints_are_not_cacheable(api: Deployed) -> None:
    for path in ("/healthz", "/metrics", "/v1/jobs/nope"):
        response = httpclient.get(f"{api.url}{path}", timeout=5)
        assert response.headers["Cache-Control"] == "no-store", path
        assert "Surrogate-Key" not in response.headers, path
        assert response.headers["X-Track"] == "stable", path


@pytest.mark.slow
def test_metrics_count_requests_by_route_template_version_and_track(api: Deployed) -> None:
    before = requests_total(api.url, api, "/v1/items", "200")
    before_item = requests_total(api.url, api, "/v1/items/{item_id:int}", "200")
    for _ in range(3):
        assert httpclient.get(f"{api.url}/v1/items?limit=2&x=1", timeout=5).status_code == 200
    for item in (1, 2):
        assert httpclient.get(f"{api.url}/v1/items/{item}", timeout=5).status_code == 200
    httpclient.get(f"{api.url}/no/such/page?token=abc", timeout=5)

    samples = scrape(api.url)
    assert requests_total(api.url, api, "/v1/items", "200") == before + 3
    assert requests_total(api.url, api, "/v1/items/{item_id:int}", "200") == before_item + 2
    paths = {dict(labels).get("path") for (_, labels) in samples}
    assert not [p for p in paths if p and ("?" in p or p.startswith("/no/"))], paths
    assert "(unmatched)" in paths

    labels = (("path", "/v1/items"), ("track", "stable"), ("version", "1.0.0"))
    buckets = {
        dict(lbl)["le"]: value
        for (name, lbl), value in samples.items()
        if name == "http_request_duration_seconds_bucket"
        and tuple(kv for kv in lbl if kv[0] != "le") == labels
    }
    for le in ("0.001", "0.002", "0.003", "0.005", "0.05", "0.125", "1.0", "2.5", "+Inf"):
        assert le in buckets, sorted(buckets)
    assert len(buckets) == 25  # 24 finite buckets and +Inf
    assert buckets["+Inf"] == samples[("http_request_duration_seconds_count", labels)]
    assert buckets["+Inf"] >= 3


# --- release knobs ----------------------------------------------------------------------------


@pytest.mark.slow
def test_error_rate_one_makes_every_data_request_fail(faulty_api: Deployed) -> None:
    for path in ("/v1/items", "/v1/items/1", "/v1/summary"):
        response = httpclient.get(f"{faulty_api.url}{path}", timeout=5)
        assert response.status_code == 500, path
        assert "injected fault" in response.json()["error"]
        assert response.headers["X-Release"] == "1.1.0-bad"
        assert response.headers["X-Track"] == "canary"
        assert response.headers["Cache-Control"] == "no-store"
    # Probes and static assets are not data requests: the process itself is healthy.
    assert httpclient.get(f"{faulty_api.url}/healthz", timeout=5).status_code == 200
    assert httpclient.get(f"{faulty_api.url}/readyz", timeout=5).status_code == 200
    assert httpclient.get(f"{faulty_api.url}/static/app.js", timeout=5).status_code == 200
    assert requests_total(faulty_api.url, faulty_api, "/v1/items", "500") == 1
    assert requests_total(faulty_api.url, faulty_api, "/v1/items", "200") == 0


@pytest.mark.slow
def test_extra_latency_and_an_exact_error_fraction(slow_api: Deployed) -> None:
    statuses = []
    with httpclient.client(base_url=slow_api.url, timeout=5) as client:
        for _ in range(20):
            started = time.perf_counter()
            response = client.get("/v1/items")
            elapsed = time.perf_counter() - started
            assert elapsed >= 0.1, elapsed
            statuses.append(response.status_code)
        fast = client.get("/healthz")
    assert fast.elapsed.total_seconds() < 0.1  # probes are not slowed down
    assert statuses.count(500) == 10  # error_rate 0.5: exactly half, spread evenly
    assert statuses.count(200) == 10
    labels = (("path", "/v1/items"), ("track", "canary"), ("version", "1.2.0-slow"))
    samples = scrape(slow_api.url)
    bucket_75ms = samples[("http_request_duration_seconds_bucket", (("le", "0.075"), *labels))]
    total = samples[("http_request_duration_seconds_count", labels)]
    assert (bucket_75ms, total) == (0, 20)


# --- jobs and the worker ----------------------------------------------------------------------


@pytest.mark.slow
def test_enqueue_is_idempotent_and_validated(api: Deployed) -> None:
    first = enqueue(api.url, "idem-1", "low", {"values": [1]})
    assert first.status_code == 202
    assert first.json()["created"] is True
    again = enqueue(api.url, "idem-1", "low", {"values": [1]})
    assert again.status_code == 200
    assert again.json()["created"] is False
    conflict = enqueue(api.url, "idem-1", "high", {"values": [2]})
    assert conflict.status_code == 409
    assert sql("SELECT count(*) FROM jobs WHERE job_key = 'idem-1'") == [(1,)]

    bad_priority = enqueue(api.url, "idem-2", "urgent", {})
    assert bad_priority.status_code == 422
    assert bad_priority.json()["field"] == "priority"
    bad_key = enqueue(api.url, "", "low", {})
    assert bad_key.json()["field"] == "key"
    bad_payload = httpclient.post(
        f"{api.url}/v1/jobs", json={"key": "k", "priority": "low", "payload": [1]}, timeout=5
    )
    assert bad_payload.json()["field"] == "payload"
    not_json = httpclient.post(f"{api.url}/v1/jobs", content=b"{nope", timeout=5)
    assert not_json.status_code == 400
    assert httpclient.get(f"{api.url}/v1/jobs/never-enqueued", timeout=5).status_code == 404


@pytest.mark.slow
def test_a_normal_job_is_processed_exactly_once(
    api: Deployed, processes: Processes, service_dsn: str
) -> None:
    worker = start_worker(processes, api, service_dsn)
    assert enqueue(api.url, "sum-1", "high", {"values": [1, 2, 3.5]}).status_code == 202
    job = wait_for_job(api.url, "sum-1")
    assert job["status"] == "done"
    assert job["attempts"] == 1
    assert job["result"]["sum"] == 6.5
    assert job["result"]["count"] == 3
    assert job["result"]["processed_by"] == "worker-f76v7exz5@1.0.0"
    assert sql("SELECT count(*) FROM job_results WHERE job_key = 'sum-1'") == [(1,)]
    assert sql("SELECT count(*) FROM dead_letter WHERE job_key = 'sum-1'") == [(0,)]
    summary = httpclient.get(f"{api.url}/v1/summary", timeout=5).json()
    assert summary["job_results"]["count"] == sql("SELECT count(*) FROM job_results")[0][0]

    # Graceful stop: SIGTERM ends the loop and the process exits cleanly.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    assert "stopped" in processes.log_of(worker)


@pytest.mark.slow
def test_a_transient_failure_is_retried_then_succeeds(
    api: Deployed, processes: Processes, service_dsn: str
) -> None:
    start_worker(processes, api, service_dsn)
    enqueue(api.url, "flaky-1", "high", {"values": [4], "fail_attempts": 2})
    job = wait_for_job(api.url, "flaky-1")
    assert (job["status"], job["attempts"]) == ("done", 3)
    assert job["result"]["attempt"] == 3
    assert job["last_error"] is None
    assert sql("SELECT count(*) FROM job_results WHERE job_key = 'flaky-1'") == [(1,)]


@pytest.mark.slow
def test_a_poison_job_lands_in_the_dead_letter_after_max_attempts(
    api: Deployed, processes: Processes, service_dsn: str, spec: ProductSpec
) -> None:
    start_worker(processes, api, service_dsn)
    policy = spec.queues.high
    enqueue(api.url, "poison-1", "high", {"poison": True})
    job = wait_for_job(api.url, "poison-1")
    assert job["status"] == "dead"
    assert job["attempts"] == policy.max_attempts
    assert "poison" in job["last_error"]
    assert job["result"] is None
    dead = sql("SELECT queue, attempts, last_error, payload FROM dead_letter WHERE job_key = %s",
               ("poison-1",))  # fmt: skip
    assert len(dead) == 1
    assert dead[0][:2] == ("high", policy.max_attempts)
    assert dead[0][3] == {"poison": True}
    assert sql("SELECT count(*) FROM job_results WHERE job_key = 'poison-1'") == [(0,)]
    # Backoff honoured: the retries waited initial * multiplier^(n-1) each (50+100+200 ms).
    backoff_s = (
        sum(
            min(
                policy.backoff_initial_ms * policy.backoff_multiplier ** (n - 1),
                policy.backoff_max_ms,
            )
            for n in range(1, policy.max_attempts)
        )
        / 1000
    )
    (elapsed,) = sql(
        "SELECT extract(epoch FROM updated_at - created_at) FROM jobs WHERE job_key = 'poison-1'"
    )[0]
    assert float(elapsed) >= backoff_s


@pytest.mark.slow
def test_a_job_matching_fail_jobs_matching_goes_to_the_dead_letter(
    api: Deployed, processes: Processes, service_dsn: str, spec: ProductSpec
) -> None:
    start_worker(processes, api, service_dsn)
    enqueue(api.url, "doomed-7", "low", {"values": [1, 2]})
    enqueue(api.url, "fine-7", "low", {"values": [1, 2]})
    doomed = wait_for_job(api.url, "doomed-7")
    fine = wait_for_job(api.url, "fine-7")
    assert (doomed["status"], doomed["attempts"]) == ("dead", spec.queues.low.max_attempts)
    assert "fail_jobs_matching" in doomed["last_error"]
    assert (fine["status"], fine["attempts"]) == ("done", 1)
    assert sql("SELECT queue FROM dead_letter WHERE job_key = 'doomed-7'") == [("low",)]


@pytest.mark.slow
def test_high_queue_is_drained_before_low(
    api: Deployed, processes: Processes, service_dsn: str
) -> None:
    # Enqueued while no worker runs: low first, so only priority can put high ahead.
    lows = [f"prio-low-{i}" for i in range(5)]
    highs = [f"prio-high-{i}" for i in range(5)]
    for key in lows:
        enqueue(api.url, key, "low", {"values": [1]})
    for key in highs:
        enqueue(api.url, key, "high", {"values": [1]})
    start_worker(processes, api, service_dsn)
    for key in lows + highs:
        assert wait_for_job(api.url, key)["status"] == "done"
    order = [
        key
        for (key,) in sql(
            "SELECT job_key FROM job_results WHERE job_key LIKE 'prio-%%' ORDER BY written_at"
        )
    ]
    assert order == highs + lows


@pytest.mark.slow
def test_exactly_once_with_competing_workers_and_a_crash(
    api: Deployed, processes: Processes, service_dsn: str
) -> None:
    keys = [f"race-{i}" for i in range(60)]
    for key in keys:
        enqueue(api.url, key, "high" if key.endswith(("0", "5")) else "low", {"values": [2, 3]})
    victim = start_worker(processes, api, service_dsn)
    start_worker(processes, api, service_dsn)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)  # a crash, mid-flight if it was processing
    victim.wait(timeout=5)
    start_worker(processes, api, service_dsn)  # the restart
    for key in keys:
        assert wait_for_job(api.url, key)["status"] == "done"
    rows = sql(
        "SELECT count(*), count(DISTINCT r.job_key), max(j.attempts), min(j.attempts) "
        "FROM job_results AS r JOIN jobs AS j USING (job_key) WHERE r.job_key LIKE 'race-%%'"
    )
    assert rows == [(60, 60, 1, 1)]


# --- configuration errors ---------------------------------------------------------------------


@pytest.mark.slow
def test_bad_configuration_stops_the_processes_naming_the_variable(
    deploy_artifact: Callable[..., Deployed], service_dsn: str, tmp_path: Path
) -> None:
    deployed = deploy_artifact("1.0.0", {})
    env = service_env(deployed, service_dsn)
    env["SERVICE_TRACK"] = "blue"
    api_run = subprocess.run(
        [sys.executable, "-c", "import api"],
        cwd=deployed.root / "service",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert api_run.returncode != 0
    assert "SERVICE_TRACK" in api_run.stderr
    assert "'blue'" in api_run.stderr

    env = service_env(deployed, service_dsn)
    del env["SERVICE_DATABASE_URL"]
    worker_run = subprocess.run(
        [sys.executable, str(deployed.root / "service" / "worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker_run.returncode == 2
    assert "SERVICE_DATABASE_URL" in worker_run.stderr

    env = service_env(deployed, service_dsn)
    env["SERVICE_MANIFEST"] = str(tmp_path / "absent.json")
    worker_run = subprocess.run(
        [sys.executable, str(deployed.root / "service" / "worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker_run.returncode == 2
    assert "SERVICE_MANIFEST" in worker_run.stderr
    assert "absent.json" in worker_run.stderr


# --- pure logic of the service configuration (imported from the product's source) -------------


@pytest.fixture(scope="module")
def service_config(spec: ProductSpec) -> Any:
    import importlib.util

    source = spec.service_path / "service_config.py"
    module_spec = importlib.util.spec_from_file_location("service_config_under_test", source)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up while defining
    module_spec.loader.exec_module(module)
    return module


def test_backoff_is_exponential_and_capped(service_config: Any) -> None:
    policy = service_config.QueuePolicy(
        name="high", max_attempts=6, backoff_initial_ms=50, backoff_multiplier=2.0,
        backoff_max_ms=300,
    )  # fmt: skip
    assert [policy.backoff_ms(n) for n in range(1, 6)] == [50, 100, 200, 300, 300]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"error_rate": 2}, "'error_rate'"),
        ({"extra_latency_ms": -5}, "'extra_latency_ms'"),
        ({"fail_jobs_matching": "(("}, "'fail_jobs_matching'"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_service_refuses_bad_knobs_naming_them(
    service_config: Any, settings: dict[str, Any], named: str
) -> None:
    with pytest.raises(service_config.ConfigError, match=named) as raised:
        service_config.parse_knobs(settings, source="/x/manifest.json")
    assert "/x/manifest.json" in str(raised.value)


@pytest.mark.slow
def test_service_config_reads_the_spec_and_manifest(
    service_config: Any, deploy_artifact: Callable[..., Deployed], spec: ProductSpec
) -> None:
    deployed = deploy_artifact("1.3.0", {"error_rate": 0.2, "fail_jobs_matching": "^x"})
    config = service_config.load_config(service_env(deployed, "postgresql://u:pw@h/db"))
    assert (config.version, config.track, config.api_tier) == ("1.3.0", "stable", "api-i")
    assert config.knobs.error_rate == 0.2
    assert config.knobs.fail_jobs_matching.pattern == "^x"
    assert config.endpoints["/static/app.js"].ttl_seconds == spec.ttl_classes["static"]
    assert config.queues["low"].max_attempts == spec.queues.low.max_attempts
    assert "pw" not in config.display_database()
