"""The sample API's own guardrails: a rate limit per client (429 + Retry-After) and a circuit
breaker around its database calls.

- pure: the token bucket and the breaker's state machine, driven by a fake clock (tables);
- spec: the `guardrails` section is typed and its errors name file:line:field;
- real path: the API served by uvicorn over a real Postgres database (the fault drill endpoint
  on, as the platform starts it on staging), with and without the `guardrails_off` knob;
- the staging smoke through the real staging edge of the local platform, and a release built
  with `--set guardrails_off=1` blocked at staging by `deploy` (exit 3, production untouched).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from conftest import GUARDRAIL_TOKEN
from dagster_project.core import database, httpclient, knobs, registry
from dagster_project.core.settings import product_dir
from dagster_project.core.spec import ProductSpec, SpecError, load_spec

PRODUCT = "4pnihc40q-yj"
SERVICE_DB = "svc_guardrails_test"
START_TIMEOUT_S = 20.0


def _guardrails_module() -> ModuleType:
    path = product_dir(PRODUCT) / "service" / "guardrails.py"
    module_spec = importlib.util.spec_from_file_location("sample_guardrails", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up
    module_spec.loader.exec_module(module)
    return module


G = _guardrails_module()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- pure: the token bucket -------------------------------------------------------------------

# (rate, burst, [(advance seconds, client, expected wait or 0.0)])
LIMITER_CASES: list[tuple[float, int, list[tuple[float, str, float]]]] = [
    # a full bucket grants `burst` at once, then the next token is 1/rate away
    (10.0, 3, [(0, "a", 0.0), (0, "a", 0.0), (0, "a", 0.0), (0, "a", 0.1)]),
    # refilled at `rate`: after 0.1 s one more request passes, not two
    (10.0, 2, [(0, "a", 0.0), (0, "a", 0.0), (0.1, "a", 0.0), (0, "a", 0.1)]),
    # per client: b is not throttled by a
    (1.0, 1, [(0, "a", 0.0), (0, "a", 1.0), (0, "b", 0.0), (0, "b", 1.0)]),
    # never above burst however long the client was idle
    (100.0, 2, [(60, "a", 0.0), (0, "a", 0.0), (0, "a", 0.01)]),
    # a partial token: the wait is what is missing
    (2.0, 1, [(0, "a", 0.0), (0.25, "a", 0.25)]),
]


@pytest.mark.parametrize(("rate", "burst", "steps"), LIMITER_CASES)
def test_token_bucket(rate: float, burst: int, steps: list[tuple[float, str, float]]) -> None:
    clock = Clock()
    limiter = G.RateLimiter(rate, burst, clock=clock)
    for index, (advance, client, expected) in enumerate(steps):
        clock.now += advance
        assert limiter.take(client) == pytest.approx(expected), f"step {index}"


def test_a_disabled_limiter_never_throttles_and_clients_are_bounded() -> None:
    off = G.RateLimiter(1.0, 1, enabled=False)
    assert all(off.take("a") == 0.0 for _ in range(100))
    clock = Clock()
    small = G.RateLimiter(1.0, 1, max_clients=3, clock=clock)
    for client in "abcde":
        assert small.take(client) == 0.0
    assert small.clients() == 3


@pytest.mark.parametrize(("wait", "header"), [(0.001, 1), (0.99, 1), (1.0, 1), (1.01, 2)])
def test_retry_after_is_whole_seconds_never_early(wait: float, header: int) -> None:
    assert G.retry_after_seconds(wait) == header


# --- pure: the circuit breaker ----------------------------------------------------------------

# events: "ok"/"fail" (a call allowed, then its outcome), "refused" (allow() is False),
# "+N" (the clock advances N s), "state:<s>" (the state now). threshold 3, open 2 s.
BREAKER_CASES: list[tuple[str, list[str]]] = [
    ("opens after N consecutive failures", ["fail", "fail", "state:closed", "fail", "refused"]),
    ("a success resets the count", ["fail", "fail", "ok", "fail", "fail", "state:closed"]),
    ("open until open_seconds", ["fail", "fail", "fail", "+1.9", "refused", "state:open"]),
    (
        "half-open lets one probe through",
        ["fail", "fail", "fail", "+2", "state:half_open", "probe", "refused", "ok", "ok"],
    ),
    (
        "a failed probe opens again for a full period",
        ["fail", "fail", "fail", "+2", "fail", "state:open", "+1.9", "refused", "+0.1", "ok"],
    ),
    ("closed after a good probe", ["fail", "fail", "fail", "+5", "ok", "state:closed", "ok"]),
]


@pytest.mark.parametrize(("name", "events"), BREAKER_CASES, ids=[c[0] for c in BREAKER_CASES])
def test_circuit_breaker(name: str, events: list[str]) -> None:
    clock = Clock()
    breaker = G.CircuitBreaker(3, 2.0, clock=clock)
    probe_out = False
    for index, event in enumerate(events):
        where = f"{name}: event {index} {event!r}"
        if event.startswith("+"):
            clock.now += float(event[1:])
        elif event.startswith("state:"):
            assert breaker.state == event.split(":")[1], where
        elif event == "refused":
            assert breaker.allow() is False, where
        elif event == "probe":  # allowed, outcome reported by the next ok/fail
            assert breaker.allow() is True, where
            probe_out = True
        else:
            if not probe_out:
                assert breaker.allow() is True, where
            probe_out = False
            (breaker.succeeded if event == "ok" else breaker.failed)()


def test_a_disabled_breaker_never_opens_and_an_abandoned_probe_frees_the_slot() -> None:
    off = G.CircuitBreaker(1, 60.0, enabled=False)
    for _ in range(10):
        assert off.allow()
        off.failed()
    assert off.state == "closed"
    clock = Clock()
    breaker = G.CircuitBreaker(1, 1.0, clock=clock)
    breaker.allow()
    breaker.failed()
    clock.now += 1
    assert breaker.allow() and not breaker.allow()
    breaker.abandoned()
    assert breaker.allow()


# --- spec: typed, errors name file:line:field -------------------------------------------------


def test_the_sample_product_declares_its_guardrails() -> None:
    spec = load_spec(PRODUCT)
    assert spec.guardrails is not None and spec.contract.guardrails is not None
    assert spec.guardrails.rate_limit.address_requests_per_second > spec.canary.load_rps
    assert "guardrails_off" in knobs.KNOBS
    with pytest.raises(knobs.KnobError, match="guardrails_off"):
        knobs.KNOBS["guardrails_off"].parse("2")


def _folder(
    tmp_path: Path,
    spec_change: Callable[[dict[str, Any]], None] | None = None,
    contract_change: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    folder = tmp_path / PRODUCT
    folder.mkdir()
    for name, change in (("product.yaml", spec_change), ("contract.yaml", contract_change)):
        raw = yaml.safe_load((product_dir(PRODUCT) / name).read_text())
        if change:
            change(raw)
        (folder / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "product.yaml"


@pytest.mark.parametrize(
    ("spec_change", "contract_change", "file", "field", "reason"),
    [
        (
            lambda r: r["guardrails"]["rate_limit"].update(address_requests_per_second=100),
            None,
            "product.yaml",
            "guardrails.rate_limit.address_requests_per_second",
            "must exceed canary.load_rps 120",
        ),
        (
            lambda r: r["guardrails"]["circuit_breaker"].update(failure_threshold=0),
            None,
            "product.yaml",
            "guardrails.circuit_breaker.failure_threshold",
            "greater than or equal to 1",
        ),
        (
            lambda r: r["guardrails"].pop("circuit_breaker"),
            None,
            "product.yaml",
            "guardrails.circuit_breaker",
            "required",
        ),
        (
            None,
            lambda r: r["guardrails"].update(probe_path="/v1/nothing"),
            "contract.yaml",
            "guardrails.probe_path",
            "not an endpoint of the spec",
        ),
        (
            None,
            lambda r: r["guardrails"].update(client_id_header="X Client"),
            "contract.yaml",
            "guardrails.client_id_header",
            "should match pattern",
        ),
    ],
)
def test_bad_guardrails_name_file_line_and_field(
    tmp_path: Path, spec_change: Any, contract_change: Any, file: str, field: str, reason: str
) -> None:
    path = _folder(tmp_path, spec_change, contract_change)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert f"{path.parent / file}:" in message, message
    assert f"field '{field}'" in message, message
    assert reason in message, message


# --- real path: the API over a real Postgres --------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> ProductSpec:
    return load_spec(PRODUCT)


@pytest.fixture(scope="module")
def service_dsn(spec: ProductSpec) -> Iterator[str]:
    database.drop_database(SERVICE_DB)
    database.ensure_database(SERVICE_DB)
    with database.connection(SERVICE_DB, autocommit=False) as conn:
        for path in sorted(spec.migrations_path.glob("*.sql")):
            with conn, conn.cursor() as cur:
                cur.execute(path.read_text())
    yield database.server().dsn(SERVICE_DB)
    database.drop_database(SERVICE_DB)


class Api:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        # One client: a new one per request costs tens of ms (SSL context), not the API's.
        self.http = httpclient.client(base_url=url, timeout=10, trust_env=False)

    def get(self, path: str, client: str | None = None) -> tuple[httpx.Response, float]:
        headers = {"X-Client-Id": client} if client else {}
        started = time.monotonic()
        response = self.http.get(path, headers=headers)
        return response, (time.monotonic() - started) * 1000


@pytest.fixture(scope="module")
def start_api(
    spec: ProductSpec, service_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Api]]:
    started: list[subprocess.Popen[bytes]] = []

    def _start(version: str, settings: dict[str, Any], fault_injection: bool = True) -> Api:
        pushed = registry.push(registry.build_artifact(spec, version, settings))
        root = registry.extract(
            registry.fetch(pushed.sha256), tmp_path_factory.mktemp(f"gr-{version}")
        )
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
        env.pop("PYTHONPATH", None)
        env.update(
            SERVICE_DATABASE_URL=service_dsn,
            SERVICE_VERSION=version,
            SERVICE_MANIFEST=str(root / "manifest.json"),
            SERVICE_PRODUCT_SPEC=str(root / "product.yaml"),
            SERVICE_FAULT_INJECTION="1" if fault_injection else "0",
        )
        log = root / "api.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "api:app",
                    "--app-dir",
                    str(root / "service"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-access-log",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        started.append(proc)
        api = Api(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if api.get("/readyz")[0].status_code == 200:
                    return api
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"api {version} not ready:\n{log.read_text()}")

    yield _start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _burst(api: Api, client: str, n: int) -> list[httpx.Response]:
    with httpclient.client(base_url=api.url, timeout=10) as http:
        return [http.get("/v1/items/1", headers={"X-Client-Id": client}) for _ in range(n)]


def _fault(api: Api, seconds: float, delay_ms: int) -> httpx.Response:
    return httpclient.post(
        f"{api.url}/_faults/database", json={"seconds": seconds, "delay_ms": delay_ms}, timeout=5
    )


@pytest.mark.slow
def test_the_rate_limit_answers_429_with_retry_after_per_client(
    spec: ProductSpec, start_api: Callable[..., Api]
) -> None:
    assert spec.guardrails is not None
    api = start_api("gr-rl-1.0.0", {})
    burst = spec.guardrails.rate_limit.burst
    rps = spec.guardrails.rate_limit.requests_per_second
    answers = _burst(api, "client-a", burst + int(rps) + 50)
    statuses = [r.status_code for r in answers]
    assert statuses[:burst] == [200] * burst
    throttled = [r for r in answers if r.status_code == 429]
    assert throttled, statuses
    first = throttled[0]
    assert first.headers["Retry-After"] == "1"
    assert first.headers["Cache-Control"] == "no-store"
    assert "rate limit" in first.json()["error"]
    # another client, and the probes, are not throttled
    assert api.get("/v1/items/1", client="client-b")[0].status_code == 200
    assert api.get("/readyz", client="client-a")[0].status_code == 200
    time.sleep(int(first.headers["Retry-After"]))
    assert api.get("/v1/items/1", client="client-a")[0].status_code == 200
    # without a client id the address is the client: its own, higher limit (the edge and the
    # canary load generator send none), not the throttled client's bucket
    anonymous = {r.status_code for r in _burst_anonymous(api, burst + 10)}
    assert anonymous == {200}


def _burst_anonymous(api: Api, n: int) -> list[httpx.Response]:
    with httpclient.client(base_url=api.url, timeout=10) as http:
        return [http.get("/v1/summary") for _ in range(n)]


@pytest.mark.slow
def test_database_faults_open_the_breaker_and_it_closes_after_recovery(
    spec: ProductSpec, start_api: Callable[..., Api]
) -> None:
    assert spec.guardrails is not None
    breaker = spec.guardrails.circuit_breaker
    api = start_api("gr-cb-1.0.0", {})
    assert _fault(api, 20, 300).status_code == 202
    try:
        for _ in range(breaker.failure_threshold):
            response, ms = api.get("/v1/items/1", client="cb")
            assert response.status_code == 503 and ms >= 300, (response.status_code, ms)
        ready, ready_ms = api.get("/readyz")
        assert ready.status_code == 503 and "circuit breaker open" in ready.json()["reason"]
        assert ready_ms < 100
        for path in ("/v1/items/1", "/v1/summary"):
            response, ms = api.get(path, client="cb")
            assert response.status_code == 503, response.text
            assert ms < 100, f"{path}: {ms:.0f}ms: the open breaker must not touch the database"
            assert "circuit breaker open" in response.json()["error"]
            assert 1 <= int(response.headers["Retry-After"]) <= breaker.open_seconds + 1
            assert response.headers["Cache-Control"] == "no-store"
        enqueue = httpclient.post(
            f"{api.url}/v1/jobs", json={"key": "gr-cb-job", "priority": "high"}, timeout=5
        )
        assert enqueue.status_code == 503 and "circuit breaker" in enqueue.text
        # still faulty when the period ends: the probe fails and the breaker opens again
        time.sleep(breaker.open_seconds + 0.1)
        assert api.get("/readyz")[0].status_code == 503
        assert api.get("/readyz")[0].status_code == 503
    finally:
        ended = httpclient.delete(f"{api.url}/_faults/database", timeout=5)
    assert ended.status_code == 200 and ended.json()["ended"] is True
    assert api.get("/v1/items/1")[0].status_code == 503  # still open: fails fast
    time.sleep(breaker.open_seconds + 0.1)
    assert api.get("/readyz")[0].status_code == 200  # the half-open probe closes it
    assert api.get("/v1/items/1")[0].status_code == 200


@pytest.mark.slow
def test_guardrails_off_has_no_rate_limit_and_a_breaker_that_never_opens(
    spec: ProductSpec, start_api: Callable[..., Api]
) -> None:
    assert spec.guardrails is not None
    api = start_api("gr-off-1.0.0", {"guardrails_off": 1})
    rps = spec.guardrails.rate_limit.requests_per_second
    statuses = {
        r.status_code
        for r in _burst(api, "client-a", spec.guardrails.rate_limit.burst + int(rps) + 50)
    }
    assert statuses == {200}
    assert _fault(api, 10, 200).status_code == 202
    try:
        for _ in range(spec.guardrails.circuit_breaker.failure_threshold + 2):
            response, ms = api.get("/v1/items/1")
            assert response.status_code == 503 and ms >= 200  # every call tries the database
    finally:
        httpclient.delete(f"{api.url}/_faults/database", timeout=5)
    assert api.get("/v1/items/1")[0].status_code == 200


@pytest.mark.slow
def test_the_fault_endpoint_exists_only_when_the_platform_turns_it_on(
    start_api: Callable[..., Api],
) -> None:
    api = start_api("gr-nofault-1.0.0", {}, fault_injection=False)
    assert _fault(api, 10, 0).status_code == 404
    assert api.get("/v1/items/1")[0].status_code == 200
    faulty = start_api("gr-badfault-1.0.0", {})
    refused = httpclient.post(f"{faulty.url}/_faults/database", json={"seconds": 600}, timeout=5)
    assert refused.status_code == 422 and refused.json()["field"] == "seconds"


# --- the staging smoke through the real edge, and a release that breaks the guardrails ----------


@pytest.fixture(scope="module")
def platform(spec: ProductSpec) -> Iterator[Any]:
    from dagster_project.core.migrations.history import apply_pending
    from dagster_project.core.platform.local import LocalPlatform

    local = LocalPlatform(PRODUCT)
    try:
        local.up()
        apply_pending(local.database("staging"), spec.migrations_path, "test")
        yield local
    finally:
        local.down()


def _staging_guardrail_rows(
    spec: ProductSpec, platform: Any, version: str, settings: dict[str, Any]
) -> dict[str, Any]:
    from dagster_project.core.smoke import run_smoke

    artifact = registry.build_artifact(spec, version, settings)
    registry.push(artifact)
    platform.deploy("staging", "stable", artifact)
    report = run_smoke(
        spec, platform, "staging", version, include_edge_cache=False, include_worker=False
    )
    return {row.name: row for row in report.rows if row.name.startswith("guardrails:")}


@pytest.mark.slow
def test_the_staging_smoke_verifies_the_guardrails_through_the_edge(
    spec: ProductSpec, platform: Any
) -> None:
    rows = _staging_guardrail_rows(spec, platform, "gr-smoke-1.0.0", {})
    assert len(rows) == 7, {name: row.detail for name, row in rows.items()}
    failed = {name: row.detail for name, row in rows.items() if not row.passed}
    assert not failed, failed
    fast = rows["guardrails: an open breaker fails fast with 503"]
    assert "ms" in fast.detail
    # staging still serves after the drill
    assert (
        httpclient.get(f"{platform.edge_url('staging')}/readyz?after", timeout=5).status_code == 200
    )

    broken = _staging_guardrail_rows(spec, platform, "gr-smoke-1.1.0", {"guardrails_off": 1})
    assert not broken["guardrails: a burst over the rate limit answers 429"].passed
    assert "no 429" in broken["guardrails: a burst over the rate limit answers 429"].detail
    assert not broken["guardrails: an open breaker fails fast with 503"].passed
    assert (
        httpclient.get(f"{platform.edge_url('staging')}/readyz?after2", timeout=5).status_code
        == 200
    )


def test_a_product_without_guardrails_fails_the_smoke(tmp_path: Path) -> None:
    from dagster_project.core.smoke import run_smoke

    folder = tmp_path / PRODUCT
    shutil.copytree(product_dir(PRODUCT), folder, ignore=shutil.ignore_patterns("service"))
    raw = yaml.safe_load((folder / "product.yaml").read_text())
    raw.pop("guardrails")
    (folder / "product.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(folder / "product.yaml")

    class Closed:
        def edge_url(self, env: str) -> str:
            return "http://127.0.0.1:9"

        def purge(self, env: str, url: str | None = None, surrogate_key: str | None = None) -> int:
            return 0

    report = run_smoke(
        spec, Closed(), "staging", "1.0.0", include_edge_cache=False, include_worker=False
    )
    row = next(r for r in report.rows if r.name == "guardrails: declared")
    assert not row.passed and "product.yaml 'guardrails' is missing" in row.detail


@pytest.mark.slow
def test_a_release_without_its_guardrails_is_blocked_at_staging(platform: Any) -> None:
    before = platform.current("production")
    env = {**os.environ, "GUARDRAIL_TOKEN": GUARDRAIL_TOKEN}
    code = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
    done = subprocess.run(
        [sys.executable, "-c", code, PRODUCT, "--release", "gr-2.0.0", "--set", "guardrails_off=1"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    output = done.stdout + done.stderr
    print(output[-4000:])
    assert done.returncode == 3, output[-4000:]
    assert "blocked by smoke" in output, output[-4000:]
    assert "guardrails: a burst over the rate limit answers 429" in output, output[-4000:]
    assert GUARDRAIL_TOKEN not in output
    assert platform.current("production") == before
