"""Gate accuracy of the canary judge, measured over many simulated canaries.

    .venv/bin/python benchmarks/bench_gate_accuracy.py [--runs 2000] [--seed 7]

Each simulated canary runs the spec's steps (weights, bake times, extension deadline, minimum
samples) second by second at the spec's load rate, through the *real* decision path: traffic
is counted into the service's own histogram buckets, turned into `TrackSnapshot`s, windows
are `later.since(start)` and latency samples are rebuilt from bucket deltas exactly as the
metrics source does; `judge()` and `step_decision()` are the ones `run_canary` uses.

Traffic model (stated, not tuned to the result):
- requests reaching the API per second: the spec's `load_rps` times the share of load weight
  on dynamic endpoints (static ones are served by the edge cache), Poisson per second;
- errors: binomial, healthy error rate 0.5% on both tracks (`--healthy-error-rate`);
- latency: lognormal body (median 40 ms, sigma 0.45) with a heavy tail (2% of requests from a
  lognormal with median 150 ms, sigma 0.6); healthy p99 is about 230 ms.

Scenarios: healthy (canary identical to baseline), +2 points of error rate, 1.5x latency.
Reported: false-block rate on healthy releases; detection rate and median canary samples (and
seconds) to detection for the regressions. Targets: <= 1% false blocks, >= 99% detection.
"""

from __future__ import annotations

import argparse
import ast
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np

from dagster_project.core.canary.analysis import StepAction, config_for_step, step_decision
from dagster_project.core.canary.judge import JudgeConfig, Verdict, judge
from dagster_project.core.canary.metrics import TrackSnapshot
from dagster_project.core.spec import ProductSpec, load_spec

PRODUCT = "4pnihc40q-yj"
HEALTHY_ERROR_RATE = 0.005
TICK_S = 1.0  # run_canary's default sample interval


def service_buckets_ms(spec: ProductSpec) -> tuple[float, ...]:
    """The sample service's histogram buckets, read from its source (not imported: the
    service configures itself from its environment at import)."""
    tree = ast.parse((spec.service_path / "api.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "LATENCY_BUCKETS_MS" for t in node.targets
        ):
            return tuple(float(v) for v in ast.literal_eval(node.value))
    raise SystemExit(f"{spec.service_path / 'api.py'}: LATENCY_BUCKETS_MS not found")


@dataclass(frozen=True)
class Scenario:
    name: str
    error_rate: float
    latency_factor: float
    regression: bool


def scenarios(healthy_error_rate: float) -> tuple[Scenario, ...]:
    return (
        Scenario("healthy", healthy_error_rate, 1.0, regression=False),
        Scenario("+2 pt error rate", healthy_error_rate + 0.02, 1.0, regression=True),
        Scenario("1.5x latency", healthy_error_rate, 1.5, regression=True),
    )


class Track:
    """Cumulative counters of one simulated API process, in the service's buckets."""

    def __init__(self, name: str, bounds_s: np.ndarray) -> None:
        self.name = name
        self.bounds_s = bounds_s
        self.requests = 0
        self.errors = 0
        self.bucket_counts = np.zeros(len(bounds_s) + 1)  # last = +Inf

    def serve(self, rng: np.random.Generator, n: int, error_rate: float, factor: float) -> None:
        self.requests += n
        self.errors += int(rng.binomial(n, error_rate))
        body = rng.lognormal(math.log(0.040), 0.45, n)
        tail = rng.random(n) < 0.02
        body[tail] = rng.lognormal(math.log(0.150), 0.6, int(tail.sum()))
        index = np.searchsorted(self.bounds_s, body * factor, side="left")  # le semantics
        self.bucket_counts += np.bincount(index, minlength=len(self.bounds_s) + 1)

    def snapshot(self, t: float) -> TrackSnapshot:
        cumulative = np.cumsum(self.bucket_counts)
        bounds = [*self.bounds_s.tolist(), math.inf]
        return TrackSnapshot(
            self.name,
            t,
            float(self.requests),
            float(self.errors),
            dict(zip(bounds, cumulative.tolist(), strict=True)),
        )


@dataclass
class Outcome:
    blocked: bool
    canary_samples: float  # canary requests in the window when the gate decided
    seconds: float
    failed_metrics: tuple[str, ...]


def simulate(
    spec: ProductSpec,
    config: JudgeConfig,
    scenario: Scenario,
    rng: np.random.Generator,
    origin_rps: float,
    bounds_s: np.ndarray,
    baseline_error_rate: float,
) -> Outcome:
    stable, canary = Track("stable", bounds_s), Track("canary", bounds_s)
    start = {"stable": stable.snapshot(0.0), "canary": canary.snapshot(0.0)}
    t = 0.0
    judgement = None
    for index, step in enumerate(spec.canary.steps, start=1):
        step_config = config_for_step(config, index, len(spec.canary.steps))
        elapsed, action = 0.0, StepAction.CONTINUE
        share = step.weight / 100
        while action in (StepAction.CONTINUE, StepAction.EXTEND):
            t += TICK_S
            elapsed += TICK_S
            stable.serve(
                rng, int(rng.poisson(origin_rps * (1 - share) * TICK_S)), baseline_error_rate, 1.0
            )
            canary.serve(
                rng,
                int(rng.poisson(origin_rps * share * TICK_S)),
                scenario.error_rate,
                scenario.latency_factor,
            )
            windows = {
                "stable": stable.snapshot(t).since(start["stable"]),
                "canary": canary.snapshot(t).since(start["canary"]),
            }
            judgement = judge(windows["stable"].side(), windows["canary"].side(), step_config)
            action = step_decision(
                judgement.verdict,
                elapsed,
                step.bake_seconds,
                spec.canary.max_step_extension_seconds,
            )
        if action == StepAction.FAIL:
            assert judgement is not None
            # The metrics that blocked: the failing ones, or the undecided ones at a deadline.
            failed = tuple(
                m.metric for m in judgement.metrics if m.verdict == Verdict.FAIL
            ) or tuple(f"{m.metric}?" for m in judgement.metrics if m.verdict != Verdict.PASS)
            return Outcome(True, float(canary.requests), t, failed)
    return Outcome(False, float(canary.requests), t, ())


def main() -> None:
    from scipy.stats import binomtest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="simulated canaries per scenario")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--healthy-error-rate",
        type=float,
        default=HEALTHY_ERROR_RATE,
        help="error rate of the baseline and of a healthy canary",
    )
    parser.add_argument("--alpha-fail", type=float, help="override the judge's default")
    parser.add_argument("--load-rps", type=float, help="override the spec's canary.load_rps")
    parser.add_argument("--alpha-suspect", type=float, help="override the judge's default")
    args = parser.parse_args()

    spec = load_spec(PRODUCT)
    overrides = {
        k: v
        for k, v in (("alpha_fail", args.alpha_fail), ("alpha_suspect", args.alpha_suspect))
        if v is not None
    }
    if args.load_rps is not None:
        spec = spec.model_copy(
            update={"canary": spec.canary.model_copy(update={"load_rps": args.load_rps})}
        )
    # The API's gate accuracy: the simulation models requests, not the workers' jobs (their
    # metrics would stay inconclusive here and block every run; tests/test_worker_canary.py
    # covers them on the real workers).
    config = JudgeConfig.from_spec(spec, judge_workers=False, **overrides)
    bounds_s = np.array(service_buckets_ms(spec)) / 1000
    dynamic = sum(e.load_weight for e in spec.endpoints if e.ttl_class == "dynamic")
    origin_rps = spec.canary.load_rps * dynamic / sum(e.load_weight for e in spec.endpoints)
    steps = ", ".join(f"{s.weight}%/{s.bake_seconds:g}s" for s in spec.canary.steps)
    extension = spec.canary.max_step_extension_seconds
    print(
        f"spec {PRODUCT}: steps {steps}; extension <= {extension:g}s;"
        f" min {config.min_requests_per_side} requests / {config.min_latency_samples} latency"
        f" samples per side; {origin_rps:g} req/s at the API ({spec.canary.load_rps:g} at the"
        f" edge); healthy error rate {args.healthy_error_rate:.2%};"
        f" alpha_fail={config.alpha_fail:g}, alpha_suspect={config.alpha_suspect:g};"
        f" {args.runs} runs per scenario"
    )

    rng = np.random.default_rng(args.seed)
    rows = []
    for scenario in scenarios(args.healthy_error_rate):
        began = time.perf_counter()
        outcomes = [
            simulate(spec, config, scenario, rng, origin_rps, bounds_s, args.healthy_error_rate)
            for _ in range(args.runs)
        ]
        blocked = [o for o in outcomes if o.blocked]
        rate = len(blocked) / len(outcomes)
        causes: dict[str, int] = {}
        for o in blocked:
            for metric in o.failed_metrics:
                causes[metric] = causes.get(metric, 0) + 1
        rows.append((scenario, rate, blocked, causes, time.perf_counter() - began))

    print()
    print(
        f"{'scenario':<18} {'measure':<13} {'measured':>9} {'95% CI':>15} {'target':>7}  "
        f"{'median samples':>14} {'median s':>9}  blocking metrics (count)"
    )
    ok = True
    for scenario, rate, blocked, causes, _elapsed in rows:
        measure = "detection" if scenario.regression else "false blocks"
        target = ">= 99%" if scenario.regression else "<= 1%"
        met = rate >= 0.99 if scenario.regression else rate <= 0.01
        ok = ok and met
        samples = statistics.median(o.canary_samples for o in blocked) if blocked else math.nan
        seconds = statistics.median(o.seconds for o in blocked) if blocked else math.nan
        top = ", ".join(f"{k} {v}" for k, v in sorted(causes.items(), key=lambda kv: -kv[1]))
        ci = binomtest(len(blocked), len(outcomes)).proportion_ci(method="wilson")
        interval = f"{ci.low:.2%}-{ci.high:.2%}"
        print(
            f"{scenario.name:<18} {measure:<13} {rate:>8.2%} {interval:>15} {target:>7}  "
            f"{samples:>14.0f} {seconds:>9.0f}  {top or '-'}"
            f"{'' if met else '   <- MISSED'}"
        )
    print(
        "median samples / s: canary requests in the judged window / seconds since the canary"
        " started, when it was blocked; 'metric?' = still inconclusive at a step deadline"
    )
    print()
    print("targets met" if ok else "TARGETS MISSED (see above)")
    print(f"simulation time: {sum(r[4] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
