"""The canary judge on its own (pure statistics), the step decision and the ledger."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from dagster_project.core.canary.analysis import (
    StepAction,
    config_for_step,
    next_look_in,
    step_decision,
    step_timing,
)
from dagster_project.core.canary.judge import (
    METRICS,
    METRICS_SOURCE,
    WORKER_METRICS,
    JudgeConfig,
    SideWindow,
    Verdict,
    VerdictLedger,
    judge,
    metrics_unavailable,
    overall_verdict,
)
from dagster_project.core.canary.metrics import samples_from_buckets
from dagster_project.core.spec import load_spec

PRODUCT = "4pnihc40q-yj"


@pytest.fixture(scope="module")
def full_config() -> JudgeConfig:
    return JudgeConfig.from_spec(load_spec(PRODUCT))


@pytest.fixture(scope="module")
def config(full_config: JudgeConfig) -> JudgeConfig:
    """The API's metrics alone (the workers have their own tests below)."""
    return replace(full_config, judge_workers=False)


def latencies(
    rng: np.random.Generator, n: int, median_ms: float = 40.0, extra_ms: float = 0.0
) -> list[float]:
    return (rng.lognormal(math.log(median_ms), 0.45, n) + extra_ms).tolist()


def side(rng: np.random.Generator, n: int, error_rate: float, **kw: float) -> SideWindow:
    return SideWindow(n, int(rng.binomial(n, error_rate)), latencies(rng, n, **kw))


def by_metric(judgement: object) -> dict[str, object]:
    return {m.metric: m for m in judgement.metrics}  # type: ignore[attr-defined]


def test_config_comes_from_the_spec(config: JudgeConfig) -> None:
    assert config.max_error_rate_increase == 0.01
    assert config.max_latency_shift_ratio == 1.2
    assert config.success_rate_min == 0.99
    assert config.p99_latency_ms_max == 500
    assert config.min_requests_per_side == 100
    assert config.min_latency_samples == 50


def test_identical_distributions_pass(config: JudgeConfig) -> None:
    rng = np.random.default_rng(1)
    verdicts = [
        judge(side(rng, 2000, 0.005), side(rng, 400, 0.005), config).verdict for _ in range(50)
    ]
    assert verdicts.count(Verdict.PASS) >= 48, verdicts
    assert Verdict.FAIL not in verdicts


def test_every_metric_is_reported_with_values_threshold_and_p_value(config: JudgeConfig) -> None:
    rng = np.random.default_rng(2)
    judgement = judge(side(rng, 2000, 0.005), side(rng, 400, 0.005), config)
    rows = [m.as_row() for m in judgement.metrics]
    assert [r["metric"] for r in rows] == list(METRICS)
    for row in rows:
        assert row["canary"] is not None and row["threshold"] and row["p_value"] is not None
        assert row["verdict"] in {"pass", "fail", "inconclusive"} and row["reason"]
    assert by_metric(judgement)["error_rate"].baseline is not None


def test_five_points_more_errors_fail(config: JudgeConfig) -> None:
    rng = np.random.default_rng(3)
    judgement = judge(side(rng, 2000, 0.005), side(rng, 400, 0.055), config)
    assert judgement.verdict == Verdict.FAIL
    rows = by_metric(judgement)
    assert rows["error_rate"].verdict == Verdict.FAIL
    assert rows["error_rate"].p_value < config.alpha_fail
    assert rows["success_rate"].verdict == Verdict.FAIL
    assert rows["latency_shift"].verdict == Verdict.PASS


def test_150ms_extra_latency_fails(config: JudgeConfig) -> None:
    rng = np.random.default_rng(4)
    judgement = judge(side(rng, 2000, 0.0), side(rng, 200, 0.0, extra_ms=150), config)
    rows = by_metric(judgement)
    assert rows["latency_shift"].verdict == Verdict.FAIL
    assert rows["latency_shift"].canary > 150
    assert rows["error_rate"].verdict == Verdict.PASS
    assert judgement.verdict == Verdict.FAIL


def test_a_shift_within_the_allowance_passes(config: JudgeConfig) -> None:
    rng = np.random.default_rng(5)
    base = latencies(rng, 3000)
    slower = (np.array(latencies(rng, 1000)) * 1.1).tolist()  # 10% slower, allowance 20%
    judgement = judge(SideWindow(3000, 0, base), SideWindow(1000, 0, slower), config)
    assert by_metric(judgement)["latency_shift"].verdict == Verdict.PASS


def midpoints(counts: dict[float, int]) -> list[float]:
    """Latency samples as the metrics source rebuilds them: one per request at its bucket's
    midpoint (the service's buckets around 3 ms: (1, 2], (2, 3], (3, 5], (5, 7], (7, 10])."""
    return [ms for ms, n in counts.items() for _ in range(n)]


FAST_BASELINE = {1.5: 60, 2.5: 400, 4.0: 40}  # median in (2, 3] ms


@pytest.mark.parametrize(
    ("canary", "floor_ms", "verdict"),
    [
        # The CI false block: a healthy canary's median one bucket up, (3, 5] ms, reads x1.6.
        ({2.5: 50, 4.0: 400, 6.0: 50}, 5.0, Verdict.PASS),
        ({2.5: 50, 4.0: 400, 6.0: 50}, 0.0, Verdict.FAIL),  # without the floor it blocked
        # Beyond the floor and the ratio (x3.4, +6 ms): still a regression.
        ({6.0: 50, 8.5: 400, 12.5: 50}, 5.0, Verdict.FAIL),
        # Two buckets up (x2.4) but +3.5 ms: within the floor, by design; the absolute
        # p99_latency SLO still guards a fast service.
        ({4.0: 50, 6.0: 400, 8.5: 50}, 5.0, Verdict.PASS),
    ],
)  # fmt: skip
def test_the_latency_floor_absorbs_one_bucket_at_a_few_ms(
    config: JudgeConfig, canary: dict[float, int], floor_ms: float, verdict: Verdict
) -> None:
    baseline = midpoints(FAST_BASELINE)
    judged = judge(
        SideWindow(len(baseline), 0, baseline),
        SideWindow(sum(canary.values()), 0, midpoints(canary)),
        replace(config, latency_shift_floor_ms=floor_ms),
    )
    assert by_metric(judged)["latency_shift"].verdict == verdict


def test_the_latency_floor_changes_nothing_above_25_ms(config: JudgeConfig) -> None:
    """5 ms is less than 20% of anything above 25 ms: the ratio alone decides there. A narrow
    baseline in (30, 40] ms against a canary in (40, 50] ms (x1.29) fails with the floor as
    without it (a floor added to the ratio, 35 x 1.2 + 5 = 47 ms, would let it pass)."""
    assert config.latency_shift_floor_ms == 5.0
    baseline = midpoints({25.0: 40, 35.0: 400, 45.0: 60})
    canary = midpoints({35.0: 40, 45.0: 400, 62.5: 60})
    for floor_ms in (0.0, 5.0):
        judged = judge(
            SideWindow(len(baseline), 0, baseline),
            SideWindow(len(canary), 0, canary),
            replace(config, latency_shift_floor_ms=floor_ms),
        )
        assert by_metric(judged)["latency_shift"].verdict == Verdict.FAIL, floor_ms


def test_p99_above_the_slo_fails_even_when_baseline_is_as_slow(config: JudgeConfig) -> None:
    rng = np.random.default_rng(6)
    slow = latencies(rng, 1000, median_ms=400)  # p99 ~ 1.1 s on both sides
    judgement = judge(SideWindow(1000, 0, slow), SideWindow(1000, 0, slow), config)
    rows = by_metric(judgement)
    assert rows["latency_shift"].verdict == Verdict.PASS
    assert rows["p99_latency"].verdict == Verdict.FAIL
    assert rows["p99_latency"].canary > 500


def test_below_minimum_sample_is_inconclusive(config: JudgeConfig) -> None:
    rng = np.random.default_rng(7)
    # 99 requests and 49 latency points: even a clean canary is not a pass.
    canary = SideWindow(99, 0, latencies(rng, 49))
    judgement = judge(side(rng, 2000, 0.0), canary, config)
    assert judgement.verdict == Verdict.INCONCLUSIVE
    rows = by_metric(judgement)
    for metric in METRICS:
        assert rows[metric].verdict == Verdict.INCONCLUSIVE
        assert "below minimum sample" in rows[metric].reason
    assert "canary 99 < 100 requests" in rows["error_rate"].reason
    assert "canary 49 < 50 latency samples" in rows["latency_shift"].reason


def test_baseline_below_minimum_is_inconclusive_too(config: JudgeConfig) -> None:
    rng = np.random.default_rng(8)
    judgement = judge(side(rng, 60, 0.0), side(rng, 500, 0.0), config)
    assert judgement.verdict == Verdict.INCONCLUSIVE
    assert "baseline 60 < 100" in by_metric(judgement)["error_rate"].reason


def test_a_clear_regression_fails_even_when_another_metric_lacks_samples(
    config: JudgeConfig,
) -> None:
    # Fail fast: 60 requests are too few to judge errors but plenty to see +150 ms.
    rng = np.random.default_rng(9)
    judgement = judge(side(rng, 2000, 0.0), side(rng, 60, 0.0, extra_ms=150), config)
    assert by_metric(judgement)["error_rate"].verdict == Verdict.INCONCLUSIVE
    assert judgement.verdict == Verdict.FAIL


@pytest.mark.parametrize(
    "canary",
    [
        SideWindow(0, 0, []),
        SideWindow(None, None, None),
        SideWindow(float("nan"), 0.0, [1.0] * 200),
        SideWindow(500, 2, [float("nan")] * 200),
        SideWindow(500, 600, [1.0] * 500),  # more errors than requests: broken counters
    ],
    ids=["no-data", "missing", "nan-requests", "nan-latency", "inconsistent"],
)
def test_no_data_missing_or_nan_is_inconclusive_never_dropped(
    config: JudgeConfig, canary: SideWindow
) -> None:
    rng = np.random.default_rng(10)
    judgement = judge(side(rng, 2000, 0.0), canary, config)
    assert judgement.verdict == Verdict.INCONCLUSIVE
    assert [m.metric for m in judgement.metrics] == list(METRICS)  # nothing dropped
    assert any(m.verdict == Verdict.INCONCLUSIVE for m in judgement.metrics)
    assert all(m.reason for m in judgement.metrics)


def test_no_metrics_at_all_is_inconclusive() -> None:
    assert overall_verdict([]) == Verdict.INCONCLUSIVE
    assert VerdictLedger().verdict == Verdict.INCONCLUSIVE


def test_failures_accumulate_across_steps(config: JudgeConfig) -> None:
    rng = np.random.default_rng(11)
    ledger = VerdictLedger()
    ledger.record(1, judge(side(rng, 2000, 0.0), side(rng, 400, 0.0), config))
    assert ledger.verdict == Verdict.PASS
    ledger.record(2, judge(side(rng, 2000, 0.0), side(rng, 400, 0.08), config))
    assert ledger.verdict == Verdict.FAIL
    ledger.record(3, judge(side(rng, 2000, 0.0), side(rng, 400, 0.0), config))
    assert ledger.entries[-1][1].verdict == Verdict.PASS
    assert ledger.verdict == Verdict.FAIL  # the later pass did not erase step 2
    assert [step for step, j in ledger.entries if j.verdict == Verdict.FAIL] == [2]


def test_metric_source_errors_fail_closed_after_k() -> None:
    judgement = metrics_unavailable(["refused", "refused", "GET x/metrics: refused"], 3)
    assert judgement.verdict == Verdict.FAIL
    rows = by_metric(judgement)
    assert rows[METRICS_SOURCE].verdict == Verdict.FAIL
    assert "3 consecutive times (limit 3)" in rows[METRICS_SOURCE].reason
    assert "x/metrics" in rows[METRICS_SOURCE].reason
    for metric in METRICS:  # still listed, never dropped
        assert rows[metric].verdict == Verdict.INCONCLUSIVE


def test_step_decision() -> None:
    assert step_decision(Verdict.FAIL, 0.5, 8, 20) == StepAction.FAIL  # fail fast
    assert step_decision(Verdict.PASS, 3, 8, 20) == StepAction.CONTINUE  # bake first
    assert step_decision(Verdict.PASS, 8, 8, 20) == StepAction.PASS
    assert step_decision(Verdict.INCONCLUSIVE, 8, 8, 20) == StepAction.EXTEND
    assert step_decision(Verdict.INCONCLUSIVE, 27.9, 8, 20) == StepAction.EXTEND
    assert step_decision(Verdict.INCONCLUSIVE, 28, 8, 20) == StepAction.FAIL  # deadline


def test_only_the_last_step_extends_on_suspicion(config: JudgeConfig) -> None:
    early, last = config_for_step(config, 1, 3), config_for_step(config, 3, 3)
    assert early.alpha_suspect == config.alpha_fail and not early.error_rate_noninferiority
    assert last.alpha_suspect == config.alpha_suspect and last.error_rate_noninferiority


def test_judge_on_bucketed_samples_like_the_metrics_source(config: JudgeConfig) -> None:
    bounds = (
        0.001,
        0.002,
        0.003,
        0.005,
        0.007,
        0.01,
        0.015,
        0.02,
        0.03,
        0.04,
        0.05,
        0.075,
        0.1,
        0.125,
        0.15,
        0.2,
        0.25,
        0.3,
        0.4,
        0.5,
        0.75,
        1.0,
        1.5,
        2.5,
        math.inf,
    )
    rng = np.random.default_rng(12)

    def bucketed(n: int, extra_ms: float) -> list[float]:
        values = np.array(latencies(rng, n, extra_ms=extra_ms)) / 1000
        counts = np.bincount(np.searchsorted(bounds, values), minlength=len(bounds))
        return samples_from_buckets(bounds, np.cumsum(counts).tolist())

    same = judge(
        SideWindow(2000, 0, bucketed(2000, 0)), SideWindow(300, 0, bucketed(300, 0)), config
    )
    slow = judge(
        SideWindow(2000, 0, bucketed(2000, 0)), SideWindow(300, 0, bucketed(300, 150)), config
    )
    assert same.verdict == Verdict.PASS
    assert by_metric(slow)["latency_shift"].verdict == Verdict.FAIL


def test_first_release_is_judged_on_absolute_slos_and_never_passes_without_data(
    config: JudgeConfig,
) -> None:
    from dagster_project.core.canary.judge import judge_absolute

    rng = np.random.default_rng(7)
    healthy = judge_absolute(side(rng, 600, 0.001), config)
    assert {m.metric for m in healthy.metrics} == {"success_rate", "p99_latency"}
    assert healthy.verdict == Verdict.PASS
    assert judge_absolute(side(rng, 600, 0.08), config).verdict == Verdict.FAIL
    slow = judge_absolute(side(rng, 600, 0.0, median_ms=400.0), config)
    assert by_metric(slow)["p99_latency"].verdict == Verdict.FAIL  # type: ignore[attr-defined]
    assert judge_absolute(side(rng, 10, 0.0), config).verdict == Verdict.INCONCLUSIVE
    assert judge_absolute(SideWindow(None, None, None), config).verdict == Verdict.INCONCLUSIVE


# ------------------------------------------------------------------------- the workers


def workers(
    rng: np.random.Generator,
    jobs: int,
    failure_rate: float = 0.0,
    dead: int = 0,
    median_ms: float = 40.0,
    extra_ms: float = 0.0,
) -> dict[str, object]:
    failed = int(rng.binomial(jobs, failure_rate)) if failure_rate else 0
    done = jobs - failed
    return {
        "jobs": jobs,
        "job_failures": failed,
        "job_latencies_ms": latencies(rng, done, median_ms, extra_ms),
        "dead_letters": dead,
    }


def full_side(rng: np.random.Generator, n: int, **worker: float) -> SideWindow:
    api = side(rng, n, 0.002)
    return replace(api, **workers(rng, **worker))  # type: ignore[arg-type]


def test_spec_configs_judge_the_workers(full_config: JudgeConfig) -> None:
    assert full_config.judge_workers
    assert full_config.max_job_failure_rate_increase == 0.01
    assert full_config.max_job_latency_shift_ratio == 1.5
    assert full_config.max_dead_letters == 0
    assert full_config.min_jobs_per_side == 8


@pytest.mark.parametrize(
    ("baseline", "canary", "metric", "verdict"),
    [
        # healthy workers on both sides
        ({"jobs": 400}, {"jobs": 60}, "job_failure_rate", Verdict.PASS),
        ({"jobs": 400}, {"jobs": 60}, "job_latency_shift", Verdict.PASS),
        ({"jobs": 400}, {"jobs": 60}, "dead_letters", Verdict.PASS),
        # every canary job fails (fail_jobs_matching): failure rate and dead letters fail
        ({"jobs": 400}, {"jobs": 60, "failure_rate": 1.0}, "job_failure_rate", Verdict.FAIL),
        ({"jobs": 400}, {"jobs": 60, "failure_rate": 1.0, "dead": 15}, "dead_letters",
         Verdict.FAIL),
        # slow jobs (job_latency_ms=500)
        ({"jobs": 400}, {"jobs": 60, "extra_ms": 500.0}, "job_latency_shift", Verdict.FAIL),
        # a shift within the allowance (x1.5) never fails
        ({"jobs": 400}, {"jobs": 60, "median_ms": 48.0}, "job_latency_shift", Verdict.PASS),
        # one dead letter is already too many by default, whatever the sample
        ({"jobs": 400}, {"jobs": 3, "dead": 1}, "dead_letters", Verdict.FAIL),
        # too few canary jobs: never a pass
        ({"jobs": 400}, {"jobs": 5}, "job_failure_rate", Verdict.INCONCLUSIVE),
        ({"jobs": 400}, {"jobs": 5}, "job_latency_shift", Verdict.INCONCLUSIVE),
        ({"jobs": 400}, {"jobs": 5}, "dead_letters", Verdict.INCONCLUSIVE),
        ({"jobs": 0}, {"jobs": 60}, "job_failure_rate", Verdict.INCONCLUSIVE),
    ],
)  # fmt: skip
def test_worker_metrics(
    full_config: JudgeConfig,
    baseline: dict[str, float],
    canary: dict[str, float],
    metric: str,
    verdict: Verdict,
) -> None:
    rng = np.random.default_rng(7)
    judgement = judge(full_side(rng, 2000, **baseline), full_side(rng, 400, **canary), full_config)
    row = by_metric(judgement)[metric]
    assert row.verdict == verdict, row  # type: ignore[attr-defined]
    if verdict != Verdict.PASS:
        assert judgement.verdict != Verdict.PASS
        assert any(r.startswith(f"{metric}: ") for r in judgement.reasons)


def test_healthy_jobs_pass_the_last_step(full_config: JudgeConfig) -> None:
    """The last step's non-inferiority rule is the API's: with tens of job attempts the upper
    bound of a job failure-rate increase never drops below 1%, so it must not apply to jobs
    (a scaffolded product's canary stayed inconclusive until its deadline)."""
    from dagster_project.core.canary.analysis import config_for_step

    last = config_for_step(full_config, 3, 3)
    assert last.error_rate_noninferiority
    rng = np.random.default_rng(11)
    judgement = judge(full_side(rng, 2000, jobs=80), full_side(rng, 400, jobs=20), last)
    assert by_metric(judgement)["job_failure_rate"].verdict == Verdict.PASS  # type: ignore[attr-defined]
    failing = judge(
        full_side(rng, 2000, jobs=80), full_side(rng, 400, jobs=20, failure_rate=1.0), last
    )
    assert by_metric(failing)["job_failure_rate"].verdict == Verdict.FAIL  # type: ignore[attr-defined]


def test_missing_worker_metrics_are_never_a_pass(full_config: JudgeConfig) -> None:
    rng = np.random.default_rng(3)
    api_only = side(rng, 2000, 0.002), side(rng, 400, 0.002)
    judgement = judge(*api_only, full_config)
    rows = by_metric(judgement)
    assert set(WORKER_METRICS) <= set(rows)
    for metric in WORKER_METRICS:
        assert rows[metric].verdict == Verdict.INCONCLUSIVE, rows[metric]  # type: ignore[attr-defined]
    assert judgement.verdict == Verdict.INCONCLUSIVE


def test_unavailable_metrics_list_the_worker_metrics_too() -> None:
    rows = {m.metric for m in metrics_unavailable(["boom"], 3).metrics}
    assert set(METRICS) | set(WORKER_METRICS) | {METRICS_SOURCE} == rows


@pytest.mark.parametrize(
    ("bake", "extension", "scale", "scale_deadline", "expected"),
    [
        (8, 30, 1.0, True, (8, 30)),  # the spec's own
        (8, 30, 1.0, False, (8, 30)),
        (8, 30, 0.5, True, (4, 15)),  # run_canary's tests: the whole step scaled
        (8, 30, 0.5, False, (4, 34)),  # RELEASE_BAKE_SCALE: the deadline stays 38 s
        (20, 30, 0.25, False, (5, 45)),
    ],
)
def test_step_timing_scales_the_bake_and_keeps_the_deadline_when_asked(
    bake: float, extension: float, scale: float, scale_deadline: bool, expected: tuple
) -> None:
    got = step_timing(bake, extension, scale, scale_deadline=scale_deadline)
    assert got == pytest.approx(expected)
    if not scale_deadline:
        assert sum(got) == pytest.approx(bake + extension)  # a short sample loses no time


@pytest.mark.parametrize(
    ("elapsed", "bake", "interval", "expected"),
    [
        (0.0, 6.0, 1.0, 1.0),  # baking: the usual interval
        (5.6, 6.0, 1.0, 0.4),  # the bake ends sooner: look when it does
        (6.0, 6.0, 1.0, 1.0),  # bake over (extending): the usual interval
        (7.3, 6.0, 1.0, 1.0),
        (0.0, 0.5, 1.0, 0.5),  # a bake shorter than one interval
    ],
)
def test_next_look_is_taken_when_the_bake_ends(
    elapsed: float, bake: float, interval: float, expected: float
) -> None:
    assert next_look_in(elapsed, bake, interval) == pytest.approx(expected)
