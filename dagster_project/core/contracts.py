"""The typed contracts between the release's stages, gates, audit, CLI and tests.

One frozen pydantic model per thing that crosses a boundary: what `build` hands on, what each
stage returns (Dagster's IO manager stores it per release partition), what a gate judges, what a
production change records as evidence and what an audit entry holds. Nothing crosses a stage
boundary as a free-form dictionary: a misspelt field is a validation error naming the field, not
a silent `None` three modules later.

Plain Python (pydantic only): the core never imports Dagster.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from dagster_project.core import guardrail


class ContractError(ValueError):
    """A stored value does not match its contract; the message names the field."""


class Contract(BaseModel):
    """Frozen and strict: unknown fields are refused, fields are never reassigned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def parse(cls, data: Any) -> Any:
        """Validate stored data (a dict from JSON, or an instance); errors name each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ContractError(f"invalid {cls.__name__}: {field_errors(exc)}") from None


def field_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in exc.errors()
    )


KnobValue = str | int | float | bool


# ------------------------------------------------------------------------------------ build


class ArtifactRecord(Contract):
    """What `build` hands on: the artifact pushed to the registry (content-addressed)."""

    product: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    path: str
    size_bytes: int = Field(ge=0)
    settings: dict[str, KnobValue] = Field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------- migrations


FindingSource = Literal["sqlfluff", "squawk", "release", "compat", "history"]


class Finding(Contract):
    """A problem in a migration file, from any of the migration gates."""

    source: FindingSource
    file: str
    line: int | None = None
    rule: str
    message: str
    help: str = ""

    def line_text(self) -> str:
        """`file:line rule — message — how to fix`, as the CLI prints it."""
        from pathlib import Path

        where = Path(self.file).name or "(unknown file)"
        if self.line:
            where += f":{self.line}"
        fix = f" — {self.help.strip()}" if self.help.strip() else ""
        return f"  {where} {self.rule} — {self.message.strip()}{fix}"


class Waiver(Contract):
    """A safety rule waived for one statement, with its reason (shown in the audit entry)."""

    rule: str
    file: str
    line: int
    reason: str
    message: str


MigrationGate = Literal["migration_lint", "migration_safety", "migration_history"]


class MigrationGateReport(Contract):
    """Lint, safety, compatibility and history of one environment's migrations, and what was
    applied (only when nothing blocked)."""

    env: str
    migrations_dir: str
    linted_files: list[str]
    lint_cached: int = 0
    lint_findings: list[Finding] = Field(default_factory=list)
    safety_findings: list[Finding] = Field(default_factory=list)  # squawk and our own rules
    compat_findings: list[Finding] = Field(default_factory=list)
    history_problems: list[str] = Field(default_factory=list)
    safety_errors: list[str] = Field(default_factory=list)  # the checker itself failed
    waivers: list[Waiver] = Field(default_factory=list)
    pending_before: list[str] = Field(default_factory=list)
    applied: list[str] = Field(default_factory=list)
    blocked_by: list[MigrationGate] = Field(default_factory=list)
    seconds: float = 0.0

    def unsafe(self) -> list[Finding]:
        """Everything `migration_safety` blocks on: rules, compatibility and history."""
        history = [
            Finding(source="history", file="(history)", rule="history", message=problem)
            for problem in self.history_problems
        ]
        return [*self.safety_findings, *self.compat_findings, *history]


class DriftDifference(Contract):
    kind: str  # table, column, constraint, index, sequence, view, function, enum, ...
    object: str  # qualified name, e.g. public.orders.total_cents
    change: Literal["missing", "unexpected", "changed"]
    expected: dict[str, JsonValue] | None = None
    actual: dict[str, JsonValue] | None = None


class SchemaDrift(Contract):
    """A live schema compared with the one its applied migrations define."""

    env: str
    differences: list[DriftDifference]
    expected_count: int
    actual_count: int
    summary: str
    markdown: str
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ smoke


SmokeSection = Literal["smoke", "edge_cache", "worker_dlq"]


class SmokeRow(Contract):
    section: SmokeSection
    name: str
    passed: bool
    detail: str
    seconds: float = Field(ge=0)


class SmokeReport(Contract):
    """The outcome of one smoke run (the rows are filled while it runs; fields never change)."""

    product: str
    env: str
    expected_version: str
    run_id: str
    edge_url: str
    sections: list[SmokeSection]  # the sections that were asked for
    started_at: str
    finished_at: str = ""
    rows: list[SmokeRow] = Field(default_factory=list)
    # GET requests answered 5xx once and retried (a smoke suite checks function, not error
    # rates: those are the canary's statistical job); listed so nothing is hidden.
    retries: list[str] = Field(default_factory=list)

    def section_rows(self, section: str) -> list[SmokeRow]:
        return [row for row in self.rows if row.section == section]

    def passed(self, section: str | None = None) -> bool:
        """True only if the section was run, has rows, and every row passed. Without a
        section: every section that was asked for passed."""
        if section is None:
            return bool(self.sections) and all(self.passed(s) for s in self.sections)
        rows = self.section_rows(section)
        return section in self.sections and bool(rows) and all(row.passed for row in rows)

    def failures(self, section: str | None = None) -> list[SmokeRow]:
        rows = self.rows if section is None else self.section_rows(section)
        return [row for row in rows if not row.passed]

    def verdict(self, section: str) -> str:
        if section not in self.sections:
            return "NOT RUN"
        if not self.section_rows(section):
            return "FAILED (no checks ran)"
        return "PASSED" if self.passed(section) else "FAILED"

    def summary(self) -> str:
        """One line per section: verdict, counts and the first failure."""
        lines = [
            f"smoke of {self.product} {self.expected_version} in {self.env} "
            f"(run {self.run_id}, edge {self.edge_url}): "
            f"{'PASSED' if self.passed() else 'FAILED'}"
        ]
        for section in self.sections:
            rows = self.section_rows(section)
            ok = sum(row.passed for row in rows)
            line = f"  {section}: {self.verdict(section)} ({ok}/{len(rows)} checks passed)"
            failed = self.failures(section)
            if failed:
                line += f"; first failure: {failed[0].name}: {failed[0].detail}"
            lines.append(line)
        return "\n".join(lines)


class StagingSmokeReport(Contract):
    """What `staging_smoke` returns: the release deployed to staging and its smoke run."""

    version: str
    artifact_sha256: str
    edge_url: str
    smoke: SmokeReport
    seconds: float = 0.0


# ----------------------------------------------------------------------------------- canary


class TrackRef(Contract):
    """A version serving on a track of an environment."""

    version: str
    artifact_sha256: str


class GateResult(Contract):
    """One blocking check upstream, as a stage found its latest evaluation."""

    check: str
    status: str  # PASSED, NEVER_EVALUATED, FAILED, ..., PASSED_ON_OTHER_ARTIFACT <sha>

    @property
    def passed(self) -> bool:
        return self.status == "PASSED"


class MetricRow(Contract):
    """One metric judged at one canary step (or during the watch after promotion)."""

    step: int
    weight: int
    metric: str
    baseline: float | None = None
    canary: float | None = None
    threshold: float | str | None = None
    p_value: float | None = None
    verdict: str
    reason: str = ""


class Snapshot(Contract):
    """A monitoring chart written during the canary, with the hash the audit verifies."""

    name: str
    path: str
    sha256: str


CanaryOutcome = Literal["already_live", "superseded", "blocked", "aborted", "passed"]


class CanaryStageReport(Contract):
    """What `canary` returns. `deployed` says whether production carried its traffic."""

    version: str
    artifact_sha256: str
    previous: TrackRef | None
    outcome: CanaryOutcome
    reason: str
    approver: str
    gate: list[GateResult] = Field(default_factory=list)
    verdict: str = "not judged"
    steps: list[MetricRow] = Field(default_factory=list)
    snapshots: list[Snapshot] = Field(default_factory=list)
    drift: SchemaDrift | None = None
    migrations: MigrationGateReport | None = None
    deployed: bool = False
    rollback_seconds: float | None = None
    change_id: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


# -------------------------------------------------------------------------------- promotion


class PurgedEndpoint(Contract):
    """An endpoint whose contract changed, and the surrogate keys purged for it."""

    path: str
    surrogate_keys: list[str]


class WatchReport(Contract):
    """The new version at 100% after promotion, the previous one kept at 0%, judged."""

    passed: bool
    smoke_passed: bool
    verdict: str
    reason: str
    seconds: float
    steps: list[MetricRow] = Field(default_factory=list)
    smoke: SmokeReport | None = None


PromotionOutcome = Literal["already_live", "promoted", "rolled_back"]


class PromotionReport(Contract):
    """What `promotion` returns."""

    version: str
    artifact_sha256: str
    approver: str
    previous: TrackRef | None
    outcome: PromotionOutcome
    gate: list[GateResult] = Field(default_factory=list)
    purged: list[PurgedEndpoint] = Field(default_factory=list)
    watch: WatchReport | None = None
    post_deploy_smoke: SmokeReport | None = None
    change_id: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------- changes and the audit


ChangeOutcome = Literal["promoted", "aborted", "rolled_back"]


class ChangeEvidence(Contract):
    """What a production change records besides who and what: the verdicts and evidence the
    audit entry carries. Every field is optional; which ones are set depends on the outcome."""

    # Rows recorded by an older version of this module may carry keys no longer written.
    model_config = ConfigDict(frozen=True, extra="ignore")

    reason: str | None = None
    approver: str | None = None
    smoke_verdict: str | None = None
    slo_verdict: str | None = None
    slo_steps: list[MetricRow] = Field(default_factory=list)
    snapshots: list[Snapshot] = Field(default_factory=list)
    staging_checks: list[GateResult] = Field(default_factory=list)
    purged: list[PurgedEndpoint] = Field(default_factory=list)
    waivers: list[Waiver] = Field(default_factory=list)
    watch: WatchReport | None = None
    # A rollback (`release rollback`, a failed watch): the release traffic went back to.
    from_release: str | None = None
    restored_release: str | None = None
    restored_artifact_sha256: str | None = None
    # Recorded by the reconciler for a run that died.
    reconciled: bool = False
    phase: str | None = None


class AuditPayload(Contract):
    """The audit entry of one production change: the five fields the architecture note
    requires (timestamp, identity, artifact SHA, environment, guardrail token) and the
    auditor's context. The one definition of this shape (`changes.audit_payload` fills it,
    `core/audit.py` stores it, the compliance check reads it)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    timestamp: str
    identity: str
    artifact_sha256: str
    environment: Literal["production"] = "production"
    guardrail_token: str = Field(repr=False)  # recorded here and nowhere else
    product: str
    release: str
    run_id: str
    change_id: str
    outcome: ChangeOutcome
    approver: str
    audited_by: str
    previous_artifact_sha256: str | None = None
    smoke_verdict: str | None = None
    slo_verdict: str | None = None
    slo_steps: list[MetricRow] = Field(default_factory=list)
    snapshots: list[Snapshot] = Field(default_factory=list)
    waivers: list[Waiver] = Field(default_factory=list)
    reason: str | None = None
    # The blocking checks the release passed before production (the ticket's gate table).
    gates: list[GateResult] = Field(default_factory=list)
    # A rollback: the release production went back to (this release for `release rollback`,
    # the previous one when this release's watch failed).
    restored_release: str | None = None
    # A promotion: the endpoints whose contract changed and the surrogate keys purged for them.
    purged: list[PurgedEndpoint] = Field(default_factory=list)

    def __repr_args__(self) -> Any:
        yield from super().__repr_args__()
        yield "guardrail_token", guardrail.mask(self.guardrail_token)

    def stored(self) -> dict[str, Any]:
        """The JSON object the trail stores (and hashes)."""
        return self.model_dump(mode="json")


class Checkpoint(Contract):
    """A signed statement, kept outside the database, that the audit trail `trail` held `seq`
    entries ending in `head_hash` at `time` (core/checkpoints.py). `signature` is Ed25519 by
    the key `key_id` over `signed_text()`."""

    format: Literal["release-audit-checkpoint/1"] = "release-audit-checkpoint/1"
    trail: str
    seq: int = Field(ge=1)
    head_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    time: str
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str = ""

    def signed_text(self) -> str:
        import json

        body = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ChecklistItem(Contract):
    """One item of the compliance checklist for one audit entry, with its evidence.
    `passed` is None when the item does not apply to the change's outcome (said in `detail`)."""

    change_id: str
    item: str
    passed: bool | None
    detail: str


class StageMaterialization(Contract):
    """A materialization of one release stage for a partition, as the instance has it (the
    change's run's own, else one of the entry's artifact, else the latest; none: run_id None)."""

    stage: str
    run_id: str | None = None
    artifact_sha256: str | None = None


class RunFacts(Contract):
    """What the Dagster instance says about the run that made a production change (checklist
    item 2): its status (None: no such run), whether the check runs inside it, the release
    stage steps of that run that did not succeed, and each stage's materialization."""

    run_id: str
    status: str | None
    current: bool = False
    failed_steps: list[str] = Field(default_factory=list)
    stages: list[StageMaterialization] = Field(default_factory=list)


class SignOff(Contract):
    """The audit ticket written for an entry (content-addressed in the evidence store) and the
    checkpoint that covered the entry when it was written."""

    ticket_html: str
    ticket_html_sha256: str
    ticket_markdown: str
    ticket_markdown_sha256: str
    checklist_passed: bool
    checkpoint: Checkpoint | None = None


class AuditEntryRef(Contract):
    seq: int
    change_id: str
    outcome: ChangeOutcome
    entry_hash: str
    created: bool
    sign_off: SignOff | None = None


class AuditReport(Contract):
    """What `audit` returns: one trail entry per production change of the release."""

    release: str
    entries: list[AuditEntryRef]
