"""The release rules (`core/decisions.py`) as one table per stage: pure, no Dagster, no Postgres.

Every outcome a stage can reach has a row; a fact that is not known yet (None) means the stage
goes on gathering facts (`proceed`)."""

from __future__ import annotations

from typing import Any

import pytest

from dagster_project.core.contracts import GateResult, TrackRef
from dagster_project.core.decisions import (
    ReleaseFacts,
    behind_production,
    decide_canary,
    decide_promotion,
    settle_after_error,
)

NEW = "b" * 64
OLD = "a" * 64
LIVE = TrackRef(version="1.0.0", artifact_sha256=OLD)
PASSED = (GateResult(check="p/staging_smoke:smoke", status="PASSED"),)
FAILED = (
    GateResult(check="p/staging_smoke:smoke", status="PASSED"),
    GateResult(check="p/build:artifact_integrity", status="FAILED"),
)
NEVER = (GateResult(check="p/staging_smoke:smoke", status="NEVER_EVALUATED"),)
OTHER_ARTIFACT = (GateResult(check="p/staging_smoke:smoke", status="PASSED_ON_OTHER_ARTIFACT x"),)
NO_TOKEN = "approval refused: the environment variable GUARDRAIL_TOKEN is not set"


def facts(**overrides: Any) -> ReleaseFacts:
    base: dict[str, Any] = {
        "release": "1.1.0",
        "artifact_sha256": NEW,
        "live": LIVE,
        "registered": ("1.0.0", "1.1.0"),
        "gates": PASSED,
        "approval_refused": None,
    }
    return ReleaseFacts(**{**base, **overrides})


# (case, facts, later facts, outcome, rule, proceed, reason contains)
CANARY_CASES = [
    ("no token", facts(approval_refused=NO_TOKEN), {}, "refused", "approval", False, "GUARDRAIL"),
    (
        "token before gates",
        facts(approval_refused=NO_TOKEN, gates=FAILED),
        {},
        "refused",
        "approval",
        False,
        "GUARDRAIL",
    ),
    ("a gate failed", facts(gates=FAILED), {}, "refused", "gates", False, "artifact_integrity"),
    ("a gate never ran", facts(gates=NEVER), {}, "refused", "gates", False, "NEVER_EVALUATED"),
    (
        "passed on another build",
        facts(gates=OTHER_ARTIFACT),
        {},
        "refused",
        "gates",
        False,
        "OTHER_ARTIFACT",
    ),
    (
        "already live",
        facts(live=TrackRef(version="1.1.0", artifact_sha256=NEW)),
        {},
        "already_live",
        "already_live",
        False,
        "already serving",
    ),
    (
        "backfill of an older release",
        facts(release="0.9.0", registered=("0.9.0", "1.0.0")),
        {},
        "superseded",
        "release_order",
        False,
        "never moved backwards",
    ),
    (
        "a lower version registered later is deliberate",
        facts(release="0.9.0", registered=("1.0.0", "0.9.0")),
        {},
        "proceed",
        None,
        True,
        "",
    ),
    ("first release, nothing live", facts(live=None), {}, "proceed", None, True, ""),
    (
        "unknown release is not judged by order",
        facts(registered=("1.0.0",)),
        {},
        "proceed",
        None,
        True,
        "",
    ),
    (
        "drift found",
        facts(),
        {"drift_differences": 2},
        "blocked",
        "schema_drift",
        False,
        "2 difference",
    ),
    (
        "no drift, migrations not checked yet",
        facts(),
        {"drift_differences": 0},
        "proceed",
        None,
        True,
        "",
    ),
    (
        "migrations blocked",
        facts(),
        {"drift_differences": 0, "migrations_blocked_by": ["migration_safety"]},
        "blocked",
        "migrations",
        False,
        "migration_safety",
    ),
    (
        "clean: deploy the canary",
        facts(),
        {"drift_differences": 0, "migrations_blocked_by": []},
        "proceed",
        None,
        True,
        "deploy",
    ),
    (
        "canary passed",
        facts(),
        {"drift_differences": 0, "migrations_blocked_by": [], "canary_verdict": "pass"},
        "passed",
        "canary_verdict",
        False,
        "passed",
    ),
    (
        "canary failed",
        facts(),
        {
            "drift_differences": 0,
            "migrations_blocked_by": [],
            "canary_verdict": "fail",
            "canary_reason": "step 2 (25%) failed",
        },
        "aborted",
        "canary_verdict",
        False,
        "step 2",
    ),
    (
        "inconclusive at the deadline is never a pass",
        facts(),
        {"drift_differences": 0, "migrations_blocked_by": [], "canary_verdict": "inconclusive"},
        "aborted",
        "canary_verdict",
        False,
        "inconclusive",
    ),
]


@pytest.mark.parametrize(
    ("case", "given", "later", "outcome", "rule", "proceed", "reason"),
    CANARY_CASES,
    ids=[c[0] for c in CANARY_CASES],
)
def test_canary_decision(
    case: str,
    given: ReleaseFacts,
    later: dict[str, Any],
    outcome: str,
    rule: str | None,
    proceed: bool,
    reason: str,
) -> None:
    decision = decide_canary(given, **later)
    assert (decision.outcome, decision.rule, decision.proceed) == (outcome, rule, proceed)
    assert reason in decision.reason


PROMOTION_CASES = [
    ("a gate failed", facts(gates=FAILED), {}, "refused", "gates", False, "artifact_integrity"),
    (
        "gates before the token",
        facts(gates=FAILED, approval_refused=NO_TOKEN),
        {},
        "refused",
        "gates",
        False,
        "artifact_integrity",
    ),
    ("no token", facts(approval_refused=NO_TOKEN), {}, "refused", "approval", False, "GUARDRAIL"),
    (
        "already live",
        facts(live=TrackRef(version="1.1.0", artifact_sha256=NEW)),
        {},
        "already_live",
        "already_live",
        False,
        "already serving",
    ),
    (
        "backfill of an older release",
        facts(release="0.9.0", registered=("0.9.0", "1.0.0")),
        {"canary_artifact": NEW},
        "refused",
        "release_order",
        False,
        "never moved backwards",
    ),
    ("no canary parked", facts(), {}, "refused", "canary_not_running", False, "not running"),
    (
        "another release's canary parked",
        facts(),
        {"canary_artifact": OLD},
        "refused",
        "canary_not_running",
        False,
        "not running",
    ),
    ("canary parked: watch", facts(), {"canary_artifact": NEW}, "proceed", None, True, "watch"),
    (
        "watch failed",
        facts(),
        {"canary_artifact": NEW, "watch_passed": False, "watch_reason": "p99 over SLO"},
        "rolled_back",
        "watch",
        False,
        "p99 over SLO",
    ),
    (
        "watch passed, ownership not re-read yet",
        facts(),
        {"canary_artifact": NEW, "watch_passed": True},
        "proceed",
        None,
        True,
        "",
    ),
    (
        "lost production during the watch",
        facts(),
        {
            "canary_artifact": NEW,
            "watch_passed": True,
            "still_owner": False,
            "serving_artifact": NEW,
        },
        "refused",
        "ownership",
        False,
        "lost production",
    ),
    (
        "another artifact serves the canary track",
        facts(),
        {
            "canary_artifact": NEW,
            "watch_passed": True,
            "still_owner": True,
            "serving_artifact": OLD,
        },
        "refused",
        "ownership",
        False,
        "not this release",
    ),
    (
        "promoted",
        facts(),
        {
            "canary_artifact": NEW,
            "watch_passed": True,
            "still_owner": True,
            "serving_artifact": NEW,
        },
        "promoted",
        "promoted",
        False,
        "promoted",
    ),
    (
        "first release promoted",
        facts(live=None),
        {
            "canary_artifact": NEW,
            "watch_passed": True,
            "still_owner": True,
            "serving_artifact": NEW,
        },
        "promoted",
        "promoted",
        False,
        "promoted",
    ),
]


@pytest.mark.parametrize(
    ("case", "given", "later", "outcome", "rule", "proceed", "reason"),
    PROMOTION_CASES,
    ids=[c[0] for c in PROMOTION_CASES],
)
def test_promotion_decision(
    case: str,
    given: ReleaseFacts,
    later: dict[str, Any],
    outcome: str,
    rule: str | None,
    proceed: bool,
    reason: str,
) -> None:
    decision = decide_promotion(given, **later)
    assert (decision.outcome, decision.rule, decision.proceed) == (outcome, rule, proceed)
    assert reason in decision.reason
    # A refusal never changes production; only a watch, a rollback or a promotion does.
    if decision.refused or decision.outcome == "already_live":
        assert not decision.touches_production


def test_gate_refusal_lists_only_the_checks_that_did_not_pass() -> None:
    decision = decide_canary(facts(gates=FAILED))
    assert [g.check for g in decision.not_passed] == ["p/build:artifact_integrity"]


# (case, refused, stable before, stable now, traffic moved, switching, canary now, settlement);
# switching: the promotion was decided and the platform's switch had begun
OTHER = "c" * 64
BACK, LEAVE, RECORD, ONLY = (
    "rollback_and_record",
    "leave_to_reconciler",
    "record_promoted",
    "rollback_only",
)
# fmt: off
SETTLEMENT_CASES = [
    ("refused before touching anything",     True,  OLD,  OLD,  False, False, None,  "nothing"),
    ("refused after the watch: not ours",    True,  OLD,  OLD,  True,  False, NEW,   "nothing"),
    ("the switch happened: record it",       False, OLD,  NEW,  True,  True,  None,  RECORD),
    ("first release switched",               False, None, NEW,  True,  True,  None,  RECORD),
    ("traffic moved, no switch",             False, OLD,  OLD,  True,  False, NEW,   BACK),
    ("no traffic: stop the canary only",     False, OLD,  OLD,  False, False, None,  ONLY),
    ("already live before: not promoted",    False, NEW,  NEW,  True,  False, None,  BACK),
    # an error while switching: stay on the canary only when no stable could be kept
    ("old stable stopped, none restarted",   False, OLD,  None, True,  True,  NEW,   LEAVE),
    ("first release's switch failed",        False, None, None, True,  True,  NEW,   LEAVE),
    ("old stable restarted: back to it",     False, OLD,  OLD,  True,  True,  NEW,   BACK),
    ("no stable, no canary of it",           False, OLD,  None, True,  True,  None,  BACK),
    ("no stable, another release's canary",  False, OLD,  None, True,  True,  OTHER, BACK),
    ("that state before the switch: undone", False, OLD,  None, True,  False, NEW,   BACK),
]
# fmt: on


@pytest.mark.parametrize(
    ("case", "refused", "before", "now", "moved", "switching", "canary", "settlement"),
    SETTLEMENT_CASES,
    ids=[c[0] for c in SETTLEMENT_CASES],
)
def test_settlement_after_an_error(
    case: str,
    refused: bool,
    before: str | None,
    now: str | None,
    moved: bool,
    switching: bool,
    canary: str | None,
    settlement: str,
) -> None:
    got = settle_after_error(
        refused=refused,
        artifact_sha256=NEW,
        stable_before=before,
        stable_now=now,
        traffic_moved=moved,
        switching=switching,
        canary_now=canary,
    )
    assert got == settlement


@pytest.mark.parametrize(
    ("release", "live", "registered", "behind"),
    [
        ("1.0.0", "1.1.0", ("1.0.0", "1.1.0"), True),
        ("1.1.0", "1.0.0", ("1.0.0", "1.1.0"), False),
        ("0.9.0", "1.0.0", ("1.0.0", "0.9.0"), False),  # registered later: deliberate
        ("1.0.0", "1.0.0", ("1.0.0",), False),
        ("1.0.0", None, ("1.0.0",), False),
        ("1.0.0", "2.0.0", ("1.0.0",), False),  # live release unknown here
    ],
)
def test_behind_production(
    release: str, live: str | None, registered: tuple[str, ...], behind: bool
) -> None:
    assert behind_production(release, live, registered) is behind


@pytest.mark.slow
def test_the_decisions_module_imports_neither_dagster_nor_a_database_driver() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import dagster_project.core.decisions; "
        "bad = [m for m in ('dagster', 'psycopg2', 'sqlalchemy') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"core.decisions pulled in {done.stdout.strip()}"
