"""Monitoring snapshots: PNG charts of a canary analysis, stored with the release.

Two charts, canary against baseline over time with the step boundaries marked: latency
quantiles (p50 and p99 per look) and error rate (per look, and since the canary started,
which is the window the judge decides on). Returns each file's path and
SHA-256 for the gate's metadata and the audit sign-off.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster_project.core.canary.analysis import CanaryReport

COLORS = {"stable": "#1f77b4", "canary": "#d62728"}
LABELS = {"stable": "baseline (stable)", "canary": "canary"}


def preload() -> threading.Thread:
    """Import the charting library in a background thread (about 1 s of imports) while the
    canary waits on processes and bake timers, so the charts at its end cost only drawing."""

    def load() -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot

    thread = threading.Thread(target=load, name="preload-charts", daemon=True)
    thread.start()
    return thread


def render_snapshots(report: CanaryReport, directory: str | Path) -> list[dict[str, str]]:
    """Write `latency.png` and `error_rate.png` into `directory`; return name, path, sha256."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{report.product} {report.version or ''} canary in {report.env}: {report.verdict}"
    written: list[dict[str, str]] = []

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for track in ("stable", "canary"):
        points = [p for p in report.series if p.track == track and p.p50_ms is not None]
        times = [p.t for p in points]
        ax.plot(
            times,
            [p.p50_ms for p in points],
            color=COLORS[track],
            linestyle="-",
            label=f"{LABELS[track]} p50",
        )
        ax.plot(
            times,
            [p.p99_ms for p in points],
            color=COLORS[track],
            linestyle="--",
            label=f"{LABELS[track]} p99",
        )
    ax.set_ylabel("latency per look (ms)")
    _finish(ax, report, title)
    written.append(_save(fig, out / "latency.png", "latency quantiles"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for track in ("stable", "canary"):
        points = [p for p in report.series if p.track == track and p.requests > 0]
        ax.plot(
            [p.t for p in points],
            [100 * p.errors / p.requests for p in points],
            color=COLORS[track],
            marker=".",
            linewidth=0.8,
            label=f"{LABELS[track]} per look",
        )
        # The running rate since the canary started: the window the judge decides on.
        requests = errors = 0.0
        running = []
        for p in points:
            requests, errors = requests + p.requests, errors + p.errors
            running.append(100 * errors / requests)
        ax.plot(
            [p.t for p in points],
            running,
            color=COLORS[track],
            linestyle="--",
            linewidth=1.6,
            label=f"{LABELS[track]} since start (judged)",
        )
    ax.set_ylabel("error rate (%)")
    _finish(ax, report, title)
    written.append(_save(fig, out / "error_rate.png", "error rate"))
    plt.close(fig)
    return written


def _finish(ax: Any, report: CanaryReport, title: str) -> None:
    for step in report.steps:
        ax.axvline(step.started_at, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(
            f"step {step.index}: {step.weight}% ({step.verdict})",
            xy=(step.started_at, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -12),
            textcoords="offset points",
            fontsize=7,
            color="grey",
        )
    if report.rolled_back and report.steps:
        ax.axvline(report.steps[-1].ended_at, color="black", linewidth=1.2, label="rollback")
    ax.set_xlabel("seconds since the canary started")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
    ax.grid(alpha=0.3)


def _save(fig: Any, path: Path, name: str) -> dict[str, str]:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"name": name, "path": str(path), "sha256": digest}
