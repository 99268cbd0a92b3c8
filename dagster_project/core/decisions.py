"""What a release stage does, decided from the facts: the one place the release rules live.

Asset bodies gather facts (what production serves, the release's place in the partition order,
the upstream gates, the approval, and, as the stage goes on, the drift, the migration gates,
the canary verdict, the watch) and call `decide_canary` or `decide_promotion`; they apply the
decision they get back. A decision with `proceed=True` means "no rule stops this stage yet:
gather the next fact" (a later call, with more facts, decides again). Each rule is a row of the
table in `tests/test_decisions.py`.

Pure: no Dagster, no Postgres, no platform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from dagster_project.core.contracts import GateResult, TrackRef

# Why a stage stops (or `None` while it may go on). Refusals leave production unchanged; a
# refused approval is reported as such (exit 4), the other refusals and blocks exit 3.
Rule = Literal[
    "approval",  # no valid guardrail token
    "gates",  # a blocking check upstream did not pass for this release and artifact
    "already_live",  # this artifact already serves 100%: nothing to do
    "release_order",  # registered before the live release: never move production backwards
    "schema_drift",  # production's schema differs from its migrations
    "migrations",  # the production migrations are not lint-clean, safe and compatible
    "canary_verdict",  # the canary's judgement (passed or aborted)
    "canary_not_running",  # promotion without this release's canary parked in production
    "watch",  # the new version at 100% failed its watch: back to the previous version
    "ownership",  # this run no longer owns production, or another artifact serves
    "promoted",  # every rule held: promoted
]


@dataclass(frozen=True)
class ReleaseFacts:
    """What a stage knows before it acts."""

    release: str  # this release's partition key
    artifact_sha256: str
    live: TrackRef | None  # what serves 100% of production now (None: first release)
    registered: Sequence[str]  # the product's release partitions, in registration order
    gates: Sequence[GateResult] = ()
    approval_refused: str | None = None  # why the token was refused; None: approved


@dataclass(frozen=True)
class Decision:
    outcome: str  # the stage's outcome (a CanaryOutcome, a PromotionOutcome, or `refused`)
    rule: Rule | None
    reason: str
    proceed: bool = False  # no rule stopped the stage: gather the next fact and decide again
    touches_production: bool = False  # applying this decision changes production traffic
    not_passed: tuple[GateResult, ...] = field(default=())

    @property
    def refused(self) -> bool:
        return self.outcome == "refused"


def _go(stage: str) -> Decision:
    return Decision(outcome="proceed", rule=None, reason=f"{stage} may go on", proceed=True)


def behind_production(release: str, live_release: str | None, registered: Sequence[str]) -> bool:
    """True when `release` was registered before the release live in production.

    Backfills re-run old partitions; production must never move backwards through them. A
    release registered later (even with a lower version number) is a deliberate new intent, and
    a release the partition list does not know is judged by nothing here."""
    if not live_release or live_release == release:
        return False
    keys = list(registered)
    if live_release not in keys or release not in keys:
        return False
    return keys.index(release) < keys.index(live_release)


def _entry_rules(facts: ReleaseFacts, order: Sequence[Rule]) -> Decision | None:
    """The rules every stage that touches production applies first, in the stage's order."""
    for rule in order:
        if rule == "approval" and facts.approval_refused is not None:
            return Decision("refused", "approval", facts.approval_refused)
        if rule == "gates":
            not_passed = tuple(g for g in facts.gates if not g.passed)
            if not_passed:
                listed = ", ".join(f"{g.check} ({g.status})" for g in not_passed)
                return Decision(
                    "refused",
                    "gates",
                    f"refusing to act for release {facts.release} (artifact "
                    f"{facts.artifact_sha256[:12]}): blocking checks upstream did not pass: "
                    f"{listed}; production is unchanged",
                    not_passed=not_passed,
                )
    return None


def _production_rules(facts: ReleaseFacts, backwards_outcome: str) -> Decision | None:
    """What production serves decides next: this artifact already live, or this release behind
    the live one (the canary reports `superseded`, promotion refuses; neither touches it)."""
    live = facts.live
    if live is not None and live.artifact_sha256 == facts.artifact_sha256:
        return Decision("already_live", "already_live", "already serving 100%")
    if live is not None and behind_production(facts.release, live.version, facts.registered):
        return Decision(
            backwards_outcome,
            "release_order",
            f"release {facts.release} is older than {live.version}, live in production: "
            "production is never moved backwards (not touched)",
        )
    return None


def decide_canary(
    facts: ReleaseFacts,
    *,
    drift_differences: int | None = None,
    migrations_blocked_by: Sequence[str] | None = None,
    canary_verdict: str | None = None,
    canary_reason: str = "",
) -> Decision:
    """The canary stage. Facts arrive in the order the stage learns them: approval and gates
    (before anything), what production serves, the drift and migration gates on production
    (before traffic moves), then the canary's verdict."""
    stop = _entry_rules(facts, ("approval", "gates")) or _production_rules(facts, "superseded")
    if stop is not None:
        return stop
    live = facts.live
    if drift_differences is None:
        return _go("canary")
    if drift_differences:
        return Decision(
            "blocked",
            "schema_drift",
            f"production schema drift: {drift_differences} difference(s); production not touched",
        )
    if migrations_blocked_by is None:
        return _go("canary")
    if migrations_blocked_by:
        return Decision(
            "blocked",
            "migrations",
            f"production migrations blocked by {', '.join(migrations_blocked_by)}; "
            "production not touched",
        )
    if canary_verdict is None:
        return Decision("proceed", None, "deploy the canary", proceed=True, touches_production=True)
    if canary_verdict == "pass":
        return Decision(
            "passed",
            "canary_verdict",
            canary_reason or "canary passed every step",
            touches_production=live is not None,  # parked at 0% behind stable
        )
    # fail, inconclusive at the deadline, or an error of the metrics: never a pass.
    return Decision(
        "aborted",
        "canary_verdict",
        f"canary {canary_verdict}: {canary_reason or 'no reason given'}; all traffic back to "
        "stable",
        touches_production=True,
    )


def decide_promotion(
    facts: ReleaseFacts,
    *,
    canary_artifact: str | None = None,
    watch_passed: bool | None = None,
    watch_reason: str = "",
    still_owner: bool | None = None,
    serving_artifact: str | None = None,
) -> Decision:
    """The promotion stage. `canary_artifact` is the artifact on production's canary track (the
    parked canary); then the watch at 100%; then, just before the switch, whether this run
    still owns production and which artifact the canary track serves."""
    stop = _entry_rules(facts, ("gates", "approval")) or _production_rules(facts, "refused")
    if stop is not None:
        return stop
    if canary_artifact != facts.artifact_sha256:
        return Decision(
            "refused",
            "canary_not_running",
            f"refusing to promote {facts.release}: its canary is not running in production (a "
            "canary is promoted in the run that judged it; materialize canary and promotion "
            "together); production is unchanged",
        )
    if watch_passed is None:
        return Decision("proceed", None, "watch at 100%", proceed=True, touches_production=True)
    if not watch_passed:
        return Decision(
            "rolled_back",
            "watch",
            f"watch after promoting {facts.release} failed: {watch_reason or 'no reason given'}",
            touches_production=True,
        )
    if still_owner is None:
        return _go("promotion")
    if not still_owner:
        return Decision("refused", "ownership", "this run lost production during the watch")
    if serving_artifact != facts.artifact_sha256:
        return Decision("refused", "ownership", "the canary serving is not this release's")
    return Decision(
        "promoted",
        "promoted",
        f"{facts.release} promoted: {watch_reason or 'watch passed'}",
        touches_production=True,
    )


ErrorSettlement = Literal[
    "record_promoted", "rollback_and_record", "rollback_only", "leave_to_reconciler", "nothing"
]


def settle_after_error(
    *,
    refused: bool,
    artifact_sha256: str,
    stable_before: str | None,
    stable_now: str | None,
    traffic_moved: bool,
    switching: bool = False,
    canary_now: str | None = None,
) -> ErrorSettlement:
    """What a stage that failed with an error owes production (pure): the one rule for
    canary and promotion. `traffic_moved`: the release's version carried production traffic
    (a canary step, or the watch at 100%) before the error; `switching`: the promotion was
    decided and the platform's switch had begun (it stops an idle old stable first).

    - refused before touching anything: nothing;
    - the switch to the new version happened (it serves as stable, and did not before): the
      promotion is recorded;
    - the switch began and no stable serves (the old one stopped and could not be started
      again), the new version's canary at 100%: production stays on it, and the ownership
      with the reconciler, which finishes the promotion (going back would stop the only
      version production has);
    - otherwise production goes back to the previous stable and, if the new version carried
      traffic, the change is recorded; if it never did, rolling back the canary track (if one
      was started) is all."""
    if refused:
        return "nothing"
    if stable_now == artifact_sha256 and stable_before != artifact_sha256:
        return "record_promoted"
    if switching and stable_now is None and canary_now == artifact_sha256:
        return "leave_to_reconciler"
    return "rollback_and_record" if traffic_moved else "rollback_only"
