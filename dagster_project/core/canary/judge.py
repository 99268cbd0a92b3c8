"""The canary judge: canary against the stable baseline over the same window (pure, no I/O).

Per window it decides four metrics, each `pass | fail | inconclusive`:

- `error_rate` (relative): two-proportion tests, canary vs baseline (Agresti-Caffo z-test;
  Fisher's exact test to fail), and an observed increase above
  `slos.max_error_rate_increase`.
- `latency_shift` (relative): Mann-Whitney U of the canary against the baseline *scaled by*
  `slos.max_latency_shift_ratio` (the effect-size allowance), the allowance never less than
  `slos.latency_shift_floor_ms`: samples are histogram bucket midpoints, and at a few ms one
  bucket step (2.5 -> 4 ms midpoints) is a x1.6 "shift" that scheduling noise alone produces.
- `success_rate` (absolute): binomial test, canary errors above `1 - slos.success_rate_min`.
- `p99_latency` (absolute): binomial test, more than 1% of canary requests slower than
  `slos.p99_latency_ms_max` (p99 <= max  <=>  P(latency > max) <= 1%).

With `JudgeConfig.judge_workers` (every spec-built config), the workers are judged beside the
API with the same statistics, minimum sample (`canary.min_jobs_per_side`) and fail-closed
rules:

- `job_failure_rate` (relative): failed attempts over attempts, two-proportion as
  `error_rate`, allowance `slos.max_job_failure_rate_increase`.
- `job_latency_shift` (relative): enqueue-to-done, Mann-Whitney as `latency_shift`,
  allowance `slos.max_job_latency_shift_ratio`.
- `dead_letters` (absolute): dead-letter additions by the canary's workers above
  `slos.max_dead_letters` fail at once (healthy traffic adds none).

All tests are one-sided ("canary worse").

Each test has two levels. `p < alpha_fail` (with the effect above its allowance) fails.
`p < alpha_suspect` is *suspicious*: inconclusive, so the caller keeps sampling, and a step
still suspicious at its deadline fails. Anything else passes, but only with the minimum sample
on both sides; below it, or with a missing/NaN input, the metric is inconclusive, never a pass.
The thresholds were tuned with `benchmarks/bench_gate_accuracy.py` (false blocks vs detection).

The overall verdict of a window is fail if any metric fails, else inconclusive if any is
inconclusive (or there are no metrics at all), else pass. `VerdictLedger` keeps failures
across steps: a later pass never erases an earlier fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster_project.core.spec import ProductSpec


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


METRICS = ("error_rate", "success_rate", "latency_shift", "p99_latency")
WORKER_METRICS = ("job_failure_rate", "job_latency_shift", "dead_letters")
METRICS_SOURCE = "metrics_source"  # the extra row when the metric source itself fails


@dataclass(frozen=True)
class SideWindow:
    """What one track served during a window. `None` means the metric was not available."""

    requests: float | None
    errors: float | None
    latencies_ms: Sequence[float] | None = None
    # The track's workers: attempts, failed attempts, enqueue-to-done of jobs done, dead
    # letters added.
    jobs: float | None = None
    job_failures: float | None = None
    job_latencies_ms: Sequence[float] | None = None
    dead_letters: float | None = None

    def worker_side(self) -> SideWindow:
        """The workers' numbers in the API's shape, so the same tests judge them."""
        return SideWindow(self.jobs, self.job_failures, self.job_latencies_ms)


@dataclass(frozen=True)
class JudgeConfig:
    max_error_rate_increase: float
    max_latency_shift_ratio: float
    success_rate_min: float
    p99_latency_ms_max: float
    min_requests_per_side: int
    min_latency_samples: int
    latency_shift_floor_ms: float = 0.0
    # The workers (see the module docstring); off only in pure tests of the API metrics.
    judge_workers: bool = False
    max_job_failure_rate_increase: float = 0.01
    max_job_latency_shift_ratio: float = 1.5
    max_dead_letters: int = 0
    min_jobs_per_side: int = 8
    # Significance levels; see the module docstring and the accuracy benchmark.
    alpha_fail: float = 0.001
    alpha_suspect: float = 0.1
    # Pass the error rate only once an increase beyond the allowance is ruled out (upper
    # confidence bound at 1 - alpha_suspect), significant or not. The last step uses it.
    error_rate_noninferiority: bool = False

    @classmethod
    def from_spec(cls, spec: ProductSpec, **overrides: Any) -> JudgeConfig:
        values: dict[str, Any] = {
            "max_error_rate_increase": spec.slos.max_error_rate_increase,
            "max_latency_shift_ratio": spec.slos.max_latency_shift_ratio,
            "latency_shift_floor_ms": spec.slos.latency_shift_floor_ms,
            "success_rate_min": spec.slos.success_rate_min,
            "p99_latency_ms_max": spec.slos.p99_latency_ms_max,
            "min_requests_per_side": spec.canary.min_requests_per_side,
            "min_latency_samples": max(50, spec.canary.min_latency_samples),
            "judge_workers": True,
            "max_job_failure_rate_increase": spec.slos.max_job_failure_rate_increase,
            "max_job_latency_shift_ratio": spec.slos.max_job_latency_shift_ratio,
            "max_dead_letters": spec.slos.max_dead_letters,
            "min_jobs_per_side": spec.canary.min_jobs_per_side,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class MetricResult:
    """One row of the gate's table."""

    metric: str
    baseline: float | None
    canary: float | None
    threshold: str
    p_value: float | None
    verdict: Verdict
    reason: str

    def as_row(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "baseline": _round(self.baseline),
            "canary": _round(self.canary),
            "threshold": self.threshold,
            "p_value": _round(self.p_value),
            "verdict": self.verdict.value,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Judgement:
    """The verdict for one window (one look at one step)."""

    metrics: tuple[MetricResult, ...]
    baseline_requests: float | None = None
    canary_requests: float | None = None

    @property
    def verdict(self) -> Verdict:
        return overall_verdict(m.verdict for m in self.metrics)

    @property
    def reasons(self) -> list[str]:
        return [f"{m.metric}: {m.reason}" for m in self.metrics if m.verdict != Verdict.PASS]


def overall_verdict(verdicts: Any) -> Verdict:
    seen = list(verdicts)
    if Verdict.FAIL in seen:
        return Verdict.FAIL
    if not seen or Verdict.INCONCLUSIVE in seen:
        return Verdict.INCONCLUSIVE  # no metrics at all is never a pass
    return Verdict.PASS


# --------------------------------------------------------------------------- the judge


def judge(baseline: SideWindow, canary: SideWindow, config: JudgeConfig) -> Judgement:
    """Judge one window: canary against baseline, plus the canary's absolute SLOs."""
    workers = _worker_metrics(baseline, canary, config) if config.judge_workers else ()
    return Judgement(
        metrics=(
            _error_rate(baseline, canary, config),
            _success_rate(canary, config),
            _latency_shift(baseline, canary, config),
            _p99_latency(canary, config),
            *workers,
        ),
        baseline_requests=baseline.requests,
        canary_requests=canary.requests,
    )


def judge_absolute(canary: SideWindow, config: JudgeConfig) -> Judgement:
    """The first release of a product has no stable baseline to compare with: only the
    absolute SLOs are judged (with the same minimum sample, so no data is still no pass)."""
    workers = (_dead_letters(canary, config),) if config.judge_workers else ()
    return Judgement(
        metrics=(_success_rate(canary, config), _p99_latency(canary, config), *workers),
        baseline_requests=None,
        canary_requests=canary.requests,
    )


def _worker_metrics(
    baseline: SideWindow, canary: SideWindow, config: JudgeConfig
) -> tuple[MetricResult, ...]:
    # No non-inferiority for jobs: with tens of job attempts per side the upper bound of an
    # increase never drops below a 1% allowance, so the last step could never pass; a job
    # failure-rate regression fails on significance, and dead letters on the absolute bound.
    jobs = replace(
        config,
        error_rate_noninferiority=False,
        max_error_rate_increase=config.max_job_failure_rate_increase,
        max_latency_shift_ratio=config.max_job_latency_shift_ratio,
        min_requests_per_side=config.min_jobs_per_side,
        min_latency_samples=config.min_jobs_per_side,
    )
    b, c = baseline.worker_side(), canary.worker_side()
    return (
        _error_rate(
            b, c, jobs, metric="job_failure_rate", noun="job failure rate", unit="job attempts"
        ),
        _latency_shift(b, c, jobs, metric="job_latency_shift", unit="jobs done"),
        _dead_letters(canary, config),
    )


def _dead_letters(canary: SideWindow, config: JudgeConfig) -> MetricResult:
    """Absolute: dead letters from the canary's workers above the allowance fail at once;
    with fewer attempts than the minimum sample and none dead, not yet a pass."""
    limit = config.max_dead_letters
    threshold = f"<= {limit}"
    if canary.dead_letters is None or canary.jobs is None:
        return MetricResult(
            "dead_letters", None, None, threshold, None, Verdict.INCONCLUSIVE,
            "canary: worker metric missing",
        )  # fmt: skip
    if not (math.isfinite(canary.dead_letters) and math.isfinite(canary.jobs)):
        return MetricResult(
            "dead_letters", None, None, threshold, None, Verdict.INCONCLUSIVE,
            "canary: worker metric is NaN/inf",
        )  # fmt: skip
    dead, jobs = round(canary.dead_letters), round(canary.jobs)
    if dead > limit:
        verdict, reason = (
            Verdict.FAIL,
            f"{dead} job(s) dead-lettered by the canary (allowed {limit})",
        )
    elif jobs < config.min_jobs_per_side:
        verdict = Verdict.INCONCLUSIVE
        reason = f"below minimum sample: canary {jobs} < {config.min_jobs_per_side} job attempts"
    else:
        verdict, reason = Verdict.PASS, f"{dead} dead-lettered in {jobs} attempts (allowed {limit})"
    return MetricResult("dead_letters", None, float(dead), threshold, None, verdict, reason)


def metrics_unavailable(errors: Sequence[str], limit: int) -> Judgement:
    """Fail closed after `limit` consecutive metric-source errors; every metric stays listed."""
    last = errors[-1] if errors else "unknown error"
    rows = [
        MetricResult(
            m,
            None,
            None,
            "-",
            None,
            Verdict.INCONCLUSIVE,
            "no data: the metrics source did not answer",
        )
        for m in (*METRICS, *WORKER_METRICS)
    ]
    rows.append(
        MetricResult(
            METRICS_SOURCE,
            None,
            float(len(errors)),
            f"< {limit} consecutive errors",
            None,
            Verdict.FAIL,
            f"metrics source failed {len(errors)} consecutive times (limit {limit}); "
            f"failing closed. Last error: {last}",
        )
    )
    return Judgement(metrics=tuple(rows))


def _counts(side: SideWindow) -> tuple[int, int] | str:
    """(requests, errors) as integers, or the reason they cannot be used."""
    if side.requests is None or side.errors is None:
        return "metric missing"
    if not (math.isfinite(side.requests) and math.isfinite(side.errors)):
        return "metric is NaN/inf"
    requests, errors = round(side.requests), round(side.errors)
    if requests < 0 or errors < 0 or errors > requests:
        return f"inconsistent counters (requests={requests}, errors={errors})"
    return requests, errors


def _latencies(side: SideWindow) -> Any:
    import numpy as np

    if side.latencies_ms is None:
        return "metric missing"
    values = np.asarray(side.latencies_ms, dtype=float)
    if values.size and not np.isfinite(values).all():
        return "latency samples contain NaN/inf"
    return values


def _grade(p_value: float, effect_above_allowance: bool, config: JudgeConfig) -> Verdict:
    if effect_above_allowance and p_value < config.alpha_fail:
        return Verdict.FAIL
    if effect_above_allowance and p_value < config.alpha_suspect:
        return Verdict.INCONCLUSIVE
    return Verdict.PASS


def _error_rate(
    baseline: SideWindow,
    canary: SideWindow,
    config: JudgeConfig,
    *,
    metric: str = "error_rate",
    noun: str = "error rate",
    unit: str = "requests",
) -> MetricResult:
    allowance = config.max_error_rate_increase
    threshold = f"<= baseline + {allowance:g}"
    b, c = _counts(baseline), _counts(canary)
    if isinstance(b, str) or isinstance(c, str):
        why = "; ".join(
            f"{name}: {r}" for name, r in (("baseline", b), ("canary", c)) if isinstance(r, str)
        )
        return MetricResult(metric, None, None, threshold, None, Verdict.INCONCLUSIVE, why)
    (nb, eb), (nc, ec) = b, c
    rate_b = eb / nb if nb else None
    rate_c = ec / nc if nc else None
    short = _below_minimum(nb, nc, config.min_requests_per_side, unit)
    if short:
        return MetricResult(metric, rate_b, rate_c, threshold, None, Verdict.INCONCLUSIVE, short)
    assert rate_b is not None and rate_c is not None
    # Failing outright needs Fisher's exact test (strong evidence even from a handful of
    # errors); suspicion, which only extends the sampling, uses the more sensitive z-test.
    p_value = _adjusted_wald_p_value(eb, nb, ec, nc)
    increase = rate_c - rate_b
    fisher = _fisher_p_value(eb, nb, ec, nc) if increase > allowance else 1.0
    if fisher < config.alpha_fail:
        verdict, p_value = Verdict.FAIL, fisher  # report the p-value that decided
    elif (p_value < config.alpha_suspect or config.error_rate_noninferiority) and (
        _increase_upper_bound(eb, nb, ec, nc, config.alpha_suspect) > allowance
    ):
        # Significantly worse and an increase beyond the allowance not ruled out: keep
        # sampling. (The observed increase alone is too noisy to clear a real regression.)
        verdict = Verdict.INCONCLUSIVE
    else:
        verdict = Verdict.PASS
    reason = {
        Verdict.FAIL: f"{noun} up {increase:+.4f} (allowed {allowance:g}), significant",
        Verdict.INCONCLUSIVE: f"{noun} up {increase:+.4f}, not yet significant: need more data",
        Verdict.PASS: f"no significant increase beyond {allowance:g} ({increase:+.4f})",
    }[verdict]
    return MetricResult(metric, rate_b, rate_c, threshold, p_value, verdict, reason)


def _adjusted_wald_p_value(eb: int, nb: int, ec: int, nc: int) -> float:
    """One-sided Agresti-Caffo z-test (one error and one success added per side): about as
    sensitive as the plain z-test at tens of errors, and sane with 0-2 errors."""
    from scipy.stats import norm

    pc, pb = (ec + 1) / (nc + 2), (eb + 1) / (nb + 2)
    se = math.sqrt(pc * (1 - pc) / (nc + 2) + pb * (1 - pb) / (nb + 2))
    return float(norm.sf((pc - pb) / se))


def _fisher_p_value(eb: int, nb: int, ec: int, nc: int) -> float:
    from scipy.stats import fisher_exact

    return float(fisher_exact([[ec, nc - ec], [eb, nb - eb]], alternative="greater").pvalue)


def _increase_upper_bound(eb: int, nb: int, ec: int, nc: int, alpha: float) -> float:
    """One-sided upper confidence bound of the error-rate increase (Agresti-Caffo adjusted
    Wald: one error and one success added per side, which behaves with zero errors)."""
    from scipy.stats import norm

    pc, pb = (ec + 1) / (nc + 2), (eb + 1) / (nb + 2)
    se = math.sqrt(pc * (1 - pc) / (nc + 2) + pb * (1 - pb) / (nb + 2))
    return (pc - pb) + float(norm.ppf(1 - alpha)) * se


def _success_rate(canary: SideWindow, config: JudgeConfig) -> MetricResult:
    from scipy.stats import binomtest

    threshold = f">= {config.success_rate_min:g}"
    c = _counts(canary)
    if isinstance(c, str):
        return MetricResult(
            "success_rate", None, None, threshold, None, Verdict.INCONCLUSIVE, f"canary: {c}"
        )
    nc, ec = c
    rate = 1 - ec / nc if nc else None
    if nc < config.min_requests_per_side:
        return MetricResult(
            "success_rate",
            None,
            rate,
            threshold,
            None,
            Verdict.INCONCLUSIVE,
            f"below minimum sample: canary {nc} < {config.min_requests_per_side} requests",
        )
    assert rate is not None
    allowed_error = 1 - config.success_rate_min
    p_value = float(binomtest(ec, nc, allowed_error, alternative="greater").pvalue)
    verdict = _grade(p_value, rate < config.success_rate_min, config)
    reason = {
        Verdict.FAIL: f"success rate {rate:.4f} below the SLO, significant",
        Verdict.INCONCLUSIVE: f"success rate {rate:.4f} below the SLO, not yet significant",
        Verdict.PASS: f"success rate {rate:.4f} not significantly below the SLO",
    }[verdict]
    return MetricResult("success_rate", None, rate, threshold, p_value, verdict, reason)


def _latency_shift(
    baseline: SideWindow,
    canary: SideWindow,
    config: JudgeConfig,
    *,
    metric: str = "latency_shift",
    unit: str = "latency samples",
) -> MetricResult:
    import numpy as np
    from scipy.stats import mannwhitneyu

    ratio, floor = config.max_latency_shift_ratio, config.latency_shift_floor_ms
    threshold = f"<= {ratio:g} x baseline" + (f", at least +{floor:g} ms" if floor else "")
    b, c = _latencies(baseline), _latencies(canary)
    if isinstance(b, str) or isinstance(c, str):
        why = "; ".join(
            f"{name}: {r}" for name, r in (("baseline", b), ("canary", c)) if isinstance(r, str)
        )
        return MetricResult(metric, None, None, threshold, None, Verdict.INCONCLUSIVE, why)
    median_b = float(np.median(b)) if b.size else None
    median_c = float(np.median(c)) if c.size else None
    short = _below_minimum(b.size, c.size, config.min_latency_samples, unit)
    if short:
        return MetricResult(
            metric, median_b, median_c, threshold, None, Verdict.INCONCLUSIVE, short
        )
    assert median_b is not None and median_c is not None
    # Effect-size allowance: the canary must be stochastically greater than the baseline
    # *scaled by the allowance* (and shifted by at least the floor), so a shift within the
    # allowance can never fail.
    allowed = np.maximum(b * ratio, b + floor)
    p_value = float(mannwhitneyu(c, allowed, alternative="greater").pvalue)
    verdict = _grade(p_value, True, config)
    shift = median_c / median_b if median_b > 0 else math.inf
    reason = {
        Verdict.FAIL: f"canary slower than {ratio:g}x baseline (median x{shift:.2f}), significant",
        Verdict.INCONCLUSIVE: f"canary may be slower than {ratio:g}x baseline "
        f"(median x{shift:.2f}): need more data",
        Verdict.PASS: f"no significant shift beyond {ratio:g}x (median x{shift:.2f})",
    }[verdict]
    return MetricResult(metric, median_b, median_c, threshold, p_value, verdict, reason)


def _p99_latency(canary: SideWindow, config: JudgeConfig) -> MetricResult:
    import numpy as np
    from scipy.stats import binomtest

    limit = config.p99_latency_ms_max
    threshold = f"<= {limit:g} ms"
    c = _latencies(canary)
    if isinstance(c, str):
        return MetricResult(
            "p99_latency", None, None, threshold, None, Verdict.INCONCLUSIVE, f"canary: {c}"
        )
    p99 = float(np.quantile(c, 0.99)) if c.size else None
    if c.size < config.min_latency_samples:
        return MetricResult(
            "p99_latency",
            None,
            p99,
            threshold,
            None,
            Verdict.INCONCLUSIVE,
            f"below minimum sample: canary {c.size} < {config.min_latency_samples} latency samples",
        )
    assert p99 is not None
    # p99 <= limit  <=>  at most 1% of requests are slower than the limit.
    slower = int((c > limit).sum())
    p_value = float(binomtest(slower, int(c.size), 0.01, alternative="greater").pvalue)
    verdict = _grade(p_value, p99 > limit, config)
    reason = {
        Verdict.FAIL: f"p99 {p99:.1f} ms above {limit:g} ms, significant",
        Verdict.INCONCLUSIVE: f"p99 {p99:.1f} ms above {limit:g} ms, not yet significant",
        Verdict.PASS: f"p99 {p99:.1f} ms not significantly above {limit:g} ms",
    }[verdict]
    return MetricResult("p99_latency", None, p99, threshold, p_value, verdict, reason)


def _below_minimum(n_baseline: int, n_canary: int, minimum: int, what: str) -> str:
    short = [
        f"{side} {n} < {minimum} {what}"
        for side, n in (("baseline", n_baseline), ("canary", n_canary))
        if n < minimum
    ]
    return "below minimum sample: " + ", ".join(short) if short else ""


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.6g}")


# ------------------------------------------------------------------ across steps


@dataclass
class VerdictLedger:
    """Verdicts across steps. A fail is permanent: a later pass never erases it."""

    entries: list[tuple[int, Judgement]] = field(default_factory=list)

    def record(self, step: int, judgement: Judgement) -> Verdict:
        self.entries.append((step, judgement))
        return self.verdict

    @property
    def failed(self) -> bool:
        return any(j.verdict == Verdict.FAIL for _, j in self.entries)

    @property
    def verdict(self) -> Verdict:
        if self.failed:
            return Verdict.FAIL
        if not self.entries:
            return Verdict.INCONCLUSIVE
        return self.entries[-1][1].verdict
