"""The real edge and metrics source against the embedded ones, side by side in one run.

    .venv/bin/python benchmarks/bench_real_edge.py [--requests 2000] [--concurrency 8]
                                                   [--repeats 7]

A private state directory (its own embedded Postgres and supervisord, stopped afterwards) and
a copy of the product whose spec picks the embedded edge and scraped metrics for staging and
Varnish + Prometheus for production (`platform:` in product.yaml), so both run on one
platform. Release 1.0.0 is stable in both environments, 1.1.0 is the canary. Printed:

1. HIT latency and throughput on the same URLs (all cached first): p50/p99 of one client
   sending requests one after another, and requests/s of `--concurrency` clients.
2. Weight change: `LocalPlatform.set_weights` until the edge routes by the new table (the
   embedded edge: POST /_edge/routes; Varnish: VCL generated, compiled, vcl.load + vcl.use).
3. Purge: by surrogate key (100 objects carry it) and by URL, through `LocalPlatform.purge`.
4. Metrics per canary look (both tracks): scraping the APIs vs PromQL on Prometheus
   (`snapshot`: 4 queries per track), and Prometheus's `increase()` window.

Needs varnishd, the xkey vmod and prometheus (Debian: varnish, varnish-modules, prometheus).
The client is Python (httpx): for Varnish the client, not the edge, is the limit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

PRODUCT = "4pnihc40q-yj"
ROOT = Path(__file__).resolve().parents[1]
URLS = [f"/v1/items?bench={i}" for i in range(50)] + ["/static/app.js", "/v1/summary"]


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000


def _timed(call: Callable[[], Any], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def _products_copy(home: str) -> Path:
    products = Path(home) / "products"
    shutil.copytree(ROOT / "products" / PRODUCT, products / PRODUCT)
    spec = products / PRODUCT / "product.yaml"
    spec.write_text(
        spec.read_text()
        + "\nplatform:\n  staging: {edge: embedded, metrics: scrape}\n"
        + "  production: {edge: varnish, metrics: prometheus}\n"
    )
    return products


def _hits(edge: str, requests: int, concurrency: int) -> dict[str, float]:
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        for url in URLS:  # cached first, then every request below is a HIT
            client.get(edge + url)
            assert client.get(edge + url).headers["X-Cache"] == "HIT", url
        sequential = []
        for i in range(requests):
            started = time.perf_counter()
            response = client.get(edge + URLS[i % len(URLS)])
            sequential.append(time.perf_counter() - started)
            assert response.headers["X-Cache"] == "HIT"
    per_thread = requests // concurrency
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            for i in range(per_thread):
                if client.get(edge + URLS[i % len(URLS)]).status_code != 200:
                    errors.append("non-200")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert not errors, errors[:3]
    return {
        "p50_ms": _ms(sequential, 0.5),
        "p99_ms": _ms(sequential, 0.99),
        "rps": per_thread * concurrency / elapsed,
    }


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def _purge_by_key(platform: Any, env: str) -> float:
    """Seconds to purge surrogate key item-1 carried by 100 cached objects."""
    edge = platform.edge_url(env)
    with httpx.Client(trust_env=False) as client:
        for i in range(100):
            client.get(f"{edge}/v1/items/1?purge={i}")
    started = time.perf_counter()
    purged = platform.purge(env, surrogate_key="item-1")
    seconds = time.perf_counter() - started
    assert purged == 100, purged
    return seconds


def _purge_by_url(platform: Any, env: str) -> float:
    httpx.get(f"{platform.edge_url(env)}/v1/summary?one=1", trust_env=False)
    started = time.perf_counter()
    purged = platform.purge(env, url="/v1/summary?one=1")
    seconds = time.perf_counter() - started
    assert purged == 1, purged
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="rbr", dir="/tmp")  # short: sockets live under it
    os.environ.update(
        RELEASE_HOME=home,
        DAGSTER_HOME=os.path.join(home, "dagster"),
        RELEASE_PRODUCTS_DIR=str(_products_copy(home)),
    )
    for variable in ("RELEASE_EDGE", "RELEASE_METRICS"):  # the spec decides, per environment
        os.environ.pop(variable, None)
    from dagster_project.core import database, registry
    from dagster_project.core.canary.metrics import PrometheusSource
    from dagster_project.core.migrations.history import apply_pending
    from dagster_project.core.platform.local import LocalPlatform
    from dagster_project.core.spec import load_spec

    spec = load_spec(PRODUCT)
    platform = LocalPlatform(PRODUCT)
    envs = {"staging": "embedded", "production": "varnish"}
    try:
        platform.up()
        stable = registry.push(registry.build_artifact(spec, "1.0.0"))
        canary = registry.push(registry.build_artifact(spec, "1.1.0"))
        for env in envs:
            apply_pending(platform.database(env), spec.migrations_path, actor="bench_real_edge")
            platform.deploy(env, "stable", stable)
        status = platform.status()
        assert {env: status[env]["edge"]["kind"] for env in envs} == envs, status
        rows: dict[str, dict[str, float]] = {env: {} for env in envs}

        for env in envs:
            rows[env].update(_hits(platform.edge_url(env), args.requests, args.concurrency))

        for env in envs:
            platform.deploy(env, "canary", canary)
            splits = [{"stable": 100 - w, "canary": w} for w in (5, 25, 50, 0)]
            changes = []
            for i in range(args.repeats):
                changes += _timed(lambda s=splits[i % 4], e=env: platform.set_weights(e, s), 1)
            rows[env]["weights_ms"] = statistics.median(changes) * 1000
            platform.set_weights(env, {"stable": 100, "canary": 0})

        for env in envs:
            rows[env]["purge_key_100_ms"] = _median_ms(
                [_purge_by_key(platform, env) for _ in range(args.repeats)]
            )
            rows[env]["purge_url_ms"] = _median_ms(
                [_purge_by_url(platform, env) for _ in range(args.repeats)]
            )

        for env in envs:  # the canary judge's look: both tracks
            platform.set_weights(env, {"stable": 95, "canary": 5})
        time.sleep(3)
        looks: dict[str, list[float]] = {}
        for env in envs:
            source = platform.metrics_source(env)
            looks[env] = _timed(
                lambda s=source: [s.snapshot(t) for t in ("stable", "canary")], args.repeats * 3
            )
        prom = platform.metrics_source("production")
        assert isinstance(prom, PrometheusSource)
        windows = _timed(
            lambda: [prom.window(t, 30) for t in ("stable", "canary")], args.repeats * 3
        )

        print(f"\nHIT path, same {len(URLS)} URLs, {args.requests} requests")
        print(f"{'':34}{'embedded':>12}{'varnish':>12}{'ratio':>10}")
        labels = {
            "p50_ms": "HIT latency p50, 1 client (ms)",
            "p99_ms": "HIT latency p99, 1 client (ms)",
            "rps": f"throughput, {args.concurrency} clients (req/s)",
            "weights_ms": "weight change (ms, median)",
            "purge_key_100_ms": "purge by key, 100 objects (ms)",
            "purge_url_ms": "purge by URL, 1 object (ms)",
        }
        for key, label in labels.items():
            a, b = rows["staging"][key], rows["production"][key]
            print(f"{label:34}{a:12.2f}{b:12.2f}{b / a:10.2f}")
        print("\nmetrics per canary look (both tracks)")
        print(f"{'':34}{'scrape':>12}{'PromQL':>12}{'ratio':>10}")
        a, b = statistics.median(looks["staging"]) * 1000, statistics.median(looks["production"])
        b *= 1000
        print(f"{'snapshot, median (ms)':34}{a:12.2f}{b:12.2f}{b / a:10.2f}")
        a, b = _ms(looks["staging"], 0.95), _ms(looks["production"], 0.95)
        print(f"{'snapshot, p95 (ms)':34}{a:12.2f}{b:12.2f}{b / a:10.2f}")
        print(
            f"{'increase() window, median (ms)':34}{'':12}{statistics.median(windows) * 1000:12.2f}"
        )
    finally:
        platform.down()
        database.stop_embedded()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
