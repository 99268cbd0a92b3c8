"""Definitions load time against a bare `import dagster`, and the wall time of a complete
release split into configured waits and overhead, measured side by side in one run.

    .venv/bin/python benchmarks/bench_load.py [--rounds 5] [--skip-release]

Target: loading the code location costs at most 1.3x the bare `import dagster`.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BARE = "import dagster"
LOCATION = "import dagster_project.definitions as d; d.defs.get_repository_def()"


def timed(code: str) -> tuple[float, float]:
    """Wall and CPU seconds of a fresh interpreter running `code` (CPU: user+sys of the child)."""
    before = os.times()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu


def bench_load(rounds: int) -> None:
    bare, location = [], []
    timed(BARE)  # warm the file cache once for both
    for _ in range(rounds):  # interleaved so machine load hits both alike
        bare.append(timed(BARE))
        location.append(timed(LOCATION))
    rows = []
    for name, samples in (("import dagster", bare), ("load code location", location)):
        rows.append(
            (
                name,
                statistics.median(w for w, _ in samples),
                statistics.median(c for _, c in samples),
            )
        )
    print(f"\nDefinitions load ({rounds} rounds, medians, fresh interpreter each)")
    print(f"{'what':<22}{'wall s':>10}{'cpu s':>10}")
    for name, wall, cpu in rows:
        print(f"{name:<22}{wall:>10.3f}{cpu:>10.3f}")
    ratio_wall, ratio_cpu = rows[1][1] / rows[0][1], rows[1][2] / rows[0][2]
    print(f"{'ratio (target <= 1.3)':<22}{ratio_wall:>10.2f}{ratio_cpu:>10.2f}")


def bench_release() -> None:
    home = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    os.environ["RELEASE_HOME"] = home
    os.environ.pop("DAGSTER_HOME", None)
    os.environ.setdefault("GUARDRAIL_TOKEN", os.environ.get("BENCH_GUARDRAIL_TOKEN", ""))
    from dagster_project import deploy
    from dagster_project.core import database
    from dagster_project.core.platform.local import LocalPlatform
    from dagster_project.core.spec import load_spec
    from dagster_project.instance import get_instance

    spec = load_spec("4pnihc40q-yj")
    try:
        rows = []
        for version in ("1.0.0", "1.1.0"):
            started = time.perf_counter()
            outcome = deploy.deploy(spec.product, version, [], echo=lambda line: None)
            wall = time.perf_counter() - started
            if outcome.exit_code != 0:
                print(f"release {version} did not succeed: {outcome.headline}")
                return
            stages = _stage_seconds(get_instance(), outcome.run_id)
            rows.append((version, wall, stages))
        waits = sum(step.bake_seconds for step in spec.canary.steps)
        print("\nComplete release (local platform, embedded Postgres)")
        print(f"configured canary bake time: {waits:.1f} s per release")
        for version, wall, stages in rows:
            print(
                f"release {version}: wall {wall:.1f} s = waits {waits:.1f} s"
                f" + overhead {wall - waits:.1f} s"
            )
            for stage, seconds in stages.items():
                print(f"    {stage:<28}{seconds:>8.1f} s")
    finally:
        LocalPlatform(spec.product).down()
        database.stop_embedded()
        shutil.rmtree(home, ignore_errors=True)


def _stage_seconds(instance, run_id: str) -> dict[str, float]:
    starts, seconds = {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        step = event.step_key.split("__", 1)[-1]
        if event.event_type_value == "STEP_START":
            starts[step] = entry.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and step in starts:
            seconds[step] = entry.timestamp - starts[step]
    return seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-release", action="store_true")
    args = parser.parse_args()
    bench_load(args.rounds)
    if not args.skip_release:
        if not os.environ.get("GUARDRAIL_TOKEN"):
            print("\nset GUARDRAIL_TOKEN to measure a complete release")
        else:
            bench_release()
