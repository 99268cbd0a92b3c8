"""Command-line entry points (declared in pyproject.toml):

    release platform up|down|status [--json] [--product ID]
    deploy <product-id>                          (placeholder; the pipeline run replaces it)

The CLI stays thin: it parses arguments, calls the core and prints. Expected failures
(`CliError` and the core's own error types) print one clear line and exit non-zero, without
a traceback. New command groups register themselves in `_COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An expected failure: printed as one line, exit code 1."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    # Imported here so `release --help` stays fast.
    from dagster_project.core.database import DatabaseUnavailable
    from dagster_project.core.platform.local import PlatformError
    from dagster_project.core.platform.processes import ProcessStartError
    from dagster_project.core.platform.state import UnknownEnvironment
    from dagster_project.core.spec import SpecError

    return (
        CliError,
        DatabaseUnavailable,
        PlatformError,
        ProcessStartError,
        UnknownEnvironment,
        SpecError,
    )


# -- release platform ------------------------------------------------------------------------


def _platform(args: argparse.Namespace) -> Any:
    from dagster_project.core.platform import LocalPlatform

    return LocalPlatform(args.product)


def _platform_up(args: argparse.Namespace) -> int:
    status = _platform(args).up()
    _print_status(status, as_json=args.json)
    return 0 if all(env["healthy"] for env in status.values()) else 1


def _platform_down(args: argparse.Namespace) -> int:
    _platform(args).down()
    if args.json:
        print(json.dumps({"down": True}))
    else:
        Console().print("platform down: every platform process stopped, state cleared")
    return 0


def _platform_status(args: argparse.Namespace) -> int:
    status = _platform(args).status()
    _print_status(status, as_json=args.json)
    return 0 if all(env["healthy"] for env in status.values()) else 1


def _print_status(status: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return
    console = Console()
    for env, info in status.items():
        verdict = "[green]healthy[/]" if info["healthy"] else "[red]unhealthy[/]"
        weights = info.get("weights") or {}
        table = Table(
            title=f"{env}: {verdict}  edge {info.get('edge_url') or '-'}  "
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
        action.add_argument("--product", default=None, help="product id (default: the only one)")
        action.set_defaults(handler=handler)


# Each adds one subcommand group to `release`; later: status, audit, ...
_COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_platform]


def build_release_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="release", description="Operate the release platform of the data products."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_group in _COMMAND_GROUPS:
        add_group(commands)
    return parser


def _run(handler: Handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except _expected_errors() as exc:
        print(f"{_prog(args)}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return 130


def _prog(args: argparse.Namespace) -> str:
    parts = ["release", getattr(args, "command", None), getattr(args, "action", None)]
    return " ".join(p for p in parts if p)


def release_main(argv: Sequence[str] | None = None) -> int:
    args = build_release_parser().parse_args(argv)
    return _run(args.handler, args)


def deploy_main(argv: Sequence[str] | None = None) -> int:
    """Placeholder until the release pipeline's CLI lands."""
    print("deploy: not yet implemented", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(release_main())
