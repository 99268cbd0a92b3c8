"""A product folder whose spec or contract does not load: one asset that says why.

The code location still loads (every other product keeps its assets, jobs, sensors and
schedules); this product shows in the UI as a single asset `<product>/product_spec` in its own
group, whose description and metadata name each problem's file, line and field (the same
lines `release validate PRODUCT` prints). Materializing it re-reads the folder and fails with
the problems, or says to reload the code location once they are fixed.
"""

import re

import dagster as dg

from dagster_project.core.spec import Problem, SpecError, load_spec, problems_of


def _slug(folder: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", folder) or "_"


def invalid_product_asset(folder: str, error: SpecError) -> dg.AssetsDefinition:
    problems = problems_of(error)
    listing = "\n".join(f"- `{problem}`" for problem in problems)

    @dg.asset(
        key=dg.AssetKey([_slug(folder), "product_spec"]),
        group_name=f"invalid_product_{_slug(folder)}",
        description=f"**Product folder `{folder}` does not load**: nothing of it can be "
        f"released until it is fixed (`release validate {folder}` checks it).\n\n{listing}",
        metadata={
            "problems": dg.MetadataValue.md(_table(problems)),
            "first_problem": str(problems[0]) if problems else str(error),
        },
        kinds={"yaml"},
    )
    def product_spec() -> None:
        try:
            load_spec(folder)
        except SpecError as again:
            raise dg.Failure(
                description=f"product folder {folder} does not load:\n{again}",
                metadata={"problems": dg.MetadataValue.md(_table(problems_of(again)))},
            ) from None
        raise dg.Failure(
            description=f"product folder {folder} loads now: reload the code location to release it"
        )

    return product_spec


def _table(problems: list[Problem]) -> str:
    lines = ["| file | line | field | problem |", "|---|---|---|---|"]
    for p in problems:
        message = p.message.replace("|", "\\|")
        lines.append(f"| {p.file} | {p.line or ''} | {p.field or ''} | {message} |")
    return "\n".join(lines)
