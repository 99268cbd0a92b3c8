"""Products as folders, without a platform: `release new` writes one that validates, `release
validate` names each problem's file, line and field, the code location loads every folder (a
bad one as one asset naming its problem), and the generic code knows no product."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import time
import tokenize
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from conftest import PRODUCT
from dagster_project.core import guardrail, scaffold
from dagster_project.core.settings import product_dir
from dagster_project.core.spec import Contract, ProductSpec, load_spec
from dagster_project.core.validate import validate_product

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("dagster_project", "assets", "checks")


def run_release(*argv: str, products: Path) -> subprocess.CompletedProcess[str]:
    code = "from dagster_project.cli import release_main; raise SystemExit(release_main())"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RELEASE_PRODUCTS_DIR": str(products)},
    )


@pytest.fixture
def products(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A products directory holding the sample product (a link) and nothing else yet."""
    root = tmp_path / "products"
    root.mkdir()
    (root / PRODUCT).symlink_to(product_dir(PRODUCT), target_is_directory=True)
    monkeypatch.setenv("RELEASE_PRODUCTS_DIR", str(root))
    yield root


# --- release new ------------------------------------------------------------------------------


@pytest.mark.slow
def test_release_new_writes_a_product_that_loads_and_prints_its_token_once(
    products: Path,
) -> None:
    done = run_release("new", "shop-orders", products=products)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    tokens = [line for line in lines if line.startswith("GUARDRAIL_TOKEN=")]
    assert len(tokens) == 1, done.stdout  # once, on a line of its own
    token = tokens[0].removeprefix("GUARDRAIL_TOKEN=")
    assert len(token) >= 32 and token == token.strip()
    assert done.stdout.count(token) == 1
    folder = products / "shop-orders"
    spec = load_spec("shop-orders")
    assert spec.guardrail.token_sha256 == guardrail.fingerprint(token)
    for path in folder.rglob("*"):  # only the fingerprint is stored, never the token
        if path.is_file():
            assert token not in path.read_text(), path
    shipped = ("product.yaml", "contract.yaml", "migrations/0001_initial.sql", "service/api.py")
    for name in (*shipped, "expectations/release_quality.json", "service/worker.py"):
        assert (folder / name).is_file(), name
    # Not the sample's names: its own tiers, endpoints, TTL classes, queues and tables.
    sample = load_spec(PRODUCT)
    assert spec.tiers.api.name == "api-shop-orders" != sample.tiers.api.name
    assert not {e.path for e in spec.endpoints} & {e.path for e in sample.endpoints}
    assert not set(spec.ttl_classes) & set(sample.ttl_classes)
    assert not {q.name for q in spec.queues.ordered} & {q.name for q in sample.queues.ordered}
    assert spec.queues.dead_letter != sample.queues.dead_letter


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["new", "Bad_Name"], "PRODUCT 'Bad_Name' is refused"),
        (["new", "../escape"], "is refused"),
        (["new", PRODUCT], "already exists"),
    ],
)
def test_release_new_refuses_bad_names_and_existing_folders(
    products: Path, argv: list[str], needle: str
) -> None:
    done = run_release(*argv, products=products)
    assert done.returncode == 2, done.stdout + done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert "GUARDRAIL_TOKEN=" not in done.stdout


def test_two_new_products_get_different_tokens(products: Path) -> None:
    first = scaffold.create_product("first-one")
    second = scaffold.create_product("second-one")
    assert first.token != second.token
    assert (
        load_spec("first-one").guardrail.token_sha256
        != load_spec("second-one").guardrail.token_sha256
    )


# --- release validate -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_product_and_the_sample_validate(products: Path) -> None:
    scaffold.create_product("fresh-one")
    for product in ("fresh-one", PRODUCT):
        result = validate_product(product)
        assert result.ok, result.lines()
        assert (
            "tables and columns in a scratch database built from the migrations" in result.checked
        )
    done = run_release("validate", "fresh-one", "--json", "--no-database", products=products)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["valid"] is True


def _edit(path: Path, old: str, new: str) -> int:
    """Replace `old` (once) and return the 1-based line it was on."""
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return text[: text.index(old)].count("\n") + 1


@pytest.mark.slow
def test_validate_names_file_line_and_field_of_each_problem(products: Path) -> None:
    folder = scaffold.create_product("broken-one").path
    spec_line = _edit(folder / "product.yaml", "  fresh: 3\n", "  fresh: -3\n")
    done = run_release("validate", "broken-one", products=products)
    assert done.returncode == 2
    assert f"{folder}/product.yaml:{spec_line}:10: field 'ttl_classes.fresh'" in done.stderr
    assert "Traceback" not in done.stderr
    _edit(folder / "product.yaml", "  fresh: -3\n", "  fresh: 3\n")

    key_line = _edit(
        folder / "contract.yaml",
        "results: {table: task_results, key_column: task_key}",
        "results: {table: task_results, key_column: task_id}",
    )
    schema_line = _edit(
        folder / "contract.yaml", "total: {type: integer", "total: {type: number-ish"
    )
    (folder / "migrations" / "0002_Oops.sql").write_text("SELECT 1;\n")
    suite = folder / "expectations" / "release_quality.json"
    _edit(suite, '"column": "title"', '"column": "headline"')
    done = run_release("validate", "broken-one", "--json", products=products)
    assert done.returncode == 2
    problems = json.loads(done.stdout)["problems"]
    by_field = {p["field"]: p for p in problems}
    schema = by_field["endpoints./api/records.schema.properties.total.type"]
    assert (schema["file"], schema["line"]) == (str(folder / "contract.yaml"), schema_line)
    # The misnamed migration stops the database checks; fix it and they run.
    assert any("0002_Oops.sql" in p["message"] and "misnamed" in p["message"] for p in problems)
    (folder / "migrations" / "0002_Oops.sql").unlink()
    problems = validate_product("broken-one").problems
    by_field = {p.field: p for p in problems}
    assert by_field["worker.results"].line == key_line
    assert "no column 'task_id'" in by_field["worker.results"].message
    column = by_field["tables.records.expectations.2.kwargs.column"]
    assert column.file == str(suite) and "no column 'headline'" in column.message


@pytest.mark.slow
def test_validate_reports_unsafe_and_unlinted_migrations_by_file_and_line(products: Path) -> None:
    folder = scaffold.create_product("unsafe-one").path
    migration = folder / "migrations" / "0002_index.sql"
    migration.write_text(
        "SET lock_timeout = '5s';\nCREATE INDEX records_title_idx ON records (title);\n"
    )
    problems = validate_product("unsafe-one", with_database=False).problems
    found = [p for p in problems if p.file == str(migration)]
    assert any(p.line == 2 and "concurrently" in p.message.lower() for p in found), found


@pytest.mark.slow
def test_deploy_refuses_a_bad_contract_up_front_naming_file_line_and_field(
    products: Path,
) -> None:
    folder = scaffold.create_product("schema-one").path
    line = _edit(folder / "contract.yaml", "total: {type: integer", "total: {type: integr")
    code = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, "schema-one"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "RELEASE_PRODUCTS_DIR": str(products), "GUARDRAIL_TOKEN": "t" * 20},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    field = "field 'endpoints./api/records.schema.properties.total.type'"
    output = done.stdout + done.stderr
    assert f"{folder}/contract.yaml:{line}:" in output and field in output
    assert "Traceback" not in output
    assert time.monotonic() - started < 30  # answered before any work


@pytest.mark.slow
def test_validate_of_an_unknown_product_lists_the_known_ones(products: Path) -> None:
    done = run_release("validate", "nope", products=products)
    assert done.returncode == 2
    assert "unknown product 'nope'" in done.stderr and PRODUCT in done.stderr


# --- discovery ---------------------------------------------------------------------------------


def test_the_code_location_loads_every_folder_and_a_bad_one_as_its_problem(
    products: Path,
) -> None:
    from dagster_project.definitions import build_definitions

    scaffold.create_product("good-one")
    bad = scaffold.create_product("bad-one").path
    line = _edit(bad / "contract.yaml", "  /api/stats:\n", "  /api/stats/:\n")
    defs = build_definitions()
    repo = defs.get_repository_def()
    groups = {g for a in defs.assets or [] for g in a.group_names_by_key.values()}  # type: ignore[union-attr]
    assert {"release_4pnihc40q_yj", "release_good_one", "invalid_product_bad_one"} <= groups
    assert "release_bad_one" not in groups
    jobs = {j.name for j in repo.get_all_jobs()}
    sensors = {s.name for s in repo.sensor_defs}
    schedules = {s.name for s in repo.schedule_defs}
    for slug in ("good_one", "4pnihc40q_yj"):
        assert {f"release_{slug}", f"audit_{slug}", f"verify_production_job_{slug}"} <= jobs
        assert {
            f"release_sensor_{slug}",
            f"audit_sensor_{slug}",
            f"reconcile_sensor_{slug}",
        } <= sensors
        assert {f"nightly_release_train_{slug}", f"post_deploy_verification_{slug}"} <= schedules
    node = defs.resolve_assets_def(dg.AssetKey(["bad_one", "product_spec"]))
    description = node.descriptions_by_key[dg.AssetKey(["bad_one", "product_spec"])]
    assert f"{bad}/contract.yaml:{line}:3: field 'endpoints./api/stats/'" in description
    assert "field 'endpoints'" in description  # the spec's /api/stats has no contract now
    result = dg.materialize([node], raise_on_error=False)
    assert not result.success  # materializing it re-reads the folder and fails naming it


@pytest.mark.slow
def test_a_bad_folder_does_not_stop_the_code_location_loading_in_a_fresh_process(
    products: Path,
) -> None:
    bad = products / "bad-two"
    bad.mkdir()
    (bad / "product.yaml").write_text("product: [not, a, name\n")
    code = "import dagster_project.definitions as d; d.defs.get_repository_def(); print('loaded')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "RELEASE_PRODUCTS_DIR": str(products)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loaded" in done.stdout
    listed = run_release("platform", "status", products=products)
    assert "bad-two: invalid product folder" in listed.stderr
    assert f"{bad}/product.yaml:2:1: not valid YAML" in listed.stderr


# --- no product knowledge in the generic code --------------------------------------------------


def _model_fields(model: type) -> set[str]:
    """Every field name (and alias) of a pydantic model and of the models it nests."""
    names: set[str] = set()
    todo, seen = [model], set()
    while todo:
        current = todo.pop()
        if current in seen or not hasattr(current, "model_fields"):
            continue
        seen.add(current)
        for name, info in current.model_fields.items():
            names.update({name, info.alias or name})
            todo.extend(a for a in getattr(info.annotation, "__args__", ()) if isinstance(a, type))
            if isinstance(info.annotation, type):
                todo.append(info.annotation)
    return names


def sample_names() -> tuple[set[str], set[str]]:
    """(phrases, words) naming the sample product's routes, tables, columns, queues, tiers and
    fields, read from its own folder. Phrases are matched anywhere in the generic code's text;
    single generic-looking words only as a whole string literal or an SQL table reference.
    Names the generic spec or contract schema itself defines (`dead_letter`) are not the
    sample's knowledge."""
    spec = load_spec(PRODUCT)
    contract = spec.contract
    schema_names = _model_fields(ProductSpec) | _model_fields(Contract)
    names = {
        spec.product,
        *(tier.name for tier in (spec.tiers.edge, spec.tiers.api, spec.tiers.worker)),
    }
    names |= {e.path for e in spec.endpoints} | set(contract.endpoints)
    names |= {contract.worker.enqueue.path, contract.worker.status_path.split("{")[0].rstrip("/")}
    names |= {
        spec.queues.dead_letter,
        contract.worker.results.table,
        contract.worker.results.key_column,
    }
    names |= {q.name for q in spec.queues.ordered}
    enqueue = contract.worker.enqueue
    names |= {enqueue.key_field, enqueue.queue_field, enqueue.payload_field}
    sql = "\n".join(p.read_text() for p in sorted(spec.migrations_path.glob("*.sql")))
    names |= set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", sql))
    names |= set(re.findall(r"^\s{4}([a-z_][a-z0-9_]*) [A-Z]", sql, re.M))
    generic_columns = {"id", "name", "created_at", "updated_at", "status", "attempts", "payload",
                       "queue", "result", "key"}  # fmt: skip
    names -= schema_names | generic_columns
    phrases = {n for n in names if re.search(r"[-_/.0-9]", n)}
    return phrases, names - phrases


def _python_strings(text: str) -> list[tuple[int, str]]:
    found = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):  # f-strings
                value = token.string
            found.append((token.start[0], str(value)))
    return found


def knowledge_in(path: Path, text: str, phrases: set[str], words: set[str]) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for phrase in phrases:
            if re.search(rf"(?<![\w/-]){re.escape(phrase)}(?![\w-])", line):
                found.append(f"{path}:{number}: {phrase!r}")
        for word in words:
            if re.search(rf"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s+{word}\b", line, re.I):
                found.append(f"{path}:{number}: table {word!r}")
    if path.suffix == ".py":
        found += [f"{path}:{n}: literal {v!r}" for n, v in _python_strings(text) if v in words]
    return found


def generic_files() -> list[Path]:
    files = []
    for top in GENERIC:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in (
                ".py",
                ".tmpl",
                ".sql",
                ".yaml",
                ".json",
                ".toml",
            ):
                files.append(path)
    return files


def test_the_generic_code_names_nothing_of_the_sample_product() -> None:
    phrases, words = sample_names()
    # What the sample is known by (so the scan below can fail): routes, tables, columns,
    # tiers, queues and fields from its own folder.
    assert {"/v1/items", "/v1/jobs", "price_cents", "job_results", PRODUCT, "api-i"} <= phrases
    assert {"items", "jobs", "high", "low", "priority"} <= words
    found = []
    for path in generic_files():
        found += knowledge_in(path.relative_to(ROOT), path.read_text(), phrases, words)
    assert not found, "product knowledge in the generic code:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        'SHAPES = {"/v1/items": "list"}\n',
        "def count(cur):\n    cur.execute('SELECT count(*) FROM jobs')\n",
        "QUEUES = ('high', 'low')\n",
        "# the dead-letter rows have a job_key\n",
    ],
)
def test_the_scan_finds_product_knowledge(source: str) -> None:
    phrases, words = sample_names()
    assert knowledge_in(Path("x.py"), source, phrases, words)
