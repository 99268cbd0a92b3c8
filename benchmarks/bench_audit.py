"""Audit trail throughput and verifier speed, on a real Postgres.

    .venv/bin/python benchmarks/bench_audit.py [--appends 200] [--threads 4] [--chain 5000]

Uses a private state directory (its own embedded Postgres, stopped afterwards) unless
RELEASE_DATABASE_URL is set, and a throw-away database dropped at the end.

Measured, side by side with the targets:
- `append()` latency, sequential (one new connection per call, as the pipeline does);
- appends/s with several threads contending for the head row lock;
- `verify()` time for a chain of `--chain` entries (filled through `audit.append` in SQL on
  one connection, so every row is a genuine chained entry).

Targets: append p95 <= 100 ms; concurrent throughput >= 50 appends/s; verify of 5,000
entries <= 2 s (a year of releases is far fewer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any


def _payload(i: int) -> dict[str, Any]:
    return {
        "timestamp": "2025-01-31T12:00:00+00:00",
        "identity": "ci:bench",
        "artifact_sha256": f"{i:064x}",
        "environment": "production",
        "guardrail_token": "bench-token-not-a-secret",
        "product": "bench-product",
        "release": f"1.0.{i}",
        "outcome": "promoted",
        "snapshots": [{"path": f"snapshots/{i}.png", "sha256": "ef" * 32}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--chain", type=int, default=5000)
    args = parser.parse_args()

    private_home = None
    if not os.environ.get("RELEASE_DATABASE_URL"):
        private_home = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: socket path
        os.environ["RELEASE_HOME"] = private_home

    from dagster_project.core import audit, database

    name = f"bench_audit_{uuid.uuid4().hex[:8]}"
    try:
        audit.ensure_audit_schema(name)

        latencies = []
        for i in range(args.appends):
            started = time.perf_counter()
            audit.append(f"seq-{i}", _payload(i), database=name)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p95 = latencies[int(0.95 * (len(latencies) - 1))] * 1000

        per_thread = args.appends // args.threads

        def worker(t: int) -> None:
            for i in range(per_thread):
                audit.append(f"thr-{t}-{i}", _payload(i), database=name)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent_rate = per_thread * args.threads / (time.perf_counter() - started)

        have = args.appends + per_thread * args.threads
        with database.connection(name) as conn, conn.cursor() as cur:
            cur.execute(f"SET ROLE {audit.PIPELINE_ROLE}")
            for i in range(have, args.chain):
                text = audit.canonical_json({**_payload(i), "change_id": f"fill-{i}"})
                cur.execute("SELECT seq FROM audit.append(%s, %s)", (f"fill-{i}", text))

        started = time.perf_counter()
        result = audit.verify(database=name)
        verify_seconds = time.perf_counter() - started
        if not result.ok:
            raise SystemExit(f"verify failed on an untouched chain: {result}")

        rows = [
            ("append latency p50 (ms)", f"{p50:.1f}", "-"),
            ("append latency p95 (ms)", f"{p95:.1f}", "<= 100"),
            (f"appends/s, {args.threads} threads", f"{concurrent_rate:.0f}", ">= 50"),
            (f"verify {result.entries_checked} entries (s)", f"{verify_seconds:.2f}", "<= 2"),
        ]
        width = max(len(r[0]) for r in rows)
        print(f"{'measure':<{width}}  {'measured':>9}  target")
        for label, measured, target in rows:
            print(f"{label:<{width}}  {measured:>9}  {target}")
    finally:
        database.drop_database(name)
        if private_home:
            database.stop_embedded()
            shutil.rmtree(private_home, ignore_errors=True)


if __name__ == "__main__":
    main()
