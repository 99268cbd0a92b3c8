"""Whole releases on the real edge and metrics source: Varnish in front of both environments,
Prometheus behind the canary judge (`RELEASE_EDGE=varnish`, `RELEASE_METRICS=prometheus` for
the platform and for the real `deploy` entry point in a child process). In order: a release
promoted and audited; a release whose contract changed for one endpoint, whose promotion purges
exactly that endpoint's keys (listed in the audit entry) while the edge keeps the rest; a
latency regression blocked by `slo_regression` from PromQL figures, production back on stable.
Skips naming the Debian packages where the binaries are missing (a failure under CI=true)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from real_parts import PRODUCT, contract_changed_product, require_prometheus, require_varnish

from conftest import GUARDRAIL_TOKEN
from dagster_project import deploy as deploy_cli
from dagster_project.core import audit, changes, httpclient
from dagster_project.core.platform import LocalPlatform

pytestmark = pytest.mark.slow
ENV = "production"


@pytest.fixture(scope="module")
def platform() -> Iterator[LocalPlatform]:
    require_varnish()
    require_prometheus()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELEASE_EDGE", "varnish")
        patch.setenv("RELEASE_METRICS", "prometheus")
        patch.setenv("GUARDRAIL_TOKEN", GUARDRAIL_TOKEN)
        local = LocalPlatform(PRODUCT)
        try:
            local.up()
            yield local
        finally:
            local.down()


def _deploy_cli(version: str, *args: str, products_dir: Path | None = None) -> tuple[int, str]:
    """The real `deploy` entry point in a child process (it inherits RELEASE_EDGE and
    RELEASE_METRICS); its exit code and output."""
    env = dict(os.environ)
    if products_dir is not None:
        env["RELEASE_PRODUCTS_DIR"] = str(products_dir)
    code = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
    done = subprocess.run(
        [sys.executable, "-c", code, PRODUCT, "--release", version, *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    output = done.stdout + done.stderr
    print(output[-4000:])
    assert GUARDRAIL_TOKEN not in output
    return done.returncode, output


def _get(local: LocalPlatform, path: str) -> httpx.Response:
    return httpclient.get(f"{local.edge_url(ENV)}{path}", timeout=5.0, trust_env=False)


def _served(local: LocalPlatform, tag: str, n: int = 40) -> dict[str, int]:
    """Releases production serves, through Varnish, on URLs never asked for before."""
    counts: dict[str, int] = {}
    for i in range(n):
        response = _get(local, f"/v1/items?{tag}={i}")
        assert response.status_code == 200
        assert response.headers.get("X-Varnish"), "not answered by Varnish"
        counts[response.headers["X-Release"]] = counts.get(response.headers["X-Release"], 0) + 1
    return counts


def _promql_queries(local: LocalPlatform) -> float:
    """How many PromQL instant queries Prometheus has answered (its own /metrics)."""
    text = httpclient.get(f"{local.prometheus_url()}/metrics", trust_env=False).text
    pattern = r'prometheus_http_requests_total\{code="200",handler="/api/v1/query"\} (\S+)'
    match = re.search(pattern, text)
    return float(match[1]) if match else 0.0


def _change(release: str, outcome: str) -> changes.ProductionChange:
    found = [c for c in changes.for_release(PRODUCT, release) if c.outcome == outcome]
    assert len(found) == 1, [(c.release, c.outcome) for c in changes.for_release(PRODUCT, release)]
    return found[0]


def test_a_release_on_varnish_and_prometheus_is_promoted_and_audited(
    platform: LocalPlatform,
) -> None:
    status = platform.status()[ENV]
    assert status["edge"]["kind"] == "varnish", status["edge"]
    assert status["metrics"]["kind"] == "prometheus" and status["metrics"]["prometheus"]["ready"]
    queries = _promql_queries(platform)
    code, output = _deploy_cli("edge-1.0.0")
    assert code == deploy_cli.EXIT_OK, output[-2000:]
    assert platform.current(ENV)["stable"]["version"] == "edge-1.0.0"
    assert "canary" not in platform.current(ENV)
    assert _served(platform, "first") == {"edge-1.0.0": 40}
    entry = audit.find(_change("edge-1.0.0", "promoted").change_id)
    assert entry is not None and entry.payload["environment"] == ENV
    # The canary judge and the watch read their figures from Prometheus.
    assert _promql_queries(platform) - queries >= 20


def test_a_contract_change_purges_exactly_its_keys_and_the_audit_lists_them(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    for path in ("/static/app.js?e2e=kept", "/v1/summary"):
        _get(platform, path)
        assert _get(platform, path).headers["X-Cache"] == "HIT", path
    code, output = _deploy_cli("edge-1.1.0", products_dir=contract_changed_product(tmp_path))
    assert code == deploy_cli.EXIT_OK, output[-2000:]
    assert platform.current(ENV)["stable"]["version"] == "edge-1.1.0"
    promoted = _change("edge-1.1.0", "promoted")
    purged = [{"path": "/v1/summary", "surrogate_keys": ["summary"]}]
    assert [p.model_dump() for p in promoted.details.purged] == purged
    entry = audit.find(promoted.change_id)
    assert entry is not None and entry.payload["purged"] == purged
    summary = _get(platform, "/v1/summary")
    assert summary.headers["X-Release"] == "edge-1.1.0" and "schema_version" in summary.json()
    # Nothing else was purged: the static file cached before is still the edge-1.0.0 copy.
    kept = _get(platform, "/static/app.js?e2e=kept")
    assert (kept.headers["X-Cache"], kept.headers["X-Release"]) == ("HIT", "edge-1.0.0")
    assert _served(platform, "second") == {"edge-1.1.0": 40}


def test_a_latency_regression_is_blocked_by_slo_regression_from_promql(
    platform: LocalPlatform,
) -> None:
    before = platform.current(ENV)
    queries = _promql_queries(platform)
    code, output = _deploy_cli("edge-1.2.0", "--set", "extra_latency_ms=150")
    assert code == deploy_cli.EXIT_BLOCKED, output[-2000:]
    assert "slo_regression" in output
    assert platform.current(ENV) == before  # edge-1.1.0 alone, no canary left
    assert _served(platform, "after-slow") == {"edge-1.1.0": 40}
    assert audit.find(_change("edge-1.2.0", "aborted").change_id) is not None
    assert _promql_queries(platform) - queries >= 10
    assert audit.verify().ok
