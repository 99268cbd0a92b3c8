"""A complete release's overhead, per stage and per gate, its peak memory, and how fast the
commands start: the current tree and a baseline commit, side by side in one run.

    GUARDRAIL_TOKEN=... .venv/bin/python benchmarks/bench_release.py [--baseline REV]
        [--no-baseline]

For each variant, in a fresh state directory on the embedded defaults: a first release of
4pnihc40q-yj (no baseline: one 100% step), a second one (full 5 -> 25 -> 50 canary), then
`release status` three times. Each `deploy` is a fresh process, as a user runs it.

- overhead = wall time - configured waits; the configured waits are the canary's bake, the
  time a step was extended because its sample was still too small (inconclusive, up to
  `max_step_extension_seconds`), and the promotion's `production.watch_seconds`.
- per stage and gate: from each step's progress line (▶) to the next, minus the configured
  waits inside it.
- peak RSS: sampled every 0.2 s, the deploy process with its children plus every process of
  the platform (supervisord and what it runs, the embedded Postgres: every process whose
  command line names the state directory), summed; at the peak, split by group (the deploy
  process and its children, the APIs and workers, Postgres, the rest of the platform) with
  the step that was running. Summed RSS counts a shared page once per process that maps it
  (Postgres's shared buffers in every backend that touched them): the peak of the summed PSS
  (proportional set size) is printed too.
- `deploy`'s first progress line: seconds from the start of the process to its first line.

The baseline runs from a `git worktree` of REV with this tree's .venv (same packages, so
site-packages bytecode cached by the sync is shared: the baseline's import times are, if
anything, better than they were). Targets (issue 16): second release overhead <= 10 s, first
<= 12 s; first progress line <= 3 s; `release status` <= 2 s; second release peak RSS <= the
first's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = "4pnihc40q-yj"
DEFAULT_BASELINE = "777706e"  # the landed pipeline before issue 16
TOKEN = os.environ.get("GUARDRAIL_TOKEN", "")  # the deploys need it; never written down here
STEP_LINE = re.compile(r"\[\s*[\d.]+s\] ▶ (\S+)")
BAKE_LINE = re.compile(r"canary: step (\d+) \(\d+%\) started, baking (\d+)s")
EXTENDED_LINE = re.compile(r"canary: step (\d+) \(\d+%\) extended")
VERDICT_LINE = re.compile(r"canary: step (\d+) \(\d+%\) (pass|fail)")


@dataclass
class Release:
    version: str
    wall: float
    first_line: float
    exit_code: int
    lines: list[tuple[float, str]]
    peak_rss_mb: float
    peak_rss_groups: dict[str, float] = field(default_factory=dict)  # MB by group at the peak
    peak_rss_at: float = 0.0  # seconds into the release
    peak_pss_mb: float = 0.0  # shared pages counted once (PSS summed)
    peak_pss_at: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # overhead per step key
    waits: float = 0.0


@dataclass
class Variant:
    name: str
    releases: list[Release] = field(default_factory=list)
    status_seconds: list[float] = field(default_factory=list)


RSS_GROUPS = ("deploy", "api+worker", "postgres", "platform")


def _platform_rss(home: str, roots: set[int]) -> dict[str, float]:
    """RSS (MB) of the processes under `roots` and of every process naming `home`, by group:
    the deploy process and its children, the services (APIs and workers), the embedded
    Postgres, and the rest of the platform (supervisord, the edges, Prometheus); and their
    PSS summed ("pss")."""
    procs = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info"]):
        procs[proc.info["pid"]] = proc.info

    def with_descendants(chosen: set[int]) -> set[int]:
        while grown := {p for p, info in procs.items() if info["ppid"] in chosen} - chosen:
            chosen |= grown
        return chosen

    deploy = with_descendants(set(roots))
    named = {pid for pid, info in procs.items() if home in " ".join(info["cmdline"] or [])}
    by_group = dict.fromkeys((*RSS_GROUPS, "pss"), 0.0)
    for pid in with_descendants(deploy | named):
        info = procs[pid]
        if not info.get("memory_info"):
            continue
        command = " ".join(info["cmdline"] or [])
        group = (
            "deploy"
            if pid in deploy
            else "api+worker"
            if "uvicorn" in command or "worker.py" in command
            else "postgres"
            if "postgres" in command
            else "platform"
        )
        by_group[group] += info["memory_info"].rss / 2**20
        # Proportional: a page shared by n processes counts 1/n in each (Postgres's shared
        # buffers are in the RSS of every backend that touched them).
        with contextlib.suppress(psutil.Error):
            by_group["pss"] += psutil.Process(pid).memory_full_info().pss / 2**20
    return by_group


def run_release(tree: Path, env: dict[str, str], version: str, watch: float) -> Release:
    command = [sys.executable, "-c", "from dagster_project.cli import deploy_main; deploy_main()"]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*command, PRODUCT, "--release", version],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak: dict[str, float] = {}
    peak_at = peak_pss = peak_pss_at = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_at, peak_pss, peak_pss_at
        while not done.is_set():
            with contextlib.suppress(psutil.Error, KeyError):  # a process ended meanwhile
                now = _platform_rss(env["RELEASE_HOME"], {proc.pid})
                pss = now.pop("pss")
                if pss > peak_pss:
                    peak_pss, peak_pss_at = pss, time.perf_counter() - started
                if sum(now.values()) > sum(peak.values()):
                    peak, peak_at = now, time.perf_counter() - started
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
    code = proc.wait()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    release = Release(
        version,
        wall,
        lines[0][0] if lines else wall,
        code,
        lines,
        sum(peak.values()),
        peak_rss_groups=peak,
        peak_rss_at=peak_at,
        peak_pss_mb=peak_pss,
        peak_pss_at=peak_pss_at,
    )
    _split(release, watch)
    return release


def _split(release: Release, watch: float) -> None:
    """Per step key: seconds from its ▶ line to the next, minus the configured waits in it."""
    marks = [(t, m.group(1)) for t, line in release.lines if (m := STEP_LINE.search(line))]
    waits: dict[str, float] = {}
    baked: dict[str, float] = {}  # step number -> start time
    for t, line in release.lines:
        if m := BAKE_LINE.search(line):
            baked[m.group(1)] = t
            waits["canary"] = waits.get("canary", 0.0) + float(m.group(2))
        elif m := EXTENDED_LINE.search(line):
            baked[m.group(1) + "x"] = t
        elif (m := VERDICT_LINE.search(line)) and m.group(1) + "x" in baked:
            waits["canary"] = waits.get("canary", 0.0) + t - baked.pop(m.group(1) + "x")
    if any(key == "promotion" for _, key in marks):
        waits["promotion"] = watch
    ends = [t for t, _ in marks[1:]] + [release.wall]
    for (t, key), end in zip(marks, ends, strict=True):
        release.stages[key] = end - t - waits.get(key, 0.0)
    release.stages["(start, before build)"] = marks[0][0] if marks else release.wall
    release.waits = sum(waits.values())


def bench_variant(name: str, tree: Path, watch: float) -> Variant:
    home = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = {
        **os.environ,
        "RELEASE_HOME": home,
        "GUARDRAIL_TOKEN": TOKEN,
        "PYTHONPATH": str(tree),
        "NO_COLOR": "1",
    }
    env.pop("DAGSTER_HOME", None)
    if tree == ROOT:  # as ./run.sh runs it: the project caches its bytecode
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    variant = Variant(name)
    try:
        for version in ("1.0.0", "1.1.0"):
            release = run_release(tree, env, version, watch)
            variant.releases.append(release)
            print(
                f"  {name} {version}: exit {release.exit_code}, wall {release.wall:.1f} s",
                flush=True,
            )
            if release.exit_code != 0:
                print("\n".join(line for _, line in release.lines[-15:]))
                break
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "from dagster_project.cli import release_main; release_main()",
                    "status",
                    PRODUCT,
                ],
                cwd=tree,
                env=env,
                capture_output=True,
                check=False,
            )
            variant.status_seconds.append(time.perf_counter() - started)
    finally:
        subprocess.run(
            [sys.executable, "-c", _DOWN],
            cwd=tree,
            env=env,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)
    return variant


_DOWN = (
    "from dagster_project.core.platform.local import LocalPlatform\n"
    "from dagster_project.core import database\n"
    f"LocalPlatform({PRODUCT!r}).down(); database.stop_embedded()"
)


def _step_at(release: Release, at: float) -> str:
    """The step whose ▶ line came last before `at` seconds into the release."""
    marks = [m.group(1) for t, line in release.lines if t <= at and (m := STEP_LINE.search(line))]
    key = marks[-1] if marks else "(start)"
    return key if len(key) <= 15 else "…" + key[-14:]  # the gate's name is at the end


def report(variants: list[Variant]) -> None:
    names = [v.name for v in variants]
    width = 16
    head = f"{'':<34}" + "".join(f"{n:>{width}}" for n in names)
    print("\n" + head)

    def row(label: str, values: list[str]) -> None:
        print(f"{label:<34}" + "".join(f"{v:>{width}}" for v in values))

    for index, which in enumerate(("first release", "second release")):
        releases = [v.releases[index] if len(v.releases) > index else None for v in variants]
        print(f"{which}:")
        row("  wall s", [f"{r.wall:.1f}" if r else "-" for r in releases])
        row("  configured waits s", [f"{r.waits:.1f}" if r else "-" for r in releases])
        row(
            "  overhead s (target)",
            [f"{r.wall - r.waits:.1f}" if r else "-" for r in releases],
        )
        row("  first progress line s", [f"{r.first_line:.2f}" if r else "-" for r in releases])
        row("  peak RSS MB", [f"{r.peak_rss_mb:.0f}" if r else "-" for r in releases])
        for group in RSS_GROUPS:
            row(
                f"    at the peak: {group}",
                [f"{r.peak_rss_groups.get(group, 0):.0f}" if r else "-" for r in releases],
            )
        row("    at the peak: during", [_step_at(r, r.peak_rss_at) if r else "-" for r in releases])
        row("  peak PSS MB", [f"{r.peak_pss_mb:.0f}" if r else "-" for r in releases])
        row("    at the peak: during", [_step_at(r, r.peak_pss_at) if r else "-" for r in releases])
        keys: list[str] = []
        for r in releases:
            for key in r.stages if r else []:
                if key not in keys:
                    keys.append(key)
        for key in keys:
            row(
                f"    {key[:30]}",
                [f"{r.stages[key]:.2f}" if r and key in r.stages else "-" for r in releases],
            )
    status = [statistics.median(v.status_seconds) if v.status_seconds else None for v in variants]
    row("release status s (median of 3)", [f"{s:.2f}" if s else "-" for s in status])
    print(
        "\ntargets: overhead <= 12 s (first) and <= 10 s (second); first progress line <= 3 s;"
        " release status <= 2 s; second release peak RSS <= the first's"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare")
    parser.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    args = parser.parse_args()
    if not TOKEN:
        raise SystemExit("set GUARDRAIL_TOKEN (the production guardrail token) to run releases")
    sys.path.insert(0, str(ROOT))
    from dagster_project.core.spec import load_spec

    watch = float(load_spec(PRODUCT).production.watch_seconds)
    variants = []
    worktree = None
    try:
        if not args.no_baseline:
            worktree = Path(tempfile.mkdtemp(prefix="bench-base-"))
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(worktree), args.baseline],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            variants.append(bench_variant(f"base {args.baseline[:8]}", worktree, watch))
        variants.append(bench_variant("current", ROOT, watch))
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False
            )
    report(variants)


if __name__ == "__main__":
    main()
