"""The compliance checklist of one audit entry (the architecture note's footnote), item by item,
each with its evidence, each able to fail on its own:

1. the artifact's SHA-256 recomputed from the registry's bytes;
2. the Dagster run that made the change completed the release's stages, and every stage up to
   promotion is materialised for the partition with the entry's artifact (facts read from the
   instance by the caller: `RunFacts`, never the payload);
3. the token recorded in the entry matches the spec's fingerprint (not merely present);
4. sign-off: (a) post-deploy smoke passed, (b) the SLO verdict passed, (c) every snapshot the
   entry names is present with a matching hash, (d) the checkpoint covering the entry verifies.

Which items apply depends on the outcome. A `promoted` change is a deploy: every item applies.
An `aborted` canary, and a release its watch rolled back, are not deploys: 2, 4a and 4b do not
apply (passed None, said in the detail); their snapshots, if any, must still match, and their
checkpoint must verify. A `release rollback` (no Dagster run, recorded under the release it
restored) put an earlier release back: 2 and 4b do not apply, 4a does (the smoke of what it
restored).
Items that apply must pass; an item that does not apply never counts as a pass of the deploy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dagster_project.core import evidence, guardrail
from dagster_project.core.contracts import (
    AuditPayload,
    ChecklistItem,
    Checkpoint,
    ContractError,
    RunFacts,
)

ITEM_PRESENT = "0 audit entry present"
ITEM_READABLE = "0 audit entry readable"
ITEM_ARTIFACT = "1 artifact SHA recomputed from the registry"
ITEM_RUN = "2 deploy run completed its stages"
ITEM_TOKEN = "3 guardrail token matches the spec's fingerprint"
ITEM_SMOKE = "4a post-deploy smoke passed"
ITEM_SLO = "4b SLO verdict passed"
ITEM_SNAPSHOTS = "4c snapshots present, hashes match"
ITEM_CHECKPOINT = "4d checkpoint covering the entry verifies"

# The stages a deploy materialises before its audit (assets/common.STAGES without `audit`).
DEPLOY_STAGES = ("build", "schema_migration_check", "staging_smoke", "canary", "promotion")
# Run statuses of a run that has not ended (Dagster's DagsterRunStatus values).
UNFINISHED = frozenset({"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"})

RunFactsSource = Callable[[AuditPayload], RunFacts | None]
Covering = Callable[[int, str], tuple[Checkpoint | None, str | None]]


def checklist(
    change_id: str,
    entry: Any,
    *,
    token_sha256: str,
    verify_artifact: Callable[[str], bool],
    run_facts: RunFactsSource,
    covering: Covering,
) -> list[ChecklistItem]:
    """The items for one entry (an `audit.AuditEntry`: `.seq`, `.entry_hash`, `.payload`); an
    entry missing or not matching the contract fails item 0, never a pass."""

    def item(name: str, passed: bool | None, detail: str) -> ChecklistItem:
        return ChecklistItem(change_id=change_id, item=name, passed=passed, detail=detail)

    if entry is None:
        return [item(ITEM_PRESENT, False, "no entry in the audit trail")]
    try:
        payload: AuditPayload = AuditPayload.parse(entry.payload)
    except ContractError as exc:
        return [item(ITEM_READABLE, False, str(exc)[:300])]
    outcome = payload.outcome
    rows = [
        item(ITEM_ARTIFACT, *_artifact(payload.artifact_sha256, verify_artifact)),
        item(ITEM_RUN, *_run(payload, run_facts)),
        item(ITEM_TOKEN, *_token(payload, token_sha256)),
    ]
    smoke, slo = payload.smoke_verdict, payload.slo_verdict
    if outcome == "aborted" or _watch_rollback(payload):
        why = "the canary was aborted" if outcome == "aborted" else "its watch rolled it back"
        rows.append(item(ITEM_SMOKE, None, f"not applicable: {why} (smoke {smoke})"))
        rows.append(item(ITEM_SLO, None, f"not applicable: {why} (SLO verdict {slo})"))
    elif outcome == "rolled_back":
        rows.append(item(ITEM_SMOKE, smoke == "passed", f"smoke of the restored release {smoke}"))
        rows.append(item(ITEM_SLO, None, f"not applicable: a rollback (SLO verdict {slo})"))
    else:
        rows.append(item(ITEM_SMOKE, smoke == "passed", f"post-deploy smoke {smoke}"))
        rows.append(item(ITEM_SLO, slo == "pass", f"SLO verdict {slo}"))
    rows.append(item(ITEM_SNAPSHOTS, *_snapshots(payload)))
    rows.append(item(ITEM_CHECKPOINT, *_checkpoint(entry, covering)))
    return rows


def passed(rows: list[ChecklistItem]) -> bool:
    """Every item that applies passed (and there is at least one)."""
    return bool(rows) and all(row.passed is not False for row in rows)


def failed(rows: list[ChecklistItem]) -> list[ChecklistItem]:
    return [row for row in rows if row.passed is False]


def _watch_rollback(payload: AuditPayload) -> bool:
    """A rollback recorded under the release that was removed (its watch failed), not under
    the release `release rollback` restored."""
    return payload.outcome == "rolled_back" and payload.restored_release != payload.release


def _artifact(sha: str, verify_artifact: Callable[[str], bool]) -> tuple[bool, str]:
    try:
        intact = bool(verify_artifact(sha))
    except Exception as exc:  # fail closed: a registry that cannot answer is not a pass
        return False, f"sha256 {sha}: {type(exc).__name__}: {str(exc)[:200]}"
    if intact:
        return True, f"sha256 {sha} recomputed from the registry's bytes"
    return False, f"the registry's copy does not hash to sha256 {sha}"


def _run(payload: AuditPayload, run_facts: RunFactsSource) -> tuple[bool | None, str]:
    if payload.outcome == "aborted":
        return None, f"not applicable: the canary was aborted (run {payload.run_id})"
    if payload.outcome == "rolled_back":
        return (
            None,
            f"not applicable: a rollback restored an earlier release (run {payload.run_id})",
        )
    run = run_facts(payload)
    if run is None or run.status is None:
        return False, f"run {payload.run_id} is not on the Dagster instance"
    problems = []
    if run.failed_steps:
        problems.append(f"steps that did not succeed: {', '.join(run.failed_steps)}")
    if not run.current and run.status in UNFINISHED:
        problems.append(f"run still {run.status}")
    by_stage = {m.stage: m for m in run.stages}
    for stage in DEPLOY_STAGES:
        found = by_stage.get(stage)
        if found is None or found.run_id is None:
            problems.append(f"{stage} not materialised for {payload.release}")
        elif found.artifact_sha256 != payload.artifact_sha256:
            problems.append(f"{stage} materialised artifact {str(found.artifact_sha256)[:12]}")
        elif stage == "promotion" and found.run_id != run.run_id:
            problems.append(f"promotion materialised by run {found.run_id[:8]}, not this one")
    state = "in progress (this check runs in it)" if run.current else run.status
    if problems:
        return False, f"run {run.run_id[:8]} {state}: {'; '.join(problems)}"
    return True, (
        f"run {run.run_id[:8]} {state}; {', '.join(DEPLOY_STAGES)} materialised for "
        f"{payload.release} with sha256 {payload.artifact_sha256[:12]}"
    )


def _token(payload: AuditPayload, token_sha256: str) -> tuple[bool, str]:
    import hmac

    token = payload.guardrail_token
    if not token:
        return False, "no token recorded"
    if hmac.compare_digest(guardrail.fingerprint(token), token_sha256):
        return True, f"{guardrail.mask(token)} matches fingerprint {token_sha256[:12]}"
    return False, f"{guardrail.mask(token)} does not match fingerprint {token_sha256[:12]}"


def _snapshots(payload: AuditPayload) -> tuple[bool | None, str]:
    snapshots = payload.snapshots
    if not snapshots:
        if payload.outcome == "promoted":
            return False, "no snapshots attached"
        return None, "not applicable: no snapshots recorded"
    problems = [p for s in snapshots if (p := evidence.check(s.path, s.sha256))]
    if problems:
        return False, "; ".join(problems)
    return True, ", ".join(f"{s.name} {s.sha256[:12]}" for s in snapshots)


def _checkpoint(entry: Any, covering: Covering) -> tuple[bool, str]:
    try:
        checkpoint, problem = covering(entry.seq, entry.entry_hash)
    except Exception as exc:  # fail closed
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if problem or checkpoint is None:
        return False, problem or f"no checkpoint covers seq {entry.seq}"
    return True, (
        f"entry seq {entry.seq} hash {entry.entry_hash[:12]} covered by checkpoint seq "
        f"{checkpoint.seq} ({checkpoint.time}, key {checkpoint.key_id})"
    )
