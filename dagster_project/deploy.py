"""`uv run deploy PRODUCT`: one release through the shared Dagster instance, with live progress.

The run is an ordinary Dagster run of the product's release job (visible in the UI, same
history as `dagster dev`), executed in this process. Exit codes:
0 promoted and audited (or already live), 1 anything else, 2 bad input, 3 blocked by a gate
(the summary names the check), 4 approval refused (the message names the variable).
"""

import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from dagster_project.core import guardrail
from dagster_project.core.settings import validate_release_key
from dagster_project.core.spec import ProductSpec, SpecError, load_spec
from dagster_project.core.versioning import default_release_version

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BLOCKED, EXIT_REFUSED = 0, 1, 2, 3, 4

INVOCATION_TAG = "release/invocation"


class BadInput(ValueError):
    """Unknown product, bad version or bad --set: exit 2."""


@dataclass
class DeployOutcome:
    exit_code: int
    product: str
    release: str
    headline: str
    run_id: str | None = None
    blocked_by: list[dict[str, str]] = field(default_factory=list)
    stages: list[dict[str, str]] = field(default_factory=list)
    audit_run_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def parse_settings(pairs: list[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set {pair!r}: expected KEY=VALUE")
        settings[key.strip()] = value.strip()
    return settings


def prepare(
    product: str, release: str | None, pairs: list[str]
) -> tuple[ProductSpec, str, dict[str, str], dict[str, Any]]:
    """Validate every input before anything runs; raises BadInput naming what is wrong.

    Returns the spec, the version, the settings as given (run config) and as parsed."""
    from assets.build import parse_setting
    from dagster_project.core import registry

    try:
        spec = load_spec(product)
    except SpecError as exc:
        raise BadInput(str(exc)) from None
    version = release or default_release_version(spec)
    try:
        validate_release_key(version)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    settings = parse_settings(pairs)
    parsed = {key: parse_setting(value) for key, value in settings.items()}
    try:
        registry.validate_settings(parsed)
    except ValueError as exc:
        raise BadInput(f"--set: {exc}") from None
    return spec, version, settings, parsed


def deploy(
    product: str,
    release: str | None = None,
    pairs: list[str] | None = None,
    *,
    echo: Callable[[str], None] = print,
) -> DeployOutcome:
    from dagster_project.core import registry
    from dagster_project.core.platform.local import LocalPlatform
    from dagster_project.instance import get_instance
    from dagster_project.partitions import register_release

    try:
        spec, version, settings, parsed = prepare(product, release, pairs or [])
    except BadInput as exc:
        return DeployOutcome(EXIT_BAD_INPUT, product, release or "?", str(exc))

    instance = get_instance()
    platform = LocalPlatform(spec.product)
    platform.up()
    # Deterministic and cheap: tells whether this exact artifact is already live.
    expected = registry.build_artifact(spec, version, parsed)
    live = platform.current("production").get("stable") or {}
    if live.get("version") == version and live.get("artifact_sha") == expected.sha256:
        return DeployOutcome(
            EXIT_OK,
            spec.product,
            version,
            f"{spec.product} {version} is already in production "
            f"(sha256 {expected.sha256[:12]}): nothing to do",
        )

    register_release(instance, spec.product, version)
    echo(f"releasing {spec.product} {version} (artifact sha256 {expected.sha256[:12]})")
    run_id, result = _execute(instance, spec, version, "release", settings, echo)
    outcome = classify(instance, spec, version, run_id, result_success=result)

    if outcome.exit_code == EXIT_BLOCKED and _has_unaudited_change(spec, version):
        # The canary carried production traffic before it was aborted: that change is audited too.
        echo("auditing the aborted canary (production carried its traffic)")
        audit_run_id, _ = _execute(instance, spec, version, "audit", {}, echo)
        outcome.audit_run_id = audit_run_id
    return outcome


def _job_name(spec: ProductSpec, which: str) -> str:
    from dagster_project.jobs import audit_job_name, release_job_name

    return release_job_name(spec.product) if which == "release" else audit_job_name(spec.product)


def _execute(
    instance: dg.DagsterInstance,
    spec: ProductSpec,
    version: str,
    which: str,
    settings: dict[str, str],
    echo: Callable[[str], None],
) -> tuple[str, bool]:
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from dagster_project.core.settings import PROJECT_ROOT
    from dagster_project.jobs import PRODUCT_TAG

    recon = ReconstructableRepository.for_module(
        "dagster_project.definitions", "defs", working_directory=str(PROJECT_ROOT)
    ).get_reconstructable_job(_job_name(spec, which))
    invocation = uuid.uuid4().hex
    # The progress thread prints what matters; Dagster's console logger would repeat it all.
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    if settings:
        op = f"{spec.product.replace('-', '_')}__build"
        run_config["ops"] = {op: {"config": {"settings": settings}}}
    progress = _Progress(instance, invocation, echo)
    progress.start()
    try:
        result = dg.execute_job(
            recon,
            instance=instance,
            run_config=run_config,
            tags={
                "dagster/partition": version,
                PRODUCT_TAG: spec.product,
                INVOCATION_TAG: invocation,
                "release/launched_by": "cli",
            },
            raise_on_error=False,
        )
    finally:
        progress.stop()
    return result.run_id, result.success


class _Progress(threading.Thread):
    """Prints stage and gate events of the run as they land in the event log."""

    def __init__(self, instance: dg.DagsterInstance, invocation: str, echo: Callable[[str], None]):
        super().__init__(daemon=True)
        self.instance, self.invocation, self.echo = instance, invocation, echo
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)

    def run(self) -> None:
        run_id, cursor = None, None
        while True:
            finished = self._done.is_set()
            if run_id is None:
                runs = self.instance.get_runs(
                    filters=dg.RunsFilter(tags={INVOCATION_TAG: self.invocation}), limit=1
                )
                run_id = runs[0].run_id if runs else None
            if run_id is not None:
                conn = self.instance.get_records_for_run(run_id, cursor=cursor, limit=500)
                cursor = conn.cursor
                for record in conn.records:
                    line = describe(record.event_log_entry)
                    if line:
                        self.echo(f"  [{time.monotonic() - self._t0:6.1f}s] {line}")
                if conn.has_more:
                    continue
            if finished:
                return
            self._done.wait(0.5)


def describe(entry: Any) -> str | None:
    """One progress line for the events a person wants to follow, None for the rest."""
    event = entry.dagster_event
    if event is None:
        message = entry.user_message or ""
        return (
            message
            if message.startswith(("canary", "built", "applied", "deployed", "audit"))
            else None
        )
    stage = (event.step_key or "").split("__", 1)[-1]
    kind = event.event_type_value
    if kind == "STEP_START":
        return f"▶ {stage}"
    if kind == "STEP_SUCCESS":
        return f"✔ {stage}"
    if kind == "STEP_FAILURE":
        error = event.event_specific_data.error
        text = error.message.strip().splitlines()[-1] if error else ""
        return f"✘ {stage}: {text[:300]}"
    if kind == "ASSET_CHECK_EVALUATION":
        data = event.event_specific_data
        verdict = "pass" if data.passed else "FAIL"
        return f"  gate {data.check_name}: {verdict}" + (
            f" — {data.description}" if data.description else ""
        )
    return None


def classify(
    instance: dg.DagsterInstance,
    spec: ProductSpec,
    version: str,
    run_id: str,
    *,
    result_success: bool,
) -> DeployOutcome:
    """Turn the run's events into the CLI's verdict and exit code."""
    events = instance.all_logs(run_id)
    stages: dict[str, str] = {}
    blocked: list[dict[str, str]] = []
    refused: str | None = None
    failure: str | None = None
    for entry in events:
        event = entry.dagster_event
        if event is None:
            continue
        stage = (event.step_key or "").split("__", 1)[-1]
        kind = event.event_type_value
        if kind == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            if not data.passed and data.blocking:
                blocked.append(
                    {
                        "check": data.check_name,
                        "asset": data.asset_key.path[-1],
                        "why": data.description or "",
                    }
                )
        elif kind == "STEP_SUCCESS":
            stages[stage] = "done"
        elif kind == "STEP_SKIPPED":
            stages.setdefault(stage, "skipped")
        elif kind == "STEP_FAILURE":
            error = event.event_specific_data.error
            text = _error_text(error)
            if error is not None and (
                "ApprovalRefused" in _error_classes(error) or "approval refused" in text
            ):
                refused = text
            elif "DagsterAssetCheckFailedError" not in _error_classes(error):
                failure = failure or f"{stage}: {text}"
            stages[stage] = "failed"
    if refused:
        return DeployOutcome(
            EXIT_REFUSED, spec.product, version, refused, run_id, stages=_rows(stages)
        )
    if blocked:
        names = ", ".join(b["check"] for b in blocked)
        return DeployOutcome(
            EXIT_BLOCKED,
            spec.product,
            version,
            f"blocked by {names}",
            run_id,
            blocked,
            _rows(stages),
        )
    if result_success and stages.get("audit") == "done" and stages.get("promotion") == "done":
        return DeployOutcome(
            EXIT_OK,
            spec.product,
            version,
            f"{spec.product} {version} promoted and audited",
            run_id,
            stages=_rows(stages),
        )
    return DeployOutcome(
        EXIT_FAILED,
        spec.product,
        version,
        failure or "the release run failed",
        run_id,
        stages=_rows(stages),
    )


def _error_classes(error: Any) -> set[str]:
    names: set[str] = set()
    while error is not None:
        names.add(error.cls_name or "")
        error = error.cause
    return names


def _error_text(error: Any) -> str:
    if error is None:
        return ""
    texts = []
    while error is not None:
        texts.append(error.message.strip().splitlines()[0] if error.message.strip() else "")
        error = error.cause
    return " <- ".join(t for t in texts if t)[:600]


def _rows(stages: dict[str, str]) -> list[dict[str, str]]:
    from assets.common import STAGES

    return [{"stage": s, "status": stages.get(s, "not run")} for s in STAGES]


def _has_unaudited_change(spec: ProductSpec, version: str) -> bool:
    from dagster_project.core import audit, changes

    return any(audit.find(c.change_id) is None for c in changes.for_release(spec.product, version))


def print_summary(outcome: DeployOutcome, echo: Callable[[str], None] = print) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)  # no hard line breaks
    table = Table(title=f"{outcome.product} {outcome.release}", show_header=True)
    table.add_column("stage")
    table.add_column("status")
    for row in outcome.stages:
        table.add_row(row["stage"], row["status"])
    if outcome.stages:
        console.print(table)
    for block in outcome.blocked_by:
        console.print(f"[red]blocked by[/red] {block['check']} on {block['asset']}: {block['why']}")
    verdict = {0: "OK", 1: "FAILED", 2: "BAD INPUT", 3: "BLOCKED", 4: "REFUSED"}[outcome.exit_code]
    console.print(f"{verdict}: {guardrail_safe(outcome.headline)}")
    if outcome.run_id:
        console.print(f"run {outcome.run_id} (visible in the Dagster UI: uv run release ui)")


def guardrail_safe(text: str) -> str:
    token = dg.EnvVar(guardrail.TOKEN_ENV_VAR).get_value()
    return guardrail.scrub(text, token)
