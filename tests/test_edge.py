"""The edge: caching, headers, purge and its protection, weighted routing by track/version.

Mostly through the real path (edge and API processes started by LocalPlatform, requests over
HTTP); a few pure tests of the route table, the endpoint matching and the cache storage, and
one in-process test of what cannot be produced on loopback (a non-loopback client)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hishel
import httpx
import pytest

from dagster_project.core import registry
from dagster_project.core.migrations.history import apply_pending
from dagster_project.core.platform import LocalPlatform
from dagster_project.core.platform.edge import (
    Edge,
    MemoryStorage,
    RouteTable,
    Upstream,
    endpoint_policies,
)
from dagster_project.core.spec import load_spec

PRODUCT = "4pnihc40q-yj"
ENVS = ("staging", "production")


@pytest.fixture(scope="module")
def platform() -> Iterator[LocalPlatform]:
    """Platform up, migrations applied, 1.0.0 stable in both environments; always down."""
    local = LocalPlatform(PRODUCT)
    try:
        local.up()
        spec = load_spec(PRODUCT)
        stable = registry.push(registry.build_artifact(spec, "1.0.0"))
        for env in ENVS:
            apply_pending(env, spec.migrations_path, actor="test_edge")
            local.deploy(env, "stable", stable)
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def canary_artifact(platform: LocalPlatform) -> registry.Artifact:
    return registry.push(registry.build_artifact(load_spec(PRODUCT), "1.1.0"))


def _get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=5.0, trust_env=False, **kwargs)


def _purge(edge: str, payload: dict[str, str], key: str | None) -> httpx.Response:
    headers = {"X-Purge-Key": key} if key is not None else {}
    return httpx.post(
        f"{edge}/_edge/purge", json=payload, headers=headers, timeout=5.0, trust_env=False
    )


# -- real path -------------------------------------------------------------------------------


def test_miss_then_hit_with_growing_age(platform: LocalPlatform) -> None:
    url = f"{platform.edge_url('staging')}/v1/items"
    first = _get(url)
    assert first.status_code == 200
    assert first.headers["x-cache"] == "MISS" and first.headers["age"] == "0"
    assert first.headers["x-release"] == "1.0.0" and first.headers["x-track"] == "stable"
    assert first.headers["surrogate-key"] == "items"
    time.sleep(1.1)
    second = _get(url)
    assert second.headers["x-cache"] == "HIT"
    assert int(second.headers["age"]) >= 1
    assert second.json() == first.json()
    time.sleep(1.1)
    third = _get(url)
    assert third.headers["x-cache"] == "HIT"
    assert int(third.headers["age"]) > int(second.headers["age"])


def test_ttl_comes_from_the_endpoint_class(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    spec = load_spec(PRODUCT)
    static = _get(f"{edge}/static/app.js")
    assert static.status_code == 200
    assert static.headers["cache-control"] == f"public, s-maxage={spec.ttl_classes['static']}"
    item = _get(f"{edge}/v1/items/1")
    assert item.headers["cache-control"] == f"public, s-maxage={spec.ttl_classes['dynamic']}"
    assert set(item.headers["surrogate-key"].split()) == {"items", "item-1"}
    assert _get(f"{edge}/v1/items/1").headers["x-cache"] == "HIT"
    # After the dynamic TTL the entry is stale and the origin is asked again.
    time.sleep(spec.ttl_classes["dynamic"] + 1.1)
    assert _get(f"{edge}/v1/items/1").headers["x-cache"] == "MISS"
    assert _get(f"{edge}/static/app.js").headers["x-cache"] == "HIT"


def test_no_cache_request_and_uncacheable_paths_reach_the_origin(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    _get(f"{edge}/v1/summary")
    assert _get(f"{edge}/v1/summary").headers["x-cache"] == "HIT"
    forced = _get(f"{edge}/v1/summary", headers={"Cache-Control": "no-cache"})
    assert forced.headers["x-cache"] == "MISS"
    # /healthz is no spec endpoint: the edge never caches it.
    for _ in range(2):
        assert _get(f"{edge}/healthz").headers["x-cache"] == "MISS"


def test_purge_by_surrogate_key_and_by_url(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    for path in ("/v1/items", "/v1/items/1", "/v1/summary"):
        _get(f"{edge}{path}")
        assert _get(f"{edge}{path}").headers["x-cache"] == "HIT"

    assert platform.purge("staging", surrogate_key="items") >= 2
    assert _get(f"{edge}/v1/items").headers["x-cache"] == "MISS"
    assert _get(f"{edge}/v1/items/1").headers["x-cache"] == "MISS"
    assert _get(f"{edge}/v1/summary").headers["x-cache"] == "HIT"  # other keys untouched

    assert platform.purge("staging", url="/v1/summary") >= 1
    assert _get(f"{edge}/v1/summary").headers["x-cache"] == "MISS"
    assert platform.purge("staging", surrogate_key="no-such-key") == 0


def test_purge_and_route_updates_are_refused_without_the_key(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    _get(f"{edge}/v1/items")
    assert _get(f"{edge}/v1/items").headers["x-cache"] == "HIT"

    for key in (None, "", "wrong-key"):
        refused = _purge(edge, {"surrogate_key": "items"}, key)
        assert refused.status_code == 403
        assert "X-Purge-Key" in refused.json()["error"]
    routes = httpx.post(
        f"{edge}/_edge/routes", json={"generation": 10**9, "weights": {}, "upstreams": {}},
        timeout=5.0, trust_env=False,
    )  # fmt: skip
    assert routes.status_code == 403
    # Nothing was purged or rerouted.
    hit = _get(f"{edge}/v1/items")
    assert hit.headers["x-cache"] == "HIT" and hit.headers["x-track"] == "stable"
    # The production key does not open the staging edge.
    production_key = platform.state.environment("production").purge_key  # type: ignore[union-attr]
    assert _purge(edge, {"surrogate_key": "items"}, production_key).status_code == 403


def test_purge_with_bad_body_names_the_field(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    key = platform.state.environment("staging").purge_key  # type: ignore[union-attr]
    bad = _purge(edge, {"path": "/v1/items"}, key)
    assert bad.status_code == 400
    assert "'url' or 'surrogate_key'" in bad.json()["error"]


def test_canary_answers_never_fill_the_stable_cache(
    platform: LocalPlatform, canary_artifact: registry.Artifact
) -> None:
    edge = platform.edge_url("production")
    url = f"{edge}/v1/summary?probe=tracks"
    platform.deploy("production", "canary", canary_artifact)
    try:
        stable = _get(url)
        assert (stable.headers["x-track"], stable.headers["x-cache"]) == ("stable", "MISS")
        platform.set_weights("production", {"stable": 0, "canary": 100})
        canary = [_get(url) for _ in range(2)]
        assert [(r.headers["x-track"], r.headers["x-cache"]) for r in canary] == [
            ("canary", "MISS"),
            ("canary", "HIT"),
        ]
        assert {r.headers["x-release"] for r in canary} == {"1.1.0"}
        platform.set_weights("production", {"stable": 100, "canary": 0})
        back = _get(url)
        # The stable entry stored before the canary ran is what serves (same version key).
        assert (back.headers["x-track"], back.headers["x-cache"]) == ("stable", "HIT")
        assert back.headers["x-release"] == "1.0.0"
    finally:
        platform.rollback("production")


def test_weights_pushed_to_the_edge_split_traffic(
    platform: LocalPlatform, canary_artifact: registry.Artifact
) -> None:
    platform.deploy("production", "canary", canary_artifact)
    try:
        platform.set_weights("production", {"stable": 50, "canary": 50})
        edge = platform.edge_url("production")
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            served = Counter(
                client.get(f"{edge}/healthz", params={"n": i}).headers["x-track"]
                for i in range(300)
            )
        assert 105 <= served["canary"] <= 195, served  # 50% +- 15 points of 300
    finally:
        platform.rollback("production")


def test_edge_health_shows_routes_without_secrets(platform: LocalPlatform) -> None:
    health = _get(f"{platform.edge_url('production')}/_edge/health")
    assert health.status_code == 200
    body = health.json()
    assert body["env"] == "production" and body["status"] == "ok"
    assert body["routes"]["weights"] == {"stable": 100, "canary": 0}
    assert set(body["routes"]["upstreams"]) == {"stable"}
    key = platform.state.environment("production").purge_key  # type: ignore[union-attr]
    assert key not in health.text


# -- pure logic and in-process ---------------------------------------------------------------


def _table(weights: dict[str, int], tracks: tuple[str, ...] = ("stable", "canary")) -> RouteTable:
    upstreams = {t: Upstream(f"http://127.0.0.1:1/{t}", f"v-{t}", "0" * 64) for t in tracks}
    return RouteTable(generation=1, weights=weights, upstreams=upstreams)


def test_route_table_chooses_by_weight_among_running_tracks() -> None:
    rng = random.Random(7)
    counts = Counter(_table({"stable": 80, "canary": 20}).choose(rng) for _ in range(5000))
    assert 0.17 <= counts["canary"] / 5000 <= 0.23
    only_stable = _table({"stable": 50, "canary": 50}, tracks=("stable",))
    assert {only_stable.choose(rng) for _ in range(50)} == {"stable"}
    assert _table({"stable": 0, "canary": 100}, tracks=("stable",)).choose(rng) is None


def test_route_table_rejects_a_malformed_push() -> None:
    with pytest.raises(ValueError, match="'generation'"):
        RouteTable.from_dict({"weights": {"stable": 100}})


def test_endpoint_matching_uses_the_spec() -> None:
    match = endpoint_policies(load_spec(PRODUCT))
    assert match("/v1/items/1").surrogate_keys == ("items", "item-1")  # type: ignore[union-attr]
    assert match("/v1/items/7").surrogate_keys == ("items",)  # type: ignore[union-attr]
    assert match("/static/app.js").ttl == 86400  # type: ignore[union-attr]
    assert match("/v1/itemsx") is None and match("/healthz") is None


def test_memory_storage_purges_by_url_across_tracks_and_by_key() -> None:
    async def scenario() -> tuple[int, int, int]:
        storage = MemoryStorage()

        async def store(key: str, url: str, surrogate: str) -> None:
            response = hishel.Response(
                200, hishel.Headers({"surrogate-key": surrogate}), stream=_one(b"x")
            )
            await storage.create_entry(hishel.Request("GET", url), response, key)

        await store("stable|1|a", "http://e/v1/items?x=1", "items")
        await store("canary|2|a", "http://localhost/v1/items?x=1", "items")
        await store("stable|1|b", "http://e/v1/summary", "summary")
        by_url = storage.purge(url="/v1/items?x=1")
        left = len(await storage.get_entries("stable|1|b"))
        by_key = storage.purge(surrogate_key="summary")
        return by_url, left, by_key

    assert asyncio.run(scenario()) == (2, 1, 1)


async def _one(body: bytes) -> Any:
    yield body


def _in_process(edge: Edge, client_host: str) -> httpx.AsyncClient:
    # The ASGI app called directly, as if from `client_host` (no lifespan: no upstream calls).
    transport = httpx.ASGITransport(app=edge.app, client=(client_host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://edge")


def test_admin_endpoints_refuse_non_loopback_clients_even_with_the_key() -> None:
    edge = Edge(env="staging", spec=load_spec(PRODUCT))
    edge.purge_key = "the-right-key"
    key = {"X-Purge-Key": "the-right-key"}

    async def scenario() -> list[int]:
        codes = []
        async with _in_process(edge, "203.0.113.9") as remote:
            codes.append(
                (await remote.post("/_edge/purge", json={"url": "/"}, headers=key)).status_code
            )
            table = _table({"stable": 100}).as_dict()
            codes.append((await remote.post("/_edge/routes", json=table, headers=key)).status_code)
        async with _in_process(edge, "127.0.0.1") as local:
            codes.append(
                (await local.post("/_edge/purge", json={"url": "/"}, headers=key)).status_code
            )
        return codes

    assert asyncio.run(scenario()) == [403, 403, 200]
    assert edge.routes.generation == 0


def test_no_upstream_answers_503_with_a_clear_body() -> None:
    edge = Edge(env="production", spec=load_spec(PRODUCT))

    async def scenario() -> httpx.Response:
        async with _in_process(edge, "127.0.0.1") as client:
            return await client.get("/v1/items")

    response = asyncio.run(scenario())
    assert response.status_code == 503
    body = response.json()
    assert "no healthy upstream for production" in body["error"]
    assert body["deployed_tracks"] == []
