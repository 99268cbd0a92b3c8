"""Varnish as the edge, through the real path: varnishd under the session's supervisord with
the VCL generated from the spec, real API processes behind it, traffic over HTTP, purges and
weight changes through `LocalPlatform`. Skips naming the Debian package where varnishd is
missing (a failure under CI=true). Tests run in file order on one platform (module fixture),
taken down at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from real_parts import PRODUCT, contract_changed_product, require_varnish

from dagster_project.core import httpclient, registry
from dagster_project.core.contract import changed_between
from dagster_project.core.migrations.history import apply_pending
from dagster_project.core.platform import LocalPlatform, varnish
from dagster_project.core.platform.processes import free_port, is_alive
from dagster_project.core.settings import release_home
from dagster_project.core.spec import load_spec

# Every test here runs the real binary (a fixture of the module requires it).
pytestmark = pytest.mark.slow

ENV = "staging"


@pytest.fixture(scope="module", autouse=True)
def _needs_varnish() -> None:
    require_varnish()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPlatform]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELEASE_EDGE", "varnish")
        patch.setenv("RELEASE_METRICS", "scrape")
        local = LocalPlatform(PRODUCT)
        try:
            local.up()
            apply_pending(
                local.database(ENV), load_spec(PRODUCT).migrations_path, actor="test_varnish_edge"
            )
            spec = load_spec(PRODUCT)
            local.deploy(ENV, "stable", registry.push(registry.build_artifact(spec, "1.0.0")))
            yield local
        finally:
            local.down()
    # Nothing left behind: no varnishd, no working directory.
    assert not (release_home() / "varnish").exists()


def _get(url: str, **kwargs: Any) -> httpx.Response:
    return httpclient.get(url, timeout=5.0, trust_env=False, **kwargs)


def _edge(platform: LocalPlatform) -> str:
    return platform.edge_url(ENV)


def _varnishd_pid(platform: LocalPlatform) -> int:
    edge = platform.state.processes(ENV, role="edge")[-1]
    assert edge.program and edge.program.endswith(".varnish"), edge.program
    assert edge.pid
    return edge.pid


def test_a_generated_vcl_compiles_and_a_broken_one_names_its_line() -> None:
    spec = load_spec(PRODUCT)
    routes = {
        "generation": 7,
        "weights": {"stable": 95, "canary": 5},
        "upstreams": {
            "stable": {"url": "http://127.0.0.1:1", "version": "1.0.0", "artifact_sha": "a"},
            "canary": {"url": "http://127.0.0.1:2", "version": "1.1.0", "artifact_sha": "b"},
        },
    }
    vcl = varnish.render_vcl(spec, ENV, routes, "k" * 43)
    assert varnish.compile_vcl(vcl).ok
    broken = vcl.replace("hash_data(req.url);", "hash_data(req.url)", 1)
    line = next(i for i, text in enumerate(broken.splitlines(), 1) if "hash_data(req.url)" in text)
    result = varnish.compile_vcl(broken)
    assert not result.ok
    assert result.line in (line, line + 1)  # VCC points at the token after the missing ';'
    assert f"line {result.line}" in result.describe()
    with pytest.raises(varnish.VclError, match=r"surrogate_keys"):
        bad = spec.model_copy(
            update={
                "endpoints": (
                    spec.endpoints[0].model_copy(update={"surrogate_keys": ('x"}',)}),
                    *spec.endpoints[1:],
                )
            }
        )
        varnish.render_vcl(bad, ENV, routes, "k")


def test_the_edge_vcl_gate_compiles_every_routing_shape_and_names_what_fails() -> None:
    spec = load_spec(PRODUCT)
    passed = varnish.vcl_gate(spec, ["production"])
    assert (passed.passed, passed.verdict) == (True, "pass")
    assert len(passed.compiled) == 4 and all(row["compiles"] for row in passed.compiled)
    endpoint = spec.endpoints[1].model_copy(update={"surrogate_keys": ("items", 'x" }')})
    bad = spec.model_copy(update={"endpoints": (spec.endpoints[0], endpoint, *spec.endpoints[2:])})
    failed = varnish.vcl_gate(bad, ["production"])
    assert (failed.passed, failed.verdict) == (False, "fail")
    assert "endpoints[" in failed.description and "surrogate_keys" in failed.description


def test_the_gate_compiles_a_text_once_per_compiler_and_every_failure_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(PRODUCT)
    cache = tmp_path / "vcl"
    first = varnish.vcl_gate(spec, ["production"], cache_dir=cache)
    again = varnish.vcl_gate(spec, ["production"], cache_dir=cache)
    assert (first.passed, again.passed) == (True, True)
    assert [row["cached"] for row in first.compiled] == [False] * 4
    assert [row["cached"] for row in again.compiled] == [True] * 4
    assert len(list(cache.glob("*.ok"))) == 4
    # Another varnishd or C compiler: compiled again.
    monkeypatch.setattr(varnish, "_compiler_identity", lambda: "varnishd=/upgraded:1:1")
    upgraded = varnish.vcl_gate(spec, ["production"], cache_dir=cache)
    assert upgraded.passed and not any(row["cached"] for row in upgraded.compiled)
    monkeypatch.undo()
    # A text that does not compile is never remembered: each gate names its line again.
    vcl = varnish.render_vcl(spec, ENV, varnish.representative_routes()[-1], "k" * 43)
    broken = vcl.replace("hash_data(req.url);", "hash_data(req.url)", 1)
    for _ in range(2):
        result = varnish.compile_vcl_once(broken, cache)
        assert (result.ok, result.cached) == (False, False)
        assert result.line is not None and f"line {result.line}" in result.describe()
    assert varnish.compile_vcl_once(vcl, cache).ok
    assert varnish.compile_vcl_once(vcl, cache).cached


def test_the_edge_is_varnish_and_status_shows_it(platform: LocalPlatform) -> None:
    status = platform.status()[ENV]
    assert status["healthy"], status["problems"]
    assert status["edge"]["kind"] == "varnish"
    assert status["edge"]["active_vcl"].startswith("g")
    health = _get(f"{_edge(platform)}/_edge/health")
    assert health.status_code == 200
    assert health.json()["edge"] == "varnish"
    assert health.headers["Server"] == "Varnish"


def test_miss_then_hit_with_age_and_the_release_headers(platform: LocalPlatform) -> None:
    url = f"{_edge(platform)}/v1/items?t=hit"
    first = _get(url)
    assert first.status_code == 200
    assert first.headers["X-Cache"] == "MISS"
    assert first.headers["X-Release"] == "1.0.0"
    assert first.headers["X-Track"] == "stable"
    assert "items" in first.headers["Surrogate-Key"].split()
    assert "X-Edge-Track" not in first.headers.get("Vary", "")
    assert "xkey" not in first.headers
    time.sleep(1.1)
    second = _get(url)
    assert second.headers["X-Cache"] == "HIT"
    assert int(second.headers["Age"]) >= 1
    assert second.json() == first.json()


def test_only_the_spec_endpoints_are_cached(platform: LocalPlatform) -> None:
    for path in ("/healthz?t=u", "/v1/jobs/none-such?t=u"):
        for _ in range(2):
            response = _get(f"{_edge(platform)}{path}")
            assert response.headers["X-Cache"] == "MISS", path


def _warm(platform: LocalPlatform, paths: list[str]) -> None:
    for path in paths:
        assert _get(f"{_edge(platform)}{path}").headers["X-Cache"] == "MISS", path
        assert _get(f"{_edge(platform)}{path}").headers["X-Cache"] == "HIT", path


def _cached(platform: LocalPlatform, path: str) -> bool:
    return _get(f"{_edge(platform)}{path}").headers["X-Cache"] == "HIT"


def test_purge_by_surrogate_key_removes_exactly_the_objects_carrying_it(
    platform: LocalPlatform,
) -> None:
    summary = [f"/v1/summary?k={i}" for i in range(4)]
    item = [f"/v1/items/1?k={i}" for i in range(3)]
    items = [f"/v1/items?k={i}" for i in range(5)]
    _warm(platform, summary + item + items)

    assert platform.purge(ENV, surrogate_key="summary") == len(summary)
    assert not any(_cached(platform, p) for p in summary)  # refetched: cached again now
    assert all(_cached(platform, p) for p in item + items)

    assert platform.purge(ENV, surrogate_key="item-1") == len(item)
    assert all(_cached(platform, p) for p in items)
    assert platform.purge(ENV, surrogate_key="no-such-key") == 0


def test_purge_by_url_removes_one_object(platform: LocalPlatform) -> None:
    _warm(platform, ["/v1/items?u=1", "/v1/items?u=2"])
    assert platform.purge(ENV, url="/v1/items?u=1") == 1
    assert not _cached(platform, "/v1/items?u=1")
    assert _cached(platform, "/v1/items?u=2")
    assert platform.purge(ENV, url="/v1/items?u=never-cached") == 0


def test_purges_are_refused_without_the_key(platform: LocalPlatform) -> None:
    edge = _edge(platform)
    _warm(platform, ["/v1/items?r=1"])
    key = platform.state.environment(ENV).purge_key  # type: ignore[union-attr]
    attempts = [
        ("POST", "/_edge/purge", {"X-Purge-URL": "/v1/items?r=1"}),
        ("POST", "/_edge/purge", {"X-Purge-URL": "/v1/items?r=1", "X-Purge-Key": "wrong"}),
        ("POST", "/_edge/purge", {"X-Purge-Surrogate-Key": "items", "X-Purge-Key": key[:-1]}),
        ("PURGE", "/v1/items?r=1", {}),
        ("POST", "/_edge/routes", {}),
    ]
    for method, path, headers in attempts:
        response = httpx.request(method, f"{edge}{path}", headers=headers, trust_env=False)
        assert response.status_code == 403, (method, path, headers)
        assert "refused" in response.json()["error"]
    assert _cached(platform, "/v1/items?r=1")
    # The PURGE method with the key works too (one object, by its own URL).
    purged = httpx.request(
        "PURGE", f"{edge}/v1/items?r=1", headers={"X-Purge-Key": key}, trust_env=False
    )
    assert purged.json() == {"purged": 1}


def _proxy_request(port: int, source_ip: str, raw: str) -> str:
    """One HTTP request through a PROXY-protocol listener, as if from `source_ip`."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"PROXY TCP4 {source_ip} 127.0.0.1 40000 80\r\n{raw}".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_purges_are_refused_from_outside_loopback_even_with_the_key(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    """The same generated VCL in a second varnishd whose extra listener speaks the PROXY
    protocol, so a client address outside loopback can be presented for real."""
    key = platform.state.environment(ENV).purge_key  # type: ignore[union-attr]
    vcl = varnish.render_vcl(load_spec(PRODUCT), ENV, platform.state.routes(ENV), key)
    (tmp_path / "edge.vcl").write_text(vcl)
    plain, proxied = free_port(), free_port()
    argv = [
        "varnishd", "-F", "-j", "none", "-n", str(tmp_path / "n"), "-f", str(tmp_path / "edge.vcl"),
        "-a", f"127.0.0.1:{plain}", "-a", f"127.0.0.1:{proxied},PROXY", "-s", "malloc,16m",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if _get(f"http://127.0.0.1:{plain}/_edge/health").status_code == 200:
                    break
            time.sleep(0.1)
        purge = (
            "POST /_edge/purge HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n"
            f"X-Purge-Key: {key}\r\nX-Purge-Surrogate-Key: items\r\nContent-Length: 0\r\n\r\n"
        )
        outside = _proxy_request(proxied, "203.0.113.7", purge)
        assert outside.startswith("HTTP/1.1 403"), outside[:200]
        inside = _proxy_request(proxied, "127.0.0.1", purge)
        assert inside.startswith("HTTP/1.1 200"), inside[:200]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_weights_change_without_a_restart_and_the_cache_survives(
    platform: LocalPlatform,
) -> None:
    spec = load_spec(PRODUCT)
    pid = _varnishd_pid(platform)
    _warm(platform, ["/static/app.js?w=1"])
    platform.deploy(ENV, "canary", registry.push(registry.build_artifact(spec, "1.1.0")))
    started = time.monotonic()
    platform.set_weights(ENV, {"stable": 50, "canary": 50})
    assert time.monotonic() - started < 10
    tracks = Counter(
        _get(f"{_edge(platform)}/v1/items?split={i}").headers["X-Track"] for i in range(200)
    )
    assert 60 <= tracks["canary"] <= 140, tracks
    assert _varnishd_pid(platform) == pid  # loaded as VCL, never restarted
    # The stable copy cached before the change is still served to stable traffic.
    hits = [
        r.headers["X-Cache"]
        for r in (_get(f"{_edge(platform)}/static/app.js?w=1") for _ in range(20))
        if r.headers["X-Track"] == "stable"
    ]
    assert hits and set(hits) == {"HIT"}


def test_canary_answers_never_fill_the_stable_cache(platform: LocalPlatform) -> None:
    platform.set_weights(ENV, {"stable": 0, "canary": 100})
    canary = _get(f"{_edge(platform)}/v1/items?iso=1")
    assert (canary.headers["X-Track"], canary.headers["X-Release"]) == ("canary", "1.1.0")
    platform.set_weights(ENV, {"stable": 100, "canary": 0})
    stable = _get(f"{_edge(platform)}/v1/items?iso=1")
    assert (stable.headers["X-Track"], stable.headers["X-Cache"]) == ("stable", "MISS")
    assert stable.headers["X-Release"] == "1.0.0"
    # One URL, one copy per track: a purge by URL removes both.
    assert platform.purge(ENV, url="/v1/items?iso=1") == 2


def test_an_older_route_table_never_replaces_a_newer_one(platform: LocalPlatform) -> None:
    routes = platform.state.routes(ENV)
    older = {**routes, "generation": routes["generation"] - 1, "weights": {"canary": 100}}
    assert platform._edge(ENV).push_routes(older)["applied"] is False
    tracks = {_get(f"{_edge(platform)}/v1/items?older={i}").headers["X-Track"] for i in range(20)}
    assert tracks == {"stable"}
    assert platform._edge(ENV).push_routes(routes)["applied"] is True  # the same one again


def test_a_killed_varnishd_comes_back_on_its_port_with_the_current_routes(
    platform: LocalPlatform,
) -> None:
    pid = _varnishd_pid(platform)
    generation = platform.state.environment(ENV).routes_generation  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            health = _get(f"{_edge(platform)}/_edge/health")
            if health.status_code == 200 and _varnishd_pid(platform) != pid:
                break
        time.sleep(0.2)
    assert not is_alive(pid, None)
    assert health.json()["generation"] == generation
    response = _get(f"{_edge(platform)}/v1/items?after-restart=1")
    assert (response.status_code, response.headers["X-Track"]) == (200, "stable")


def test_after_a_promotion_exactly_the_changed_keys_are_purged(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    """The platform side of the promotion's selective purge: the keys of the endpoints whose
    contract changed are purged, the next GET of those carries the new release, the others
    keep their cached copy of the previous release until their TTL."""
    changed_spec = load_spec(contract_changed_product(tmp_path) / PRODUCT / "product.yaml")
    new = registry.push(registry.build_artifact(changed_spec, "2.0.0"))
    platform.rollback(ENV)  # canary 1.1.0 gone; stable 1.0.0 at 100%
    _warm(platform, ["/v1/summary", "/static/app.js?p=1"])
    platform.deploy(ENV, "canary", new)
    old = platform.current(ENV)["stable"]["artifact_sha"]
    changed = changed_between(load_spec(PRODUCT), str(old), new.sha256)
    assert changed == [{"path": "/v1/summary", "surrogate_keys": ["summary"]}]
    platform.promote(ENV)
    purged = {k: platform.purge(ENV, surrogate_key=k) for c in changed for k in c["surrogate_keys"]}
    assert purged == {"summary": 1}
    summary = _get(f"{_edge(platform)}/v1/summary")
    assert (summary.headers["X-Cache"], summary.headers["X-Release"]) == ("MISS", "2.0.0")
    assert "schema_version" in summary.json()
    static = _get(f"{_edge(platform)}/static/app.js?p=1")  # not purged: still the old copy
    assert (static.headers["X-Cache"], static.headers["X-Release"]) == ("HIT", "1.0.0")
