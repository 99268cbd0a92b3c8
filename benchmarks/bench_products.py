"""Code-location load with 1, 10 and 50 generated products against a bare `import dagster`,
measured side by side in one run (fresh interpreter each, rounds interleaved so machine load
hits every variant alike).

    .venv/bin/python benchmarks/bench_products.py [--rounds 5] [--counts 1 10 50]

The products are written by the scaffold (`release new`) into temporary products directories
(RELEASE_PRODUCTS_DIR). Target: at most 1.5x the bare import at 50 products.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = "import dagster"
LOCATION = "import dagster_project.definitions as d; d.defs.get_repository_def()"
TARGET = 1.5


def timed(code: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of a fresh interpreter running `code` (CPU: user+sys of the child)."""
    before = os.times()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu


def products_dir(count: int, root: Path) -> Path:
    from dagster_project.core.scaffold import create_product

    folder = root / f"products-{count}"
    folder.mkdir()
    for index in range(count):
        create_product(f"bench-product-{index:03d}", root=folder)
    return folder


def main(rounds: int, counts: list[int]) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-products-"))
    # A private state directory: the spec cache ($RELEASE_HOME/cache/yaml) is filled by the
    # warm-up run, as it is after a code location's first load.
    os.environ["RELEASE_HOME"] = str(root / "home")
    try:
        variants: dict[str, tuple[str, dict[str, str]]] = {
            "import dagster": (BARE, dict(os.environ))
        }
        for count in counts:
            env = {**os.environ, "RELEASE_PRODUCTS_DIR": str(products_dir(count, root))}
            variants[f"{count} product(s)"] = (LOCATION, env)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for code, env in variants.values():  # warm the file cache once for each
            timed(code, env)
        for _ in range(rounds):
            for name, (code, env) in variants.items():
                samples[name].append(timed(code, env))
        bare_wall = statistics.median(w for w, _ in samples["import dagster"])
        bare_cpu = statistics.median(c for _, c in samples["import dagster"])
        print(f"\nCode-location load ({rounds} rounds, medians, fresh interpreter each)")
        print(f"{'what':<20}{'wall s':>9}{'cpu s':>9}{'x wall':>9}{'x cpu':>9}")
        for name, values in samples.items():
            wall = statistics.median(w for w, _ in values)
            cpu = statistics.median(c for _, c in values)
            print(
                f"{name:<20}{wall:>9.3f}{cpu:>9.3f}{wall / bare_wall:>9.2f}{cpu / bare_cpu:>9.2f}"
            )
        largest = f"{max(counts)} product(s)"
        wall_ratio = statistics.median(w for w, _ in samples[largest]) / bare_wall
        cpu_ratio = statistics.median(c for _, c in samples[largest]) / bare_cpu
        verdict = "met" if cpu_ratio <= TARGET else "NOT met"
        # CPU time is what loading costs; wall time also counts waiting for a CPU, which on a
        # shared machine varies from one fresh interpreter to the next.
        print(
            f"target: {largest} at most {TARGET}x the bare import: {cpu_ratio:.2f}x CPU "
            f"({wall_ratio:.2f}x wall), {verdict}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(args.rounds, args.counts)
