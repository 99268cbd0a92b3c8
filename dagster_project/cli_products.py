"""`release new PRODUCT` and `release validate PRODUCT [--json]`: products as folders.

    release new PRODUCT          a product folder from the scaffold under $RELEASE_PRODUCTS_DIR
                                 (or products/); prints its guardrail token once, as
                                 GUARDRAIL_TOKEN=<token> on a line of its own
    release validate PRODUCT     spec, contract, JSON Schemas, migrations (names, lint,
                                 safety), expectation suite, and the tables they name, without
                                 deploying; exit 0 valid, 2 with each problem's file, line, field

Registered in cli.py (`_COMMAND_GROUPS`); expected failures raise `cli.CliError` (exit 2).
"""

from __future__ import annotations

import argparse
import sys


def _new(args: argparse.Namespace) -> int:
    from dagster_project.cli import CliError
    from dagster_project.core.scaffold import ScaffoldRefused, create_product

    try:
        created = create_product(args.product)
    except ScaffoldRefused as exc:
        raise CliError(str(exc)) from None
    print(f"created product {created.product} in {created.path}:")
    for name in created.files:
        print(f"  {name}")
    print(
        "its guardrail token follows, shown this once: keep it in your secret store "
        f"(product.yaml keeps only its SHA-256, {created.token_sha256[:12]}...)"
    )
    print(f"GUARDRAIL_TOKEN={created.token}")
    print(
        f"next: uv run release validate {created.product}, then "
        f"GUARDRAIL_TOKEN=<the token> uv run deploy {created.product}"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from dagster_project.core.validate import render, render_json, validate_product

    result = validate_product(args.product, with_database=not args.no_database)
    if args.json:
        print(render_json(result))
    else:
        print(render(result), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 2


def add_product_commands(commands: argparse._SubParsersAction) -> None:
    new = commands.add_parser(
        "new",
        help="write a new product folder (spec, migration, expectations, service, contract) "
        "and print its guardrail token once",
    )
    new.add_argument("product", help="the new product's id (a folder name: a-z, 0-9, '-')")
    new.set_defaults(handler=_new)
    validate = commands.add_parser(
        "validate",
        help="check a product folder without deploying: exit 0, or 2 naming each problem's "
        "file, line and field",
    )
    validate.add_argument("product", help="product id (a folder under the products directory)")
    validate.add_argument("--json", action="store_true", help="print JSON")
    validate.add_argument(
        "--no-database",
        action="store_true",
        help="skip the scratch database that checks the tables and columns the contract and "
        "the suite name",
    )
    validate.set_defaults(handler=_validate)
