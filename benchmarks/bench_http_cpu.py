"""CPU per request of the two hot HTTP clients, the previous (httpx) and the current (aiohttp)
side by side in one run: the edge's upstream calls and the canary's load generator.

    .venv/bin/python benchmarks/bench_http_cpu.py [--requests 3000] [--load-requests 1200]
                                                  [--rounds 3]

Every part is a real process on 127.0.0.1: two origins (a small Starlette app under uvicorn,
the same stack as the product's API), and the edge (`Edge` of
dagster_project/core/platform/edge.py) in its own process, once as it is and once with
`HttpxEdge` below (the httpx upstream client it replaced). The driver sends the load
generator's mix (nine in ten URLs unique, so they reach an origin; one in ten cached) with 8
in flight, and reads the edge process's CPU time (user + system) before and after. Then the
load generator itself: `LoadGenerator` as it is and `ThreadedHttpxLoad` (the thread pool with
an httpx client it replaced), each in its own process sending the same number of requests
at 120 req/s to an origin directly; its process CPU per request is printed.

Rounds alternate the variants so a busy host slows both alike; the median is printed.
Target: the current edge at most half the CPU per request of the httpx one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = "4pnihc40q-yj"
STATIC_EVERY = 10  # one request in ten to the cached static asset


# -- the replaced implementations, kept here to measure against -------------------------------


def httpx_edge_class() -> type:
    """The edge with its previous upstream client: httpx.AsyncClient (as of 9b5244a)."""
    import contextlib
    from email.utils import formatdate
    from urllib.parse import urlsplit

    import hishel

    from dagster_project.core.platform import edge as edge_module

    class HttpxEdge(edge_module.Edge):
        @contextlib.asynccontextmanager
        async def _lifespan(self, _app):  # type: ignore[no-untyped-def]
            self._httpx = httpx.AsyncClient(
                timeout=httpx.Timeout(10.0, connect=2.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                trust_env=False,
            )
            try:
                yield
            finally:
                await self._httpx.aclose()

        async def _forward(self, outgoing, body, upstream, policy):  # type: ignore[no-untyped-def]
            parts = urlsplit(outgoing.url)
            target = upstream.url + parts.path + (f"?{parts.query}" if parts.query else "")
            request_headers = {
                k: v
                for k, v in edge_module._header_lists(outgoing.headers).items()
                if k not in edge_module.HOP_BY_HOP
            }
            request_headers["x-forwarded-host"] = [parts.netloc]
            answer = await self._httpx.request(
                outgoing.method,
                target,
                headers=[(k, v) for k, values in request_headers.items() for v in values],
                content=body or None,
            )
            headers = edge_module._grouped(answer.headers.raw)
            for name in edge_module.HOP_BY_HOP:
                headers.pop(name, None)
            if "cache-control" not in headers:
                ok = policy is not None and answer.status_code == 200
                headers["cache-control"] = [f"public, s-maxage={policy.ttl}" if ok else "no-store"]
            keys = set(policy.surrogate_keys if policy else ())
            for value in headers.pop("surrogate-key", []):
                keys.update(value.split())
            if keys:
                headers["surrogate-key"] = [" ".join(sorted(keys))]
            headers["date"] = [formatdate(usegmt=True)]
            return hishel.Response(
                status_code=answer.status_code,
                headers=hishel.Headers(headers),
                stream=edge_module._body_stream(answer.content),
            )

    return HttpxEdge


class ThreadedHttpxLoad:
    """The load generator's previous loop: a thread per request in flight, one httpx.Client."""

    def __init__(self, base_url: str, paths: list[str], rps: float, concurrency: int = 16):
        self.base_url, self.paths, self.rps, self.concurrency = base_url, paths, rps, concurrency

    def run(self) -> int:
        interval, sent, ok = 1.0 / self.rps, 0, [0]
        in_flight = threading.BoundedSemaphore(self.concurrency)
        lock = threading.Lock()

        def send(client: httpx.Client, path: str) -> None:
            try:
                answer = client.get(self.base_url + path)
                with lock:
                    ok[0] += answer.status_code == 200
            finally:
                in_flight.release()

        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        with (
            httpx.Client(timeout=5.0, limits=limits) as client,
            ThreadPoolExecutor(self.concurrency) as pool,
        ):
            next_at = time.monotonic()
            while sent < len(self.paths):
                now = time.monotonic()
                if now < next_at:
                    time.sleep(next_at - now)
                    continue
                next_at += interval
                in_flight.acquire()
                pool.submit(send, client, self.paths[sent])
                sent += 1
        return ok[0]


# -- child processes ----------------------------------------------------------------------------


def serve_origin(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def answer(_request):  # type: ignore[no-untyped-def]
        return JSONResponse({"items": [{"id": i, "name": f"item {i}"} for i in range(5)]})

    app = Starlette(routes=[Route("/{path:path}", answer)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_edge(kind: str, port: int, stable: int, canary: int) -> None:
    import uvicorn

    from dagster_project.core.platform.edge import Edge, RouteTable
    from dagster_project.core.spec import load_spec

    cls = Edge if kind == "aiohttp" else httpx_edge_class()
    edge = cls(env="production", spec=load_spec(PRODUCT), load_state=None)

    def upstream(origin: int, version: str) -> dict[str, str]:
        return {"url": f"http://127.0.0.1:{origin}", "version": version, "artifact_sha": version}

    edge.apply_routes(
        RouteTable.from_dict(
            {
                "generation": 1,
                "weights": {"stable": 90, "canary": 10},
                "upstreams": {"stable": upstream(stable, "1.0"), "canary": upstream(canary, "1.1")},
            }
        )
    )
    uvicorn.run(edge.app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_load(kind: str, origin: int, requests: int) -> None:
    """Send `requests` at 120 req/s to the origin; print this process's CPU per request."""
    from dagster_project.core.canary.load import LoadGenerator, Target  # imports not counted

    paths = [f"/v1/items?lg={n}" for n in range(requests)]
    base = f"http://127.0.0.1:{origin}"
    started = time.process_time()
    if kind == "aiohttp":
        load = LoadGenerator(base, [Target("/v1/items", 1, True)], rps=120, max_requests=requests)
        load.start()
        while load.running:
            time.sleep(0.05)
        ok = sum(1 for r in load.records() if r.status == 200)
    else:
        ok = ThreadedHttpxLoad(base, paths, rps=120).run()
    print(f"{(time.process_time() - started) * 1000 / requests:.4f} {ok}")


# -- the driver ---------------------------------------------------------------------------------


def _child(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


def _wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within 30 s")


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def edge_cpu_per_request(port: int, pid: int, requests: int) -> float:
    edge = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=5.0, trust_env=False) as client:

        def one(n: int) -> None:
            path = "/static/app.js" if n % STATIC_EVERY == 0 else f"/v1/items?lg={n}"
            answer = client.get(edge + path)
            if answer.status_code != 200:
                raise SystemExit(f"the edge answered {answer.status_code} to {path}")

        one(1)  # warm: connections open, imports done
        before = _cpu(pid)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(2, requests + 2)))
        return (_cpu(pid) - before) * 1000 / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--load-requests", type=int, default=1200)  # 10 s at 120 req/s
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from dagster_project.core.platform.processes import free_port

    origins = [free_port(), free_port()]
    edges = {"httpx": free_port(), "aiohttp": free_port()}
    children = [_child("--origin", str(port)) for port in origins]
    children += [
        _child("--edge", kind, str(port), *map(str, origins)) for kind, port in edges.items()
    ]
    try:
        for port in [*origins, *edges.values()]:
            _wait_up(f"http://127.0.0.1:{port}/_edge/health")
        pids = dict(zip(edges, (c.pid for c in children[2:]), strict=True))
        edge_ms: dict[str, list[float]] = {kind: [] for kind in edges}
        load_ms: dict[str, list[float]] = {kind: [] for kind in edges}
        for _ in range(args.rounds):
            for kind, port in edges.items():
                edge_ms[kind].append(edge_cpu_per_request(port, pids[kind], args.requests))
            for kind in edges:
                count = str(args.load_requests)
                out = subprocess.run(
                    [sys.executable, __file__, "--load", kind, str(origins[0]), count],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                if out[1] != count:
                    raise SystemExit(f"{kind} load: {out[1]} of {count} answered 200")
                load_ms[kind].append(float(out[0]))
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=10)
    print(
        f"\nCPU ms per request, median of {args.rounds} rounds ({args.requests} through each "
        f"edge, {args.load_requests} from each load generator)"
    )
    print(f"{'':<34}{'httpx (before)':>16}{'aiohttp (now)':>16}{'ratio':>8}")
    for name, figures in (("edge process (proxy, cache)", edge_ms), ("load generator", load_ms)):
        before, now = statistics.median(figures["httpx"]), statistics.median(figures["aiohttp"])
        print(f"{name:<34}{before:>16.3f}{now:>16.3f}{now / before:>8.2f}")
    ratio = statistics.median(edge_ms["aiohttp"]) / statistics.median(edge_ms["httpx"])
    print(f"target: edge ratio <= 0.50: {'met' if ratio <= 0.5 else 'NOT met'} ({ratio:.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--origin":
        serve_origin(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--edge":
        serve_edge(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        run_load(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
