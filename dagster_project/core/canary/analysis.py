"""The canary step loop: shift traffic step by step, judge canary against baseline, abort fast.

`run_canary(platform, spec, artifact=...)` assumes the caller deployed the new artifact on
track `canary` of `env`. It starts the bounded load generator through the production edge,
then for each step of the spec: set the weights, bake while sampling the metrics every
`sample_interval_s`, and judge. The decision per look is `step_decision()` (pure, shared with
the accuracy benchmark):

- a fail at any look aborts at once (fail fast);
- at the end of the bake, pass -> next step, inconclusive -> keep sampling (the step is
  extended) up to `max_step_extension_seconds`, after which it fails (the deadline);
- metric-source errors: each look is retried inside the source; `max_consecutive_metric_errors`
  consecutive failed looks fail closed.

On a fail `platform.rollback(env)` sends 100% of traffic back to stable and stops the canary,
immediately. All steps passing means the report passes; promotion is the caller's job.

The first release of a product (`baseline=False`: production serves nothing yet) has no
stable track to compare with: it runs one step at 100% for the spec's total bake time and is
judged on the absolute SLOs only, with the same minimum sample and deadline.

Windows are cumulative from the start of the canary (same window for both sides): the canary
runs the same build at every step, so later steps judge with all the evidence gathered so far
and a small regression missed at 5% is caught at 25% or 50%. Each step is still judged (and
reported) separately, and its failures are never erased by later passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from dagster_project.core.canary.judge import (
    JudgeConfig,
    Judgement,
    Verdict,
    VerdictLedger,
    judge,
    judge_absolute,
    metrics_unavailable,
)
from dagster_project.core.canary.metrics import MetricsSource, MetricsUnavailable, TrackSnapshot

if TYPE_CHECKING:
    from dagster_project.core.canary.load import LoadGenerator
    from dagster_project.core.spec import ProductSpec

TRACKS = ("stable", "canary")


class StepAction(StrEnum):
    CONTINUE = "continue"  # still baking
    EXTEND = "extend"  # bake over, not conclusive yet: keep sampling
    PASS = "pass"
    FAIL = "fail"


def step_decision(
    verdict: Verdict, elapsed_s: float, bake_s: float, max_extension_s: float
) -> StepAction:
    """What to do after one look at a step (pure; the benchmark drives the same function)."""
    if verdict == Verdict.FAIL:
        return StepAction.FAIL
    if elapsed_s < bake_s:
        return StepAction.CONTINUE
    if verdict == Verdict.PASS:
        return StepAction.PASS
    if elapsed_s < bake_s + max_extension_s:
        return StepAction.EXTEND
    return StepAction.FAIL  # inconclusive at the deadline: never a pass


def step_timing(
    bake_seconds: float, extension_seconds: float, scale: float, *, scale_deadline: bool = True
) -> tuple[float, float]:
    """(bake, extension) of a step under a bake scale (pure). `scale_deadline=False` scales
    the bake only: the extension gets back what the bake lost, so the deadline (bake +
    extension) stays the spec's, and a short sample still has the spec's time to grow."""
    bake = bake_seconds * scale
    if scale_deadline:
        return bake, extension_seconds * scale
    return bake, extension_seconds + bake_seconds - bake


def next_look_in(elapsed_s: float, bake_s: float, interval_s: float) -> float:
    """Seconds until the next look at a step (pure): every `interval_s`, except that the look
    ending the bake is taken when the bake ends, not up to an interval later (a step that has
    its sample passes on time)."""
    remaining = bake_s - elapsed_s
    return min(interval_s, remaining) if remaining > 0 else interval_s


def config_for_step(config: JudgeConfig, step: int, steps: int) -> JudgeConfig:
    """Early steps stop only on strong evidence; the last step, which decides promotion, also
    extends on suspicion, and until an error-rate increase beyond the allowance is ruled out
    (see judge.py). A group-sequential design: with cumulative windows
    an ambiguous early step is settled by the larger samples of the steps after it, instead
    of failing at an early deadline on a small sample."""
    if step < steps:
        return replace(config, alpha_suspect=config.alpha_fail, error_rate_noninferiority=False)
    return replace(config, error_rate_noninferiority=True)


class Platform(Protocol):
    """The part of `LocalPlatform` (or a production adapter) the step loop uses."""

    def set_weights(self, env: str, weights: dict[str, int]) -> Any: ...
    def rollback(self, env: str) -> Any: ...
    def edge_url(self, env: str) -> str: ...
    def api_urls(self, env: str) -> dict[str, str]: ...


@dataclass
class SeriesPoint:
    """One look, for the monitoring snapshots."""

    t: float  # seconds since the canary started
    step: int
    track: str
    requests: float
    errors: float
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class StepReport:
    index: int
    weight: int
    bake_seconds: float
    started_at: float  # seconds since the canary started
    ended_at: float = 0.0
    looks: int = 0
    extended: bool = False
    verdict: Verdict = Verdict.INCONCLUSIVE
    reason: str = ""
    judgement: Judgement | None = None
    traffic: dict[str, Any] = field(default_factory=dict)  # what the load generator saw

    def rows(self) -> list[dict[str, Any]]:
        metrics = self.judgement.metrics if self.judgement else ()
        return [{"step": self.index, "weight": self.weight, **m.as_row()} for m in metrics]


@dataclass
class CanaryReport:
    product: str
    env: str
    version: str | None
    steps: list[StepReport] = field(default_factory=list)
    series: list[SeriesPoint] = field(default_factory=list)
    verdict: Verdict = Verdict.INCONCLUSIVE
    reason: str = ""
    rolled_back: bool = False
    rollback_seconds: float | None = None
    rollback_result: dict[str, Any] = field(default_factory=dict)
    load_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == Verdict.PASS

    def rows(self) -> list[dict[str, Any]]:
        """Per step, per metric: baseline, canary, threshold, p-value, verdict, reason."""
        return [row for step in self.steps for row in step.rows()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "env": self.env,
            "version": self.version,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "rolled_back": self.rolled_back,
            "rollback_seconds": self.rollback_seconds,
            "rollback": self.rollback_result,
            "steps": [
                {
                    "step": s.index,
                    "weight": s.weight,
                    "verdict": s.verdict.value,
                    "reason": s.reason,
                    "looks": s.looks,
                    "extended": s.extended,
                    "started_at": round(s.started_at, 3),
                    "ended_at": round(s.ended_at, 3),
                    "traffic": s.traffic,
                }
                for s in self.steps
            ],
            "rows": self.rows(),
            "load": self.load_summary,
        }


EventCallback = Callable[[dict[str, Any]], None]
StepGuard = Callable[[float], list[str]]


def run_canary(
    platform: Platform,
    spec: ProductSpec,
    *,
    env: str = "production",
    artifact: Any = None,
    metrics: MetricsSource | None = None,
    load: LoadGenerator | None = None,
    load_enabled: bool = True,
    bake_scale: float = 1.0,
    sample_interval_s: float = 1.0,
    judge_config: JudgeConfig | None = None,
    on_event: EventCallback | None = None,
    baseline: bool = True,
    step_guard: StepGuard | None = None,
    single_step_seconds: float | None = None,
    scale_deadline: bool = True,
) -> CanaryReport:
    """Run the spec's canary steps against `env`; roll back on any fail. See the module doc.

    `bake_scale` multiplies bake times and the extension deadline (tests use < 1) without
    touching the spec; with `scale_deadline=False` (RELEASE_BAKE_SCALE) only the bake: a step
    whose sample is still short extends to the spec's own deadline (bake + extension).
    `metrics` defaults to scraping the API processes of `env`; `load` defaults to a generator
    at the spec's rate through the edge (`load_enabled=False` sends none, e.g. to show that
    no traffic is never a pass). `step_guard(step_started_epoch)`
    is asked at every look; any problem it names (the edge or a track down during the step,
    ownership lost) fails the step at once: such a step cannot pass, whatever the metrics say.
    """
    from dagster_project.core.canary.load import LoadGenerator
    from dagster_project.core.canary.metrics import LocalScrapeSource

    if bake_scale <= 0:
        raise ValueError(f"bake_scale must be > 0, got {bake_scale}")
    config = judge_config or JudgeConfig.from_spec(spec)
    worker_urls = getattr(platform, "worker_metrics_urls", None)
    source = metrics or LocalScrapeSource(
        platform.api_urls(env), worker_urls=worker_urls(env) if worker_urls else None
    )
    emit = on_event or (lambda event: None)
    version = getattr(artifact, "version", None)
    report = CanaryReport(product=spec.product, env=env, version=version)
    ledger = VerdictLedger()
    max_errors = spec.canary.max_consecutive_metric_errors

    tracks = TRACKS if baseline else ("canary",)
    steps = [_Step(s.weight, s.bake_seconds) for s in spec.canary.steps]
    if not baseline:
        # One step at 100% judged on the absolute SLOs: a first release (the spec's whole bake
        # time), or the watch after a promotion (`single_step_seconds`).
        steps = [_Step(100, single_step_seconds or sum(s.bake_seconds for s in spec.canary.steps))]
    generator = load
    if generator is None and load_enabled:
        generator = LoadGenerator.for_spec(spec, platform.edge_url(env))
    start = time.monotonic()
    try:
        if generator is not None:
            generator.start()
        start_snapshots = _first_snapshots(source, max_errors, sample_interval_s, tracks)
        if isinstance(start_snapshots, list):
            # No starting point, no window: fail closed before any traffic shifts.
            first = StepReport(1, steps[0].weight, 0.0, 0.0, looks=max_errors)
            first.judgement = metrics_unavailable(start_snapshots, max_errors)
            first.verdict = Verdict.FAIL
            first.reason = _fail_reason(first.judgement)
            report.steps.append(first)
            _abort(platform, env, report, first, emit)
            return report
        looker = _Looker(source, start_snapshots, max_errors, tracks)
        for index, step in enumerate(steps, start=1):
            bake_s, step_extension_s = step_timing(
                step.bake_seconds,
                spec.canary.max_step_extension_seconds,
                bake_scale,
                scale_deadline=scale_deadline,
            )
            step_config = config_for_step(config, index, len(steps))
            step_report = StepReport(index, step.weight, bake_s, time.monotonic() - start)
            report.steps.append(step_report)
            platform.set_weights(env, {"stable": 100 - step.weight, "canary": step.weight})
            emit(
                {
                    "event": "step_started",
                    "step": index,
                    "weight": step.weight,
                    "bake_seconds": bake_s,
                }
            )
            step_started = time.monotonic()
            step_started_epoch = time.time()
            action = StepAction.CONTINUE
            outage: list[str] = []
            while action in (StepAction.CONTINUE, StepAction.EXTEND):
                time.sleep(next_look_in(time.monotonic() - step_started, bake_s, sample_interval_s))
                outage = step_guard(step_started_epoch) if step_guard is not None else []
                if outage:
                    action = StepAction.FAIL
                    break
                elapsed = time.monotonic() - step_started
                judgement = looker.look(report, index, time.monotonic() - start, step_config)
                step_report.looks += 1
                if judgement is None:  # a metric error below the limit: look again
                    continue
                step_report.judgement = judgement
                previous = action
                action = step_decision(judgement.verdict, elapsed, bake_s, step_extension_s)
                if action == StepAction.PASS and step_guard is not None:
                    # The look's window ends now: an outage during it still fails the step.
                    outage = step_guard(step_started_epoch)
                    if outage:
                        action = StepAction.FAIL
                        break
                if action == StepAction.EXTEND and previous != StepAction.EXTEND:
                    step_report.extended = True
                    emit(
                        {
                            "event": "step_extended",
                            "step": index,
                            "weight": step.weight,
                            "reasons": judgement.reasons,
                            "deadline_seconds": bake_s + step_extension_s,
                        }
                    )
            step_report.ended_at = time.monotonic() - start
            if generator is not None:
                step_report.traffic = generator.track_share(step_started, time.monotonic())
            step_report.verdict = Verdict.PASS if action == StepAction.PASS else Verdict.FAIL
            if step_report.judgement is not None:
                ledger.record(index, step_report.judgement)
            if outage:
                step_report.reason = "outage during the step: " + "; ".join(outage)
            elif step_report.verdict == Verdict.FAIL:
                assert step_report.judgement is not None
                step_report.reason = _fail_reason(step_report.judgement)
                if step_report.judgement.verdict == Verdict.INCONCLUSIVE:
                    step_report.reason = (
                        "deadline reached while inconclusive: " + step_report.reason
                    )
            else:
                step_report.reason = "all metrics pass"
            emit(
                {
                    "event": "step_judged",
                    "step": index,
                    "weight": step.weight,
                    "verdict": step_report.verdict.value,
                    "reason": step_report.reason,
                    "rows": step_report.rows(),
                }
            )
            if step_report.verdict == Verdict.FAIL:
                _abort(platform, env, report, step_report, emit)
                break
        else:
            report.verdict = Verdict.PASS if not ledger.failed else Verdict.FAIL
            report.reason = f"all {len(steps)} steps passed" + (
                "" if baseline else " (first release: absolute SLOs, no baseline)"
            )
    except BaseException as exc:
        # Anything unexpected (including Ctrl-C) must not leave the canary taking traffic.
        if not report.rolled_back:
            _rollback(platform, env, report)
            report.verdict = Verdict.FAIL
            report.reason = f"canary analysis aborted by {type(exc).__name__}: {exc}"
            emit({"event": "aborted", "reason": report.reason})
        raise
    finally:
        if generator is not None:
            generator.stop()
            report.load_summary = generator.summary()
    return report


@dataclass(frozen=True)
class _Step:
    weight: int
    bake_seconds: float


# Before any traffic shifts, a metrics source may not have seen a track that just started (a
# Prometheus discovers the new target, then scrapes it, about 2 s on an idle host, more on a
# loaded one): the starting point is retried this long, besides the spec's error limit.
START_GRACE_SECONDS = 10.0


def _first_snapshots(
    source: MetricsSource,
    max_errors: int,
    interval_s: float,
    tracks: tuple[str, ...],
    grace_s: float = START_GRACE_SECONDS,
) -> dict[str, TrackSnapshot] | list[str]:
    """The starting point of every window, or the consecutive errors that prevented it (at
    least `max_errors`, and for at least `grace_s`)."""
    problems: list[str] = []
    until = time.monotonic() + grace_s
    while len(problems) < max_errors or time.monotonic() < until:
        taken = _snapshots(source, tracks)
        if not isinstance(taken, str):
            return taken
        problems.append(taken)
        time.sleep(interval_s)
    return problems[-max_errors:] if max_errors > 0 else problems


def _snapshots(source: MetricsSource, tracks: tuple[str, ...]) -> dict[str, TrackSnapshot] | str:
    try:
        return {track: source.snapshot(track) for track in tracks}
    except MetricsUnavailable as exc:
        return str(exc)


@dataclass
class _Looker:
    """Takes looks: the judged window runs from the canary's start, the charted one from the
    previous look (so the snapshots show rates over time, not running averages)."""

    source: MetricsSource
    start: dict[str, TrackSnapshot]
    max_errors: int
    tracks: tuple[str, ...] = TRACKS
    previous: dict[str, TrackSnapshot] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def look(
        self, report: CanaryReport, step: int, t: float, config: JudgeConfig
    ) -> Judgement | None:
        """A judgement, or None after a metric error below the limit (look again later)."""
        taken = _snapshots(self.source, self.tracks)
        windows = None
        if not isinstance(taken, str):
            try:
                windows = {track: taken[track].since(self.start[track]) for track in self.tracks}
                recent = {
                    track: taken[track].since((self.previous or self.start)[track])
                    for track in self.tracks
                }
            except MetricsUnavailable as exc:
                taken = str(exc)
        if windows is None or isinstance(taken, str):
            self.errors.append(str(taken))
            if len(self.errors) >= self.max_errors:
                return metrics_unavailable(self.errors, self.max_errors)
            return None
        self.errors.clear()  # only *consecutive* errors count
        self.previous = taken
        for track, window in recent.items():
            report.series.append(
                SeriesPoint(
                    t=t,
                    step=step,
                    track=track,
                    requests=window.requests,
                    errors=window.errors,
                    p50_ms=window.quantile_ms(0.5),
                    p99_ms=window.quantile_ms(0.99),
                )
            )
        if "stable" not in windows:  # first release: nothing to compare with
            return judge_absolute(windows["canary"].side(), config)
        return judge(windows["stable"].side(), windows["canary"].side(), config)


def _fail_reason(judgement: Judgement) -> str:
    # Failures first: they decided the step; inconclusive metrics follow for context.
    failing = sorted(
        (m for m in judgement.metrics if m.verdict != Verdict.PASS),
        key=lambda m: m.verdict != Verdict.FAIL,
    )
    return "; ".join(f"{m.metric}: {m.verdict.value} ({m.reason})" for m in failing)


def _rollback(platform: Platform, env: str, report: CanaryReport) -> None:
    began = time.monotonic()
    result = platform.rollback(env)
    report.rollback_result = dict(result) if isinstance(result, dict) else {}
    report.rolled_back = True
    report.rollback_seconds = round(time.monotonic() - began, 3)


def _abort(
    platform: Platform, env: str, report: CanaryReport, step: StepReport, emit: EventCallback
) -> None:
    _rollback(platform, env, report)
    report.verdict = Verdict.FAIL
    report.reason = f"step {step.index} ({step.weight}%) failed: {step.reason}"
    emit(
        {
            "event": "aborted",
            "step": step.index,
            "reason": report.reason,
            "rollback_seconds": report.rollback_seconds,
        }
    )
