"""Production back to an earlier promoted release: `release rollback` and the watch after a
promotion.

The same mechanism as a canary, owned like one: the target's artifact (from the registry, so
only what was built and pushed) starts on the canary track, traffic shifts to it through the
production edge in the spec's steps, each step held only while the edge and both tracks stay
up and ready, then it is promoted to stable at 100%. The change is recorded as `rolled_back`
and audited with the presented token. Any failure returns production to the version that was
live, and the operation fails with a message that says so.

`choose_target` decides which release (pure, tested as a table). Plain Python: no Dagster.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dagster_project.core import changes, guardrail, ownership, registry
from dagster_project.core.contracts import ChangeEvidence
from dagster_project.core.spec import load_spec

logger = logging.getLogger("release.rollback")

ENV = "production"
STEP_HOLD_SECONDS = 1.0  # each weight is held this long, watched for outages, before the next


class RollbackRefused(ValueError):
    """Nothing to roll back to, or the named release was never promoted: production untouched."""


class RollbackFailed(RuntimeError):
    """The target could not take production; production is back on the version that was live."""


@dataclass(frozen=True)
class RollbackTarget:
    release: str
    artifact_sha256: str


@dataclass(frozen=True)
class RollbackResult:
    product: str
    from_release: str
    to_release: str
    artifact_sha256: str
    change_id: str
    audit_seq: int
    smoke_passed: bool
    seconds: float


def choose_target(
    history: Sequence[changes.ProductionChange], live_sha: str | None, to_version: str | None
) -> RollbackTarget:
    """The release to return to: `to_version` if it ever served production, else the newest
    release that served production whose artifact differs from the live one. A promotion
    served its own release; a rollback served the release it restored (never the one it
    removed, so a release whose watch failed is not a target)."""
    served = [s for s in map(served_by, history) if s is not None]
    if live_sha is None:
        raise RollbackRefused("nothing is live in production: there is nothing to roll back")
    if to_version is not None:
        named = [t for t in served if t.release == to_version]
        if not named:
            known = sorted({t.release for t in served}) or ["none"]
            raise RollbackRefused(
                f"release {to_version!r} was never promoted to production; promoted releases: "
                f"{', '.join(known)}"
            )
        if named[-1].artifact_sha256 == live_sha:
            raise RollbackRefused(f"release {to_version} is already live in production")
        return named[-1]
    for target in reversed(served):
        if target.artifact_sha256 != live_sha:
            return target
    raise RollbackRefused("no earlier promoted release to roll back to")


def served_by(change: changes.ProductionChange) -> RollbackTarget | None:
    """The release a production change left serving, if it left one."""
    if change.outcome == "promoted":
        return RollbackTarget(change.release, change.artifact_sha256)
    restored = change.details.restored_release
    restored_sha = change.details.restored_artifact_sha256
    if change.outcome == "rolled_back" and restored and restored_sha:
        return RollbackTarget(restored, restored_sha)
    return None


def rollback(
    product: str,
    *,
    to_version: str | None,
    token: str | None,
    actor: str,
    reason: str = "requested by an operator",
    run_id: str | None = None,
    echo: Callable[[str], None] = lambda line: None,
    platform: Any = None,
) -> RollbackResult:
    """Roll production back; see the module doc. Raises RollbackRefused before touching
    anything, ApprovalRefused without a valid token, ProductionOwned while another release
    owns production, RollbackFailed when the target could not take production."""
    from dagster_project.core import audit, checkpoints, reconcile
    from dagster_project.core.smoke import post_deploy_smoke

    started = time.monotonic()
    spec = load_spec(product)
    token = guardrail.verify(token, spec.guardrail.token_sha256)
    checkpoints.signer()  # the audit entry will be signed: refuse an unusable key up front
    if platform is None:
        from dagster_project.core.platform.local import LocalPlatform

        platform = LocalPlatform(product)
        platform.up()
    live = platform.current(ENV).get("stable")
    live_sha = (live or {}).get("artifact_sha")
    target = choose_target(changes.history(product), live_sha, to_version)
    artifact = registry.fetch(target.artifact_sha256)
    run_id = run_id or f"rollback-{uuid.uuid4().hex}"
    ownership.acquire(
        product,
        ENV,
        run_id=run_id,
        release=target.release,
        artifact_sha256=target.artifact_sha256,
        previous_artifact_sha256=live_sha,
        phase="rollback",
        wait_seconds=spec.production.owner_wait_seconds,
        stale_after_seconds=spec.production.owner_heartbeat_timeout_seconds,
        run_in_progress=lambda run: None,
        take_over=lambda owner, why: reconcile.take_over(spec, owner, why, platform=platform),
        on_wait=lambda owner: echo(f"waiting for {owner.label}, which owns production"),
    )
    try:
        with ownership.heartbeat_while(
            product, ENV, run_id, lost_after=spec.production.owner_heartbeat_timeout_seconds / 2
        ):
            # Re-read now that production is ours: another release may have moved it while
            # this one waited, and the choice must be made against what is live now.
            now = (platform.current(ENV).get("stable") or {}).get("artifact_sha")
            if now != live_sha:
                raise RollbackRefused(
                    "production changed while the rollback waited for it; run it again"
                )
            echo(f"rolling {product} back from {live['version']} to {target.release}")
            _shift(platform, spec, artifact, echo)
            smoke = post_deploy_smoke(spec, platform, target.release)
            change = changes.record(
                product=product,
                release=target.release,
                outcome="rolled_back",
                artifact_sha256=target.artifact_sha256,
                previous_artifact_sha256=live_sha,
                run_id=run_id,
                details=ChangeEvidence(
                    approver=actor,
                    reason=f"rolled back from {live['version']}: {reason}",
                    from_release=live["version"],
                    restored_release=target.release,
                    restored_artifact_sha256=target.artifact_sha256,
                    smoke_verdict="passed" if smoke.passed("smoke") else "failed",
                    slo_verdict="not judged (rollback)",
                ),
            )
            entry = audit.append(
                change.change_id, changes.audit_payload(change, audited_by=actor, token=token)
            )
    finally:
        try:
            ownership.release(product, ENV, run_id)
        except Exception as exc:  # the original error matters more; the reconciler frees it
            logger.error("releasing production after the rollback failed: %s", exc)
    return RollbackResult(
        product=product,
        from_release=live["version"],
        to_release=target.release,
        artifact_sha256=target.artifact_sha256,
        change_id=change.change_id,
        audit_seq=entry.seq,
        smoke_passed=smoke.passed("smoke"),
        seconds=round(time.monotonic() - started, 3),
    )


def _shift(
    platform: Any, spec: Any, artifact: registry.Artifact, echo: Callable[[str], None]
) -> None:
    """Canary track -> the spec's weights -> promoted; back to the live version on any failure."""
    weights = [s.weight for s in spec.canary.steps]
    try:
        platform.deploy(ENV, "canary", artifact)
        for weight in weights:
            since = time.time()
            platform.set_weights(ENV, {"stable": 100 - weight, "canary": weight})
            echo(f"  {artifact.version} at {weight}%")
            time.sleep(STEP_HOLD_SECONDS)
            outages = platform.outages(ENV, since) if hasattr(platform, "outages") else []
            if outages:
                raise RollbackFailed(f"outage at {weight}%: {'; '.join(outages)}")
        platform.promote(ENV)
        echo(f"  {artifact.version} at 100%, promoted")
    except BaseException as exc:
        try:
            if "canary" in platform.current(ENV):
                platform.rollback(ENV)
        except Exception as cleanup:  # report the original error; the reconciler finishes
            logger.error("returning production to the live version failed: %s", cleanup)
        if isinstance(exc, RollbackFailed) or not isinstance(exc, Exception):
            raise
        raise RollbackFailed(
            f"rollback to {artifact.version} failed ({type(exc).__name__}: {exc}); "
            "production is back on the version that was live"
        ) from exc
