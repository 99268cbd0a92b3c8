"""`uv run deploy PRODUCT`: one release through the shared Dagster instance, with live progress.

The run is an ordinary Dagster run of the product's release job (visible in the UI, same
history as `dagster dev`), executed in this process. Everything checkable is checked before
the run starts (`prepare`, `check_token`): the product id, the state directory and database
URL, the spec, the migration files, the release key, every `--set` knob, the token.

Exit codes, one meaning each (README has the table):
0 promoted and audited, or nothing to do; 2 bad input or broken environment (named);
3 blocked by a gate or a release-order rule (named); 4 approval refused (the variable named);
5 production is owned by another release; 1 an unexpected internal error only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dagster_project.core import guardrail, knobs
from dagster_project.core.knobs import quote
from dagster_project.core.settings import bake_scale, validate_release_key
from dagster_project.core.spec import ProductSpec, SpecError, load_spec, validate_product_id
from dagster_project.core.versioning import default_release_version

if TYPE_CHECKING:  # dagster is imported where a run starts: bad input is answered without it
    import dagster as dg

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BLOCKED, EXIT_REFUSED, EXIT_OWNED = 0, 1, 2, 3, 4, 5
EXIT_INTERNAL = EXIT_FAILED
VERDICTS = {0: "OK", 1: "FAILED", 2: "BAD INPUT", 3: "BLOCKED", 4: "REFUSED", 5: "OWNED"}

# Error class NAME -> exit code, first match wins (so "owned" beats the rest). By name, so a
# class need not be importable here (ProductionOwned lives in the core's ownership module)
# and so Dagster's serialised errors of a run classify the same as exceptions raised here.
EXIT_BY_ERROR_CLASS: tuple[tuple[str, int], ...] = (
    ("ProductionOwned", EXIT_OWNED),
    ("ProductionLocked", EXIT_OWNED),
    ("ApprovalRefused", EXIT_REFUSED),
    ("RollbackRefused", EXIT_BAD_INPUT),  # nothing to roll back to, or never promoted
    ("RollbackFailed", EXIT_BLOCKED),  # the target could not take production: back on live
    ("AuditKeyError", EXIT_BAD_INPUT),  # the checkpoint signing key is unusable or not trusted
    ("CheckpointRefused", EXIT_BLOCKED),  # the trail no longer matches its checkpoints
    ("EvidenceError", EXIT_BLOCKED),  # the evidence store holds other bytes under a hash
    ("DatabaseUnavailable", EXIT_BAD_INPUT),  # before MigrationError: an outage is not a block
    ("StateDirError", EXIT_BAD_INPUT),
    ("PartChoiceError", EXIT_BAD_INPUT),  # RELEASE_EDGE/METRICS unknown, or its binary missing
    ("MigrationError", EXIT_BLOCKED),
    ("BadInput", EXIT_BAD_INPUT),
    ("CliError", EXIT_BAD_INPUT),
    ("SpecError", EXIT_BAD_INPUT),
    ("KnobError", EXIT_BAD_INPUT),
    ("UnknownEnvironment", EXIT_BAD_INPUT),
    ("PlatformError", EXIT_BAD_INPUT),
    ("ProcessStartError", EXIT_BAD_INPUT),
)
SUPERSEDED_RULE = "release order"
MAX_TOKEN_LENGTH = 1024
MESSAGE_LIMIT = 2000  # longest failure text shown; findings lists stay whole below it

INVOCATION_TAG = "release/invocation"


class BadInput(ValueError):
    """Unknown product, bad version or bad --set: exit 2."""


def exit_code_for(class_names: Iterable[str]) -> int | None:
    """The exit code for an error whose class chain has these names; None if unexpected."""
    names = set(class_names)
    return next((code for name, code in EXIT_BY_ERROR_CLASS if name in names), None)


def exception_class_names(exc: BaseException) -> set[str]:
    """Names of every class in the MRO of the exception and of its causes/contexts."""
    names: set[str] = set()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names.update(cls.__name__ for cls in type(current).__mro__)
        current = current.__cause__ or current.__context__
    return names


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
    rule: str | None = None  # a release-order rule, not a gate, blocked it


def parse_settings(pairs: list[str]) -> dict[str, str]:
    try:
        return knobs.parse_pairs(pairs)
    except knobs.KnobError as exc:
        raise BadInput(str(exc)) from None


def prepare(
    product: str, release: str | None, pairs: list[str]
) -> tuple[ProductSpec, str, dict[str, str], dict[str, Any]]:
    """Validate every input before anything runs; raises BadInput naming what is wrong.

    Returns the spec, the version, the settings as given (run config) and as parsed."""
    from dagster_project.core import checkpoints, database
    from dagster_project.core.migrations.history import MigrationError, read_migrations
    from dagster_project.core.settings import StateDirError, release_home

    try:
        validate_product_id(product)
        release_home()  # the state directory exists and is writable
        checkpoints.signer()  # the audit checkpoint key: usable and trusted (first use: made)
        if os.environ.get(database.ENV_URL):
            database.server()  # parses the URL only; an embedded server is not started here
        spec = load_spec(product)  # the spec and the contract
        _check_schemas(spec)  # the contract's JSON Schemas are JSON Schemas
        if spec.migrations_path.is_dir():
            read_migrations(spec.migrations_path)  # misnamed files, version clashes
    except (
        SpecError,
        StateDirError,
        database.DatabaseUnavailable,
        MigrationError,
        checkpoints.AuditKeyError,
    ) as exc:
        raise BadInput(str(exc)) from None
    # `--release ""` is an error, not "use the default": only an absent flag means that.
    version = default_release_version(spec) if release is None else release
    try:
        validate_release_key(version)
    except ValueError as exc:
        raise BadInput(f"--release: {exc}") from None
    try:
        bake_scale()
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    settings = parse_settings(pairs)
    try:
        parsed = knobs.validate(settings)
    except knobs.KnobError as exc:
        raise BadInput(str(exc)) from None
    return spec, version, settings, parsed


def _check_schemas(spec: ProductSpec) -> None:
    from dagster_project.core.validate import schema_problems

    problems = schema_problems(spec)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise SpecError(f"{spec.contract_path}: invalid JSON Schema(s):\n{lines}", problems)


def check_token(spec: ProductSpec, environ: Mapping[str, str] | None = None) -> str:
    """The guardrail token, verified before any work (the canary verifies it again): presence,
    format, fingerprint. Raises ApprovalRefused naming the variable, never echoing the value."""
    env = os.environ if environ is None else environ
    name = guardrail.TOKEN_ENV_VAR
    token = env.get(name)
    if token and token != token.strip():
        raise guardrail.ApprovalRefused(
            f"approval refused: {name} has leading or trailing whitespace (a space or a "
            "newline, e.g. from copying it or from `echo`); the token is compared exactly, "
            "so remove it"
        )
    if token and (len(token) > MAX_TOKEN_LENGTH or not token.isprintable()):
        raise guardrail.ApprovalRefused(
            f"approval refused: {name} is not a token (longer than {MAX_TOKEN_LENGTH} "
            "characters or holding control characters)"
        )
    return guardrail.verify(token, spec.guardrail.token_sha256, name)


def deploy(
    product: str,
    release: str | None = None,
    pairs: list[str] | None = None,
    *,
    echo: Callable[[str], None] = print,
) -> DeployOutcome:
    try:
        spec, version, settings, parsed = prepare(product, release, pairs or [])
    except BadInput as exc:
        return DeployOutcome(EXIT_BAD_INPUT, quote(product, 40), _shown(release), str(exc))
    try:
        check_token(spec)
    except guardrail.ApprovalRefused as exc:
        return DeployOutcome(EXIT_REFUSED, spec.product, version, str(exc))

    # A first progress line at once: the platform, Dagster's instance and the reconciler
    # take a few seconds before the run starts.
    echo(f"{spec.product} {version}: inputs valid; starting the platform")
    # Heavy imports (dagster, the platform) only once the inputs are known to be good.
    from dagster_project.core import registry
    from dagster_project.core.platform.local import LocalPlatform
    from dagster_project.instance import get_instance
    from dagster_project.partitions import register_release

    instance = get_instance()
    platform = LocalPlatform(spec.product)
    platform.up()
    _reconcile(spec, instance, echo)  # a release that died before us is settled first
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
    try:
        run_id, result = _execute(instance, spec, version, "release", settings, echo)
        outcome = classify(instance, spec, version, run_id, result_success=result)
        if outcome.exit_code == EXIT_BLOCKED and _has_unaudited_change(spec, version):
            # Production carried this release's traffic before it was sent back: audited too.
            echo("auditing the production change (production carried this release's traffic)")
            audit_run_id, _ = _execute(instance, spec, version, "audit", {}, echo)
            outcome.audit_run_id = audit_run_id
    finally:
        # Whatever this run still holds (Ctrl-C, an error) is released, and audited.
        _reconcile(spec, instance, echo)
    return outcome


def _reconcile(
    spec: ProductSpec, instance: dg.DagsterInstance, echo: Callable[[str], None]
) -> None:
    from dagster_project.core import ownership
    from dagster_project.production import reconcile_product

    for env in ("staging", "production"):
        ownership.stop_heartbeat(spec.product, env)  # no run of this process is acting now
    for line in reconcile_product(spec.product, instance).lines():
        echo(f"reconciled: {line}")


def _shown(release: str | None) -> str:
    return "?" if release is None else quote(release, 40)


def _job_name(spec: ProductSpec, which: str) -> str:
    from dagster_project.jobs import audit_job_name, release_job_name

    return release_job_name(spec.product) if which == "release" else audit_job_name(spec.product)


def job_definition(job_name: str) -> dg.JobDefinition:
    """The code location's job `job_name` (`dagster_project.definitions:defs`).

    The reconstructor `_execute` hands to the public `dg.build_reconstructable_job`: a run
    rebuilds its job by calling this function by module and name, so `deploy` reads no private
    Dagster API. The job is the very object the code location serves (same snapshot id)."""
    from dagster_project.definitions import defs

    return defs.resolve_job_def(job_name)


def _execute(
    instance: dg.DagsterInstance,
    spec: ProductSpec,
    version: str,
    which: str,
    settings: dict[str, str],
    echo: Callable[[str], None],
) -> tuple[str, bool]:
    import dagster as dg

    from dagster_project.core.settings import PROJECT_ROOT
    from dagster_project.jobs import PRODUCT_TAG

    recon = dg.build_reconstructable_job(
        "dagster_project.deploy",  # by name: this module may also run as __main__
        "job_definition",
        (_job_name(spec, which),),
        reconstructor_working_directory=str(PROJECT_ROOT),
    )
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
                # The process executing the run: if it dies, the reconciler marks the run
                # failed (an in-process run has no run worker for Dagster to monitor).
                **process_tags(),
            },
            raise_on_error=False,
        )
    finally:
        progress.stop()
    return result.run_id, result.success


def process_tags() -> dict[str, str]:
    from dagster_project.production import HOST_TAG, PID_STARTED_TAG, PID_TAG, this_process

    host, pid, started = this_process()
    return {HOST_TAG: host, PID_TAG: str(pid), PID_STARTED_TAG: repr(started)}


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
        import dagster as dg

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
        return f"✘ {stage}: {_cut(user_message(event.event_specific_data.error), 600)}"
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
    failures: list[tuple[int, str]] = []  # (exit code, text) of failed steps, in order
    superseded: str | None = None
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
        elif kind == "ASSET_MATERIALIZATION" and stage == "canary":
            metadata = event.event_specific_data.materialization.metadata
            outcome = getattr(metadata.get("outcome"), "value", None)
            if outcome == "superseded":
                previous = getattr(metadata.get("previous_version"), "value", None) or "?"
                superseded = (
                    f"{spec.product} {version} is older than the live release {previous}; "
                    "production is never moved backwards (production not touched)"
                )
        elif kind == "STEP_SUCCESS":
            stages[stage] = "done"
        elif kind == "STEP_SKIPPED":
            stages.setdefault(stage, "skipped")
        elif kind == "STEP_FAILURE":
            error = event.event_specific_data.error
            classes = _error_classes(error)
            stages[stage] = "failed"
            if "DagsterAssetCheckFailedError" in classes:
                continue  # the blocked check itself is reported below, by name
            text = user_message(error)
            code = exit_code_for(classes)
            if code is None and "approval refused" in text:
                code = EXIT_REFUSED
            failures.append((code or EXIT_FAILED, f"{stage}: {text}"))
    return _verdict(
        spec,
        version,
        run_id,
        stages=stages,
        blocked=blocked,
        failures=failures,
        superseded=superseded,
        result_success=result_success,
    )


def _verdict(
    spec: ProductSpec,
    version: str,
    run_id: str | None,
    *,
    stages: dict[str, str],
    blocked: list[dict[str, str]],
    failures: list[tuple[int, str]],
    superseded: str | None,
    result_success: bool,
) -> DeployOutcome:
    """The decision of `classify`, pure: owned > refused > release order > gates > other."""
    rows = _rows(stages)

    def outcome(code: int, headline: str, **extra: Any) -> DeployOutcome:
        return DeployOutcome(code, spec.product, version, headline, run_id, stages=rows, **extra)

    for wanted in (EXIT_OWNED, EXIT_REFUSED, EXIT_BAD_INPUT):
        text = next((t for c, t in failures if c == wanted), None)
        if text is not None:
            return outcome(wanted, text, blocked_by=blocked)
    if superseded:
        # The canary check fails on a superseded release, but no gate judged it: it is a rule.
        return outcome(
            EXIT_BLOCKED,
            f"blocked by the {SUPERSEDED_RULE} rule: {superseded}",
            blocked_by=blocked,
            rule=SUPERSEDED_RULE,
        )
    if blocked:
        names = ", ".join(b["check"] for b in blocked)
        return outcome(EXIT_BLOCKED, f"blocked by {names}", blocked_by=blocked)
    text = next((t for c, t in failures if c == EXIT_BLOCKED), None)
    if text is not None:
        return outcome(EXIT_BLOCKED, f"blocked: {text}")
    if result_success and stages.get("audit") == "done" and stages.get("promotion") == "done":
        return outcome(EXIT_OK, f"{spec.product} {version} promoted and audited")
    return outcome(EXIT_FAILED, failures[0][1] if failures else "the release run failed")


def _error_classes(error: Any) -> set[str]:
    names: set[str] = set()
    while error is not None:
        names.add(error.cls_name or "")
        error = error.cause
    return names


def user_message(error: Any) -> str:
    """The innermost message a person can act on, never Dagster's wrapper ("Error occurred
    while executing op ...") in front of it: the deepest error in the cause chain that is not
    one of Dagster's own, with its class name prefix removed."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.cause
    if not chain:
        return ""
    ours = [e for e in chain if not (e.cls_name or "").startswith("Dagster")]
    chosen = (ours or chain)[-1]
    text = (chosen.message or "").strip()
    # SerializableErrorInfo.message is "module.Class: text"; the class name is noise here.
    name = chosen.cls_name or ""
    head, sep, rest = text.partition(": ")
    if sep and name and (head == name or head.endswith("." + name)):
        text = rest
    return _cut(text, MESSAGE_LIMIT)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


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
    if not outcome.rule:  # a rule's block is said once, in the headline, not as a gate
        for block in outcome.blocked_by:
            why = guardrail_safe(block["why"])
            console.print(f"[red]blocked by[/red] {block['check']} on {block['asset']}: {why}")
    verdict = VERDICTS.get(outcome.exit_code, "FAILED")
    console.print(f"{verdict}: {guardrail_safe(outcome.headline)}")
    if outcome.run_id:
        console.print(f"run {outcome.run_id} (visible in the Dagster UI: uv run release ui)")


def guardrail_safe(text: str) -> str:
    token = os.environ.get(guardrail.TOKEN_ENV_VAR)
    # The token as presented, and stripped: a padded token must not leak either way.
    text = guardrail.scrub(text, token)
    return guardrail.scrub(text, token.strip()) if token and token.strip() else text
