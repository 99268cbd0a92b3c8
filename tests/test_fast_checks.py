"""Fast tests of every gate: the asset check definitions invoked directly (Dagster's direct
invocation of an `AssetChecksDefinition`: the upstream value and fake resources as arguments),
and the pure judges the check modules expose. No Postgres, no platform processes.

The real-path tests of the same gates (tests/test_release_e2e.py, test_production_faults.py,
test_migration_*.py, test_drift.py, test_smoke.py) stay: these only pin each gate's verdict
for contract values built by hand, above all that no data, an empty report, an inconclusive
canary or an unreadable audit entry is never a pass.

Not here: the staging `schema_drift` check (it snapshots the live staging schema) and
`data_quality` (Great Expectations against staging tables): both need Postgres.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from checks import release_checks
from checks.artifact import artifact_integrity_check
from checks.common import rows_result
from checks.compliance import compliance_check, judge_compliance
from checks.edge_cache import edge_cache_check
from checks.edge_vcl import edge_vcl_check
from checks.migrations import drift_result, migration_checks, production_drift_result
from checks.slo import judge_slo, slo_regression_check
from checks.smoke import judge_post_deploy, judge_smoke, post_deploy_smoke_check, smoke_check
from checks.worker_dlq import worker_dlq_check
from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project.core import checklist as items
from dagster_project.core.contracts import (
    ArtifactRecord,
    AuditEntryRef,
    AuditPayload,
    AuditReport,
    CanaryStageReport,
    ChecklistItem,
    Checkpoint,
    DriftDifference,
    Finding,
    MetricRow,
    MigrationGateReport,
    PromotionReport,
    RunFacts,
    SchemaDrift,
    SmokeReport,
    SmokeRow,
    Snapshot,
    StageMaterialization,
    StagingSmokeReport,
    TrackRef,
    Waiver,
    WatchReport,
)
from dagster_project.core.guardrail import mask
from dagster_project.core.registry import ArtifactNotFound
from dagster_project.core.spec import ProductSpec, load_spec
from dagster_project.partitions import releases_partitions
from dagster_project.resources import AuditResource, RegistryResource

# Partitioned check specs are a Dagster preview feature (definitions.py silences it too).
pytestmark = pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")

VERSION = "1.4.0"
SHA = hashlib.sha256(b"4pnihc40q-yj 1.4.0 artifact").hexdigest()
PREVIOUS_SHA = hashlib.sha256(b"4pnihc40q-yj 1.3.0 artifact").hexdigest()
MIGRATIONS = f"/tmp/rt-fast/deployments/{SHA[:12]}/migrations"
RUN_ID = "0f3c5c9e-5d7a-4c1e-9a55-6f1f2d8e4b21"


# --- the check definitions, built as release_checks builds them ---------------------------------


@pytest.fixture(scope="module")
def spec() -> ProductSpec:
    return load_spec(PRODUCT)


@pytest.fixture(scope="module")
def partitions_def(spec: ProductSpec) -> dg.DynamicPartitionsDefinition:
    return releases_partitions(spec.product)


@pytest.fixture(scope="module")
def gates(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> dict[tuple[str, str], dg.AssetChecksDefinition]:
    """Each migration check by (stage, name), from the factory release_checks uses."""
    return {
        (check.asset_key.path[-1], check.name): definition
        for definition in migration_checks(spec, partitions_def)
        for check in definition.check_specs
    }


def test_the_factories_build_the_release_checks_of_the_definitions(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> None:
    """What these tests invoke is what the code location serves: same keys, all blocking."""
    ours = [
        artifact_integrity_check(spec, partitions_def),
        *migration_checks(spec, partitions_def),
        smoke_check(spec, partitions_def),
        edge_cache_check(spec, partitions_def),
        worker_dlq_check(spec, partitions_def),
        slo_regression_check(spec, partitions_def),
        post_deploy_smoke_check(spec, partitions_def),
        compliance_check(spec, partitions_def),
        edge_vcl_check(spec, partitions_def),
    ]
    keys = {key for d in ours for key in d.check_keys}
    served = {key for d in release_checks(spec, partitions_def) for key in d.check_keys}
    assert keys == served - {
        dg.AssetCheckKey(dg.AssetKey([PRODUCT, "staging_smoke"]), "data_quality")
    }
    assert all(s.blocking for d in ours for s in d.check_specs)


def invoke(definition: dg.AssetChecksDefinition, **inputs: Any) -> dg.AssetCheckResult:
    """Direct invocation of a check definition: upstream values and resources by name."""
    result = definition(**inputs)
    assert isinstance(result, dg.AssetCheckResult), result
    return result


def metadata_value(result: dg.AssetCheckResult, key: str) -> Any:
    value = result.metadata[key]
    return getattr(value, "value", value)


def table_rows(result: dg.AssetCheckResult, key: str) -> list[dict[str, Any]]:
    return [record.data for record in result.metadata[key].value.records]


# --- fakes behind the real resource interfaces ------------------------------------------------


class FakeRegistry(RegistryResource):
    """The registry's verify: True for the SHAs whose stored copy re-hashes to its name, False
    for a tampered copy, ArtifactNotFound for a SHA never pushed (like core/registry.py)."""

    intact: list[str] = []
    tampered: list[str] = []

    def verify(self, sha256: str) -> bool:
        if sha256 in self.intact:
            return True
        if sha256 in self.tampered:
            return False
        raise ArtifactNotFound(f"artifact sha256:{sha256} is not in the registry index")


def audit_trail(entries: Mapping[str, Any], checkpoint_problem: str | None = None) -> AuditResource:
    """An audit trail whose `find(change_id)` answers from `entries` (None when absent), like
    `core.audit.find`: an object with `.payload`, the stored JSON dict; `covering` answers with
    a checkpoint at the entry's seq, or `checkpoint_problem`."""

    class FakeAuditTrail(AuditResource):
        def find(self, change_id: str) -> Any:
            return entries.get(change_id)

        def covering(self, seq: int, entry_hash: str) -> tuple[Any, str | None]:
            checkpoint = Checkpoint(
                trail="release_control",
                seq=seq,
                head_hash=entry_hash,
                time="2026-11-30T09:31:13.000+00:00",
                key_id="0123456789abcdef",
                signature="c2lnbmVk",
            )
            return checkpoint, checkpoint_problem

        def append(self, change_id: str, payload: dict[str, Any]) -> Any:
            raise AssertionError("a gate never writes to the audit trail")

    return FakeAuditTrail()


# --- artifact_integrity -------------------------------------------------------------------------


def artifact_record(sha: str = SHA) -> ArtifactRecord:
    return ArtifactRecord(
        product=PRODUCT,
        version=VERSION,
        sha256=sha,
        path=f"/tmp/rt-fast/registry/staging/sha256/{sha}.tar.gz",
        size_bytes=48_213,
        settings={"error_rate": 0.0},
        seconds=0.412,
    )


def test_artifact_integrity_passes_when_the_registry_copy_rehashes(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> None:
    check = artifact_integrity_check(spec, partitions_def)
    result = invoke(check, build=artifact_record(), registry=FakeRegistry(intact=[SHA]))
    assert result.passed is True
    assert result.description == f"registry copy matches sha256 {SHA}"
    assert metadata_value(result, "sha256") == SHA


def test_artifact_integrity_through_an_asset_check_context(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> None:
    """The documented form with a context: resources bound on the context."""
    check = artifact_integrity_check(spec, partitions_def)
    context = dg.build_asset_check_context(resources={"registry": FakeRegistry(tampered=[SHA])})
    result = check(context, artifact_record())
    assert result.passed is False
    assert "does NOT match" in (result.description or "")


def test_artifact_integrity_fails_on_a_tampered_copy(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> None:
    check = artifact_integrity_check(spec, partitions_def)
    result = invoke(check, build=artifact_record(), registry=FakeRegistry(tampered=[SHA]))
    assert result.passed is False
    assert result.description == f"registry copy does NOT match sha256 {SHA}"


def test_artifact_integrity_never_passes_an_artifact_the_registry_does_not_know(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> None:
    """Nothing to verify is an error of the check (its evaluation fails), never a pass."""
    check = artifact_integrity_check(spec, partitions_def)
    with pytest.raises(ArtifactNotFound, match=SHA):
        check(build=artifact_record(), registry=FakeRegistry(intact=[PREVIOUS_SHA]))


# --- migration_lint, migration_safety, schema drift -----------------------------------------


def finding(source: str, name: str, line: int, rule: str, message: str, help: str) -> Finding:
    return Finding(
        source=source,  # type: ignore[arg-type]
        file=f"{MIGRATIONS}/{name}",
        line=line,
        rule=rule,
        message=message,
        help=help,
    )


LINT_FINDING = finding(
    "sqlfluff",
    "0003_add_price.sql",
    2,
    "LT01",
    "Expected single whitespace between naked identifier and keyword 'ADD'.",
    "",
)
SQUAWK_FINDING = finding(
    "squawk",
    "0003_add_price.sql",
    4,
    "require-concurrent-index-creation",
    "During normal index creation, table updates are blocked, but reads are still allowed.",
    "Use `CONCURRENTLY` to avoid blocking writes.",
)
COMPAT_FINDING = finding(
    "compat",
    "0003_add_price.sql",
    6,
    "drop-column-in-use",
    "column public.items.name is read by the running version 1.3.0",
    "Drop it in a later release, after no running version reads it.",
)


def gate_report(**changes: Any) -> MigrationGateReport:
    """A clean staging report: two files linted, one pending and applied."""
    values: dict[str, Any] = {
        "env": "staging",
        "migrations_dir": MIGRATIONS,
        "linted_files": ["0001_initial.sql", "0002_seed_items.sql"],
        "lint_cached": 1,
        "pending_before": ["0002_seed_items.sql"],
        "applied": ["0002_seed_items.sql"],
        "seconds": 1.84,
    }
    values.update(changes)
    return MigrationGateReport(**values)


def test_migration_lint_passes_clean_files(gates: dict[tuple[str, str], Any]) -> None:
    result = invoke(
        gates["schema_migration_check", "migration_lint"], schema_migration_check=gate_report()
    )
    assert result.passed is True
    assert result.description == "0 finding(s) in 2 file(s)"
    assert metadata_value(result, "files") == 2
    assert metadata_value(result, "cached") == 1


def test_migration_lint_fails_on_a_finding(gates: dict[tuple[str, str], Any]) -> None:
    report = gate_report(lint_findings=[LINT_FINDING], blocked_by=["migration_lint"], applied=[])
    result = invoke(
        gates["schema_migration_check", "migration_lint"], schema_migration_check=report
    )
    assert result.passed is False
    assert result.description == "1 finding(s) in 2 file(s)"
    assert table_rows(result, "findings")[0]["rule"] == "LT01"


def test_migration_lint_with_nothing_linted_is_inconclusive_never_a_pass(
    gates: dict[tuple[str, str], Any],
) -> None:
    report = gate_report(linted_files=[], pending_before=[], applied=[])
    result = invoke(
        gates["schema_migration_check", "migration_lint"], schema_migration_check=report
    )
    assert result.passed is False
    assert "inconclusive" in (result.description or "")


def test_migration_safety_passes_safe_pending_migrations(gates: dict[tuple[str, str], Any]) -> None:
    result = invoke(
        gates["schema_migration_check", "migration_safety"], schema_migration_check=gate_report()
    )
    assert result.passed is True
    assert result.description == "pending migrations are safe"
    assert table_rows(result, "pending") == [{"file": "0002_seed_items.sql"}]


def test_a_waived_rule_is_not_a_finding_and_is_shown(gates: dict[tuple[str, str], Any]) -> None:
    waiver = Waiver(
        rule="adding-not-nullable-field",
        file=f"{MIGRATIONS}/0003_add_price.sql",
        line=3,
        reason="table is empty in every environment (seeded in 0004)",
        message="Adding a NOT NULL field requires a default.",
    )
    report = gate_report(waivers=[waiver])
    result = invoke(
        gates["schema_migration_check", "migration_safety"], schema_migration_check=report
    )
    assert result.passed is True
    assert table_rows(result, "waivers")[0]["reason"].startswith("table is empty")


@pytest.mark.parametrize(
    ("changes", "expected_line"),
    [
        (
            {"safety_findings": [SQUAWK_FINDING]},
            "  0003_add_price.sql:4 require-concurrent-index-creation — During normal index "
            "creation, table updates are blocked, but reads are still allowed. — Use "
            "`CONCURRENTLY` to avoid blocking writes.",
        ),
        (
            {"compat_findings": [COMPAT_FINDING]},
            "  0003_add_price.sql:6 drop-column-in-use — column public.items.name is read by "
            "the running version 1.3.0 — Drop it in a later release, after no running version "
            "reads it.",
        ),
        (
            {
                "history_problems": [
                    "0001_initial.sql was edited after it was applied (sha256 differs)"
                ]
            },
            "  (history) history — 0001_initial.sql was edited after it was applied (sha256 "
            "differs)",
        ),
        (
            # The checker itself failed: nothing was judged, so nothing passes.
            {"safety_errors": ["squawk exited 2: unable to parse 0003_add_price.sql"]},
            "  error — squawk exited 2: unable to parse 0003_add_price.sql",
        ),
    ],
    ids=["squawk", "compat", "history", "checker_error"],
)
def test_migration_safety_fails_naming_file_line_rule_and_fix(
    gates: dict[tuple[str, str], Any], changes: dict[str, Any], expected_line: str
) -> None:
    report = gate_report(**changes, blocked_by=["migration_safety"], applied=[])
    result = invoke(
        gates["schema_migration_check", "migration_safety"], schema_migration_check=report
    )
    assert result.passed is False
    assert (result.description or "").splitlines()[1:] == [expected_line]


def drift(*differences: DriftDifference, env: str = "production") -> SchemaDrift:
    return SchemaDrift(
        env=env,
        differences=list(differences),
        expected_count=14,
        actual_count=14
        + sum(d.change == "unexpected" for d in differences)
        - sum(d.change == "missing" for d in differences),
        summary=f"{len(differences)} difference(s)",
        markdown="| change | kind | object |\n|---|---|---|\n"
        + "".join(f"| {d.change} | {d.kind} | {d.object} |\n" for d in differences),
        seconds=0.231,
    )


HOTFIX_INDEX = DriftDifference(
    kind="index",
    object="public.items_name_idx",
    change="unexpected",
    actual={"definition": "CREATE INDEX items_name_idx ON public.items USING btree (name)"},
)
PRICE_TYPE = DriftDifference(
    kind="column",
    object="public.items.price_cents",
    change="changed",
    expected={"type": "integer", "nullable": False},
    actual={"type": "bigint", "nullable": False},
)


def test_drift_result_passes_a_schema_that_matches_its_migrations() -> None:
    result = drift_result(drift(env="staging"), "staging")
    assert result.passed is True
    assert result.description == "staging schema matches its migrations"
    assert metadata_value(result, "objects_expected") == 14


def test_drift_result_fails_and_names_each_difference() -> None:
    result = drift_result(drift(HOTFIX_INDEX, PRICE_TYPE), "production")
    assert result.passed is False
    assert result.description == (
        "production schema drift: 2 difference(s): unexpected index public.items_name_idx; "
        "changed column public.items.price_cents"
    )
    assert "public.items_name_idx" in metadata_value(result, "differences")


def canary_report(outcome: str, **changes: Any) -> CanaryStageReport:
    values: dict[str, Any] = {
        "version": VERSION,
        "artifact_sha256": SHA,
        "previous": TrackRef(version="1.3.0", artifact_sha256=PREVIOUS_SHA),
        "outcome": outcome,
        "reason": "",
        "approver": "ci:github:release-bot",
    }
    values.update(changes)
    return CanaryStageReport(**values)


STEPS = [
    MetricRow(
        step=step,
        weight=weight,
        metric=metric,
        baseline=base,
        canary=can,
        threshold=threshold,
        p_value=p,
        verdict="pass",
        reason="within threshold",
    )
    for step, weight in ((1, 5), (2, 25), (3, 50))
    for metric, base, can, threshold, p in (
        ("error_rate", 0.002, 0.003, "+0.01 abs", 0.41),
        ("latency_shift", 0.018, 0.019, "p<0.01 and +10%", 0.37),
        ("p99_latency", 0.061, 0.064, "<= 0.5s", None),
    )
]
FAILED_STEPS = [
    *STEPS[:3],
    MetricRow(
        step=2,
        weight=25,
        metric="error_rate",
        baseline=0.002,
        canary=0.081,
        threshold="+0.01 abs",
        p_value=1.2e-9,
        verdict="fail",
        reason="canary error rate 8.1% vs stable 0.2%",
    ),
]


def test_production_schema_drift_passes_when_the_canary_found_none(
    gates: dict[tuple[str, str], Any],
) -> None:
    report = canary_report("passed", drift=drift(), deployed=True, verdict="pass", steps=STEPS)
    result = invoke(gates["canary", "schema_drift"], canary=report)
    assert result.passed is True
    assert result.description == "production schema matches its migrations"


def test_production_schema_drift_fails_on_a_difference(gates: dict[tuple[str, str], Any]) -> None:
    report = canary_report(
        "blocked",
        reason="production schema drift: 1 difference(s); production not touched",
        drift=drift(HOTFIX_INDEX),
    )
    result = invoke(gates["canary", "schema_drift"], canary=report)
    assert result.passed is False
    assert "unexpected index public.items_name_idx" in (result.description or "")


@pytest.mark.parametrize("outcome", ["passed", "aborted", "blocked"])
def test_production_schema_drift_without_a_drift_record_is_inconclusive(
    gates: dict[tuple[str, str], Any], outcome: str
) -> None:
    """A canary that reached production without recording its drift check never passes it."""
    result = invoke(gates["canary", "schema_drift"], canary=canary_report(outcome))
    assert result.passed is False
    assert result.description == "no drift check recorded for production: inconclusive"
    assert production_drift_result(canary_report(outcome)).passed is False


@pytest.mark.parametrize("outcome", ["already_live", "superseded"])
def test_production_schema_drift_of_a_canary_that_never_touched_production(
    gates: dict[tuple[str, str], Any], outcome: str
) -> None:
    """Already live or superseded: the canary refused before production, no drift to judge.
    (Not a pass of the release: slo_regression decides superseded, see below.)"""
    result = invoke(gates["canary", "schema_drift"], canary=canary_report(outcome))
    assert result.passed is True
    assert result.description == f"canary {outcome}: production not touched"


# --- smoke, edge_cache, worker_dlq (staging) ---------------------------------------------------


def row(section: str, name: str, passed: bool = True, detail: str = "ok") -> SmokeRow:
    return SmokeRow(section=section, name=name, passed=passed, detail=detail, seconds=0.042)  # type: ignore[arg-type]


SMOKE_ROWS = [
    row("smoke", "GET /healthz", detail="200"),
    row("smoke", "GET /readyz", detail="200"),
    row("smoke", "GET /v1/items", detail="200, 3 items, X-Release 1.4.0"),
    row("smoke", "GET /v1/items/1", detail="200, X-Release 1.4.0"),
]
EDGE_ROWS = [
    row("edge_cache", "dynamic endpoint", detail="MISS then HIT, Age 1, s-maxage 5"),
    row("edge_cache", "static endpoint", detail="MISS then HIT, s-maxage 86400"),
    row("edge_cache", "purge by surrogate key", detail="purged 1, next answer MISS"),
    row("edge_cache", "purge without the key is refused", detail="403"),
]
DLQ_ROWS = [
    row("worker_dlq", "normal job done after one attempt", detail="done, attempts 1"),
    row("worker_dlq", "poison job (high queue) dead-lettered after 4 attempts", detail="dlq"),
    row("worker_dlq", "re-enqueue of a done key is not processed twice", detail="attempts 1"),
    row("worker_dlq", "backoff between attempts of the retry job (high queue)", detail="2 gaps"),
    row("worker_dlq", "retry job (high queue) done after 2 failures, written back once"),
    row("worker_dlq", "worker SIGKILLed during a job (high queue): done once after restart"),
    row("worker_dlq", "high job not delayed by a flood of low jobs", detail="41 ms, bound 600"),
]
SECTIONS = ["smoke", "edge_cache", "worker_dlq"]


def smoke_run(
    rows: list[SmokeRow],
    *,
    env: str = "staging",
    sections: list[str] | None = None,
    retries: list[str] | None = None,
) -> SmokeReport:
    return SmokeReport(
        product=PRODUCT,
        env=env,
        expected_version=VERSION,
        run_id=RUN_ID,
        edge_url="http://127.0.0.1:18081" if env == "staging" else "http://127.0.0.1:18080",
        sections=SECTIONS if sections is None else sections,  # type: ignore[arg-type]
        started_at="2026-11-30T09:14:02+00:00",
        finished_at="2026-11-30T09:14:09+00:00",
        rows=rows,
        retries=retries or [],
    )


def staging(rows: list[SmokeRow], **kwargs: Any) -> StagingSmokeReport:
    return StagingSmokeReport(
        version=VERSION,
        artifact_sha256=SHA,
        edge_url="http://127.0.0.1:18081",
        smoke=smoke_run(rows, **kwargs),
        seconds=7.2,
    )


def with_failure(rows: list[SmokeRow], index: int, detail: str) -> list[SmokeRow]:
    broken = rows[index].model_copy(update={"passed": False, "detail": detail})
    return [broken if i == index else r for i, r in enumerate(rows)]


STAGING_GATES: dict[str, tuple[Callable[..., dg.AssetChecksDefinition], list[SmokeRow], str]] = {
    "smoke": (smoke_check, SMOKE_ROWS, "staging smoke"),
    "edge_cache": (edge_cache_check, EDGE_ROWS, "edge cache"),
    "worker_dlq": (worker_dlq_check, DLQ_ROWS, "worker/DLQ"),
}


@pytest.fixture(params=sorted(STAGING_GATES))
def staging_gate(
    request: pytest.FixtureRequest,
    spec: ProductSpec,
    partitions_def: dg.DynamicPartitionsDefinition,
) -> tuple[dg.AssetChecksDefinition, list[SmokeRow], str]:
    factory, rows, what = STAGING_GATES[request.param]
    return factory(spec, partitions_def), rows, what


def test_staging_gate_passes_when_every_row_of_its_section_passed(
    staging_gate: tuple[dg.AssetChecksDefinition, list[SmokeRow], str],
) -> None:
    check, rows, what = staging_gate
    result = invoke(check, staging_smoke=staging(SMOKE_ROWS + EDGE_ROWS + DLQ_ROWS))
    assert result.passed is True
    assert result.description == f"{what}: {len(rows)}/{len(rows)} passed"
    assert metadata_value(result, "verdict") == "pass"
    assert [r["name"] for r in table_rows(result, "results")] == [r.name for r in rows]


def test_staging_gate_fails_on_one_failed_row_of_its_section(
    staging_gate: tuple[dg.AssetChecksDefinition, list[SmokeRow], str],
) -> None:
    check, rows, what = staging_gate
    broken = with_failure(rows, 1, "expected 200, got 503")
    others = [r for r in SMOKE_ROWS + EDGE_ROWS + DLQ_ROWS if r.section != rows[0].section]
    result = invoke(check, staging_smoke=staging(others + broken))
    assert result.passed is False
    expected = f"{what}: {len(rows) - 1}/{len(rows)} passed; failed: {rows[1].name}"
    if rows[0].section in ("edge_cache", "worker_dlq"):  # the rule or bound: carries the detail
        expected += " (expected 200, got 503)"
    assert result.description == expected
    assert metadata_value(result, "verdict") == "fail"


def test_staging_gate_ignores_failures_of_other_sections(
    staging_gate: tuple[dg.AssetChecksDefinition, list[SmokeRow], str],
) -> None:
    check, rows, _ = staging_gate
    others = [r for r in SMOKE_ROWS + EDGE_ROWS + DLQ_ROWS if r.section != rows[0].section]
    broken_others = [r.model_copy(update={"passed": False}) for r in others]
    assert invoke(check, staging_smoke=staging(rows + broken_others)).passed is True


@pytest.mark.parametrize("index", [3, 4, 5, 6], ids=["backoff", "retry", "crash", "priority"])
def test_worker_dlq_gate_is_blocked_by_a_timing_crash_or_priority_row(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition, index: int
) -> None:
    check = worker_dlq_check(spec, partitions_def)
    broken = with_failure(DLQ_ROWS, index, "high job done 2400 ms after its enqueue")
    result = invoke(check, staging_smoke=staging(SMOKE_ROWS + EDGE_ROWS + broken))
    assert result.passed is False
    assert result.description.startswith(f"worker/DLQ: {len(DLQ_ROWS) - 1}/{len(DLQ_ROWS)} passed")
    assert DLQ_ROWS[index].name in result.description


@pytest.mark.parametrize(
    "report",
    [
        pytest.param(lambda rows: staging([]), id="no_rows_at_all"),
        pytest.param(
            lambda rows: staging(
                [r for r in SMOKE_ROWS + EDGE_ROWS + DLQ_ROWS if r.section != rows[0].section]
            ),
            id="no_rows_in_its_section",
        ),
        pytest.param(lambda rows: staging([], sections=[]), id="nothing_asked_for"),
    ],
)
def test_staging_gate_without_rows_is_inconclusive_never_a_pass(
    staging_gate: tuple[dg.AssetChecksDefinition, list[SmokeRow], str],
    report: Callable[[list[SmokeRow]], StagingSmokeReport],
) -> None:
    check, rows, what = staging_gate
    result = invoke(check, staging_smoke=report(rows))
    assert result.passed is False
    assert result.description == (
        f"{what}: inconclusive, no results recorded (no data is never a pass)"
    )
    assert metadata_value(result, "verdict") == "inconclusive"


def test_staging_smoke_lists_the_gets_retried_after_a_5xx() -> None:
    retried = ["GET /v1/summary answered 502 once; retried: 200"]
    result = judge_smoke(staging(SMOKE_ROWS, retries=retried))
    assert result.passed is True
    assert metadata_value(result, "retried_after_5xx") == retried


def test_rows_result_is_the_one_rule_for_row_gates() -> None:
    assert rows_result([], what="x").passed is False
    assert rows_result(SMOKE_ROWS, what="x").passed is True
    assert rows_result(with_failure(SMOKE_ROWS, 0, "timeout"), what="x").passed is False


# --- slo_regression (canary) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def slo(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> dg.AssetChecksDefinition:
    return slo_regression_check(spec, partitions_def)


def test_slo_regression_passes_a_canary_that_passed_every_step(
    slo: dg.AssetChecksDefinition,
) -> None:
    report = canary_report(
        "passed",
        reason="canary passed every step",
        deployed=True,
        verdict="pass",
        steps=STEPS,
        drift=drift(),
    )
    result = invoke(slo, canary=report)
    assert result.passed is True
    assert result.description == "canary passed 3 step(s)"
    assert metadata_value(result, "verdict") == "pass"
    assert len(table_rows(result, "steps")) == len(STEPS)


def test_slo_regression_fails_an_aborted_canary_with_its_reason(
    slo: dg.AssetChecksDefinition,
) -> None:
    reason = "canary fail: canary error rate 8.1% vs stable 0.2%; all traffic back to stable"
    report = canary_report(
        "aborted",
        reason=reason,
        deployed=True,
        verdict="fail",
        steps=FAILED_STEPS,
        drift=drift(),
        rollback_seconds=0.8,
    )
    result = invoke(slo, canary=report)
    assert result.passed is False
    assert result.description == f"canary aborted: {reason}"
    assert metadata_value(result, "verdict") == "fail"


@pytest.mark.parametrize(
    "report",
    [
        pytest.param(
            canary_report(
                "aborted",
                reason="canary inconclusive: too few requests at 5% after "
                "3 extensions; all traffic back to stable",
                deployed=True,
                verdict="inconclusive",
                steps=STEPS[:3],
                drift=drift(),
            ),
            id="inconclusive_at_the_deadline",
        ),
        pytest.param(
            # A pass with no judged step is no evidence (an analysis that judged nothing).
            canary_report("passed", deployed=True, verdict="pass", drift=drift()),
            id="passed_without_steps",
        ),
        pytest.param(
            canary_report(
                "blocked",
                reason="production schema drift: 1 difference(s); production not touched",
                drift=drift(HOTFIX_INDEX),
            ),
            id="blocked_by_drift",
        ),
        pytest.param(
            canary_report(
                "blocked",
                reason="production migrations blocked by migration_safety; production not touched",
                drift=drift(),
            ),
            id="blocked_by_migrations",
        ),
        pytest.param(
            # Older than the live release: never judged, and production never moves back.
            canary_report(
                "superseded",
                reason="release 1.4.0 is older than 1.5.0, live in "
                "production: production is never moved backwards (not touched)",
                previous=TrackRef(version="1.5.0", artifact_sha256=PREVIOUS_SHA),
            ),
            id="superseded",
        ),
    ],
)
def test_slo_regression_never_passes_without_a_judged_passing_canary(
    slo: dg.AssetChecksDefinition, report: CanaryStageReport
) -> None:
    result = invoke(slo, canary=report)
    assert result.passed is False
    assert (result.description or "").startswith(f"canary {report.outcome}: ")
    assert judge_slo(report).passed is False


def test_slo_regression_of_a_release_already_live(slo: dg.AssetChecksDefinition) -> None:
    """Already serving 100%: nothing to judge and nothing changed (deploy exits 0, README)."""
    report = canary_report(
        "already_live",
        reason="already serving 100%",
        previous=TrackRef(version=VERSION, artifact_sha256=SHA),
    )
    result = invoke(slo, canary=report)
    assert result.passed is True
    assert result.description == "release already live at 100%"


def test_an_earlier_failed_step_stays_in_the_slo_table(slo: dg.AssetChecksDefinition) -> None:
    report = canary_report(
        "aborted",
        reason="canary fail: step 2",
        deployed=True,
        verdict="fail",
        steps=FAILED_STEPS,
        drift=drift(),
    )
    verdicts = [r["verdict"] for r in table_rows(invoke(slo, canary=report), "steps")]
    assert "fail" in verdicts


# --- post_deploy_smoke (promotion) -------------------------------------------------------------


@pytest.fixture(scope="module")
def post_deploy(
    spec: ProductSpec, partitions_def: dg.DynamicPartitionsDefinition
) -> dg.AssetChecksDefinition:
    return post_deploy_smoke_check(spec, partitions_def)


def production_smoke(rows: list[SmokeRow] | None = None) -> SmokeReport:
    return smoke_run(SMOKE_ROWS if rows is None else rows, env="production", sections=["smoke"])


def watch(passed: bool = True, **changes: Any) -> WatchReport:
    values: dict[str, Any] = {
        "passed": passed,
        "smoke_passed": passed,
        "verdict": "pass" if passed else "fail",
        "reason": "absolute SLOs held for 60s at 100%"
        if passed
        else "p99 latency 0.82s > 0.5s at 100%",
        "seconds": 60.4,
        "steps": [
            MetricRow(
                step=1,
                weight=100,
                metric="p99_latency",
                canary=0.064 if passed else 0.82,
                threshold="<= 0.5s",
                verdict="pass" if passed else "fail",
            )
        ],
    }
    values.update(changes)
    return WatchReport(**values)


def promotion_report(outcome: str, **changes: Any) -> PromotionReport:
    values: dict[str, Any] = {
        "version": VERSION,
        "artifact_sha256": SHA,
        "approver": "ci:github:release-bot",
        "previous": TrackRef(version="1.3.0", artifact_sha256=PREVIOUS_SHA),
        "outcome": outcome,
        "change_id": "chg-4pnihc40q-yj-1.4.0-0f3c5c9e",
    }
    values.update(changes)
    return PromotionReport(**values)


def test_post_deploy_smoke_passes_a_promotion_whose_smoke_passed(
    post_deploy: dg.AssetChecksDefinition,
) -> None:
    report = promotion_report("promoted", watch=watch(), post_deploy_smoke=production_smoke())
    result = invoke(post_deploy, promotion=report)
    assert result.passed is True
    assert result.description == "post-deploy smoke: 4/4 passed"
    assert metadata_value(result, "watch") == "absolute SLOs held for 60s at 100%"


def test_post_deploy_smoke_fails_on_a_failed_smoke_row(
    post_deploy: dg.AssetChecksDefinition,
) -> None:
    rows = with_failure(SMOKE_ROWS, 2, "expected X-Release 1.4.0, got 1.3.0")
    report = promotion_report("promoted", watch=watch(), post_deploy_smoke=production_smoke(rows))
    result = invoke(post_deploy, promotion=report)
    assert result.passed is False
    assert result.description == "post-deploy smoke: 3/4 passed; failed: GET /v1/items"


def test_post_deploy_smoke_fails_a_rolled_back_promotion_even_if_its_smoke_passed(
    post_deploy: dg.AssetChecksDefinition,
) -> None:
    failed_watch = watch(False, smoke=production_smoke())
    report = promotion_report(
        "rolled_back", watch=failed_watch, post_deploy_smoke=production_smoke()
    )
    result = invoke(post_deploy, promotion=report)
    assert result.passed is False
    assert result.description == (
        "watch after promotion failed, production rolled back to the previous version: "
        "p99 latency 0.82s > 0.5s at 100%"
    )
    assert judge_post_deploy(promotion_report("rolled_back")).passed is False


@pytest.mark.parametrize(
    "report",
    [
        pytest.param(promotion_report("promoted", watch=watch()), id="promoted_without_smoke"),
        pytest.param(
            promotion_report("promoted", watch=watch(), post_deploy_smoke=production_smoke([])),
            id="promoted_with_empty_smoke",
        ),
        pytest.param(
            promotion_report(
                "already_live", previous=TrackRef(version=VERSION, artifact_sha256=SHA)
            ),
            id="already_live_without_smoke",
        ),
    ],
)
def test_post_deploy_smoke_without_rows_is_inconclusive_never_a_pass(
    post_deploy: dg.AssetChecksDefinition, report: PromotionReport
) -> None:
    result = invoke(post_deploy, promotion=report)
    assert result.passed is False
    assert "inconclusive" in (result.description or "")


def test_post_deploy_smoke_of_a_release_already_live_is_judged_on_its_smoke(
    post_deploy: dg.AssetChecksDefinition,
) -> None:
    live = TrackRef(version=VERSION, artifact_sha256=SHA)
    ok = promotion_report("already_live", previous=live, post_deploy_smoke=production_smoke())
    result = invoke(post_deploy, promotion=ok)
    assert result.passed is True
    assert metadata_value(result, "watch") == "not run (already live)"
    broken = ok.model_copy(
        update={"post_deploy_smoke": production_smoke(with_failure(SMOKE_ROWS, 0, "503"))}
    )
    assert invoke(post_deploy, promotion=broken).passed is False


# --- compliance (audit) ------------------------------------------------------------------------
# The checklist items with fakes behind the trail, the registry and the instance's run facts.
# tests/test_audit_evidence.py makes each item fail through the real path (Postgres, the
# registry's files, the evidence store, the signed checkpoints, a real Dagster instance).


CHANGE_ID = "chg-4pnihc40q-yj-1.4.0-0f3c5c9e"
ALL_ITEMS = [
    items.ITEM_ARTIFACT,
    items.ITEM_RUN,
    items.ITEM_TOKEN,
    items.ITEM_SMOKE,
    items.ITEM_SLO,
    items.ITEM_SNAPSHOTS,
    items.ITEM_CHECKPOINT,
]


@pytest.fixture
def snapshot(tmp_path: Path) -> Snapshot:
    """A monitoring chart on disk with its recorded hash (what the canary attaches)."""
    path = tmp_path / "evidence" / "sha256" / "error_rate.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"error-rate chart, 3 steps" * 40)
    return Snapshot(
        name="error_rate", path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest()
    )


def payload(snapshot: Snapshot, **changes: Any) -> dict[str, Any]:
    """The stored JSON of a promotion's audit entry (`AuditPayload.stored()`)."""
    values: dict[str, Any] = {
        "timestamp": "2026-11-30T09:31:12.402+00:00",
        "identity": "ci:github:release-bot",
        "artifact_sha256": SHA,
        "guardrail_token": GUARDRAIL_TOKEN,
        "product": PRODUCT,
        "release": VERSION,
        "run_id": RUN_ID,
        "change_id": CHANGE_ID,
        "outcome": "promoted",
        "approver": "ci:github:release-bot",
        "audited_by": "ci:github:release-bot",
        "previous_artifact_sha256": PREVIOUS_SHA,
        "smoke_verdict": "passed",
        "slo_verdict": "pass",
        "slo_steps": [s.model_dump(mode="json") for s in STEPS],
        "snapshots": [snapshot.model_dump(mode="json")],
    }
    values.update(changes)
    return AuditPayload.model_validate(values).stored()


def entry(data: dict[str, Any]) -> SimpleNamespace:
    """What `core.audit.find` returns: the entry, its `.payload` the stored JSON dict."""
    return SimpleNamespace(
        seq=7, change_id=data.get("change_id", CHANGE_ID), payload=data, entry_hash="9" * 64
    )


def audit_report(*change_ids: str) -> AuditReport:
    return AuditReport(
        release=VERSION,
        entries=[
            AuditEntryRef(
                seq=7 + i, change_id=c, outcome="promoted", entry_hash=f"{i}" * 64, created=True
            )
            for i, c in enumerate(change_ids)
        ],
    )


def run_facts(**changes: Any) -> RunFacts:
    """What the instance says about a deploy run that completed every stage."""
    values: dict[str, Any] = {
        "run_id": RUN_ID,
        "status": "SUCCESS",
        "stages": [
            StageMaterialization(stage=stage, run_id=RUN_ID, artifact_sha256=SHA)
            for stage in items.DEPLOY_STAGES
        ],
    }
    values.update(changes)
    return RunFacts(**values)


def judge(
    spec: ProductSpec,
    data: dict[str, Any],
    *,
    facts: RunFacts | None = None,
    registry: RegistryResource | None = None,
    checkpoint_problem: str | None = None,
) -> dg.AssetCheckResult:
    return judge_compliance(
        audit_report(CHANGE_ID),
        audit_trail({CHANGE_ID: entry(data)}, checkpoint_problem),
        registry or FakeRegistry(intact=[SHA]),
        spec,
        lambda payload: run_facts() if facts is None else facts,
    )


def checklist_of(result: dg.AssetCheckResult) -> dict[str, tuple[bool | None, str]]:
    return {r["item"]: (r["passed"], r["detail"]) for r in table_rows(result, "checklist")}


def test_compliance_passes_a_complete_promotion_entry(
    spec: ProductSpec, snapshot: Snapshot
) -> None:
    result = judge(spec, payload(snapshot))
    assert result.passed is True
    assert result.description == "compliance checklist complete"
    checked = checklist_of(result)
    assert list(checked) == ALL_ITEMS
    assert all(ok is True for ok, _ in checked.values())
    assert checked[items.ITEM_TOKEN][1].startswith(mask(GUARDRAIL_TOKEN))
    assert GUARDRAIL_TOKEN not in str(table_rows(result, "checklist"))


def test_the_check_reads_item_2_from_its_instance_not_the_payload(
    spec: ProductSpec,
    partitions_def: dg.DynamicPartitionsDefinition,
    snapshot: Snapshot,
) -> None:
    """The check definition, invoked with a context: the payload names a run the instance has
    never seen, so the deploy run is not taken on the payload's word."""
    check = compliance_check(spec, partitions_def)
    context = dg.build_asset_check_context(instance=dg.DagsterInstance.ephemeral())
    result = check(
        context,
        audit=audit_report(CHANGE_ID),
        audit_trail=audit_trail({CHANGE_ID: entry(payload(snapshot))}),
        registry=FakeRegistry(intact=[SHA]),
    )
    assert result.passed is False
    assert checklist_of(result)[items.ITEM_RUN] == (
        False,
        f"run {RUN_ID} is not on the Dagster instance",
    )


FAILURES = {
    "registry_tampered": ({}, {"registry": "tampered"}, items.ITEM_ARTIFACT),
    "registry_unknown": ({}, {"registry": "unknown"}, items.ITEM_ARTIFACT),
    "run_unknown": ({}, {"facts": RunFacts(run_id=RUN_ID, status=None)}, items.ITEM_RUN),
    "run_failed_step": (
        {},
        {"facts": run_facts(status="FAILURE", failed_steps=["4pnihc40q_yj__promotion"])},
        items.ITEM_RUN,
    ),
    "run_unfinished": ({}, {"facts": run_facts(status="STARTED")}, items.ITEM_RUN),
    "stage_missing": (
        {},
        {"facts": run_facts(stages=[StageMaterialization(stage="build")])},
        items.ITEM_RUN,
    ),
    "promoted_by_another_run": (
        {},
        {
            "facts": run_facts(
                stages=[
                    StageMaterialization(stage=s, run_id="other-run-id", artifact_sha256=SHA)
                    for s in items.DEPLOY_STAGES
                ]
            )
        },
        items.ITEM_RUN,
    ),
    "wrong_token": ({"guardrail_token": "tpt-forged-token"}, {}, items.ITEM_TOKEN),
    "no_token": ({"guardrail_token": ""}, {}, items.ITEM_TOKEN),
    "smoke_failed": ({"smoke_verdict": "failed"}, {}, items.ITEM_SMOKE),
    "smoke_missing": ({"smoke_verdict": None}, {}, items.ITEM_SMOKE),
    "slo_inconclusive": ({"slo_verdict": "inconclusive"}, {}, items.ITEM_SLO),
    "slo_missing": ({"slo_verdict": None}, {}, items.ITEM_SLO),
    "no_snapshots": ({"snapshots": []}, {}, items.ITEM_SNAPSHOTS),
    "checkpoint_forged": (
        {},
        {"checkpoint_problem": "signature does not verify"},
        items.ITEM_CHECKPOINT,
    ),
}


@pytest.mark.parametrize(("changes", "setup", "failed_item"), FAILURES.values(), ids=FAILURES)
def test_each_item_fails_on_its_own(
    spec: ProductSpec,
    snapshot: Snapshot,
    changes: dict[str, Any],
    setup: dict[str, Any],
    failed_item: str,
) -> None:
    registry = {
        "tampered": FakeRegistry(tampered=[SHA]),
        "unknown": FakeRegistry(),
        None: None,
    }[setup.get("registry")]
    result = judge(
        spec,
        payload(snapshot, **changes),
        facts=setup.get("facts"),
        registry=registry,
        checkpoint_problem=setup.get("checkpoint_problem"),
    )
    assert result.passed is False
    checked = checklist_of(result)
    assert [item for item, (ok, _) in checked.items() if ok is False] == [failed_item]
    assert failed_item in (result.description or "")
    assert GUARDRAIL_TOKEN not in str(table_rows(result, "checklist"))


@pytest.mark.parametrize("tamper", ["edited", "deleted"])
def test_compliance_fails_when_a_snapshot_no_longer_matches_its_hash(
    spec: ProductSpec, snapshot: Snapshot, tamper: str
) -> None:
    path = Path(snapshot.path)
    if tamper == "edited":
        path.write_bytes(path.read_bytes() + b"retouched")
    else:
        path.unlink()
    result = judge(spec, payload(snapshot))
    assert result.passed is False
    ok, detail = checklist_of(result)[items.ITEM_SNAPSHOTS]
    assert ok is False and snapshot.path in detail


def test_an_aborted_canary_is_audited_without_deploy_items(
    spec: ProductSpec, snapshot: Snapshot
) -> None:
    """An abort is not a deploy: items 2, 4a and 4b do not apply (said, never a pass); the
    artifact, the token, its snapshots and its checkpoint still must hold."""
    aborted = payload(snapshot, outcome="aborted", smoke_verdict=None, slo_verdict="fail")
    result = judge(spec, aborted, facts=RunFacts(run_id=RUN_ID, status=None))
    assert result.passed is True
    checked = checklist_of(result)
    assert {item for item, (ok, _) in checked.items() if ok is None} == {
        items.ITEM_RUN,
        items.ITEM_SMOKE,
        items.ITEM_SLO,
    }
    assert checked[items.ITEM_RUN][1] == f"not applicable: the canary was aborted (run {RUN_ID})"
    assert metadata_value(result, "not_applicable") == 3
    snapshot_gone = judge(spec, payload(snapshot, outcome="aborted", snapshots=[]))
    assert checklist_of(snapshot_gone)[items.ITEM_SNAPSHOTS][0] is None
    Path(snapshot.path).unlink()
    assert judge(spec, aborted).passed is False  # a recorded snapshot must still be there


def test_a_rollback_needs_its_smoke_but_no_dagster_run(
    spec: ProductSpec, snapshot: Snapshot
) -> None:
    """`release rollback` (recorded under the release it restored) is judged on the smoke of
    what it restored; a release its own watch rolled back is, like an abort, not a deploy."""
    by_hand = payload(
        snapshot,
        outcome="rolled_back",
        restored_release=VERSION,
        slo_verdict="not judged (rollback)",
    )
    result = judge(spec, by_hand, facts=RunFacts(run_id="rollback-1", status=None))
    assert result.passed is True
    checked = checklist_of(result)
    assert checked[items.ITEM_RUN][0] is None and checked[items.ITEM_SLO][0] is None
    assert checked[items.ITEM_SMOKE] == (True, "smoke of the restored release passed")
    failed = {**by_hand, "smoke_verdict": "failed"}
    assert checklist_of(judge(spec, failed))[items.ITEM_SMOKE][0] is False

    by_watch = payload(
        snapshot,
        outcome="rolled_back",
        restored_release="1.3.0",
        smoke_verdict="failed or not run",
        slo_verdict="fail",
    )
    checked = checklist_of(judge(spec, by_watch))
    assert {item for item, (ok, _) in checked.items() if ok is None} == {
        items.ITEM_RUN,
        items.ITEM_SMOKE,
        items.ITEM_SLO,
    }
    assert checked[items.ITEM_SMOKE][1] == (
        "not applicable: its watch rolled it back (smoke failed or not run)"
    )


def test_an_aborted_first_canary_does_not_fail_the_promotion_of_the_retry(
    spec: ProductSpec, snapshot: Snapshot
) -> None:
    aborted_id = "chg-4pnihc40q-yj-1.4.0-aborted-77aa"
    aborted = payload(
        snapshot, outcome="aborted", change_id=aborted_id, run_id="first-run", slo_verdict="fail"
    )
    trail = audit_trail({CHANGE_ID: entry(payload(snapshot)), aborted_id: entry(aborted)})
    result = judge_compliance(
        audit_report(aborted_id, CHANGE_ID),
        trail,
        FakeRegistry(intact=[SHA]),
        spec,
        lambda p: run_facts() if p.run_id == RUN_ID else RunFacts(run_id=p.run_id, status=None),
    )
    assert result.passed is True
    rows = table_rows(result, "checklist")
    assert {r["change_id"] for r in rows} == {aborted_id, CHANGE_ID}


def test_compliance_without_audit_entries_is_inconclusive(spec: ProductSpec) -> None:
    result = judge_compliance(
        audit_report(), audit_trail({}), FakeRegistry(intact=[SHA]), spec, lambda p: run_facts()
    )
    assert result.passed is False
    assert result.description == "no audit entry to check: inconclusive"
    assert table_rows(result, "checklist") == []


def test_compliance_fails_an_entry_missing_from_the_trail(
    spec: ProductSpec, snapshot: Snapshot
) -> None:
    """One entry complete, the other one gone from the trail: not a pass."""
    other = "chg-4pnihc40q-yj-1.4.0-aborted-77aa"
    result = judge_compliance(
        audit_report(CHANGE_ID, other),
        audit_trail({CHANGE_ID: entry(payload(snapshot))}),
        FakeRegistry(intact=[SHA]),
        spec,
        lambda p: run_facts(),
    )
    assert result.passed is False
    assert result.description == (
        f"compliance checklist incomplete: {items.ITEM_PRESENT} ({other}): "
        "no entry in the audit trail"
    )
    assert table_rows(result, "checklist")[-1] == {
        "change_id": other,
        "item": items.ITEM_PRESENT,
        "passed": False,
        "detail": "no entry in the audit trail",
    }


@pytest.mark.parametrize(
    ("corrupt", "named_field"),
    [
        (lambda p: {k: v for k, v in p.items() if k != "artifact_sha256"}, "artifact_sha256"),
        (lambda p: {**p, "environment": "staging"}, "environment"),
        (lambda p: {**p, "outcome": "approved"}, "outcome"),
        (lambda p: {**p, "shipped_by": "someone"}, "shipped_by"),  # unknown field: refused
        (lambda p: {**p, "slo_steps": [{"step": "two"}]}, "slo_steps"),
        (lambda p: {k: v for k, v in p.items() if k != "guardrail_token"}, "guardrail_token"),
    ],
    ids=["no_sha", "wrong_environment", "unknown_outcome", "extra_field", "bad_steps", "no_token"],
)
def test_compliance_never_passes_an_entry_that_does_not_match_the_contract(
    spec: ProductSpec,
    snapshot: Snapshot,
    corrupt: Callable[[dict[str, Any]], dict[str, Any]],
    named_field: str,
) -> None:
    result = judge(spec, corrupt(payload(snapshot)))
    assert result.passed is False
    assert (result.description or "").startswith(
        f"compliance checklist incomplete: {items.ITEM_READABLE}"
    )
    (only,) = table_rows(result, "checklist")
    assert only["item"] == items.ITEM_READABLE
    assert f"field '{named_field}" in only["detail"]
    assert GUARDRAIL_TOKEN not in only["detail"]  # the contract hides input in its errors


def test_checklist_rows_are_contracts(snapshot: Snapshot, spec: ProductSpec) -> None:
    rows = items.checklist(
        CHANGE_ID,
        entry(payload(snapshot)),
        token_sha256=spec.guardrail.token_sha256,
        verify_artifact=FakeRegistry(intact=[SHA]).verify,
        run_facts=lambda p: run_facts(),
        covering=audit_trail({}).covering,
    )
    assert all(isinstance(r, ChecklistItem) for r in rows)
    assert items.passed(rows) and not items.failed(rows)
    assert not items.passed([])
