"""The reconciler: production back to a recorded, ready state after a release run died.

Run by a sensor in the Dagster daemon, at the start of every CLI command and of every stage
that touches an environment. For each environment of a product it reads the owner
(`core/ownership.py`); an owner that is alive is left alone. A dead one (process gone,
heartbeat stale, or its Dagster run no longer in progress) is taken over:

- production: if its release already serves as stable (the run died after the promotion
  switched traffic) the change is recorded as `promoted`; if it died switching (its watch
  passed, the promotion decided) the reconciler finishes the switch, also `promoted`;
  otherwise traffic goes back to 100% of the last ready stable, the canary is stopped, and
  the change is recorded as `aborted` — with the same change id the run itself would have
  used, so each production change is recorded exactly once;
- staging: the ownership is simply released (staging carries no user traffic);
- processes that no serving track owns (left `starting` or `retiring` by a killed operation)
  are reaped;
- with a valid guardrail token at hand the recorded change is audited at once; otherwise the
  audit sensor, or the next `deploy`, audits it.

What was done is returned as a `Reconciliation` (and printed by `release status`).
Plain Python: no Dagster import; the caller says whether a run is still in progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from dagster_project.core import changes, database, guardrail, ownership
from dagster_project.core.contracts import ChangeEvidence
from dagster_project.core.ownership import Owner
from dagster_project.core.spec import ProductSpec, load_spec

logger = logging.getLogger("release.reconcile")

ENVIRONMENTS = ("staging", "production")

RunInProgress = Callable[[str], "bool | None"]


def _unknown(run_id: str) -> bool | None:
    return None


@dataclass(frozen=True)
class TakeOver:
    """One dead owner handled."""

    env: str
    owner_release: str
    owner_run_id: str
    why: str
    outcome: str | None  # the production change recorded, None for staging
    change_id: str | None
    audited: bool
    problem: str | None = None  # why it could not be settled (the ownership stays)


@dataclass
class Reconciliation:
    product: str
    owners: dict[str, Owner | None] = field(default_factory=dict)
    take_overs: list[TakeOver] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)
    audited: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)  # Dagster runs whose process died
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"{t.env}: owner {t.owner_release} (run {t.owner_run_id[:8]}) was dead ({t.why}); "
            + (
                f"not settled, kept for the next reconcile: {t.problem}"
                if t.problem
                else f"recorded as {t.outcome} ({'audited' if t.audited else 'audit pending'})"
                if t.outcome
                else "released"
            )
            for t in self.take_overs
        ]
        out += [f"reaped {what}" for what in self.reaped]
        out += [f"audited {change_id}" for change_id in self.audited]
        out += [f"marked run {run_id} failed: its process died" for run_id in self.failed_runs]
        out += [f"problem: {p}" for p in self.problems]
        return out


def production_decision(
    *,
    phase: str,
    owner_artifact: str,
    owner_previous: str | None,
    stable_artifact: str | None,
    canary_artifact: str | None = None,
) -> str | None:
    """What a dead production owner's change was (pure), or None when traffic never moved:
    - still preparing (drift checks, migrations) or nothing changing hands (already live): None;
    - its artifact serves as stable now: `promoted` (`rolled_back` for a rollback);
    - it died switching (its watch had passed, the promotion was decided) with its canary at
      100%: `promoted`, the switch finished by the reconciler (`finishes_promotion`);
    - otherwise its canary carried traffic and is stopped: `aborted`."""
    if phase in ("preparing", "staging") or owner_previous == owner_artifact:
        return None
    if stable_artifact is not None and stable_artifact == owner_artifact:
        return "rolled_back" if phase == "rollback" else "promoted"
    if phase == "switching" and canary_artifact == owner_artifact:
        return "promoted"
    return "aborted"


def finishes_promotion(
    outcome: str | None, owner_artifact: str, stable_artifact: str | None
) -> bool:
    """The reconciler promotes the dead owner's canary itself (pure): its change is a
    promotion that had not yet made its artifact stable. (The old stable may already be
    stopped then, so returning to it is not an option.)"""
    return outcome == "promoted" and stable_artifact != owner_artifact


def return_to_stable(platform: object, env: str = "production") -> bool:
    """Production back to 100% of its stable with the canary track stopped, if a canary track
    runs (True then). The one way stages and the reconciler undo a canary outside the canary's
    own step loop (which aborts a failing step itself, timed, in `core/canary/analysis.py`)."""
    if "canary" not in platform.current(env):  # type: ignore[attr-defined]
        return False
    platform.rollback(env)  # type: ignore[attr-defined]
    return True


def reconcile(
    product: str,
    *,
    run_in_progress: RunInProgress = _unknown,
    platform: object | None = None,
) -> Reconciliation:
    """Bring every environment of `product` back to a recorded, owned-or-settled state."""
    spec = load_spec(product)
    result = Reconciliation(product)
    for env in ENVIRONMENTS:
        owner = ownership.current(product, env)
        result.owners[env] = owner
        if owner is None:
            continue
        verdict = ownership.judge_owner(
            ownership.facts_for(owner, run_in_progress(owner.run_id)),
            stale_after_seconds=spec.production.owner_heartbeat_timeout_seconds,
        )
        if verdict.alive:
            continue
        taken = take_over(spec, owner, verdict.reason, platform=platform)
        result.take_overs.append(taken)
        if taken.problem:
            result.problems.append(f"{env}: {taken.problem}")
        result.owners[env] = ownership.current(product, env)
    local = platform or _platform(product)
    for env in ENVIRONMENTS:
        reap = getattr(local, "reap_orphans", None)
        if reap is None:
            continue
        try:
            result.reaped += [f"{env}: {what}" for what in reap(env)]
        except Exception as exc:  # reaping is housekeeping: report it, do not stop the caller
            result.problems.append(f"reaping {env}: {type(exc).__name__}: {exc}")
    result.audited += audit_pending(spec)
    return result


def take_over(
    spec: ProductSpec, owner: Owner, why: str, *, platform: object | None = None
) -> TakeOver:
    """Put the environment a dead owner held back in order, record the change, release it.

    Serialised per product and environment, and re-checked under the lock, so two reconcilers
    never act twice on one owner."""
    with _reconcile_lock(spec.product, owner.env):
        still = ownership.current(spec.product, owner.env)
        if still is None or still.run_id != owner.run_id or _beat_since(owner, still, why):
            return TakeOver(owner.env, owner.release, owner.run_id, why, None, None, False)
        local = platform or _platform(spec.product)
        tracks = local.current("production")  # type: ignore[attr-defined]
        stable = (tracks.get("stable") or {}).get("artifact_sha")
        outcome = (
            production_decision(
                phase=owner.phase,
                owner_artifact=owner.artifact_sha256,
                owner_previous=owner.previous_artifact_sha256,
                stable_artifact=stable,
                canary_artifact=(tracks.get("canary") or {}).get("artifact_sha"),
            )
            if owner.env == "production"
            else None
        )
        finishing = owner.env == "production" and finishes_promotion(
            outcome, owner.artifact_sha256, stable
        )
        problem = _finish_promotion(local) if finishing else None
        if problem is not None and not local.current("production").get("stable"):  # type: ignore[attr-defined]
            # Nothing to go back to (no stable before, or the old one could not be started
            # again): the canary keeps production; the next reconcile retries.
            logger.error("%s owner %s: %s", owner.env, owner.label, problem)
            return TakeOver(owner.env, owner.release, owner.run_id, why, None, None, False, problem)
        if problem is not None:
            outcome = "aborted"  # the old stable is back (LocalPlatform.promote restarts it)
        finished = finishing and problem is None
        if owner.env == "production" and outcome is not None and not finished:
            # Traffic first: back to the last ready stable (the platform waits for its
            # readiness and keeps the last ready routing if it cannot get it), canary stopped.
            local.rollback("production")  # type: ignore[attr-defined]
        elif owner.env == "production" and not finished:
            return_to_stable(local)
        change = None
        if outcome is not None:
            change = changes.record(
                product=spec.product,
                release=owner.release,
                outcome=outcome,
                artifact_sha256=owner.artifact_sha256,
                previous_artifact_sha256=owner.previous_artifact_sha256,
                run_id=owner.run_id,
                details=ChangeEvidence(
                    reason=f"reconciled: the owning run {owner.run_id} was dead ({why}) "
                    f"during {owner.phase}; "
                    + (
                        f"traffic returned to the last ready stable ({problem})"
                        if problem
                        else "traffic returned to the last ready stable"
                        if outcome == "aborted"
                        else "its promotion was decided; the reconciler finished the switch"
                        if finished
                        else "its release already served as stable"
                    ),
                    slo_verdict="not judged (run died)",
                    reconciled=True,
                    phase=owner.phase,
                    restored_release=owner.release if outcome == "rolled_back" else None,
                    restored_artifact_sha256=(
                        owner.artifact_sha256 if outcome == "rolled_back" else None
                    ),
                ),
            )
        ownership.release(spec.product, owner.env, owner.run_id)
        logger.warning("%s owner %s was dead (%s): %s", owner.env, owner.label, why, outcome)
    if change is None:
        return TakeOver(owner.env, owner.release, owner.run_id, why, None, None, False)
    audited = change.change_id in audit_pending(spec, only=[change])
    return TakeOver(owner.env, owner.release, owner.run_id, why, outcome, change.change_id, audited)


def _finish_promotion(local: object) -> str | None:
    """Promote a dead owner's canary, what its killed run left half-started reaped first (so
    production never runs three releases). None when done; else what went wrong."""
    try:
        reap = getattr(local, "reap_orphans", None)
        if reap is not None:
            reap("production")
        local.promote("production")  # type: ignore[attr-defined]
    except Exception as exc:
        return f"finishing the promotion failed: {type(exc).__name__}: {exc}"
    return None


def _beat_since(judged: Owner, now: Owner, why: str) -> bool:
    """A heartbeat went through since the owner was judged stale: it is alive after all."""
    return "heartbeat" in why and now.heartbeat_at > judged.heartbeat_at


def audit_pending(
    spec: ProductSpec, only: list[changes.ProductionChange] | None = None
) -> list[str]:
    """Audit the product's unaudited production changes when a valid token is at hand.

    Without one, or without a usable checkpoint signing key, nothing is written (the audit
    trail must carry the token, and each append is signed) and the changes wait for the audit
    sensor or the next deploy."""
    from dagster_project.core import audit, checkpoints
    from dagster_project.core.identity import approver_identity

    token = os.environ.get(guardrail.TOKEN_ENV_VAR)
    try:
        token = guardrail.verify(token, spec.guardrail.token_sha256)
    except guardrail.ApprovalRefused:
        return []
    try:
        checkpoints.signer()
    except checkpoints.AuditKeyError as exc:
        logger.error("production changes left unaudited: %s", exc)
        return []
    audit.ensure_audit_schema()
    pending = only if only is not None else changes.unaudited(spec.product)
    done = []
    for change in pending:
        payload = changes.audit_payload(change, audited_by=approver_identity(), token=token)
        entry = audit.append(change.change_id, payload)
        if entry.created or only is not None:
            done.append(change.change_id)
    return done


@contextlib.contextmanager
def _reconcile_lock(product: str, env: str) -> Iterator[None]:
    with database.advisory_lock(f"reconcile:{product}:{env}"):
        yield


def _platform(product: str) -> object:
    from dagster_project.core.platform.local import LocalPlatform

    return LocalPlatform(product)
