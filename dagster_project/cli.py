"""Command-line entry points (declared in pyproject.toml):

    deploy PRODUCT [--release VERSION] [--set KEY=VALUE ...]
    release status PRODUCT [--json]
    release platform up|down|status [--json] [--product ID]   (every product without --product)
    release new PRODUCT | release validate PRODUCT [--json]   (cli_products.py)
    release audit verify [--json] | show PRODUCT [--json] | ticket PRODUCT VERSION [--out DIR]
    release audit export [--since SEQ] [--format jsonl] | release audit checkpoint
    release ui                                   (dagster dev on the shared instance)
    release dlq list PRODUCT --env ENV [--json] | replay PRODUCT --env ENV (--job KEY | --all)
        [--dry-run]                              (the dead-letter queue; core/dlq.py)

The CLI stays thin: it parses arguments, calls the core and prints. Expected failures
(`CliError` and the core's own error types) print one clear line and exit with their code,
without a traceback; only an unexpected error exits 1 (with its traceback, to report it).
Exit codes: see EXIT_CODES_HELP (and the README). New command groups register themselves in
`_COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

Handler = Callable[[argparse.Namespace], int]


EXIT_CODES_HELP = (
    "exit codes: 0 done (or nothing to do); 2 bad input or environment (named); "
    "3 blocked by a gate or a release-order rule (named); 4 approval refused "
    "(GUARDRAIL_TOKEN missing, padded or wrong); 5 production is owned by another release; "
    "1 an unexpected internal error only"
)
ERROR_ECHO_LIMIT = 160  # argparse quotes bad arguments whole: a 100 KB one must not flood


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2 (bad input)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its error line cut to a readable length (it exits 2 as before)."""

    def error(self, message: str) -> NoReturn:
        if len(message) > ERROR_ECHO_LIMIT:
            message = f"{message[:ERROR_ECHO_LIMIT]}… ({len(message):,} characters)"
        super().error(message)


def _exit_code(exc: BaseException) -> int | None:
    """The documented exit code of an expected failure, by its class names; None otherwise."""
    from dagster_project.deploy import exception_class_names, exit_code_for

    return exit_code_for(exception_class_names(exc))


# -- release platform ------------------------------------------------------------------------


def _platforms(args: argparse.Namespace) -> list[Any]:
    """The platform of `--product`, else of every product folder: each product has its own
    environments, databases and ports. Without --product, a folder whose spec does not load
    is listed with its first problem (file:line:column and field) and skipped."""
    from dagster_project.core.platform import LocalPlatform
    from dagster_project.core.settings import list_products
    from dagster_project.core.spec import SpecError, problems_of

    if args.product is not None:
        return [LocalPlatform(args.product)]
    platforms = []
    for product in list_products():
        try:
            platforms.append(LocalPlatform(product))
        except SpecError as exc:
            first = problems_of(exc)[0]
            print(f"{product}: invalid product folder, skipped: {first}", file=sys.stderr)
    return platforms


def _platform_up(args: argparse.Namespace) -> int:
    statuses = {p.product: p.up() for p in _platforms(args)}
    _print_statuses(statuses, args)
    return 0 if _healthy(statuses) else 1


def _platform_down(args: argparse.Namespace) -> int:
    downed = []
    for platform in _platforms(args):
        platform.down()
        downed.append(platform.product)
    if args.json:
        print(json.dumps({"down": True, "products": downed}))
    else:
        Console().print(
            f"platform down ({', '.join(downed) or 'no product'}): every platform process "
            "stopped, state cleared"
        )
    return 0


def _platform_status(args: argparse.Namespace) -> int:
    statuses = {p.product: p.status() for p in _platforms(args)}
    _print_statuses(statuses, args)
    return 0 if _healthy(statuses) else 1


def _healthy(statuses: dict[str, dict[str, Any]]) -> bool:
    """Every environment of every product healthy; a product never brought up (no edge in
    either environment) is listed as down, not counted as unhealthy, unless it was asked for."""
    return all(
        env["healthy"]
        for status in statuses.values()
        if len(statuses) == 1 or any(env.get("edge_url") for env in status.values())
        for env in status.values()
    )


def _print_statuses(statuses: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """With --product: that product's environments (JSON: {env: ...}); without: every product
    (JSON: {product: {env: ...}})."""
    if args.json:
        shown: Any = next(iter(statuses.values())) if args.product is not None else statuses
        print(json.dumps(shown, indent=2, sort_keys=True))
        return
    if not statuses:
        Console().print("no product folder found (release new PRODUCT writes one)")
    for product, status in statuses.items():
        if len(statuses) > 1 and not any(env.get("edge_url") for env in status.values()):
            Console().print(f"{product}: down (release platform up --product {product})")
            continue
        _print_status(status, as_json=False, product=product)


def _print_status(status: dict[str, Any], *, as_json: bool, product: str = "") -> None:
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return
    console = Console()
    for env, info in status.items():
        verdict = "[green]healthy[/]" if info["healthy"] else "[red]unhealthy[/]"
        weights = info.get("weights") or {}
        table = Table(
            title=f"{product + ' ' if product else ''}{env}: {verdict}  "
            f"edge {info.get('edge_url') or '-'} ({(info.get('edge') or {}).get('kind', '-')})  "
            f"metrics {(info.get('metrics') or {}).get('kind', '-')}  "
            f"weights {' / '.join(f'{t} {w}%' for t, w in weights.items()) or '-'}",
            title_justify="left",
        )
        for column in ("track", "version", "artifact", "api", "pids", "alive"):
            table.add_column(column)
        for track, t in info["tracks"].items():
            table.add_row(
                track,
                str(t["version"]),
                (t["artifact_sha"] or "")[:12],
                t["api_url"] or "-",
                " ".join(f"{role}={pid}" for role, pid in t["pids"].items()),
                "yes" if t["alive"] else "[red]no[/]",
            )
        if not info["tracks"]:
            table.add_row("-", "no release deployed", "", "", "", "")
        console.print(table)
        for problem in info["problems"]:
            console.print(f"  [red]problem:[/] {problem}", highlight=False)


def _add_platform(commands: argparse._SubParsersAction) -> None:
    platform = commands.add_parser("platform", help="the local platform (edges, APIs, workers)")
    actions = platform.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, help_text in (
        ("up", _platform_up, "start databases and both edges (idempotent)"),
        ("down", _platform_down, "stop every platform process and clear its state"),
        ("status", _platform_status, "per environment: edge, releases, health, problems"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--json", action="store_true", help="print JSON")
        action.add_argument("--product", default=None, help="product id (default: every product)")
        action.set_defaults(handler=handler)


# -- release status ---------------------------------------------------------------------------


def _reconciled(product: str) -> list[str]:
    """Every command that looks at or touches production reconciles first (core/reconcile.py):
    traffic a dead release left is returned to stable and recorded. The Dagster instance is
    kept out of quick commands: a dead owner is known by its process and heartbeat, and the
    instance is loaded only when one was taken over, to mark its run failed."""
    from dagster_project.core.reconcile import reconcile

    result = reconcile(product)
    if result.take_overs:
        from dagster_project.instance import get_instance
        from dagster_project.production import mark_run_failed

        instance = get_instance()
        for taken in result.take_overs:
            if mark_run_failed(instance, taken.owner_run_id, f"its {taken.env} owner was dead"):
                result.failed_runs.append(taken.owner_run_id)
    return result.lines()


def _release_status(args: argparse.Namespace) -> int:
    from dagster_project.core import ownership
    from dagster_project.core.platform import LocalPlatform
    from dagster_project.core.spec import load_spec

    spec = load_spec(args.product)
    reconciled = _reconciled(spec.product)
    raw = LocalPlatform(spec.product).status()
    environments = {}
    for env, info in raw.items():
        stable = info["tracks"].get("stable") or {}
        owner = ownership.current(spec.product, env)
        environments[env] = {
            "owner": None
            if owner is None
            else {
                "release": owner.release,
                "run_id": owner.run_id,
                "phase": owner.phase,
                "since": owner.acquired_at.isoformat(),
                "heartbeat_age_seconds": round(owner.heartbeat_age_seconds, 1),
            },
            "version": stable.get("version"),
            "artifact_sha256": stable.get("artifact_sha"),
            "tracks": {
                track: {"version": t["version"], "artifact_sha256": t["artifact_sha"]}
                for track, t in info["tracks"].items()
            },
            "weights": {t: w for t, w in (info.get("weights") or {}).items() if w},
            "healthy": info["healthy"],
            "problems": info["problems"],
            "edge_url": info.get("edge_url"),
            "database_url": info.get("database"),
            "dead_letter": _dlq_depth(spec, env),
        }
    if args.json:
        print(
            json.dumps(
                {"product": spec.product, "environments": environments, "reconciled": reconciled},
                indent=2,
            )
        )
        return 0
    console = Console(width=max(Console().width, 150))
    table = Table(title=f"{spec.product}", title_justify="left")
    columns = (
        "env",
        "version",
        "artifact",
        "weights",
        "owner",
        "health",
        "dlq",
        "edge",
        "database",
    )
    for column in columns:
        table.add_column(column)
    for env, e in environments.items():
        owner = e["owner"]
        table.add_row(
            env,
            str(e["version"] or "-"),
            (e["artifact_sha256"] or "")[:12],
            " / ".join(f"{t} {w}%" for t, w in e["weights"].items()) or "-",
            f"{owner['release']} ({owner['phase']}, heartbeat {owner['heartbeat_age_seconds']}s)"
            if owner
            else "-",
            "[green]healthy[/]" if e["healthy"] else "[red]unhealthy[/]",
            _dlq_cell(e["dead_letter"]),
            e["edge_url"] or "-",
            e["database_url"] or "-",
        )
    console.print(table)
    for line in reconciled:
        console.print(f"  reconciled: {line}", highlight=False)
    return 0


def _dlq_depth(spec: Any, env: str) -> dict[str, Any]:
    """The dead-letter table's depth and oldest age in seconds; `error` names why not."""
    import psycopg2

    from dagster_project.core import dlq
    from dagster_project.core.database import DatabaseUnavailable

    try:
        return dlq.depth(spec, env).as_json()
    except (dlq.DlqInputError, DatabaseUnavailable, psycopg2.Error) as exc:
        return {"depth": None, "oldest_age_seconds": None, "problem": str(exc).splitlines()[0]}


def _dlq_cell(depth: dict[str, Any]) -> str:
    if depth.get("depth") is None:
        return "?"
    oldest = depth.get("oldest_age_seconds")
    return f"{depth['depth']} (oldest {oldest:.0f}s)" if oldest is not None else "0"


def _add_status(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="per environment: version, SHA, weights, health")
    status.add_argument("product", help="product id (a folder under the products directory)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_release_status)


# -- release audit ----------------------------------------------------------------------------


def _audit_verify(args: argparse.Namespace) -> int:
    from dagster_project.core import audit

    text, code = audit.verify_output(audit.verify(), args.json)
    print(text, file=sys.stdout if code == 0 or args.json else sys.stderr)
    return code


def _audit_show(args: argparse.Namespace) -> int:
    from dagster_project.core import audit
    from dagster_project.core.spec import validate_product_id

    validate_product_id(args.product)  # unknown ids: exit 2 listing the known products
    text, code = audit.show_output(args.product, args.json)
    print(text)
    return code


def _audit_ticket(args: argparse.Namespace) -> int:
    """The sign-off document of each audited production change of the release: HTML (the
    snapshots embedded) and Markdown, stored by content hash and copied to --out. Exit 0 when
    every checklist item that applies passed, 3 naming the first that did not."""
    import shutil
    from pathlib import Path

    from checks.compliance import instance_run_facts
    from dagster_project.core import audit, checklist, registry, ticket
    from dagster_project.core.contracts import AuditPayload, ContractError
    from dagster_project.core.settings import release_home, validate_release_key
    from dagster_project.core.spec import load_spec
    from dagster_project.instance import get_instance

    spec = load_spec(args.product)
    try:
        validate_release_key(args.version)
    except ValueError as exc:
        raise CliError(f"VERSION: {exc}") from None
    found = [e for e in audit.entries(spec.product) if e.release == args.version]
    if not found:
        raise CliError(
            f"VERSION: no audit entry for {spec.product} {args.version}: nothing to sign off "
            f"(release audit show {spec.product} lists the audited changes)"
        )
    out = Path(args.out) if args.out else release_home() / "tickets" / spec.product / args.version
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    facts = instance_run_facts(get_instance(), spec)
    first_failure = None
    for entry in found:
        try:
            run = facts(AuditPayload.parse(entry.payload))
        except ContractError:
            run = None  # item 0 of the checklist says why
        rows = checklist.checklist(
            entry.change_id,
            entry,
            token_sha256=spec.guardrail.token_sha256,
            verify_artifact=registry.verify,
            run_facts=lambda payload, run=run: run,
            covering=audit.covering,
        )
        checkpoint, _ = audit.covering(entry.seq, entry.entry_hash)
        sign_off = ticket.write(entry, rows, checkpoint, run)
        stem = ticket.file_stem(entry)
        try:
            shutil.copyfile(sign_off.ticket_html, out / f"{stem}.html")
            shutil.copyfile(sign_off.ticket_markdown, out / f"{stem}.md")
        except OSError as exc:
            raise CliError(f"--out: cannot write into {out}: {exc.strerror or exc}") from None
        failed = checklist.failed(rows)
        verdict = "ready to sign off" if not failed else f"NOT ready: {failed[0].item}"
        print(
            f"seq {entry.seq} {entry.payload.get('outcome')}: {out / stem}.html and .md "
            f"(sha256 {sign_off.ticket_html_sha256[:12]}, checkpoint "
            f"{checkpoint.seq if checkpoint else 'none'}): {verdict}"
        )
        if failed and first_failure is None:
            first_failure = f"seq {entry.seq}: {failed[0].item}: {failed[0].detail}"
    if first_failure:
        print(f"release audit ticket: checklist incomplete at {first_failure}", file=sys.stderr)
        return 3
    return 0


def _audit_export(args: argparse.Namespace) -> int:
    from dagster_project.core import audit

    for line in audit.export_lines(since=args.since):
        print(line)
    return 0


def _audit_checkpoint(args: argparse.Namespace) -> int:
    from dagster_project.core import audit

    checkpoint = audit.record_checkpoint()
    if checkpoint is None:
        print("the audit trail is empty: nothing to sign")
    else:
        print(
            f"checkpoint seq {checkpoint.seq} head {checkpoint.head_hash} signed by key "
            f"{checkpoint.key_id} at {checkpoint.time}"
        )
    return 0


def _seq(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a sequence number (0 or more), got {text!r}")
    return int(text)


def _add_audit(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser("audit", help="the hash-chained audit trail")
    actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="recompute the chain, then the signed checkpoints; exit 0 only when intact"
    )
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(handler=_audit_verify)
    show = actions.add_parser("show", help="list a product's entries, token masked")
    show.add_argument("product", help="product id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_audit_show)
    ticket = actions.add_parser(
        "ticket", help="write the sign-off document (HTML + Markdown) of a release's changes"
    )
    ticket.add_argument("product", help="product id")
    ticket.add_argument("version", help="the release, e.g. 1.4.0")
    ticket.add_argument("--out", help="directory for copies (default $RELEASE_HOME/tickets/...)")
    ticket.set_defaults(handler=_audit_ticket)
    export = actions.add_parser(
        "export", help="entries as JSON Lines for a SIEM (token masked), then their checkpoint"
    )
    export.add_argument("--since", type=_seq, default=0, help="only entries with seq > SEQ")
    export.add_argument("--format", choices=["jsonl"], default="jsonl", help="jsonl (default)")
    export.set_defaults(handler=_audit_export)
    checkpoint = actions.add_parser(
        "checkpoint", help="sign the current head (after checking it extends the last checkpoint)"
    )
    checkpoint.set_defaults(handler=_audit_checkpoint)


# -- release ui -------------------------------------------------------------------------------


def _ui(args: argparse.Namespace) -> int:
    import os
    import subprocess
    from pathlib import Path

    from dagster_project.core.settings import PROJECT_ROOT
    from dagster_project.instance import prepare_instance_home

    home = prepare_instance_home()
    print(f"DAGSTER_HOME={home}; opening the code location from workspace.yaml")
    dagster = Path(sys.executable).parent / "dagster"  # the venv's, whatever PATH says
    argv = [
        str(dagster),
        "dev",
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(args.port),
    ]
    return subprocess.call(argv, cwd=PROJECT_ROOT, env=os.environ.copy())


def _add_ui(commands: argparse._SubParsersAction) -> None:
    ui = commands.add_parser("ui", help="dagster dev (webserver + daemon) on the shared instance")
    ui.add_argument("--port", type=int, default=3000, help="webserver port on 127.0.0.1")
    ui.set_defaults(handler=_ui)


# -- release rollback -------------------------------------------------------------------------


def _rollback(args: argparse.Namespace) -> int:
    import os

    from dagster_project.core import guardrail
    from dagster_project.core.identity import approver_identity
    from dagster_project.core.rollback import rollback
    from dagster_project.core.spec import load_spec

    spec = load_spec(args.product)
    for line in _reconciled(spec.product):
        print(f"reconciled: {line}")
    result = rollback(
        spec.product,
        to_version=args.to,
        token=os.environ.get(guardrail.TOKEN_ENV_VAR),
        actor=approver_identity(),
        echo=print,
    )
    print(
        f"rolled back {result.product} from {result.from_release} to {result.to_release} "
        f"(sha256 {result.artifact_sha256[:12]}) in {result.seconds:.1f}s; post-deploy smoke "
        f"{'passed' if result.smoke_passed else 'FAILED'}; audit entry seq {result.audit_seq}"
    )
    return 0


def _add_rollback(commands: argparse._SubParsersAction) -> None:
    rollback = commands.add_parser(
        "rollback",
        help="production back to the previous (or a named) promoted release; needs "
        "GUARDRAIL_TOKEN; audited",
    )
    rollback.add_argument("product", help="product id (a folder under the products directory)")
    rollback.add_argument("--to", metavar="VERSION", help="a release promoted before")
    rollback.set_defaults(handler=_rollback)


# -- release dlq ------------------------------------------------------------------------------


def _dlq_spec(args: argparse.Namespace) -> Any:
    from dagster_project.core import dlq
    from dagster_project.core.spec import load_spec

    spec = load_spec(args.product)  # unknown ids: exit 2 listing the known products
    try:
        dlq.replay_contract(spec)
    except dlq.DlqInputError as exc:
        raise CliError(str(exc)) from None
    return spec


def _dlq_list(args: argparse.Namespace) -> int:
    from dagster_project.core import dlq

    spec = _dlq_spec(args)
    try:
        dead = dlq.list_dead(spec, args.env)
    except dlq.DlqInputError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        body = {"product": spec.product, "env": args.env, "table": spec.queues.dead_letter}
        print(json.dumps({**body, "dead": [d.as_json() for d in dead]}, indent=2))
        return 0
    if not dead:
        print(
            f"{spec.product} {args.env}: the dead-letter table {spec.queues.dead_letter} is empty"
        )
        return 0
    table = Table(
        title=f"{spec.product} {args.env}: {spec.queues.dead_letter}", title_justify="left"
    )
    for column in ("key", "queue", "attempts", "last error", "age", "dead since"):
        table.add_column(column)
    for d in dead:
        table.add_row(
            d.key, d.queue, str(d.attempts), d.latest_error[:80], f"{d.age_seconds:.0f}s",
            d.dead_since.isoformat(timespec="seconds"),
        )  # fmt: skip
    Console(width=max(Console().width, 150)).print(table)
    return 0


def _dlq_replay(args: argparse.Namespace) -> int:
    import os

    from dagster_project.core import dlq, guardrail
    from dagster_project.core.identity import approver_identity

    if (args.job is None) == (not args.all):
        raise CliError("--job KEY or --all: give exactly one of them")
    spec = _dlq_spec(args)
    keys = None if args.all else args.job
    seq = None
    try:
        if args.env == "production" and not args.dry_run:
            token = os.environ.get(guardrail.TOKEN_ENV_VAR)
            result, seq = dlq.replay_production(spec, keys, token=token, actor=approver_identity())
        else:
            result = dlq.replay(spec, args.env, keys, dry_run=args.dry_run)
    except dlq.DlqInputError as exc:
        raise CliError(str(exc)) from None
    except dlq.DlqRefused as exc:
        print(f"{_prog(args)}: refused: {exc}", file=sys.stderr)
        return 3
    for line in result.lines():
        print(line)
    what = "would replay" if result.dry_run else "replayed"
    summary = f"{spec.product} {args.env}: {what} {len(result.replayed)} job(s)"
    if result.skipped:
        summary += f", skipped {len(result.skipped)}"
    if result.dry_run:
        summary += " (dry run: nothing changed)"
    if seq is not None:
        summary += f"; audit entry seq {seq}"
    print(summary)
    return 0


def _add_dlq(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("dlq", help="the dead-letter queue: list and replay dead jobs")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    envs = ("staging", "production")
    listing = actions.add_parser("list", help="key, queue, attempts, last error, age")
    replaying = actions.add_parser(
        "replay",
        help="put dead jobs back with a fresh attempt budget, once; production needs "
        "GUARDRAIL_TOKEN and is audited",
    )
    for action in (listing, replaying):
        action.add_argument("product", help="product id (a folder under the products directory)")
        action.add_argument("--env", required=True, choices=envs, help="the environment")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_dlq_list)
    replaying.add_argument("--job", metavar="KEY", action="append", help="a dead job's key")
    replaying.add_argument("--all", action="store_true", help="every job of the dead-letter table")
    replaying.add_argument(
        "--dry-run", action="store_true", help="change nothing, say what would be replayed"
    )
    replaying.set_defaults(handler=_dlq_replay)


# Each adds one subcommand group to `release`.
def _add_products(commands: argparse._SubParsersAction) -> None:
    from dagster_project.cli_products import add_product_commands

    add_product_commands(commands)


_COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_status,
    _add_platform,
    _add_audit,
    _add_ui,
    _add_rollback,
    _add_dlq,
    _add_products,
]


def build_release_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="release",
        description="Operate the release platform of the data products.",
        epilog=EXIT_CODES_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_group in _COMMAND_GROUPS:
        add_group(commands)
    return parser


def _run(handler: Handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise  # a bug: exit 1 with the traceback, so it can be reported
        print(f"{_prog(args)}: error: {_scrubbed(str(exc))}", file=sys.stderr)
        return code


def _scrubbed(text: str) -> str:
    from dagster_project.deploy import guardrail_safe

    return guardrail_safe(text)


def _prog(args: argparse.Namespace) -> str:
    parts = ["release", getattr(args, "command", None), getattr(args, "action", None)]
    return " ".join(p for p in parts if p)


def release_main(argv: Sequence[str] | None = None) -> int:
    args = build_release_parser().parse_args(argv)
    return _run(args.handler, args)


def build_deploy_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deploy",
        description="Release a product to production: build, migrations, staging smoke, "
        "canary, promotion, audit. Needs GUARDRAIL_TOKEN in the environment. Every input "
        "(product, release key, --set, token, spec, migrations) is checked before work starts.",
        epilog=EXIT_CODES_HELP.replace("0 done", "0 promoted and audited, or already live"),
    )
    parser.add_argument("product", help="product id (a folder under the products directory)")
    parser.add_argument(
        "--release",
        help="release key, 1-64 of letters, digits, '.', '_', '+', '-' (default: src-<hash> of "
        "the source; an empty value is an error)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="carried in the artifact manifest: error_rate (0..1), extra_latency_ms "
        "(0..60000), fail_jobs_matching (a regex of at most 256 characters), "
        "dynamic_max_age (seconds, 1..31536000: the max-age the API declares on its dynamic "
        "endpoints; the edge_cache gate judges it against the spec's cache_policy)",
    )
    return parser


def deploy_main(argv: Sequence[str] | None = None) -> int:
    from dagster_project import deploy

    args = build_deploy_parser().parse_args(argv)
    try:
        outcome = deploy.deploy(args.product, args.release, args.settings)
    except KeyboardInterrupt:
        print("deploy: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise  # a bug: exit 1 with the traceback, so it can be reported
        verdict = deploy.VERDICTS.get(code, "FAILED")
        print(f"deploy: {verdict}: {deploy.guardrail_safe(str(exc))}", file=sys.stderr)
        return code
    deploy.print_summary(outcome)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(release_main())
