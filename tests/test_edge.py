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

from dagster_project.core import httpclient, registry
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
            apply_pending(local.database(env), spec.migrations_path, actor="test_edge")
            local.deploy(env, "stable", stable)
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def canary_artifact(platform: LocalPlatform) -> registry.Artifact:
    return registry.push(registry.build_artifact(load_spec(PRODUCT), "1.1.0"))


def _get(url: str, **kwargs: Any) -> httpx.Response:
    return httpclient.get(url, timeout=5.0, trust_env=False, **kwargs)


def _purge(edge: str, payload: dict[str, str], key: str | None) -> httpx.Response:
    headers = {"X-Purge-Key": key} if key is not None else {}
    return httpclient.post(
        f"{edge}/_edge/purge", json=payload, headers=headers, timeout=5.0, trust_env=False
    )


# -- real path -------------------------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
def test_ttl_comes_from_the_endpoint_class(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    spec = load_spec(PRODUCT)
    static = _get(f"{edge}/static/app.js")
    assert static.status_code == 200
    # The origin declares the class TTL (static: immutable, from the spec's cache_policy);
    # the edge honours it as sent.
    static_ttl, dynamic_ttl = spec.ttl_classes["static"], spec.ttl_classes["dynamic"]
    assert static.headers["cache-control"] == f"public, max-age={static_ttl}, immutable"
    item = _get(f"{edge}/v1/items/1")
    assert item.headers["cache-control"] == f"public, max-age={dynamic_ttl}"
    assert set(item.headers["surrogate-key"].split()) == {"items", "item-1"}
    assert _get(f"{edge}/v1/items/1").headers["x-cache"] == "HIT"
    # After the dynamic TTL the entry is stale and the origin is asked again.
    time.sleep(spec.ttl_classes["dynamic"] + 1.1)
    assert _get(f"{edge}/v1/items/1").headers["x-cache"] == "MISS"
    assert _get(f"{edge}/static/app.js").headers["x-cache"] == "HIT"


@pytest.mark.slow
def test_no_cache_request_and_uncacheable_paths_reach_the_origin(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    _get(f"{edge}/v1/summary")
    assert _get(f"{edge}/v1/summary").headers["x-cache"] == "HIT"
    forced = _get(f"{edge}/v1/summary", headers={"Cache-Control": "no-cache"})
    assert forced.headers["x-cache"] == "MISS"
    # /healthz is no spec endpoint: the edge never caches it.
    for _ in range(2):
        assert _get(f"{edge}/healthz").headers["x-cache"] == "MISS"


@pytest.mark.slow
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


@pytest.mark.slow
def test_many_unique_urls_are_cached_and_purged_through_the_edge(
    platform: LocalPlatform,
) -> None:
    """The canary load's long tail (unique ?lg=<n> URLs) through the real edge: each URL
    its own entry, found again by key, purged by URL and by surrogate key."""
    edge = platform.edge_url("staging")
    urls = [f"{edge}/v1/items?bulk={n}" for n in range(300)]
    with httpclient.client(timeout=5.0, trust_env=False) as client:

        def cache_entries() -> int:
            return int(client.get(f"{edge}/_edge/health").json()["cache_entries"])

        # Left: only long-lived static entries, so no expiry can move the counts below.
        for surrogate_key in ("items", "summary"):
            platform.purge("staging", surrogate_key=surrogate_key)
        before = cache_entries()
        assert {client.get(u).headers["x-cache"] for u in urls} == {"MISS"}
        assert cache_entries() == before + len(urls)
        assert {client.get(u).headers["x-cache"] for u in urls[::10]} == {"HIT"}

        assert platform.purge("staging", url="/v1/items?bulk=7") == 1
        assert client.get(urls[7]).headers["x-cache"] == "MISS"
        assert client.get(urls[8]).headers["x-cache"] == "HIT"

        assert platform.purge("staging", surrogate_key="items") == len(urls)
        assert cache_entries() == before
        assert {client.get(u).headers["x-cache"] for u in urls[::10]} == {"MISS"}


@pytest.mark.slow
def test_purge_and_route_updates_are_refused_without_the_key(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    _get(f"{edge}/v1/items")
    assert _get(f"{edge}/v1/items").headers["x-cache"] == "HIT"

    for key in (None, "", "wrong-key"):
        refused = _purge(edge, {"surrogate_key": "items"}, key)
        assert refused.status_code == 403
        assert "X-Purge-Key" in refused.json()["error"]
    routes = httpclient.post(
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


@pytest.mark.slow
def test_purge_with_bad_body_names_the_field(platform: LocalPlatform) -> None:
    edge = platform.edge_url("staging")
    key = platform.state.environment("staging").purge_key  # type: ignore[union-attr]
    bad = _purge(edge, {"path": "/v1/items"}, key)
    assert bad.status_code == 400
    assert "'url' or 'surrogate_key'" in bad.json()["error"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_weights_pushed_to_the_edge_split_traffic(
    platform: LocalPlatform, canary_artifact: registry.Artifact
) -> None:
    platform.deploy("production", "canary", canary_artifact)
    try:
        platform.set_weights("production", {"stable": 50, "canary": 50})
        edge = platform.edge_url("production")
        with httpclient.client(timeout=5.0, trust_env=False) as client:
            served = Counter(
                client.get(f"{edge}/healthz", params={"n": i}).headers["x-track"]
                for i in range(300)
            )
        assert 105 <= served["canary"] <= 195, served  # 50% +- 15 points of 300
    finally:
        platform.rollback("production")


@pytest.mark.slow
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


class _FakeClock:
    """A clock the test moves by hand, so expiry is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _store(
    storage: MemoryStorage, key: str, url: str, surrogate: str, body: bytes, ttl: float | None
) -> None:
    response = hishel.Response(200, hishel.Headers({"surrogate-key": surrogate}), stream=_one(body))
    await storage.create_entry(hishel.Request("GET", url), response, key, ttl=ttl)


async def _bodies(storage: MemoryStorage, key: str) -> list[bytes]:
    bodies = []
    for entry in await storage.get_entries(key):
        bodies.append(b"".join([chunk async for chunk in entry.response.stream]))  # type: ignore[union-attr]
    return bodies


def _assert_indexes_consistent(storage: MemoryStorage) -> None:
    # White-box: every index points only at live entries, and no empty bucket or dead
    # deadline piles up (that would be the memory leak of a long-running edge).
    live = set(storage._entries)
    for index in (storage._by_key, storage._by_path_query, storage._by_surrogate_key):
        assert all(ids and set(ids) <= live for ids in index.values())
    assert sum(len(ids) for ids in storage._by_key.values()) == len(live)
    assert len(storage._deadlines) <= 2 * len(live) + 64


def test_memory_storage_stays_correct_with_20000_keys() -> None:
    """20,000 distinct keys (unique URLs, as the canary load makes): lookups, purges and
    expiry all find exactly the right entries."""
    clock = _FakeClock()
    storage = MemoryStorage(max_entries=50_000, clock=clock)
    count = 20_000

    def url(n: int) -> str:
        return f"http://127.0.0.1:9/v1/items?lg={n}"

    async def scenario() -> None:
        for n in range(count):
            # Even n: a dynamic URL kept 70 s; odd n: kept 300 s. Every 100th URL is also
            # cached for the canary track, under its own key.
            ttl = 70.0 if n % 2 == 0 else 300.0
            await _store(storage, f"stable|1|a|{url(n)}", url(n), f"items lg-{n}", b"s%d" % n, ttl)
            if n % 100 == 0:
                await _store(storage, f"canary|2|b|{url(n)}", url(n), "items", b"c%d" % n, ttl)
        assert len(storage) == count + count // 100

        sample = random.Random(3).sample(range(count), 500)
        for n in sample:
            assert await _bodies(storage, f"stable|1|a|{url(n)}") == [b"s%d" % n]
            canary = await _bodies(storage, f"canary|2|b|{url(n)}")
            assert canary == ([b"c%d" % n] if n % 100 == 0 else [])
        assert await storage.get_entries(f"stable|1|a|{url(count)}") == []

        # By URL: path and query, every track; by surrogate key: only entries carrying it.
        assert storage.purge(url="/v1/items?lg=200") == 2
        assert await storage.get_entries(f"canary|2|b|{url(200)}") == []
        assert storage.purge(url="/v1/items?lg=200") == 0
        assert storage.purge(url="/v1/items") == 0  # another URL (no query) is not a prefix
        assert storage.purge(surrogate_key="lg-201") == 1
        assert await _bodies(storage, f"stable|1|a|{url(202)}") == [b"s202"]
        left = count - 2 + count // 100 - 1
        assert len(storage) == left

        # 71 s later the 70 s entries are gone, the 300 s ones still served.
        clock.now += 71
        assert await storage.get_entries(f"stable|1|a|{url(4)}") == []
        assert await _bodies(storage, f"stable|1|a|{url(5)}") == [b"s5"]
        odd_left = count // 2 - 1  # lg-201 was purged
        assert len(storage) == odd_left
        _assert_indexes_consistent(storage)

        # A surrogate key shared by all: one purge removes every entry that carries it.
        assert storage.purge(surrogate_key="items") == odd_left
        assert len(storage) == 0
        _assert_indexes_consistent(storage)
        assert storage._by_path_query == {} and storage._by_surrogate_key == {}

    asyncio.run(scenario())


def test_memory_storage_evicts_the_oldest_and_forgets_removed_entries() -> None:
    clock = _FakeClock()
    storage = MemoryStorage(max_entries=1_000, clock=clock)

    async def scenario() -> None:
        for n in range(1_500):
            # Long-lived entries: eviction, not expiry, must bound memory and the heap.
            url = f"http://e/static/{n}.js"
            await _store(storage, f"stable|1|a|{url}", url, f"static f-{n}", b"%d" % n, 86400.0)
        assert len(storage) == 1_000
        assert await storage.get_entries("stable|1|a|http://e/static/499.js") == []
        assert await _bodies(storage, "stable|1|a|http://e/static/500.js") == [b"500"]
        assert storage.purge(url="/static/10.js") == 0
        assert storage.purge(surrogate_key="f-10") == 0
        assert storage.purge(surrogate_key="static") == 1_000
        _assert_indexes_consistent(storage)

        # remove_entry (hishel's invalidation) unindexes too; update_headers keeps the body.
        await _store(storage, "k", "http://e/v1/summary", "summary", b"x", None)
        [entry] = await storage.get_entries("k")
        await storage.update_headers(entry.id, hishel.Headers({"etag": '"v2"'}))
        [updated] = await storage.get_entries("k")
        assert updated.response.headers.get("etag") == '"v2"'
        await storage.remove_entry(entry.id)
        await storage.remove_entry(entry.id)  # already gone: nothing happens
        assert await storage.get_entries("k") == []
        assert storage.purge(url="/v1/summary") == 0 and len(storage) == 0
        clock.now += 10**6  # no ttl: such an entry would never expire, nothing left to expire
        _assert_indexes_consistent(storage)

    asyncio.run(scenario())


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
