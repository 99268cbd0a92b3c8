"""Data-quality gate: a versioned Great Expectations suite validated against Postgres tables.

The suite is a JSON file in the product's `expectations/` folder, named by the product's
contract (`data_quality.suite`); its `tables` are the tables the gate reads:

    {"name": "release_quality", "version": 1,
     "tables": {"orders": {"min_rows": 1, "expectations": [
         {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "id"}}]}}}

`expectations` entries are Great Expectations 1.x configurations (`type` + `kwargs`), so any
GE expectation can be used. Every table also gets `expect_table_row_count_to_be_between
(min_value=min_rows)` first: an empty table is a failure, never a vacuous pass.

Great Expectations takes ~3.5 s to import (~10 s without cached bytecode) and ~190 MB of
memory, so it is imported only inside `validate_tables`, never in the release's process:

- The platform's validator (`serve_platform`), a supervisord program `LocalPlatform.up` adds
  per product, imports GE once and answers each request on a unix socket in a forked child
  (`platform_socket`), so a release pays neither the import nor its CPU.
- Without it (platform not up through `up`, validator stopped or restarting), the gate runs a
  child process of its own (`Validator`): started (niced, by run id) once the staging smoke's
  worker retry-timing rows are judged, it imports GE while the rest of the smoke waits,
  validates once asked, answers in JSON and exits.

Both defer altair and scipy.stats, which GE imports for three expectations only
(`_DeferredImports`): ~145 MB instead of ~220 MB. A validator that is asked and gives no
answer is an error (the gate blocks), never a fallback. Loading and checking the suite file
(`load_suite`) does not need GE.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import make_url

from dagster_project.core import database
from dagster_project.core.settings import release_home

ROW_COUNT_EXPECTATION = "expect_table_row_count_to_be_between"


class DataQualityError(RuntimeError):
    """The suite could not be loaded or run (bad file, unreachable database); blocks."""


# --------------------------------------------------------------------------------------------
# The suite file
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ExpectationEntry(_Strict):
    type: str = Field(pattern=r"^expect_[a-z0-9_]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)


class TableExpectations(_Strict):
    db_schema: str = Field(default="public", alias="schema")
    # At least one row: "no data" must never validate successfully.
    min_rows: int = Field(default=1, ge=1)
    expectations: list[ExpectationEntry] = Field(min_length=1)


class QualitySuite(_Strict):
    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    description: str = ""
    tables: dict[str, TableExpectations] = Field(min_length=1)


def default_suite_path(product_id: str) -> Path:
    """The suite the product's contract names."""
    from dagster_project.core.spec import load_spec

    return load_spec(product_id).suite_path


def load_suite(suite_path: Path | str) -> QualitySuite:
    """Read and check the suite file; errors name the file and the field (or line)."""
    path = Path(suite_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataQualityError(f"expectation suite {path} cannot be read: {exc.strerror}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataQualityError(
            f"expectation suite {path} line {exc.lineno} column {exc.colno}: invalid JSON "
            f"({exc.msg})"
        ) from exc
    try:
        return QualitySuite.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise DataQualityError(f"expectation suite {path} is invalid: {problems}") from exc


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataQualityReport:
    success: bool
    # One dict per expectation: table, expectation, column, success, observed (+ kwargs).
    results: list[dict[str, Any]]
    evaluated: int  # expectations that ran to a result (errors excluded)
    suite: str = ""
    version: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # rows per table, as GE counted them
    reasons: list[str] = field(default_factory=list)  # why it failed, one line each
    seconds: float = 0.0

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["success"]]

    def summary(self) -> str:
        head = f"suite {self.suite} v{self.version}"
        if self.success:
            return (
                f"{head}: {self.evaluated} expectations passed over "
                f"{sum(self.rows.values())} rows in {len(self.rows)} tables"
            )
        return f"{head} failed: " + "; ".join(self.reasons)

    def as_markdown(self) -> str:
        lines = [
            "| table | expectation | column | result | observed |",
            "|---|---|---|---|---|",
        ]
        for r in self.results:
            observed = str(r["observed"]).replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r['table']} | {r['expectation']} | {r['column'] or '—'} | "
                f"{'pass' if r['success'] else '**FAIL**'} | {observed[:200]} |"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_great_expectations() -> Iterator[None]:
    """GE logs at INFO and warns freely; the check's metadata carries what matters."""
    logger = logging.getLogger("great_expectations")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


# --- the gate's own process -----------------------------------------------------------------

VALIDATOR_ANSWER_SECONDS = 300.0  # a validation that takes longer is an error (blocks)
VALIDATOR_IDLE_SECONDS = 900.0  # a validator never asked exits on its own (its stage failed)
# Its import overlaps the staging smoke, whose worker timing rows (retry backoff within
# tolerance_ms) must not lose the CPU to it on a busy host: it runs niced.
VALIDATOR_NICE = 15
_SERVE = "from dagster_project.core.data_quality import serve; raise SystemExit(serve())"


class Validator:
    """A child process that imports Great Expectations at once, then validates one suite when
    asked (`validate`) and exits. It also exits when its parent closes the pipe (the parent
    died) or after VALIDATOR_IDLE_SECONDS unasked."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # GE's warnings; every error is in the JSON answer
            text=True,
            env={**os.environ, "GX_ANALYTICS_ENABLED": "False"},
        )

    def validate(self, db: str, suite_path: Path | str) -> DataQualityReport:
        """The report of `validate_tables(db, suite_path)`, run in the child; its
        DataQualityError / DatabaseUnavailable raised here as they would be in-process."""
        request = json.dumps({"db": db, "suite": str(suite_path)}) + "\n"
        try:
            out, _ = self.proc.communicate(request, timeout=VALIDATOR_ANSWER_SECONDS)
        except subprocess.TimeoutExpired:
            self.close()
            raise DataQualityError(
                f"the data-quality validator gave no answer within {VALIDATOR_ANSWER_SECONDS:.0f}s"
            ) from None
        except OSError as exc:  # it died before reading the request
            self.close()
            raise DataQualityError(f"the data-quality validator is gone: {exc}") from None
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        if not lines:
            raise DataQualityError(
                f"the data-quality validator exited with code {self.proc.returncode} "
                "without an answer"
            )
        return _report_from(json.loads(lines[-1]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=5)


_validators: dict[str, Validator] = {}
_validators_lock = threading.Lock()


def start_validator(key: str, product: str | None = None) -> None:
    """Start the validator for `key` (a run id) now, so it is ready when the gate asks; none
    when `product`'s platform runs its own (`platform_socket`)."""
    if product is not None and platform_socket(product).exists():
        return
    with _validators_lock:
        if key not in _validators:
            _validators[key] = Validator()


def validate_in_child(
    key: str, db: str, suite_path: Path | str, product: str | None = None
) -> DataQualityReport:
    """Validate in another process: `product`'s platform validator when it listens (GE
    imported once for every release), else the validator started for `key`, else a new one
    (a gate run in another process than its stage, or on its own, pays the import here)."""
    if product is not None:
        answer = _ask_platform_validator(platform_socket(product), db, suite_path)
        if answer is not None:
            with _validators_lock:  # one started before the platform's was up: not needed
                unused = _validators.pop(key, None)
            if unused is not None:
                unused.close()
            return _report_from(answer)
    with _validators_lock:
        validator = _validators.pop(key, None)
    if validator is None or validator.proc.poll() is not None:
        validator = Validator()
    try:
        return validator.validate(db, suite_path)
    finally:
        validator.close()


def _report_from(answer: dict[str, Any]) -> DataQualityReport:
    """A validator's JSON answer as the report, or its error raised here."""
    if "report" in answer:
        return DataQualityReport(**answer["report"])
    error = (
        database.DatabaseUnavailable
        if answer.get("error") == "DatabaseUnavailable"
        else DataQualityError
    )
    raise error(str(answer.get("message", "the validator failed")))


# --- the platform's validator: GE imported once, a forked child per validation --------------

PLATFORM_CONNECT_SECONDS = 2.0
PLATFORM_REQUEST_SECONDS = 10.0  # a connection that sends no request within this is dropped


def platform_socket(product: str) -> Path:
    """The unix socket of `product`'s platform validator (`serve_platform`)."""
    return release_home() / "validator" / f"{product}.sock"


def platform_argv(product: str) -> list[str]:
    """The command line supervisord runs for `product`'s platform validator."""
    code = (
        "from dagster_project.core.data_quality import serve_platform; "
        f"raise SystemExit(serve_platform({product!r}))"
    )
    return [sys.executable, "-c", code]


def _ask_platform_validator(path: Path, db: str, suite_path: Path | str) -> dict[str, Any] | None:
    """The platform validator's answer; None when none listens at `path` (not started,
    stopped, restarting), so the caller validates in a child of its own. Once a request is
    sent, no answer is an error (the gate blocks), never a fallback."""
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(PLATFORM_CONNECT_SECONDS)
        try:
            conn.connect(str(path))
        except OSError:
            return None
        conn.settimeout(VALIDATOR_ANSWER_SECONDS)
        try:
            conn.sendall((json.dumps({"db": db, "suite": str(suite_path)}) + "\n").encode())
            conn.shutdown(socket.SHUT_WR)
            received = b"".join(iter(lambda: conn.recv(65536), b""))
        except TimeoutError:
            raise DataQualityError(
                f"the platform's data-quality validator ({path}) gave no answer within "
                f"{VALIDATOR_ANSWER_SECONDS:.0f}s"
            ) from None
        except OSError as exc:
            raise DataQualityError(
                f"the platform's data-quality validator ({path}) failed: {exc}"
            ) from None
    finally:
        conn.close()
    lines = [
        line for line in received.decode(errors="replace").splitlines() if line.startswith("{")
    ]
    if not lines:
        raise DataQualityError(
            f"the platform's data-quality validator ({path}) closed the connection without "
            "an answer"
        )
    return json.loads(lines[-1])


def serve_platform(product: str) -> int:
    """`product`'s platform validator, a supervisord program of `LocalPlatform.up`: imports
    GE once, then answers each connection on `platform_socket(product)` in a forked child
    (same answers as `serve`), so no release pays the import and no validation leaves state
    behind for the next. The socket appears only once GE is imported and it listens."""
    with contextlib.suppress(OSError):
        os.nice(VALIDATOR_NICE)
    _import_great_expectations()
    path = platform_socket(product)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    listening = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        listening.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listening))
    os.chmod(listening, 0o600)
    server.listen(16)
    os.replace(listening, path)

    def stop(*_: object) -> None:
        with contextlib.suppress(OSError):
            path.unlink()  # supervisord stops this one before it starts another
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped by the kernel
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:  # the child: one validation, then exit
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(number, signal.SIG_DFL)
            server.close()
            signal.alarm(int(VALIDATOR_ANSWER_SECONDS) + 10)  # never outlives its asker's wait
            code = 1
            try:
                conn.settimeout(PLATFORM_REQUEST_SECONDS)
                request = conn.makefile("rb").readline().decode()
                if request:
                    conn.sendall((json.dumps(_answer(request), default=str) + "\n").encode())
                code = 0
            finally:
                os._exit(code)
        conn.close()


class _DeferredImports(importlib.abc.MetaPathFinder):
    """Loads `NAMES` lazily (`importlib.util.LazyLoader`): a module runs at its first
    attribute access, not at its import. Great Expectations imports altair and scipy.stats
    at module level for three expectations (KL divergence, two KS tests) that use them only
    inside functions; a suite without those never runs them, which saves the validator
    ~75 MB and ~2 s of CPU. A suite that uses them loads them when they are first called."""

    NAMES = frozenset({"altair", "scipy.stats"})

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.NAMES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def _import_great_expectations() -> None:
    """The validator's import of GE, with `_DeferredImports` installed first. Only in the
    validator's own process: nothing else is imported lazily."""
    sys.meta_path.insert(0, _DeferredImports())
    with contextlib.suppress(Exception), _quiet_great_expectations():
        import great_expectations  # noqa: F401


def serve() -> int:
    """The validator's side (`Validator`): import GE, wait for one request, answer, exit."""
    with contextlib.suppress(OSError):
        os.nice(VALIDATOR_NICE)
    _import_great_expectations()
    ready, _, _ = select.select([sys.stdin], [], [], VALIDATOR_IDLE_SECONDS)
    line = sys.stdin.readline() if ready else ""
    if not line:  # idle too long, or the parent is gone
        return 0
    print(json.dumps(_answer(line), default=str), flush=True)
    return 0


def _answer(line: str) -> dict[str, Any]:
    """A validator's answer to one JSON request line: the report, or the error by name."""
    try:
        request = json.loads(line)
        report = validate_tables(request["db"], request["suite"])
        return {"report": asdict(report)}
    except database.DatabaseUnavailable as exc:
        return {"error": "DatabaseUnavailable", "message": str(exc)}
    except DataQualityError as exc:
        return {"error": "DataQualityError", "message": str(exc)}
    except Exception as exc:  # fail closed: the gate blocks, naming what went wrong
        return {"error": "DataQualityError", "message": f"{type(exc).__name__}: {exc}"}


def validate_tables(db: str, suite_path: Path | str) -> DataQualityReport:
    """Validate the tables of logical database `db` against the suite file at `suite_path`.

    Raises DataQualityError / DatabaseUnavailable when it cannot run at all. Any failing or
    erroring expectation, or a table with fewer than `min_rows` rows, gives success=False."""
    started = time.perf_counter()
    suite = load_suite(suite_path)
    # Fail fast (and clearly) before paying for the GE import.
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")

    # No usage statistics: this machine has no internet, and a gate must not phone home.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    with _quiet_great_expectations():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.expectations.expectation_configuration import (
            ExpectationConfiguration,
        )

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        datasource = _add_datasource(context, database.server().sqlalchemy_url(db))

        results: list[dict[str, Any]] = []
        rows: dict[str, int] = {}
        reasons: list[str] = []
        for table, spec in suite.tables.items():
            ge_suite = gx.ExpectationSuite(name=f"{suite.name}.{table}")
            configs = [{"type": ROW_COUNT_EXPECTATION, "kwargs": {"min_value": spec.min_rows}}]
            configs += [e.model_dump() for e in spec.expectations]
            for index, config in enumerate(configs):
                try:
                    ge_suite.add_expectation(ExpectationConfiguration(**config).to_domain_obj())
                except Exception as exc:  # GE raises many types for an unknown/invalid config
                    where = "min_rows" if index == 0 else f"expectations.{index - 1}"
                    raise DataQualityError(
                        f"expectation suite {suite_path}: tables.{table}.{where}: "
                        f"{config['type']} is not a valid Great Expectations expectation: "
                        f"{_first_line(exc)}"
                    ) from exc
            ge_suite = context.suites.add(ge_suite)
            try:
                asset = datasource.add_table_asset(
                    name=table, table_name=table, schema_name=spec.db_schema
                )
                batch = asset.add_batch_definition_whole_table("whole_table").get_batch()
                validation = batch.validate(ge_suite)
            except Exception as exc:  # a missing table or lost connection: record, block
                message = _first_line(exc)
                results.append(_row(table, "load_table", None, False, message, {}))
                reasons.append(f"table {spec.db_schema}.{table} could not be validated: {message}")
                continue
            for outcome in validation.results:
                row = _result_row(table, outcome)
                results.append(row)
                if row["expectation"] == ROW_COUNT_EXPECTATION:
                    count = (outcome.result or {}).get("observed_value")
                    rows[table] = int(count) if isinstance(count, int | float) else 0
                    if not row["success"]:
                        reasons.append(
                            f"table {table} has {rows[table]} rows; the suite needs at "
                            f"least {spec.min_rows}"
                        )
                elif not row["success"]:
                    column = f" on {table}.{row['column']}" if row["column"] else f" on {table}"
                    reasons.append(f"{row['expectation']}{column} failed: {row['observed']}")

    evaluated = sum(1 for r in results if r["error"] is None and r["expectation"] != "load_table")
    if evaluated == 0:
        reasons.append("no expectation was evaluated")
    if sum(rows.values()) == 0 and not any("rows; the suite needs" in r for r in reasons):
        reasons.append("no rows were evaluated")
    return DataQualityReport(
        success=not reasons and all(r["success"] for r in results),
        results=results,
        evaluated=evaluated,
        suite=suite.name,
        version=suite.version,
        rows=rows,
        reasons=reasons,
        seconds=time.perf_counter() - started,
    )


def _add_datasource(context: Any, url: str) -> Any:
    """A Postgres data source; `add_postgres` insists on a URL with a host, which the
    embedded server's unix-socket URLs (`?host=/path`) lack, so those use the generic SQL
    source (same SQLAlchemy execution engine, same queries)."""
    if make_url(url).host:
        return context.data_sources.add_postgres(name="release_db", connection_string=url)
    return context.data_sources.add_sql(name="release_db", connection_string=url)


def _result_row(table: str, outcome: Any) -> dict[str, Any]:
    config = outcome.expectation_config
    kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id"}
    error = _exception_message(outcome.exception_info)
    observed: Any = f"error: {error}" if error else _observed(outcome.result or {})
    return _row(table, config.type, kwargs.get("column"), bool(outcome.success) and not error,
                observed, kwargs, error)  # fmt: skip


def _row(
    table: str,
    expectation: str,
    column: str | None,
    success: bool,
    observed: Any,
    kwargs: dict[str, Any],
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "table": table,
        "expectation": expectation,
        "column": column,
        "success": success,
        "observed": _jsonable(observed),
        "kwargs": _jsonable(kwargs),
        "error": error,
    }


def _observed(result: dict[str, Any]) -> Any:
    """Aggregate expectations report observed_value; column-map ones report counts."""
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        text = f"{result['unexpected_count']} of {result.get('element_count')} rows unexpected"
        sample = result.get("partial_unexpected_list") or []
        return text + (f", e.g. {sample[:5]}" if sample else "")
    return result


def _exception_message(info: Any) -> str | None:
    """GE 1.x nests exception info per metric; older shapes put it at the top level."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message") or "expectation raised an exception")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
