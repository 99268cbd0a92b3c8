"""Fast tests of the stages: each stage asset of the code location materialized with
`dg.materialize` on an ephemeral instance, with fakes behind the real resource interfaces. No
Postgres (a guard fails any connection), no platform processes.

- `build` hands on an `ArtifactRecord`; a bad knob fails the step naming the key;
- every stage contract round-trips through the IO manager (Dagster stores it per partition);
- `canary` and `promotion` launched alone, as from the UI, refuse before production: the
  guardrail token and the blocking checks upstream (never evaluated, failed, or passed on
  another build of the release).

The real-path tests (test_release_e2e.py, test_production_faults.py) stay; these pin the
stages' own logic around the fakes in seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pydantic import ValidationError

from assets.build import BuildConfig
from assets.common import gate_rows
from checks import blocking_check_keys_before_promotion
from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project.core import database
from dagster_project.core.contracts import (
    ArtifactRecord,
    AuditEntryRef,
    AuditReport,
    CanaryStageReport,
    DriftDifference,
    Finding,
    GateResult,
    MetricRow,
    MigrationGateReport,
    PromotionReport,
    PurgedEndpoint,
    SchemaDrift,
    SmokeReport,
    SmokeRow,
    Snapshot,
    StagingSmokeReport,
    TrackRef,
    Waiver,
    WatchReport,
)
from dagster_project.core.registry import Artifact
from dagster_project.core.spec import ProductSpec
from dagster_project.definitions import product_definitions
from dagster_project.partitions import register_release, releases_partitions
from dagster_project.resources import (
    ApprovalResource,
    MetricsResource,
    PlatformResource,
    RegistryResource,
)

# Partitioned check specs are a Dagster preview feature (definitions.py silences it too).
pytestmark = pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")

RELEASE = "1.0.0"
LIVE = TrackRef(version="0.9.0", artifact_sha256=hashlib.sha256(b"0.9.0").hexdigest())
# Stand-ins replace these gates (they read Postgres); the real check definitions judge the rest.
STAGING_DRIFT = dg.AssetCheckKey(dg.AssetKey([PRODUCT, "schema_migration_check"]), "schema_drift")
DATA_QUALITY = dg.AssetCheckKey(dg.AssetKey([PRODUCT, "staging_smoke"]), "data_quality")


# --- no Postgres --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection of the core goes through `database.server()`/`connect()`: a fast test
    that reaches them fails (refusals come before ownership, reconciliation or the platform)."""

    def reached(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a fast stage test reached Postgres {args or ''}")

    monkeypatch.setattr(database, "server", reached)
    monkeypatch.setattr(database, "connect", reached)


# --- fakes behind the real resource interfaces ------------------------------------------------


def artifact_bytes(product: str, version: str, settings: Mapping[str, Any]) -> bytes:
    """A small deterministic gzip of the manifest: same inputs, same SHA-256 (like the real)."""
    manifest = {"product": product, "version": version, "settings": dict(settings)}
    return gzip.compress(json.dumps(manifest, sort_keys=True).encode(), mtime=0)


class FakeRegistry(RegistryResource):
    """Content-addressed files under `root`; fetching or unpacking is past any refusal."""

    root: str

    def stored(self, sha256: str) -> Path:
        return Path(self.root) / "sha256" / f"{sha256}.tar.gz"

    def build_and_push(self, spec: ProductSpec, version: str, settings: dict[str, Any]) -> Artifact:
        data = artifact_bytes(spec.product, version, settings)
        sha = hashlib.sha256(data).hexdigest()
        path = self.stored(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest = {"product": spec.product, "version": version, "settings": settings}
        return Artifact(
            product=spec.product, version=version, sha256=sha, path=path, manifest=manifest
        )

    def verify(self, sha256: str) -> bool:
        path = self.stored(sha256)
        return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256

    def fetch(self, sha256: str) -> Artifact:
        raise AssertionError(f"registry.fetch({sha256[:12]}) reached: past a refusal")

    def unpacked(self, sha256: str) -> Path:
        raise AssertionError(f"registry.unpacked({sha256[:12]}) reached: past a refusal")


class ProductionProbe:
    """Stands in for `LocalPlatform`: records every call; answers only the read-only ones in
    `answers` and fails every other one (a refusal must not reach them)."""

    def __init__(self, calls: list[tuple[str, tuple[Any, ...]]], answers: Mapping[str, Any]):
        self._calls = calls
        self._answers = answers

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append((name, args))
            if name in self._answers:
                return self._answers[name]
            raise AssertionError(f"production touched: LocalPlatform.{name}{args}")

        return call


def fake_platform(
    calls: list[tuple[str, tuple[Any, ...]]], answers: Mapping[str, Any] | None = None
) -> PlatformResource:
    class FakePlatform(PlatformResource):
        def for_product(self, product_id: str) -> Any:
            calls.append(("for_product", (product_id,)))
            return ProductionProbe(calls, answers or {})

    return FakePlatform()


def fake_metrics(calls: list[tuple[str, tuple[Any, ...]]]) -> MetricsResource:
    class FakeMetrics(MetricsResource):
        def source(self, api_urls: dict[str, str], **where: Any) -> Any:
            calls.append(("metrics.source", (api_urls,)))
            raise AssertionError("canary metrics read: past a refusal")

    return FakeMetrics()


# --- the code location's stages, an ephemeral instance -----------------------------------------


@pytest.fixture(scope="module")
def location() -> dg.Definitions:
    return product_definitions(PRODUCT)


@pytest.fixture(scope="module")
def stages(location: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    return {a.key.path[-1]: a for a in location.assets or []}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def gate_keys(location: dg.Definitions) -> list[dg.AssetCheckKey]:
    """The blocking checks promotion re-reads (canary: those before its own)."""
    return blocking_check_keys_before_promotion(list(location.asset_checks or []))  # type: ignore[arg-type]


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as instance:
        assert register_release(instance, PRODUCT, RELEASE)  # what `deploy` and the sensor do
        yield instance


@pytest.fixture
def calls() -> list[tuple[str, tuple[Any, ...]]]:
    """Every call that reached the platform or the metrics."""
    return []


@pytest.fixture
def resources(tmp_path: Path, calls: list[tuple[str, tuple[Any, ...]]]) -> dict[str, Any]:
    return {
        "registry": FakeRegistry(root=str(tmp_path / "registry")),
        "platform": fake_platform(calls, {"current": {"stable": _current(LIVE)}}),
        "metrics": fake_metrics(calls),
        "approval": ApprovalResource(),  # the real one: it reads GUARDRAIL_TOKEN
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "storage")),
    }


def _current(track: TrackRef) -> dict[str, str]:
    return {"version": track.version, "artifact_sha": track.artifact_sha256}


def materialize(
    assets: Sequence[dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: Mapping[str, Any],
    *,
    selection: Any = None,
    settings: Mapping[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    run_config = None
    if settings is not None:
        build_op = f"{PRODUCT.replace('-', '_')}__build"
        run_config = dg.RunConfig(ops={build_op: BuildConfig(settings=dict(settings))})
    return dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        partition_key=RELEASE,
        selection=selection,
        run_config=run_config,
        raise_on_error=False,
    )


def step_failure(result: dg.ExecuteInProcessResult) -> Any:
    """The one failed step's event data (error and, for a dg.Failure, its description)."""
    assert result.success is False
    (failure,) = result.get_step_failure_events()
    return failure.step_failure_data


def error_chain(data: Any) -> list[tuple[str, str]]:
    """(class name, message) of the failure and every cause below it."""
    chain, error = [], data.error
    while error is not None:
        chain.append((error.cls_name, error.message))
        error = error.cause
    return chain


# --- build ------------------------------------------------------------------------------------


def test_build_hands_on_an_artifact_record(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
) -> None:
    result = materialize(
        [stages["build"]],
        instance,
        resources,
        settings={"error_rate": "0.05", "extra_latency_ms": "40"},
    )
    assert result.success
    record = result.output_for_node(stages["build"].node_def.name)
    assert type(record) is ArtifactRecord
    stored = resources["registry"].stored(record.sha256)
    assert record.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert (record.product, record.version, record.path) == (PRODUCT, RELEASE, str(stored))
    assert record.size_bytes == stored.stat().st_size
    assert record.settings == {"error_rate": 0.05, "extra_latency_ms": 40.0}  # canonical knobs
    (materialization,) = result.asset_materializations_for_node(stages["build"].node_def.name)
    assert materialization.partition == RELEASE
    assert materialization.metadata["sha256"].value == record.sha256
    assert materialization.metadata["size_bytes"].value == record.size_bytes


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"error_rate": "2"},
            "'error_rate': out of range, got '2'; expected a number within [0, 1]",
        ),
        ({"error_rate": "[0.5]"}, "'error_rate'"),
        ({"fail_jobs_matching": "(unclosed"}, "'fail_jobs_matching'"),
        ({"errorrate": "0.1"}, "unknown key 'errorrate'; known keys: error_rate"),
    ],
    ids=["out_of_range", "not_a_number", "bad_regex", "unknown_key"],
)
def test_build_refuses_a_bad_knob_naming_the_key_without_a_traceback(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    settings: dict[str, str],
    named: str,
) -> None:
    result = materialize([stages["build"]], instance, resources, settings=settings)
    data = step_failure(result)
    assert data.user_failure_data is not None  # a dg.Failure: the description is the message
    assert named in data.user_failure_data.description
    assert data.error.cls_name == "Failure"
    assert data.error.cause is None  # `from None`: no KnobError traceback chained below it
    assert not Path(resources["registry"].root).exists()  # nothing built or pushed


# --- the contracts through the IO manager ------------------------------------------------------


def test_the_artifact_record_round_trips_through_the_io_manager(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
) -> None:
    built = materialize([stages["build"]], instance, resources, settings={"error_rate": "0.1"})
    record = built.output_for_node(stages["build"].node_def.name)
    loaded = dg.Definitions(assets=[stages["build"]], resources=resources).load_asset_value(
        stages["build"].key, instance=instance, partition_key=RELEASE
    )
    assert type(loaded) is ArtifactRecord
    assert loaded == record

    received: list[Any] = []

    @dg.asset(
        ins={"artifact": dg.AssetIn(key=stages["build"].key)},
        partitions_def=releases_partitions(PRODUCT),
    )
    def receiver(artifact: ArtifactRecord) -> None:
        received.append(artifact)

    done = materialize([stages["build"], receiver], instance, resources, selection=[receiver])
    assert done.success
    assert received == [record]
    assert type(received[0]) is ArtifactRecord


SHA = hashlib.sha256(b"round trip").hexdigest()
STEP = MetricRow(
    step=1,
    weight=5,
    metric="error_rate",
    baseline=0.002,
    canary=0.003,
    threshold="+0.01 abs",
    p_value=0.41,
    verdict="pass",
    reason="within threshold",
)
SMOKE = SmokeReport(
    product=PRODUCT,
    env="staging",
    expected_version=RELEASE,
    run_id="r1",
    edge_url="http://127.0.0.1:18081",
    sections=["smoke"],
    started_at="2026-11-30T09:14:02+00:00",
    rows=[SmokeRow(section="smoke", name="GET /healthz", passed=True, detail="200", seconds=0.01)],
)
PASSED_CANARY = CanaryStageReport(
    version=RELEASE,
    artifact_sha256=SHA,
    previous=LIVE,
    outcome="passed",
    reason="canary passed every step",
    approver="ci:github:release-bot",
    gate=[GateResult(check=f"{PRODUCT}/build:artifact_integrity", status="PASSED")],
    verdict="pass",
    steps=[STEP],
    snapshots=[Snapshot(name="error_rate", path="/tmp/s.png", sha256=SHA)],
    drift=SchemaDrift(
        env="production",
        differences=[],
        expected_count=14,
        actual_count=14,
        summary="no differences",
        markdown="",
    ),
    migrations=MigrationGateReport(
        env="production",
        migrations_dir="/tmp/m",
        linted_files=["0001_initial.sql", "0002_seed_items.sql"],
        pending_before=["0002_seed_items.sql"],
        applied=["0002_seed_items.sql"],
    ),
    deployed=True,
    seconds=123.4,
)
# What each stage returns, by test id: (stage, value).
CONTRACTS = {
    "schema_migration_check": MigrationGateReport(
        env="staging",
        migrations_dir="/tmp/m",
        linted_files=["0001_initial.sql"],
        safety_findings=[
            Finding(
                source="squawk",
                file="/tmp/m/0003.sql",
                line=4,
                rule="require-concurrent-index-creation",
                message="blocks writes",
                help="Use CONCURRENTLY",
            )
        ],
        waivers=[
            Waiver(
                rule="adding-not-nullable-field",
                file="/tmp/m/0003.sql",
                line=3,
                reason="empty table",
                message="NOT NULL without default",
            )
        ],
        blocked_by=["migration_safety"],
    ),
    "staging_smoke": StagingSmokeReport(
        version=RELEASE, artifact_sha256=SHA, edge_url="http://127.0.0.1:18081", smoke=SMOKE
    ),
    "canary": PASSED_CANARY,
    "canary_blocked": PASSED_CANARY.model_copy(
        update={
            "outcome": "blocked",
            "reason": "production schema drift: 1 difference(s); production not touched",
            "verdict": "not judged",
            "steps": [],
            "snapshots": [],
            "deployed": False,
            "migrations": None,
            "drift": PASSED_CANARY.drift.model_copy(  # type: ignore[union-attr]
                update={
                    "actual_count": 15,
                    "summary": "1 difference(s)",
                    "markdown": "| unexpected | index | public.items_name_idx |",
                    "differences": [
                        DriftDifference(
                            kind="index",
                            object="public.items_name_idx",
                            change="unexpected",
                            actual={"columns": ["name"], "unique": False},
                        )
                    ],
                }
            ),
        }
    ),
    "promotion": PromotionReport(
        version=RELEASE,
        artifact_sha256=SHA,
        approver="ci:github:release-bot",
        previous=LIVE,
        outcome="promoted",
        purged=[PurgedEndpoint(path="/v1/items", surrogate_keys=["items"])],
        watch=WatchReport(
            passed=True,
            smoke_passed=True,
            verdict="pass",
            reason="held",
            seconds=60.0,
            steps=[STEP],
            smoke=SMOKE,
        ),
        post_deploy_smoke=SMOKE,
        change_id="chg-1",
    ),
    "audit": AuditReport(
        release=RELEASE,
        entries=[
            AuditEntryRef(
                seq=7, change_id="chg-1", outcome="promoted", entry_hash="9" * 64, created=True
            )
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_each_stage_contract_round_trips_through_the_io_manager(
    name: str, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    """What a stage returns is what the next one (and its gates) load: equal, same type, still
    frozen. A stand-in asset under the stage's key returns the value."""
    value = CONTRACTS[name]
    key = dg.AssetKey([PRODUCT, name.removesuffix("_blocked")])

    @dg.asset(key=key, partitions_def=releases_partitions(PRODUCT))
    def stand_in() -> Any:
        return value

    assert materialize([stand_in], instance, resources).success
    loaded = dg.Definitions(assets=[stand_in], resources=resources).load_asset_value(
        key, instance=instance, partition_key=RELEASE
    )
    assert type(loaded) is type(value)
    assert loaded == value
    assert loaded.model_dump(mode="json") == value.model_dump(mode="json")
    first_field = next(iter(type(loaded).model_fields))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(loaded, first_field, "changed")


# --- the gates upstream, evaluated on the instance ---------------------------------------------


def staging_rows(*, dlq_passes: bool = True) -> list[SmokeRow]:
    rows = [
        ("smoke", "GET /healthz", True),
        ("smoke", "GET /v1/items", True),
        ("edge_cache", "dynamic endpoint", True),
        ("edge_cache", "purge by surrogate key", True),
        ("worker_dlq", "normal job done after one attempt", True),
        ("worker_dlq", "poison job (high queue) dead-lettered after 4 attempts", dlq_passes),
    ]
    return [
        SmokeRow(
            section=s,
            name=n,
            passed=p,
            detail="ok" if p else "still pending after 9.5s",
            seconds=0.05,
        )  # type: ignore[arg-type]
        for s, n, p in rows
    ]


def stand_in_stages(*, dlq_passes: bool = True) -> list[Any]:
    """Stand-ins for the stages between build and promotion (they need staging, production
    and Postgres), each returning its contract for the build's artifact with the metadata the
    gate reader matches (`artifact_sha256`), and stand-ins for the two Postgres gates. The real
    check definitions judge everything else."""
    partitions_def = releases_partitions(PRODUCT)
    build = dg.AssetIn(key=dg.AssetKey([PRODUCT, "build"]))

    def out(value: Any, artifact: ArtifactRecord) -> dg.Output[Any]:
        return dg.Output(value, metadata={"artifact_sha256": artifact.sha256})

    @dg.asset(
        key=[PRODUCT, "schema_migration_check"],
        ins={"artifact": build},
        partitions_def=partitions_def,
    )
    def schema_migration_check(artifact: ArtifactRecord) -> dg.Output[MigrationGateReport]:
        return out(
            MigrationGateReport(
                env="staging",
                migrations_dir="/tmp/m",
                linted_files=["0001_initial.sql", "0002_seed_items.sql"],
                pending_before=["0002_seed_items.sql"],
                applied=["0002_seed_items.sql"],
            ),
            artifact,
        )

    @dg.asset(
        key=[PRODUCT, "staging_smoke"], ins={"artifact": build}, partitions_def=partitions_def
    )
    def staging_smoke(artifact: ArtifactRecord) -> dg.Output[StagingSmokeReport]:
        smoke = SMOKE.model_copy(
            update={
                "sections": ["smoke", "edge_cache", "worker_dlq"],
                "rows": staging_rows(dlq_passes=dlq_passes),
            }
        )
        return out(
            StagingSmokeReport(
                version=artifact.version,
                artifact_sha256=artifact.sha256,
                edge_url=smoke.edge_url,
                smoke=smoke,
            ),
            artifact,
        )

    @dg.asset(key=[PRODUCT, "canary"], ins={"artifact": build}, partitions_def=partitions_def)
    def canary(artifact: ArtifactRecord) -> dg.Output[CanaryStageReport]:
        return out(PASSED_CANARY.model_copy(update={"artifact_sha256": artifact.sha256}), artifact)

    @dg.asset_check(
        asset=STAGING_DRIFT.asset_key,
        name=STAGING_DRIFT.name,
        blocking=True,
        partitions_def=partitions_def,
    )
    def staging_drift() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            passed=True, description="stand-in (the real one reads Postgres)"
        )

    @dg.asset_check(
        asset=DATA_QUALITY.asset_key,
        name=DATA_QUALITY.name,
        blocking=True,
        partitions_def=partitions_def,
    )
    def data_quality() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            passed=True, description="stand-in (the real one reads Postgres)"
        )

    return [schema_migration_check, staging_smoke, canary, staging_drift, data_quality]


def evaluate_gates(
    location: dg.Definitions,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: Mapping[str, Any],
    *,
    settings: Mapping[str, str] | None = None,
    dlq_passes: bool = True,
) -> tuple[dg.ExecuteInProcessResult, ArtifactRecord]:
    """One run: the real build and every blocking gate before promotion evaluated on it (the
    real check definitions, but for the two stand-ins)."""
    upstream = {"build", "schema_migration_check", "staging_smoke", "canary"}
    real_checks = [
        c
        for c in location.asset_checks or []  # type: ignore[union-attr]
        if next(iter(c.check_keys)).asset_key.path[-1] in upstream
        and not set(c.check_keys) & {STAGING_DRIFT, DATA_QUALITY}
    ]
    result = materialize(
        [stages["build"], *stand_in_stages(dlq_passes=dlq_passes), *real_checks],
        instance,
        resources,
        settings=settings or {},
    )
    return result, result.output_for_node(stages["build"].node_def.name)


@pytest.mark.slow  # the edge_vcl gate runs varnishd -C where Varnish is installed
def test_the_gate_reader_sees_every_gate_passed_on_this_artifact(
    location: dg.Definitions,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    gate_keys: list[dg.AssetCheckKey],
) -> None:
    """The real checks evaluated in a run; `gate_rows` (what canary and promotion read) finds
    each one PASSED for this artifact, and for no other."""
    result, record = evaluate_gates(location, stages, instance, resources)
    assert result.success
    assert len(gate_keys) == 11  # the gates of build, staging and canary
    rows = gate_rows(instance, gate_keys, RELEASE, record.sha256)
    assert {r.check: r.status for r in rows} == {k.to_user_string(): "PASSED" for k in gate_keys}
    other = gate_rows(instance, gate_keys, RELEASE, LIVE.artifact_sha256)
    assert {r.status for r in other} == {f"PASSED_ON_OTHER_ARTIFACT {record.sha256[:12]}"}


class CorruptingRegistry(FakeRegistry):
    """Pushes, then the stored copy no longer matches its name (a corrupted or replaced blob)."""

    def build_and_push(self, spec: ProductSpec, version: str, settings: dict[str, Any]) -> Artifact:
        artifact = super().build_and_push(spec, version, settings)
        artifact.path.write_bytes(artifact.path.read_bytes() + b"appended after the push")
        return artifact


@pytest.mark.parametrize("registry", [FakeRegistry, CorruptingRegistry])
def test_artifact_integrity_judges_the_build_in_its_run(
    location: dg.Definitions,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    registry: type[FakeRegistry],
) -> None:
    """The real check after the real build in one run; a copy that does not re-hash fails it,
    the run stops (blocking) and the gate reader sees FAILED."""
    (integrity,) = [
        c
        for c in location.asset_checks or []  # type: ignore[union-attr]
        if next(iter(c.check_keys)).name == "artifact_integrity"
    ]
    resources = {**resources, "registry": registry(root=resources["registry"].root)}
    result = materialize([stages["build"], integrity], instance, resources)
    record = result.output_for_node(stages["build"].node_def.name)
    (evaluation,) = result.get_asset_check_evaluations()
    intact = registry is FakeRegistry
    assert evaluation.passed is intact
    assert result.success is intact
    (row,) = gate_rows(instance, list(integrity.check_keys), RELEASE, record.sha256)
    assert row.status == ("PASSED" if intact else "FAILED")


# --- canary launched alone ----------------------------------------------------------------------


def launch(
    stage: str,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: Mapping[str, Any],
) -> dg.ExecuteInProcessResult:
    """`stage` alone, as a UI launch of that asset: its inputs load from storage."""
    inputs = [stages["build"]] + ([stages["canary"]] if stage == "promotion" else [])
    return materialize([*inputs, stages[stage]], instance, resources, selection=[stages[stage]])


def build_only(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: Mapping[str, Any],
) -> ArtifactRecord:
    built = materialize([stages["build"]], instance, resources)
    assert built.success
    return built.output_for_node(stages["build"].node_def.name)


def test_canary_without_the_token_refuses_naming_the_variable(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Approval first (the gates were never evaluated either: the token is what it names)."""
    monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    build_only(stages, instance, resources)
    data = step_failure(launch("canary", stages, instance, resources))
    cls, message = error_chain(data)[-1]
    assert cls == "ApprovalRefused"
    assert "GUARDRAIL_TOKEN is not set" in message
    assert calls == []  # production never looked at


def test_canary_with_a_wrong_token_refuses_without_showing_it(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = "tpt-guess-of1ce"
    monkeypatch.setenv("GUARDRAIL_TOKEN", wrong)
    build_only(stages, instance, resources)
    data = step_failure(launch("canary", stages, instance, resources))
    cls, message = error_chain(data)[-1]
    assert cls == "ApprovalRefused"
    assert "GUARDRAIL_TOKEN does not match" in message
    assert wrong not in str(error_chain(data))
    assert calls == []


def test_canary_with_the_token_refuses_gates_never_evaluated(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[Any],
    gate_keys: list[dg.AssetCheckKey],
    guardrail_token: str,
) -> None:
    record = build_only(stages, instance, resources)
    data = step_failure(launch("canary", stages, instance, resources))
    assert data.error.cls_name == "GateNotPassed"
    description = data.user_failure_data.description
    assert description.startswith(
        f"refusing to act for release {RELEASE} (artifact {record.sha256[:12]}): blocking "
        "checks upstream did not pass: "
    )
    assert description.endswith("; production is unchanged")
    staging_gates = [k for k in gate_keys if k.asset_key.path[-1] != "canary"]
    for key in staging_gates:
        assert f"{key.to_user_string()} (NEVER_EVALUATED)" in description
    table = data.user_failure_data.metadata["gate"].value
    assert [r.data["status"] for r in table.records] == ["NEVER_EVALUATED"] * len(staging_gates)
    assert calls == []


@pytest.mark.slow  # the edge_vcl gate runs varnishd -C where Varnish is installed
def test_canary_with_the_token_refuses_a_failed_gate(
    location: dg.Definitions,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[Any],
    guardrail_token: str,
) -> None:
    evaluated, _ = evaluate_gates(location, stages, instance, resources, dlq_passes=False)
    assert evaluated.success is False  # the blocking worker_dlq check stopped that run
    data = step_failure(launch("canary", stages, instance, resources))
    assert data.error.cls_name == "GateNotPassed"
    description = data.user_failure_data.description
    assert f"{PRODUCT}/staging_smoke:worker_dlq (FAILED)" in description
    assert "artifact_integrity" not in description  # the passed ones are not listed
    assert calls == []


@pytest.mark.slow  # the edge_vcl gate runs varnishd -C where Varnish is installed
def test_canary_with_the_token_refuses_gates_passed_on_another_build(
    location: dg.Definitions,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[Any],
    guardrail_token: str,
) -> None:
    """Gates passed for the release, then it was rebuilt with other knobs: the new artifact
    was never judged."""
    evaluated, judged = evaluate_gates(location, stages, instance, resources)
    assert evaluated.success
    rebuilt = materialize([stages["build"]], instance, resources, settings={"error_rate": "0.2"})
    assert rebuilt.output_for_node(stages["build"].node_def.name).sha256 != judged.sha256
    data = step_failure(launch("canary", stages, instance, resources))
    assert data.error.cls_name == "GateNotPassed"
    statuses = {r.data["status"] for r in data.user_failure_data.metadata["gate"].value.records}
    assert statuses == {f"PASSED_ON_OTHER_ARTIFACT {judged.sha256[:12]}"}
    assert calls == []


def test_canary_refuses_with_the_real_platform_resource_without_reaching_postgres(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    guardrail_token: str,
) -> None:
    """The production resources as the code location binds them: still refused before any of
    them (and Postgres) is used."""
    build_only(stages, instance, resources)
    real = {**resources, "platform": PlatformResource(), "metrics": MetricsResource()}
    data = step_failure(launch("canary", stages, instance, real))
    assert data.error.cls_name == "GateNotPassed", error_chain(data)


@pytest.mark.slow  # the edge_vcl gate runs varnishd -C where Varnish is installed
def test_canary_with_the_token_and_every_gate_passed_is_not_refused(
    location: dg.Definitions,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[Any],
    guardrail_token: str,
) -> None:
    """Past both refusals, the first thing the canary does is hand back staging (ownership,
    in Postgres): here the guard stops it, before production was looked at."""
    evaluated, _ = evaluate_gates(location, stages, instance, resources)
    assert evaluated.success
    data = step_failure(launch("canary", stages, instance, resources))
    assert error_chain(data)[-1][0] == "AssertionError"
    assert "a fast stage test reached Postgres" in error_chain(data)[-1][1]
    assert "ownership.py" in str(data.error.cause.stack)
    assert calls == []


# --- promotion launched alone -------------------------------------------------------------------


def canary_in_storage(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: Mapping[str, Any],
) -> None:
    """A parked canary's report in storage (the input promotion loads), no gate evaluated."""
    canary = next(
        a
        for a in stand_in_stages()
        if isinstance(a, dg.AssetsDefinition) and a.key.path[-1] == "canary"
    )
    assert materialize([stages["build"], canary], instance, resources).success


def no_production_change(calls: list[tuple[str, tuple[Any, ...]]]) -> None:
    """At most a read of what production serves: nothing else reached the platform."""
    assert {name for name, _ in calls} <= {"for_product", "current"}
    assert all(args == ("production",) for name, args in calls if name == "current")


@pytest.mark.parametrize("token", [None, GUARDRAIL_TOKEN], ids=["no_token", "token"])
def test_promotion_refuses_gates_never_evaluated_first(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[tuple[str, tuple[Any, ...]]],
    gate_keys: list[dg.AssetCheckKey],
    monkeypatch: pytest.MonkeyPatch,
    token: str | None,
) -> None:
    """Gates before the token (decide_promotion): with or without it, the refusal names the
    blocking checks, the canary's own ones included."""
    if token is None:
        monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    else:
        monkeypatch.setenv("GUARDRAIL_TOKEN", token)
    canary_in_storage(stages, instance, resources)
    data = step_failure(launch("promotion", stages, instance, resources))
    assert data.error.cls_name == "GateNotPassed"
    description = data.user_failure_data.description
    for key in gate_keys:
        assert f"{key.to_user_string()} (NEVER_EVALUATED)" in description
    assert f"{PRODUCT}/canary:slo_regression (NEVER_EVALUATED)" in description
    no_production_change(calls)


@pytest.mark.slow  # the edge_vcl gate runs varnishd -C where Varnish is installed
def test_promotion_with_every_gate_passed_refuses_without_the_token(
    location: dg.Definitions,
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[tuple[str, tuple[Any, ...]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    evaluated, _ = evaluate_gates(location, stages, instance, resources)
    assert evaluated.success
    data = step_failure(launch("promotion", stages, instance, resources))
    cls, message = error_chain(data)[-1]
    assert cls == "ApprovalRefused"
    assert "GUARDRAIL_TOKEN is not set" in message
    no_production_change(calls)


def test_promotion_refuses_before_looking_at_production(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    calls: list[tuple[str, tuple[Any, ...]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    canary_in_storage(stages, instance, resources)
    step_failure(launch("promotion", stages, instance, resources))
    assert calls == []


def test_a_refused_promotion_never_reaches_postgres_with_the_real_platform(
    stages: dict[str, dg.AssetsDefinition],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    canary_in_storage(stages, instance, resources)
    real = {**resources, "platform": PlatformResource()}
    data = step_failure(launch("promotion", stages, instance, real))
    assert data.error.cls_name == "GateNotPassed", error_chain(data)
