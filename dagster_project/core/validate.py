"""`release validate PRODUCT`: everything about a product folder that can be checked without
deploying it, each problem named by file, line and field.

1. the spec and the contract (`load_spec`: pydantic, file:line:column);
2. the contract's JSON Schemas are valid JSON Schema (draft 2020-12);
3. the service has the entry points the platform starts (`service/api.py`, `worker.py`);
4. the migrations: file names and versions, lint (sqlfluff) and safety (squawk and own rules);
5. the expectation suite the contract names (its model, file and field);
6. in a scratch database built from the migrations (dropped afterwards): the tables and key
   columns the worker probes count rows in, and every table and column the suite reads.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagster_project.core.spec import (
    Problem,
    ProductSpec,
    SpecError,
    load_spec,
    locate,
    problems_of,
)

SERVICE_ENTRY_POINTS = ("api.py", "worker.py")  # what core/platform/local.py starts


@dataclass
class Validation:
    product: str
    problems: list[Problem] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "valid": self.ok,
            "problems": [asdict(p) for p in self.problems],
            "checked": self.checked,
            "seconds": round(self.seconds, 3),
        }

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


def validate_product(product: str, *, with_database: bool = True) -> Validation:
    """Validate the product folder; never deploys. `with_database=False` skips step 6."""
    started = time.monotonic()
    result = Validation(product)
    try:
        spec = load_spec(product)
    except SpecError as exc:
        result.problems = problems_of(exc)
        result.checked.append("spec and contract")
        result.seconds = time.monotonic() - started
        return result
    result.checked += ["spec", "contract"]
    result.problems += schema_problems(spec)
    result.checked.append("JSON Schemas")
    result.problems += service_problems(spec)
    result.checked.append("service")
    files, found = migration_problems(spec)
    result.problems += found
    result.checked.append("migrations (names, lint, safety)")
    suite, found = suite_problems(spec)
    result.problems += found
    result.checked.append("expectation suite")
    if with_database and files is not None:
        result.problems += database_problems(spec, files, suite)
        result.checked.append("tables and columns in a scratch database built from the migrations")
    result.seconds = time.monotonic() - started
    return result


def _at(path: Path, loc: tuple[Any, ...], message: str) -> Problem:
    line, column = locate(path, loc)
    return Problem(str(path), line, column, ".".join(str(p) for p in loc), message)


def schema_problems(spec: ProductSpec) -> list[Problem]:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    problems = []
    for endpoint, contract in spec.contract.endpoints.items():
        if contract.json_schema is None:
            continue
        try:
            Draft202012Validator.check_schema(contract.json_schema)
        except SchemaError as exc:
            loc = ("endpoints", endpoint, "schema", *exc.path)
            problems.append(_at(spec.contract_path, loc, f"not a valid JSON Schema: {exc.message}"))
    return problems


def service_problems(spec: ProductSpec) -> list[Problem]:
    return [
        Problem(
            str(spec.service_path / name),
            0,
            0,
            "",
            f"missing: the platform starts the service's {name.removesuffix('.py')} from it",
        )
        for name in SERVICE_ENTRY_POINTS
        if not (spec.service_path / name).is_file()
    ]


def migration_problems(spec: ProductSpec) -> tuple[list[Path] | None, list[Problem]]:
    """(the migration files in order, or None when they cannot be read, and the problems)."""
    from dagster_project.core.migrations import lint, safety
    from dagster_project.core.migrations.history import MigrationError, read_migrations

    try:
        files = read_migrations(spec.migrations_path)
    except MigrationError as exc:
        return None, [Problem(str(spec.migrations_path), 0, 0, "", str(exc))]
    if not files:
        return [], [Problem(str(spec.migrations_path), 0, 0, "", "no migration (NNNN_name.sql)")]
    problems = []
    try:
        report = lint.lint_migrations([f.path for f in files])
        problems += [
            Problem(f.file, f.line, 1, "", f"{f.rule} {f.description} (sqlfluff)")
            for f in report.findings
        ]
    except lint.LintError as exc:
        problems.append(Problem(str(spec.migrations_path), 0, 0, "", str(exc)))
    checked = safety.check_safety(files)
    for finding in checked.findings:
        hint = f" ({finding.help})" if finding.help else ""
        message = f"{finding.rule}: {finding.message}{hint}"
        problems.append(Problem(finding.file, finding.line, 1, "", message))
    problems += [Problem(str(spec.migrations_path), 0, 0, "", e) for e in checked.errors]
    return [f.path for f in files], problems


def suite_problems(spec: ProductSpec) -> tuple[Any | None, list[Problem]]:
    from dagster_project.core.data_quality import DataQualityError, load_suite

    path = spec.suite_path
    if not path.is_file():
        where = ("data_quality", "suite")
        return None, [_at(spec.contract_path, where, f"the expectation suite {path} is missing")]
    try:
        return load_suite(path), []
    except DataQualityError as exc:
        match = re.search(r"line (\d+) column (\d+)", str(exc))
        line, column = (int(match[1]), int(match[2])) if match else (0, 0)
        return None, [Problem(str(path), line, column, "", str(exc))]


def _json_line(path: Path, needle: str) -> int:
    """The first line of a JSON file holding `"needle"`, 0 when none does."""
    try:
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if f'"{needle}"' in text:
                return number
    except OSError:
        pass
    return 0


def database_problems(spec: ProductSpec, files: list[Path], suite: Any | None) -> list[Problem]:
    """Build the migrations in a scratch database, then look up every table and column the
    worker probes and the suite read."""
    from dagster_project.core.migrations import catalog

    try:
        with catalog.scratch_database(f"validate_{spec.product}", files) as scratch:
            columns = _columns(scratch)
    except catalog.ScratchBuildError as exc:
        return [Problem(str(spec.migrations_path), 0, 0, "", f"the migrations do not apply: {exc}")]
    problems = []
    worker = spec.contract.worker
    dead_letter = spec.queues.dead_letter
    named = [
        (("worker", "results"), worker.results.table, worker.results.key_column),
        (("worker", "dead_letter_key_column"), dead_letter, worker.dead_letter_key_column),
    ]
    if worker.replay is not None:  # `release dlq`: every column it reads or writes
        for section, table, fields in (
            ("dead_letter", dead_letter, worker.replay.dead_letter.model_dump()),
            ("jobs_table", worker.replay.jobs_table.table, worker.replay.jobs_table.model_dump()),
        ):
            for field, value in fields.items():
                if field.endswith("_column") and value is not None:
                    named.append((("worker", "replay", section, field), table, value))
    for loc, table, column in named:
        if table not in columns:
            problems.append(_at(spec.contract_path, loc, f"no table {table!r} in the migrations"))
        elif column not in columns[table]:
            problems.append(
                _at(spec.contract_path, loc, f"table {table!r} has no column {column!r}")
            )
    if suite is not None:
        for table, expectations in suite.tables.items():
            schema_table = columns.get(table) if expectations.db_schema == "public" else None
            if schema_table is None:
                problems.append(
                    Problem(
                        str(spec.suite_path),
                        _json_line(spec.suite_path, table),
                        1,
                        f"tables.{table}",
                        f"no table {expectations.db_schema}.{table} in the migrations",
                    )
                )
                continue
            for index, entry in enumerate(expectations.expectations):
                for key in ("column", "column_A", "column_B"):
                    column = entry.kwargs.get(key)
                    if isinstance(column, str) and column not in schema_table:
                        problems.append(
                            Problem(
                                str(spec.suite_path),
                                _json_line(spec.suite_path, table),
                                1,
                                f"tables.{table}.expectations.{index}.kwargs.{key}",
                                f"table {table!r} has no column {column!r}",
                            )
                        )
    return problems


def _columns(db: str) -> dict[str, set[str]]:
    from dagster_project.core import database

    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public'"
        )
        found: dict[str, set[str]] = {}
        for table, column in cur.fetchall():
            found.setdefault(table, set()).add(column)
    return found


def render(result: Validation) -> str:
    """The human report: one line per problem, then the verdict."""
    lines = result.lines()
    verdict = (
        f"{result.product}: valid ({', '.join(result.checked)})"
        if result.ok
        else f"{result.product}: {len(result.problems)} problem(s)"
    )
    return "\n".join([*lines, verdict])


def render_json(result: Validation) -> str:
    return json.dumps(result.as_json(), indent=2)
