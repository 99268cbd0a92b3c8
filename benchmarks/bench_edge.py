"""Edge latency under a long tail of unique URLs, and the cache storage's cost per lookup.

    .venv/bin/python benchmarks/bench_edge.py [--seconds 60] [--rps 120] [--entries 10000]
                                              [--skip-platform] [--skip-storage]

1. Real path: a private state directory (its own embedded Postgres, stopped afterwards), the
   local platform up, release 1.0.0 stable in production, then the canary load generator
   (`LoadGenerator.for_spec`: dynamic endpoints get a unique `?lg=<n>`) sends `--rps`
   requests/s through the production edge for `--seconds`, loopback only. Printed per
   10-second window: requests, achieved rate, p50/p95 latency, and the edge's cache size.
   Unique URLs pile up in the cache (they linger ttl*2+60 s), so a storage that scans every
   entry per request shows as latency growing window by window; an indexed one stays flat.
2. In process: `get_entries`, `create_entry` and `purge` timed on a storage holding
   `--entries` entries, the current `MemoryStorage` beside `LegacyMemoryStorage` (a copy of
   the scanning implementation it replaced), so before/after show side by side in one run.

Target: edge p50 in the last window within 2x of the first window (no growth with the
number of cached entries); storage lookup independent of the number of entries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import hishel
import httpx

PRODUCT = "4pnihc40q-yj"
WINDOW_SECONDS = 10.0


# -- real path -------------------------------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1)))]


def bench_platform(seconds: float, rps: float) -> None:
    home = tempfile.mkdtemp(prefix="rbe", dir="/tmp")  # short: the socket path lives under it
    os.environ["RELEASE_HOME"] = home
    os.environ["DAGSTER_HOME"] = os.path.join(home, "dagster")
    # Imported after RELEASE_HOME is set: settings are read from the environment.
    from dagster_project.core import database, registry
    from dagster_project.core.canary.load import LoadGenerator
    from dagster_project.core.migrations.history import apply_pending
    from dagster_project.core.platform.local import LocalPlatform
    from dagster_project.core.spec import load_spec

    spec = load_spec(PRODUCT)
    platform = LocalPlatform(PRODUCT)
    try:
        platform.up()
        apply_pending("production", spec.migrations_path, actor="bench_edge")
        stable = registry.push(registry.build_artifact(spec, "1.0.0"))
        platform.deploy("production", "stable", stable)
        edge = platform.edge_url("production")
        cache_sizes: list[int] = []
        load = LoadGenerator.for_spec(spec, edge, rps=rps, max_seconds=seconds, seed=1)
        with httpx.Client(timeout=5.0, trust_env=False) as admin, load:
            # Sample the edge's cache size at the end of each window while the load runs.
            for window_end in range(1, int(seconds / WINDOW_SECONDS) + 1):
                pause = load.started_at + window_end * WINDOW_SECONDS - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                cache_sizes.append(admin.get(f"{edge}/_edge/health").json()["cache_entries"])
            while load.running:
                time.sleep(0.2)
        _print_windows(load.records(), cache_sizes, seconds, rps, load.summary(), load.concurrency)
    finally:
        platform.down()
        database.stop_embedded()
        shutil.rmtree(home, ignore_errors=True)


def _print_windows(
    records: list[Any],
    cache_sizes: list[int],
    seconds: float,
    rps: float,
    summary: dict[str, Any],
    concurrency: int,
) -> None:
    print(f"\nProduction edge, {rps:g} req/s for {seconds:g} s (dynamic URLs unique)")
    print(f"{'window s':<10}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'errors':>8}{'cached':>8}")  # fmt: skip
    p50s = []
    for index in range(int(seconds / WINDOW_SECONDS)):
        lo, hi = index * WINDOW_SECONDS, (index + 1) * WINDOW_SECONDS
        window = [r for r in records if lo <= r.t < hi]
        latencies = sorted(r.latency_ms for r in window if r.status)
        errors = sum(1 for r in window if r.status != 200)
        cached = str(cache_sizes[index]) if index < len(cache_sizes) else "-"
        if not latencies:
            print(f"{f'{lo:.0f}-{hi:.0f}':<10}{len(window):>9}{'no answers':>26}")
            continue
        p50s.append(statistics.median(latencies))
        print(
            f"{f'{lo:.0f}-{hi:.0f}':<10}{len(window):>9}{len(window) / WINDOW_SECONDS:>8.1f}"
            f"{p50s[-1]:>9.1f}{_percentile(latencies, 0.95):>9.1f}{errors:>8}{cached:>8}"
        )
    print(
        f"achieved {summary['rps_achieved']} req/s of {rps:g} target; completed "
        f"{summary['completed']}, skipped (all {concurrency} in flight) {summary['skipped_busy']}, "
        f"transport errors {summary['transport_errors']}, by cache {summary['by_cache']}"
    )
    if len(p50s) >= 2:
        ratio = p50s[-1] / p50s[0]
        print(f"p50 last/first window: {ratio:.2f}x (target <= 2x)")


# -- storage in process --------------------------------------------------------------------


@dataclass
class _LegacyStored:
    key: str
    request: hishel.Request
    status_code: int
    headers: hishel.Headers
    body: bytes
    expires_at: float | None
    path_query: str
    surrogate_keys: frozenset[str]


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


class LegacyMemoryStorage(hishel.AsyncBaseStorage):
    """The storage before indexing (verbatim logic): every lookup and purge scans all entries."""

    def __init__(self, *, max_entries: int = 10_000) -> None:
        super().__init__()
        self.max_entries = max_entries
        self._entries: OrderedDict[uuid.UUID, _LegacyStored] = OrderedDict()

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
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        ttl_deadline, _ = self._limits(ttl, None, time.time())
        parts = urlsplit(request.url)
        stored = _LegacyStored(
            key=key,
            request=request,
            status_code=response.status_code,
            headers=response.headers,
            body=body,
            expires_at=ttl_deadline,
            path_query=parts.path + (f"?{parts.query}" if parts.query else ""),
            surrogate_keys=frozenset((response.headers.get("surrogate-key") or "").split()),
        )
        entry_id = uuid.uuid4()
        self._entries[entry_id] = stored
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return self._entry(entry_id, stored)

    async def get_entries(self, key: str) -> list[hishel.Entry]:
        now = time.time()
        expired = [
            i for i, s in self._entries.items() if s.expires_at is not None and s.expires_at <= now
        ]
        for entry_id in expired:
            del self._entries[entry_id]
        return [self._entry(i, s) for i, s in self._entries.items() if s.key == key]

    async def update_headers(self, id: uuid.UUID, headers: hishel.Headers) -> None:
        if id in self._entries:
            self._entries[id].headers = headers

    async def remove_entry(self, id: uuid.UUID) -> None:
        self._entries.pop(id, None)

    def purge(self, *, url: str | None = None, surrogate_key: str | None = None) -> int:
        target = None
        if url is not None:
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        doomed = [
            i
            for i, s in self._entries.items()
            if (target is not None and s.path_query == target)
            or (surrogate_key is not None and surrogate_key in s.surrogate_keys)
        ]
        for entry_id in doomed:
            del self._entries[entry_id]
        return len(doomed)

    @staticmethod
    def _entry(entry_id: uuid.UUID, stored: _LegacyStored) -> hishel.Entry:
        response = hishel.Response(
            status_code=stored.status_code,
            headers=hishel.Headers({n: list(stored.headers.get_list(n)) for n in stored.headers}),
            stream=_one_chunk(stored.body),
        )
        return hishel.Entry(id=entry_id, request=stored.request, response=response)


async def _time_storage(storage: Any, entries: int, lookups: int) -> dict[str, float]:
    """Microseconds per operation on a storage filled with `entries` unique URLs."""

    async def store(n: int) -> None:
        url = f"http://127.0.0.1:1/v1/items?lg={n}"
        response = hishel.Response(
            200, hishel.Headers({"surrogate-key": f"items lg-{n}"}), stream=_one_chunk(b"{}")
        )
        await storage.create_entry(hishel.Request("GET", url), response, f"stable|1|a|{url}",
                                   ttl=300.0)  # fmt: skip

    started = time.perf_counter()
    for n in range(entries):
        await store(n)
    fill = (time.perf_counter() - started) / entries
    started = time.perf_counter()
    for n in range(lookups):
        url = f"http://127.0.0.1:1/v1/items?lg={(n * 7919) % entries}"
        found = await storage.get_entries(f"stable|1|a|{url}")
        assert len(found) == 1, f"lookup of {url} found {len(found)} entries"
    lookup = (time.perf_counter() - started) / lookups
    started = time.perf_counter()
    purges = min(lookups, 200)
    for n in range(purges):
        removed = storage.purge(surrogate_key=f"lg-{n}")
        assert removed == 1, f"purge of lg-{n} removed {removed}"
    purge = (time.perf_counter() - started) / purges
    return {"create_entry": fill * 1e6, "get_entries": lookup * 1e6, "purge": purge * 1e6}


def bench_storage(entries: int, lookups: int) -> None:
    from dagster_project.core.platform.edge import MemoryStorage

    capacity = max(entries, 10_000)
    legacy = asyncio.run(_time_storage(LegacyMemoryStorage(max_entries=capacity), entries, lookups))
    current = asyncio.run(_time_storage(MemoryStorage(max_entries=capacity), entries, lookups))
    print(f"\nCache storage in process, {entries} entries ({lookups} lookups; µs per operation)")
    print(f"{'operation':<14}{'legacy (scan)':>15}{'current':>10}{'speed-up':>10}")
    for operation in ("create_entry", "get_entries", "purge"):
        before, after = legacy[operation], current[operation]
        print(f"{operation:<14}{before:>15.1f}{after:>10.1f}{before / after:>9.0f}x")
    print("target: get_entries in µs, independent of the number of entries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rps", type=float, default=120.0)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--skip-platform", action="store_true")
    parser.add_argument("--skip-storage", action="store_true")
    args = parser.parse_args()
    if not args.skip_storage:
        bench_storage(args.entries, args.lookups)
    if not args.skip_platform:
        bench_platform(args.seconds, args.rps)


if __name__ == "__main__":
    main()
