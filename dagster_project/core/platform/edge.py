"""The edge: a caching reverse proxy per environment, the local stand-in for a CDN.

Run as its own process (started by `LocalPlatform.up`):

    python -m dagster_project.core.platform.edge --product PRODUCT --env staging --port N

- Caching follows RFC 9111 through hishel's state machine as a shared cache. The origin is
  authoritative for TTLs: its `Cache-Control` is honoured as sent (the edge_cache gate judges
  it against the spec's `cache_policy`). A spec endpoint's 200 without one gets
  `Cache-Control: public, s-maxage=<ttl of its class>`; any other response without one gets
  `no-store` (the edge never caches heuristically). A request with `Authorization` bypasses
  the cache (never stored, never served from it).
- The cache key is track + release version + artifact + full URL; the method is matched by
  the state machine inside a key (hishel keeps all methods of a URL under one key so an
  unsafe request can invalidate them). So a canary answer never fills the stable cache and
  a promotion starts with a clean cache.
- Responses carry `Age`, `X-Cache: HIT|MISS`, `X-Release`, `X-Track`, `Surrogate-Key`.
- Traffic is split between `stable` and `canary` by weight. The route table comes from
  platform state at start and every few seconds, and is pushed by the platform to
  `POST /_edge/routes` so a rollback applies at once. A table never replaces a newer one
  (generation numbers), so a slow reload cannot undo a push.
- `POST /_edge/purge` and `POST /_edge/routes` accept only loopback clients presenting the
  environment's purge key in `X-Purge-Key`; anything else gets 403.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import hmac
import itertools
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, assert_never
from urllib.parse import urlsplit

import aiohttp
import hishel
import uvicorn
import yarl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dagster_project.core.platform.state import PURGE_KEY_HEADER, PlatformState
from dagster_project.core.spec import ProductSpec, load_spec

logger = logging.getLogger("release.edge")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
CACHE_OPTIONS = hishel.CacheOptions(shared=True)
# Headers meaningful for one connection only (RFC 9110 §7.6.1) plus those we recompute.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


# -- cache storage ---------------------------------------------------------------------------


@dataclass
class _Stored:
    key: str
    request: hishel.Request
    status_code: int
    headers: hishel.Headers
    body: bytes
    expires_at: float | None
    path_query: str
    surrogate_keys: frozenset[str]


async def _body_stream(body: bytes) -> AsyncIterator[bytes]:
    yield body


class MemoryStorage(hishel.AsyncBaseStorage):
    """An in-memory hishel storage that can also purge by URL or surrogate key.

    Memory is what an edge node has: a restarted edge starts cold, like a CDN node. Bounded
    by `max_entries` (oldest evicted first).

    Every operation costs O(1) or amortised O(log n) in the number of stored entries: entries
    are indexed by cache key, by path and query and by surrogate key, and expire through a
    heap of deadlines. (Scanning all entries per request made the edge slow down as unique
    URLs piled up under load.)"""

    def __init__(
        self, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.max_entries = max_entries
        # Monotonic by default: expiry must not jump with the wall clock. Tests pass their own.
        self._clock = clock
        # Insertion order, so the oldest entry is the first to evict.
        self._entries: OrderedDict[uuid.UUID, _Stored] = OrderedDict()
        # Index values are dicts used as ordered sets: lookups keep insertion order.
        self._by_key: dict[str, dict[uuid.UUID, None]] = {}
        self._by_path_query: dict[str, dict[uuid.UUID, None]] = {}
        self._by_surrogate_key: dict[str, dict[uuid.UUID, None]] = {}
        # (deadline, tie-breaker, id); ids already removed are skipped when popped.
        self._deadlines: list[tuple[float, int, uuid.UUID]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    async def create_entry(
        self,
        request: hishel.Request,
        response: hishel.Response,
        key: str,
        *,
        ttl: float | None = None,
        tti: float | None = None,
    ) -> hishel.Entry:
        chunks = [chunk async for chunk in _aiter(response.stream)]
        body = b"".join(chunks)
        now = self._clock()
        self._expire(now)
        ttl_deadline, _ = self._limits(ttl, None, now)
        parts = urlsplit(request.url)
        stored = _Stored(
            key=key,
            request=request,
            status_code=response.status_code,
            headers=response.headers,
            body=body,
            expires_at=ttl_deadline,
            path_query=_path_query(parts.path, parts.query),
            surrogate_keys=frozenset((response.headers.get("surrogate-key") or "").split()),
        )
        entry_id = uuid.uuid4()
        self._add(entry_id, stored)
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))
        self._compact_deadlines()
        return self._entry(entry_id, stored)

    async def get_entries(self, key: str) -> list[hishel.Entry]:
        self._expire(self._clock())
        ids = self._by_key.get(key, {})
        return [self._entry(i, self._entries[i]) for i in ids]

    async def update_headers(self, id: uuid.UUID, headers: hishel.Headers) -> None:
        if id in self._entries:
            self._entries[id].headers = headers

    async def remove_entry(self, id: uuid.UUID) -> None:
        self._remove(id)
        self._compact_deadlines()

    def purge(self, *, url: str | None = None, surrogate_key: str | None = None) -> int:
        """Remove every entry (all tracks, versions, methods) for a URL's path and query, or
        carrying a surrogate key. Returns how many were removed."""
        doomed: dict[uuid.UUID, None] = {}
        if url is not None:
            parts = urlsplit(url)
            doomed.update(self._by_path_query.get(_path_query(parts.path or "/", parts.query), {}))
        if surrogate_key is not None:
            doomed.update(self._by_surrogate_key.get(surrogate_key, {}))
        for entry_id in doomed:
            self._remove(entry_id)
        self._compact_deadlines()
        return len(doomed)

    def _add(self, entry_id: uuid.UUID, stored: _Stored) -> None:
        self._entries[entry_id] = stored
        self._by_key.setdefault(stored.key, {})[entry_id] = None
        self._by_path_query.setdefault(stored.path_query, {})[entry_id] = None
        for surrogate_key in stored.surrogate_keys:
            self._by_surrogate_key.setdefault(surrogate_key, {})[entry_id] = None
        if stored.expires_at is not None:
            heapq.heappush(self._deadlines, (stored.expires_at, next(self._sequence), entry_id))

    def _compact_deadlines(self) -> None:
        # Purged, removed and evicted entries leave their deadlines behind; rebuild the heap
        # from the live entries once those are outnumbered (amortised O(1) per removal).
        if len(self._deadlines) > 2 * len(self._entries) + 64:
            self._deadlines = [d for d in self._deadlines if d[2] in self._entries]
            heapq.heapify(self._deadlines)

    def _remove(self, entry_id: uuid.UUID) -> None:
        stored = self._entries.pop(entry_id, None)
        if stored is None:
            return
        _unindex(self._by_key, stored.key, entry_id)
        _unindex(self._by_path_query, stored.path_query, entry_id)
        for surrogate_key in stored.surrogate_keys:
            _unindex(self._by_surrogate_key, surrogate_key, entry_id)

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            self._remove(heapq.heappop(self._deadlines)[2])

    @staticmethod
    def _entry(entry_id: uuid.UUID, stored: _Stored) -> hishel.Entry:
        response = hishel.Response(
            status_code=stored.status_code,
            headers=hishel.Headers(_header_lists(stored.headers)),
            stream=_body_stream(stored.body),
        )
        return hishel.Entry(id=entry_id, request=stored.request, response=response)


def _path_query(path: str, query: str) -> str:
    return path + (f"?{query}" if query else "")


def _unindex(index: dict[str, dict[uuid.UUID, None]], name: str, entry_id: uuid.UUID) -> None:
    ids = index.get(name)
    if ids is not None:
        ids.pop(entry_id, None)
        if not ids:  # drop empty buckets, or unique URLs would leak one each
            del index[name]


async def _aiter(stream: Any) -> AsyncIterator[bytes]:
    if stream is None:
        return
    if hasattr(stream, "__aiter__"):
        async for chunk in stream:
            yield chunk
    else:
        for chunk in stream:
            yield chunk


def _header_lists(headers: hishel.Headers) -> dict[str, list[str]]:
    return {name: list(headers.get_list(name) or []) for name in headers}


# -- routes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    url: str
    version: str
    artifact_sha: str


@dataclass
class RouteTable:
    """Weights and the serving upstream per track; replaced whole, never edited in place."""

    generation: int = 0
    weights: dict[str, int] = field(default_factory=lambda: {"stable": 100, "canary": 0})
    upstreams: dict[str, Upstream] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouteTable:
        try:
            return cls(
                generation=int(data["generation"]),
                weights={str(k): int(v) for k, v in data["weights"].items()},
                upstreams={
                    str(track): Upstream(
                        url=str(u["url"]),
                        version=str(u["version"]),
                        artifact_sha=str(u["artifact_sha"]),
                    )
                    for track, u in data.get("upstreams", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                "route table needs 'generation' (int), 'weights' ({track: int}) and "
                f"'upstreams' ({{track: {{url, version, artifact_sha}}}}): {exc!r}"
            ) from None

    def as_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "weights": dict(self.weights),
            "upstreams": {
                t: {"url": u.url, "version": u.version, "artifact_sha": u.artifact_sha}
                for t, u in self.upstreams.items()
            },
        }

    def choose(self, rng: random.Random) -> str | None:
        """A track by weight among those with an upstream, or None if none can serve."""
        candidates = [(t, w) for t, w in self.weights.items() if w > 0 and t in self.upstreams]
        if not candidates:
            return None
        tracks, weights = zip(*candidates, strict=True)
        return rng.choices(tracks, weights=weights)[0]


# -- the edge application ------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointPolicy:
    ttl: int
    surrogate_keys: tuple[str, ...]


def endpoint_policies(spec: ProductSpec) -> Callable[[str], EndpointPolicy | None]:
    """Match a request path to its spec endpoint: exact path, else the longest endpoint that
    is a directory prefix of it (so /orders/7 is treated like /orders)."""
    policies = sorted(
        (
            (
                e.path.rstrip("/") or "/",
                EndpointPolicy(spec.ttl_classes[e.ttl_class], e.surrogate_keys),
            )
            for e in spec.endpoints
        ),
        key=lambda item: len(item[0]),
        reverse=True,
    )

    def match(path: str) -> EndpointPolicy | None:
        for prefix, policy in policies:
            if path == prefix or path.startswith(prefix + "/"):
                return policy
        return None

    return match


class Edge:
    """The proxy's state and handlers; `app` is the Starlette application."""

    def __init__(
        self,
        *,
        env: str,
        spec: ProductSpec,
        load_state: Callable[[], tuple[str, dict[str, Any]]] | None = None,
        reload_interval: float = 2.0,
    ) -> None:
        self.env = env
        self.spec = spec
        self.policy_for = endpoint_policies(spec)
        self.storage = MemoryStorage()
        self.routes = RouteTable()
        self.purge_key = ""
        self._load_state = load_state
        self._reload_interval = reload_interval
        self._rng = random.Random()
        self._session: aiohttp.ClientSession | None = None
        self.app = Starlette(
            routes=[
                Route("/_edge/health", self.health, methods=["GET"]),
                Route("/_edge/purge", self.purge, methods=["POST"]),
                Route("/_edge/routes", self.push_routes, methods=["POST"]),
                Route("/{path:path}", self.proxy, methods=ALL_METHODS),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # aiohttp, not httpx, to reach the origins: measured on this proxy, httpx's client
        # took 63% of the edge's CPU per request (its pool re-checks every idle connection on
        # each request). No cookie jar: a shared proxy must never replay one client's cookie.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, limit_per_host=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=10.0, connect=2.0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            trust_env=False,
        )
        reloader = None
        if self._load_state is not None:
            await self.reload()
            reloader = asyncio.create_task(self._reload_forever())
        try:
            yield
        finally:
            if reloader is not None:
                reloader.cancel()
            await self._session.close()

    async def reload(self) -> None:
        assert self._load_state is not None
        purge_key, routes = await asyncio.to_thread(self._load_state)
        self.purge_key = purge_key
        self.apply_routes(RouteTable.from_dict(routes))

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reload_interval)
            try:
                await self.reload()
            except Exception as exc:  # keep serving with the last good table
                logger.warning(
                    "edge %s: route reload from platform state failed: %s", self.env, exc
                )

    def apply_routes(self, table: RouteTable) -> bool:
        if table.generation < self.routes.generation:
            return False
        self.routes = table
        return True

    def _authorized(self, request: Request) -> bool:
        client_host = request.client.host if request.client else ""
        presented = request.headers.get(PURGE_KEY_HEADER, "")
        return (
            client_host in LOOPBACK_HOSTS
            and bool(self.purge_key)
            and hmac.compare_digest(presented.encode(), self.purge_key.encode())
        )

    @staticmethod
    def _refused(what: str) -> JSONResponse:
        return JSONResponse(
            {
                "error": f"{what} refused: only loopback clients with the environment's "
                f"{PURGE_KEY_HEADER} may do this"
            },
            status_code=403,
        )

    async def health(self, _request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "env": self.env,
                "product": self.spec.product,
                "routes": self.routes.as_dict(),
                "cache_entries": len(self.storage),
            }
        )

    async def _json_body(self, request: Request, endpoint: str) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ValueError(f"{endpoint}: the request body must be a JSON object")
        return body

    async def purge(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return self._refused("purge")
        try:
            body = await self._json_body(request, "POST /_edge/purge")
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        url, surrogate_key = body.get("url"), body.get("surrogate_key")
        if (
            not isinstance(url, str | None)
            or not isinstance(surrogate_key, str | None)
            or (url is None and surrogate_key is None)
        ):
            return JSONResponse(
                {"error": "POST /_edge/purge: give a string field 'url' or 'surrogate_key'"},
                status_code=400,
            )
        purged = self.storage.purge(url=url, surrogate_key=surrogate_key)
        return JSONResponse({"purged": purged})

    async def push_routes(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return self._refused("route update")
        try:
            table = RouteTable.from_dict(await self._json_body(request, "POST /_edge/routes"))
        except ValueError as exc:
            return JSONResponse({"error": f"POST /_edge/routes: {exc}"}, status_code=400)
        applied = self.apply_routes(table)
        return JSONResponse({"applied": applied, "generation": self.routes.generation})

    async def proxy(self, request: Request) -> Response:
        routes = self.routes  # one consistent table for the whole request
        track = routes.choose(self._rng)
        if track is None:
            return JSONResponse(
                {
                    "error": f"no healthy upstream for {self.env}: no release is serving "
                    "(weights > 0 with a running API)",
                    "env": self.env,
                    "weights": routes.weights,
                    "deployed_tracks": sorted(routes.upstreams),
                },
                status_code=503,
            )
        upstream = routes.upstreams[track]
        url = str(request.url)
        key = f"{track}|{upstream.version}|{upstream.artifact_sha}|{url}"
        body = await request.body()
        policy = self.policy_for(request.url.path)
        cache_request = hishel.Request(
            method=request.method,
            url=url,
            headers=hishel.Headers(_grouped(request.headers.raw)),
        )

        async def send(outgoing: hishel.Request) -> hishel.Response:
            return await self._forward(outgoing, body, upstream, policy)

        try:
            if "authorization" in request.headers:  # per-user answers are never shared
                response = await send(cache_request)
                cache_status = hishel.CacheStatus(from_cache=False, revalidated=False, stored=False)
            else:
                response, cache_status = await _handle_with_rfc(
                    cache_request,
                    send,
                    self.storage,
                    key,
                    CACHE_OPTIONS,
                    ttl=_storage_ttl(policy),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return JSONResponse(
                {
                    "error": f"no healthy upstream for {self.env}: the {track} API at "
                    f"{upstream.url} failed ({type(exc).__name__})",
                    "env": self.env,
                    "track": track,
                },
                status_code=503,
                headers={"X-Track": track, "X-Release": upstream.version},
            )
        content = b"".join([chunk async for chunk in _aiter(response.stream)])
        headers = _header_lists(response.headers)
        for name in HOP_BY_HOP:
            headers.pop(name, None)
        headers.setdefault("age", ["0"])
        headers["x-cache"] = ["HIT" if cache_status["from_cache"] else "MISS"]
        headers["x-track"] = [track]
        headers["x-release"] = [upstream.version]
        out = Response(content=content, status_code=response.status_code)
        for name, values in headers.items():
            for value in values:
                out.headers.append(name, value)
        return out

    async def _forward(
        self,
        outgoing: hishel.Request,
        body: bytes,
        upstream: Upstream,
        policy: EndpointPolicy | None,
    ) -> hishel.Response:
        assert self._session is not None
        parts = urlsplit(outgoing.url)
        target = upstream.url + parts.path + (f"?{parts.query}" if parts.query else "")
        request_headers = [
            (name, value)
            for name, values in _header_lists(outgoing.headers).items()
            if name not in HOP_BY_HOP
            for value in values
        ]
        request_headers.append(("x-forwarded-host", parts.netloc))
        async with self._session.request(
            outgoing.method,
            # As sent: the client's percent-encoding is the cache key's, not re-quoted.
            yarl.URL(target, encoded=True),
            headers=request_headers,
            data=body or None,
            allow_redirects=False,
            # Only what the client sent: no User-Agent or Accept-Encoding of the edge's own.
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        ) as upstream_response:
            content = await upstream_response.read()
            status = upstream_response.status
            headers = _grouped(list(upstream_response.raw_headers))
        for name in HOP_BY_HOP:
            headers.pop(name, None)
        if "cache-control" in headers:
            pass  # the origin decides; the gate judges what it declared
        elif policy is not None and status == 200:
            headers["cache-control"] = [f"public, s-maxage={policy.ttl}"]
        else:
            headers["cache-control"] = ["no-store"]
        keys = set(policy.surrogate_keys if policy else ())
        for value in headers.pop("surrogate-key", []):
            keys.update(value.split())
        if keys:
            headers["surrogate-key"] = [" ".join(sorted(keys))]
        # Age counts from when the edge received the answer.
        headers["date"] = [formatdate(usegmt=True)]  # RFC 9110 IMF-fixdate
        return hishel.Response(
            status_code=status, headers=hishel.Headers(headers), stream=_body_stream(content)
        )


async def _handle_with_rfc(
    request: hishel.Request,
    send: Callable[[hishel.Request], Awaitable[hishel.Response]],
    storage: hishel.AsyncBaseStorage,
    key: str,
    options: hishel.CacheOptions,
    *,
    ttl: float | None = None,
) -> tuple[hishel.Response, hishel.CacheStatus]:
    """Answer `request` by driving hishel's RFC 9111 state machine (its public states) against
    `storage`; `send` reaches the origin. The same loop hishel's own integrations run, which
    hishel keeps private (`hishel._async_rfc`), so the edge drives the states itself."""
    state: hishel.AnyState = hishel.IdleClient(options=options)
    revalidated = False
    while True:
        if isinstance(state, hishel.IdleClient):
            state = state.next(request, await storage.get_entries(key))
        elif isinstance(state, (hishel.CacheMiss, hishel.NeedRevalidation)):
            # A 304 that matches nothing leads to a plain request, not a revalidated one.
            revalidated = isinstance(state, hishel.NeedRevalidation)
            state = state.next(await send(state.request))
        elif isinstance(state, hishel.StoreAndUse):
            entry = await storage.create_entry(request, state.response, key, ttl=ttl)
            status = hishel.CacheStatus(from_cache=False, revalidated=revalidated, stored=True)
            return entry.response, status
        elif isinstance(state, hishel.CouldNotBeStored):
            status = hishel.CacheStatus(from_cache=False, revalidated=revalidated, stored=False)
            return state.response, status
        elif isinstance(state, hishel.FromCache):
            status = hishel.CacheStatus(from_cache=True, revalidated=revalidated, stored=False)
            return state.entry.response, status
        elif isinstance(state, hishel.NeedToBeUpdated):
            for updating in state.updating_entries:
                await storage.update_headers(updating.id, updating.response.headers)
            state = state.next()
        elif isinstance(state, hishel.InvalidateEntries):
            for entry_id in state.entry_ids:
                await storage.remove_entry(entry_id)
            state = state.next()
        else:
            assert_never(state)


def _storage_ttl(policy: EndpointPolicy | None) -> float | None:
    # Freshness is decided by the state machine; this only bounds how long stale entries
    # linger in memory (kept a while for revalidation).
    return float(policy.ttl * 2 + 60) if policy else 300.0


def _grouped(raw: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, value in raw:
        grouped.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return grouped


# -- process entry point -------------------------------------------------------------------


def state_loader(product: str, env: str) -> Callable[[], tuple[str, dict[str, Any]]]:
    """Read the purge key and route table of `env` from platform state."""
    state = PlatformState(product)

    def load() -> tuple[str, dict[str, Any]]:
        record = state.environment(env)
        if record is None:
            raise RuntimeError(
                f"no platform state for {product}/{env} in release_control.platform."
                "environments: edges are started by `release platform up`"
            )
        return record.purge_key, state.routes(env)

    return load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Edge cache of one environment.")
    parser.add_argument("--product", required=True)
    parser.add_argument("--env", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reload-interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loader = state_loader(args.product, args.env)
    loader()  # fail fast, with the message above, before binding the port
    edge = Edge(
        env=args.env,
        spec=load_spec(args.product),
        load_state=loader,
        reload_interval=args.reload_interval,
    )
    uvicorn.run(edge.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
