"""Every bad input and broken environment, through the real entry points: the documented exit
code, a message naming the field, no traceback, user input echoed only cut to a readable
length, the token never shown, and (checked up front) an answer within 3 s.

The table runs `deploy` and `release` as child processes, inheriting the session's
RELEASE_HOME (conftest.py). The fuzz tests throw seeded random values at the same parsers
in-process (fast). Anything that starts the platform is marked slow.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project import cli, deploy
from dagster_project.core import knobs
from dagster_project.core.settings import PROJECT_ROOT, product_dir

DEPLOY = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
RELEASE = "from dagster_project.cli import release_main; raise SystemExit(release_main())"
UP_FRONT_SECONDS = 3.0
LONG = 10_000
HUGE = 100_000
UNSET = object()


def run_cli(
    entry: str, *args: str, env: dict[str, Any] | None = None, timeout: float = 120
) -> tuple[int, str, float]:
    """Run an entry point in a child process; `env` overrides (UNSET removes a variable)."""
    child = dict(os.environ)
    child.pop("GUARDRAIL_TOKEN", None)
    for name, value in (env or {}).items():
        if value is UNSET:
            child.pop(name, None)
        else:
            child[name] = value
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", entry, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child,
        cwd=PROJECT_ROOT,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def assert_well_answered(output: str, needles: tuple[str, ...], inputs: tuple[str, ...]) -> None:
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in output, (needle, output[-3000:])
    for value in inputs:
        if len(value) > 200:
            # Quoted cut (at most 80 characters) with the original length, never whole.
            assert value[:200] not in output, "echoed a long input in full"
    assert len(output) < 4000, output[:4000]
    assert GUARDRAIL_TOKEN not in output


def _product_copy(tmp_path: Path, edit) -> Path:
    """A products directory holding an edited copy of the product (RELEASE_PRODUCTS_DIR)."""
    products = tmp_path / "products"
    shutil.copytree(
        product_dir(PRODUCT), products / PRODUCT, ignore=shutil.ignore_patterns("__pycache__")
    )
    edit(products / PRODUCT)
    return products


def _negative_ttl(root: Path) -> None:
    spec = root / "product.yaml"
    spec.write_text(spec.read_text().replace("  dynamic: 5\n", "  dynamic: -5\n"))


def _version_clash(root: Path) -> None:
    (root / "migrations" / "0002_another.sql").write_text("SELECT 1;\n")


TOKEN = {"GUARDRAIL_TOKEN": GUARDRAIL_TOKEN}

# (id, argv, env, exit code, needles in the output)
DEPLOY_CASES: list[tuple[str, list[str], dict[str, Any], int, tuple[str, ...]]] = [
    (
        "unknown product",
        ["nope"],
        TOKEN,
        2,
        ("unknown product 'nope'", f"known products: {PRODUCT}"),
    ),
    ("product is a path", ["../../etc/passwd"], TOKEN, 2, ("product id", "not a path", PRODUCT)),
    ("product is huge", ["p" * LONG], TOKEN, 2, ("product id", "10,000 characters")),
    ("product with a newline", ["nope\n"], TOKEN, 2, ("product id",)),
    ("empty release", [PRODUCT, "--release", ""], TOKEN, 2, ("--release", "empty")),
    ("release with a comma", [PRODUCT, "--release", "1,2"], TOKEN, 2, ("--release", "comma")),
    ("release with a newline", [PRODUCT, "--release", "1.0\n"], TOKEN, 2, ("--release",)),
    (
        "huge release",
        [PRODUCT, "--release", "v" * LONG],
        TOKEN,
        2,
        ("--release", "10,000 characters"),
    ),
    ("--set without =", [PRODUCT, "--set", "nonsense"], TOKEN, 2, ("--set", "KEY=VALUE")),
    (
        "--set unknown key",
        [PRODUCT, "--set", "turbo=1"],
        TOKEN,
        2,
        ("unknown key 'turbo'", "error_rate"),
    ),
    (
        "--set key twice",
        [PRODUCT, "--set", "error_rate=0.1", "--set", "error_rate=0.2"],
        TOKEN,
        2,
        ("twice",),
    ),
    (
        "number is a bracket",
        [PRODUCT, "--set", "error_rate=["],
        TOKEN,
        2,
        ("'error_rate'", "not a number"),
    ),
    (
        "number out of range",
        [PRODUCT, "--set", "error_rate=7"],
        TOKEN,
        2,
        ("'error_rate'", "[0, 1]"),
    ),
    (
        "number not finite",
        [PRODUCT, "--set", "extra_latency_ms=1e999"],
        TOKEN,
        2,
        ("'extra_latency_ms'", "finite"),
    ),
    (
        "number is YAML",
        [PRODUCT, "--set", "extra_latency_ms={a: 1}"],
        TOKEN,
        2,
        ("'extra_latency_ms'",),
    ),
    (
        "number is huge",
        [PRODUCT, "--set", "error_rate=" + "1" * HUGE],
        TOKEN,
        2,
        ("'error_rate'", "100,000 characters"),
    ),
    (
        "regex unbalanced",
        [PRODUCT, "--set", "fail_jobs_matching=("],
        TOKEN,
        2,
        ("'fail_jobs_matching'", "not a valid regex"),
    ),
    (
        "regex deeply nested",
        [PRODUCT, "--set", "fail_jobs_matching=" + "(" * 60 + "a" + ")" * 60],
        TOKEN,
        2,
        ("'fail_jobs_matching'", "nested"),
    ),
    (
        "regex huge",
        [PRODUCT, "--set", "fail_jobs_matching=" + "a" * HUGE],
        TOKEN,
        2,
        ("'fail_jobs_matching'", "256"),
    ),
    (
        "unknown option, huge",
        [PRODUCT, "--bogus", "b" * HUGE],
        TOKEN,
        2,
        ("unrecognized arguments",),
    ),
    # A good regex (the YAML parser used to crash on it) gets as far as the token check.
    (
        "regex that YAML choked on",
        [PRODUCT, "--set", "fail_jobs_matching=[0-9]+$"],
        {},
        4,
        ("GUARDRAIL_TOKEN", "not set"),
    ),
    ("token missing", [PRODUCT], {}, 4, ("GUARDRAIL_TOKEN", "not set")),
    (
        "token wrong",
        [PRODUCT],
        {"GUARDRAIL_TOKEN": "tpt-wrong-token"},
        4,
        ("GUARDRAIL_TOKEN", "does not match"),
    ),
    (
        "token padded",
        [PRODUCT],
        {"GUARDRAIL_TOKEN": f" {GUARDRAIL_TOKEN}\n"},
        4,
        ("GUARDRAIL_TOKEN", "whitespace"),
    ),
    ("token huge", [PRODUCT], {"GUARDRAIL_TOKEN": "t" * HUGE}, 4, ("GUARDRAIL_TOKEN",)),
    (
        "database URL not a URL",
        [PRODUCT],
        {**TOKEN, "RELEASE_DATABASE_URL": "not a url"},
        2,
        ("RELEASE_DATABASE_URL", "postgresql://"),
    ),
    (
        "database URL not Postgres",
        [PRODUCT],
        {**TOKEN, "RELEASE_DATABASE_URL": "mysql://u:hunter2@h/d"},
        2,
        ("RELEASE_DATABASE_URL", "***"),
    ),
    (
        "bake scale not a number",
        [PRODUCT],
        {**TOKEN, "RELEASE_BAKE_SCALE": "fast"},
        2,
        ("RELEASE_BAKE_SCALE", "(0, 1]"),
    ),
    (
        "bake scale above 1",
        [PRODUCT],
        {**TOKEN, "RELEASE_BAKE_SCALE": "2"},
        2,
        ("RELEASE_BAKE_SCALE", "(0, 1]"),
    ),
    (
        "state dir not creatable",
        [PRODUCT],
        {**TOKEN, "RELEASE_HOME": "/etc/hostname/state"},
        2,
        ("RELEASE_HOME", "/etc/hostname/state"),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "env", "code", "needles"),
    [pytest.param(*case[1:], id=case[0]) for case in DEPLOY_CASES],
)
def test_deploy_answers_bad_input_up_front(
    argv: list[str], env: dict[str, Any], code: int, needles: tuple[str, ...]
) -> None:
    exit_code, output, seconds = run_cli(DEPLOY, *argv, env=env)
    assert exit_code == code, output[-3000:]
    assert_well_answered(output, needles, (*argv, *map(str, env.values())))
    assert "hunter2" not in output  # a database password is masked
    assert seconds < UP_FRONT_SECONDS, f"took {seconds:.1f}s: not checked up front"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        pytest.param(
            _negative_ttl,
            ("product.yaml:", "ttl_classes.dynamic", "greater than 0"),
            id="negative TTL",
        ),
        pytest.param(
            _version_clash,
            ("0002_another.sql", "0002_seed_items.sql", "share version"),
            id="migration version clash",
        ),
    ],
)
def test_a_bad_product_source_is_refused_up_front_naming_the_file(
    tmp_path: Path, edit, needles: tuple[str, ...]
) -> None:
    products = _product_copy(tmp_path, edit)
    env = {**TOKEN, "RELEASE_PRODUCTS_DIR": str(products)}
    exit_code, output, seconds = run_cli(DEPLOY, PRODUCT, env=env)
    assert exit_code == 2, output[-3000:]
    assert_well_answered(output, needles, ())
    assert seconds < UP_FRONT_SECONDS


RELEASE_CASES: list[tuple[str, list[str], dict[str, Any], int, tuple[str, ...]]] = [
    (
        "audit show unknown product",
        ["audit", "show", "nope"],
        {},
        2,
        ("unknown product 'nope'", PRODUCT),
    ),
    ("audit show a path", ["audit", "show", "../x"], {}, 2, ("product id", PRODUCT)),
    ("status unknown product", ["status", "nope"], {}, 2, ("unknown product 'nope'", PRODUCT)),
    ("status huge product", ["status", "s" * LONG], {}, 2, ("product id", "10,000 characters")),
    (
        "audit verify, database URL not a URL",
        ["audit", "verify"],
        {"RELEASE_DATABASE_URL": "not a url"},
        2,
        ("cannot read the trail", "RELEASE_DATABASE_URL"),
    ),
    (
        "audit verify, database unreachable",
        ["audit", "verify"],
        {"RELEASE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/postgres"},
        2,
        ("cannot read the trail", "127.0.0.1:1", "says nothing about tampering"),
    ),
    (
        "platform status, state dir not creatable",
        ["platform", "status"],
        {"RELEASE_HOME": "/etc/hostname/state"},
        2,
        ("RELEASE_HOME",),
    ),
    ("unknown command", ["frobnicate"], {}, 2, ("invalid choice",)),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "env", "code", "needles"),
    [pytest.param(*case[1:], id=case[0]) for case in RELEASE_CASES],
)
def test_release_commands_answer_bad_input_with_their_code(
    argv: list[str], env: dict[str, Any], code: int, needles: tuple[str, ...]
) -> None:
    exit_code, output, _ = run_cli(RELEASE, *argv, env=env)
    assert exit_code == code, output[-3000:]
    assert_well_answered(output, needles, tuple(argv))


# -- exit codes and messages of a run (pure) ----------------------------------------------------


def _error(*chain: tuple[str, str]) -> Any:
    """A Dagster-like serialised error chain, outermost first: (class name, message)."""
    error = None
    for cls_name, message in reversed(chain):
        error = SimpleNamespace(cls_name=cls_name, message=message, cause=error)
    return error


def test_the_innermost_user_message_is_shown_not_dagsters_wrapper() -> None:
    error = _error(
        ("DagsterExecutionStepExecutionError", 'Error occurred while executing op "x__canary":'),
        ("ApprovalRefused", "dagster_project.core.guardrail.ApprovalRefused: approval refused: X"),
    )
    assert deploy.user_message(error) == "approval refused: X"
    assert deploy.user_message(_error(("DagsterError", "only dagster"))) == "only dagster"
    assert len(deploy.user_message(_error(("ValueError", "v" * HUGE)))) < 2100


class ProductionOwned(RuntimeError):
    """Stands in for core/ownership.py's class: matched by name, never imported."""


@pytest.mark.parametrize(
    ("classes", "code"),
    [
        ({"DagsterExecutionStepExecutionError", "ProductionOwned"}, deploy.EXIT_OWNED),
        ({"ProductionLocked"}, deploy.EXIT_OWNED),
        ({"ProductionOwned", "ApprovalRefused"}, deploy.EXIT_OWNED),
        ({"ApprovalRefused", "PermissionError"}, deploy.EXIT_REFUSED),
        ({"MigrationError"}, deploy.EXIT_BLOCKED),
        ({"MigrationError", "DatabaseUnavailable"}, deploy.EXIT_BAD_INPUT),
        ({"SpecError"}, deploy.EXIT_BAD_INPUT),
        ({"KnobError"}, deploy.EXIT_BAD_INPUT),
        ({"StateDirError"}, deploy.EXIT_BAD_INPUT),
        ({"KeyError"}, None),
        (set(), None),
    ],
)
def test_exit_code_by_error_class_name(classes: set[str], code: int | None) -> None:
    assert deploy.exit_code_for(classes) == code


def test_production_owned_raised_directly_exits_5(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def owned(*args: Any, **kwargs: Any) -> None:
        raise ProductionOwned("production of p is owned by release 9.9.9 (run abc)")

    monkeypatch.setattr(deploy, "deploy", owned)
    assert cli.deploy_main([PRODUCT]) == deploy.EXIT_OWNED
    assert "owned by release 9.9.9" in capsys.readouterr().err


def test_an_unexpected_error_is_exit_1_with_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(deploy, "deploy", bug)
    with pytest.raises(KeyError):  # the interpreter prints it and exits 1
        cli.deploy_main([PRODUCT])


def _verdict(**overrides: Any) -> deploy.DeployOutcome:
    from dagster_project.core.spec import load_spec

    args: dict[str, Any] = {
        "stages": {},
        "blocked": [],
        "failures": [],
        "superseded": None,
        "result_success": False,
    }
    args.update(overrides)
    return deploy._verdict(load_spec(PRODUCT), "1.0.0", "run-1", **args)


SLO_BLOCK = {"check": "slo_regression", "asset": "canary", "why": "canary superseded: older"}


@pytest.mark.parametrize(
    ("overrides", "code", "needle"),
    [
        (
            {"superseded": "1.0.0 is older than the live release 1.1.0", "blocked": [SLO_BLOCK]},
            deploy.EXIT_BLOCKED,
            "release order rule: 1.0.0 is older than the live release 1.1.0",
        ),
        ({"failures": [(5, "canary: owned by 2.0.0")]}, deploy.EXIT_OWNED, "owned by 2.0.0"),
        ({"failures": [(4, "canary: approval refused")]}, deploy.EXIT_REFUSED, "approval"),
        ({"failures": [(3, "schema: a clash")]}, deploy.EXIT_BLOCKED, "blocked: schema: a clash"),
        ({"blocked": [SLO_BLOCK]}, deploy.EXIT_BLOCKED, "blocked by slo_regression"),
        ({"failures": [(1, "build: boom")]}, deploy.EXIT_FAILED, "build: boom"),
        (
            {"stages": {"promotion": "done", "audit": "done"}, "result_success": True},
            deploy.EXIT_OK,
            "promoted and audited",
        ),
    ],
)
def test_run_verdicts(overrides: dict[str, Any], code: int, needle: str) -> None:
    outcome = _verdict(**overrides)
    assert outcome.exit_code == code
    assert needle in outcome.headline


def test_a_superseded_release_is_reported_by_its_rule_not_as_a_gate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcome = _verdict(superseded="1.0.0 is older than the live release 1.1.0", blocked=[SLO_BLOCK])
    deploy.print_summary(outcome)
    out = capsys.readouterr().out
    assert "BLOCKED: blocked by the release order rule" in out
    assert "older than the live release 1.1.0" in out
    assert "blocked by slo_regression" not in out


@pytest.mark.slow
def test_a_blocked_migration_lists_every_finding_with_file_line_rule_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from checks.migrations import safety_result
    from dagster_project.core.contracts import MigrationGateReport
    from dagster_project.core.migrations.gate import safety_findings
    from dagster_project.core.migrations.safety import check_safety

    migration = tmp_path / "0003_x.sql"
    long_comment = "-- " + "n" * 300
    migration.write_text(
        f"SET lock_timeout = '1s';\n{long_comment}\n\n"
        "CREATE INDEX items_name_idx ON items (name);\n"
    )
    checked = check_safety([migration])
    report = MigrationGateReport(
        env="staging",
        migrations_dir=str(tmp_path),
        linted_files=[str(migration)],
        safety_findings=safety_findings(checked),
        safety_errors=checked.errors,
        pending_before=[migration.name],
    )
    result = safety_result(report)
    assert not result.passed
    block = {
        "check": "migration_safety",
        "asset": "schema_migration_check",
        "why": result.description,
    }
    deploy.print_summary(_verdict(blocked=[block]))
    out = capsys.readouterr().out
    assert "0003_x.sql:4 require-concurrent-index-creation — " in out
    assert "use CREATE INDEX CONCURRENTLY in a file of its own" in out
    assert "0003_x.sql:4 require-statement-timeout — " in out  # every finding, not the first 3
    assert "Traceback" not in out


# -- fuzz: generated values through the parsers, in-process -------------------------------------

ALPHABETS = (
    "0123456789.",
    "0123456789.eE+-",
    "abcdefghijklmnopqrstuvwxyz-",
    "[](){}*+?^$|\\.:,=!&#~@%'\" \t\n",
    "".join(chr(c) for c in range(0, 0x30)),
    "éß٣１𝟘\u200b\u202e日本",
)
SEEDS = range(250)


def _value(rng: random.Random) -> str:
    special = [
        "",
        "[",
        "{a: 1}",
        "!!python/object:os.system",
        "~",
        "null",
        "true",
        "1e999",
        "-0",
        "0x10",
        "nan",
        ".5",
        "1_000",
        "(" * 40 + ")" * 40,
        "(a+)+$",
        "../../etc",
        "a" * rng.choice([64, 65, 255, 256, 257, LONG]),
    ]
    if rng.random() < 0.3:
        return rng.choice(special)
    alphabet = rng.choice(ALPHABETS)
    length = rng.choice([1, 2, 5, 20, 63, 64, 65, 300, LONG])
    return "".join(rng.choice(alphabet) for _ in range(length))


def _check_message(message: str, value: str, field: str) -> None:
    assert field in message, (field, message[:300])
    assert len(message) < 1500, message[:300]
    if len(value) > 200:
        assert value[:200] not in message


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_release_settings_and_product_are_parsed_or_refused_by_name(seed: int) -> None:
    rng = random.Random(seed)
    value = _value(rng)
    key = rng.choice([*knobs.SETTING_KEYS, _value(rng)[:30]])
    cases = [
        ((PRODUCT, value, []), "--release"),
        ((PRODUCT, "1.0.0", [f"{key}={value}"]), "--set"),
        ((value, "1.0.0", []), "product"),
    ]
    for (product, release, pairs), field in cases:
        try:
            _, version, _, parsed = deploy.prepare(product, release, pairs)
        except deploy.BadInput as exc:
            _check_message(str(exc), value, field)
        else:
            # Accepted: then it is canonical and valid by the same schema the registry uses.
            assert version == release
            assert knobs.validate(parsed) == parsed
            assert set(parsed) <= set(knobs.SETTING_KEYS)


@pytest.mark.parametrize("seed", range(100))
def test_fuzz_the_deploy_parser_never_crashes(seed: int) -> None:
    rng = random.Random(1000 + seed)
    argv = [rng.choice([PRODUCT, _value(rng)])]
    for _ in range(rng.randrange(4)):
        argv += [rng.choice(["--release", "--set", _value(rng)[:50]]), _value(rng)]
    try:
        args = cli.build_deploy_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 2  # argparse's usage error: bad input, bounded by _Parser
        return
    try:
        deploy.prepare(args.product, args.release, args.settings)
    except deploy.BadInput as exc:
        assert len(str(exc)) < 1500


# -- ./run.sh -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_run_sh_at_once_both_work_and_never_resync() -> None:
    python = PROJECT_ROOT / ".venv" / "bin" / "python"
    before = python.lstat()
    children = [
        subprocess.Popen(
            [str(PROJECT_ROOT / "run.sh"), "release", "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=PROJECT_ROOT,
        )
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    for output in outputs:
        assert "exit codes:" in output
        assert "Removed virtual environment" not in output
    after = python.lstat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# -- with the platform up: nothing reaches production, the trail still verifies -----------------


@pytest.mark.slow
def test_bad_input_leaves_a_running_platform_and_the_trail_untouched() -> None:
    from dagster_project.core import audit
    from dagster_project.core.platform.local import LocalPlatform

    platform = LocalPlatform(PRODUCT)
    platform.up()
    before = platform.current("production")
    entries_before = [(e.seq, e.entry_hash) for e in audit.entries()]
    for _, argv, env, code, _needles in DEPLOY_CASES:
        if env.get("RELEASE_HOME") or env.get("RELEASE_DATABASE_URL"):
            continue  # those point the child at another state directory or server
        assert run_cli(DEPLOY, *argv, env=env)[0] == code
    assert platform.current("production") == before
    assert [(e.seq, e.entry_hash) for e in audit.entries()] == entries_before
    exit_code, output, _ = run_cli(RELEASE, "audit", "verify")
    if entries_before:
        assert exit_code == 0, output
    else:  # a fresh session has no trail yet: that is reported as such, never as tampering
        assert audit.verify(allow_empty=True).ok, output


# -- the service reads what the schema writes ---------------------------------------------------


def test_the_sample_service_accepts_every_canonical_knob_value() -> None:
    """The service ships alone (stdlib + PyYAML), so it cannot import core/knobs.py; it must
    at least accept whatever the schema puts into a manifest, with the same keys."""
    import importlib.util

    source = product_dir(PRODUCT) / "service" / "service_config.py"
    module_spec = importlib.util.spec_from_file_location("service_config_for_knobs", source)
    assert module_spec is not None and module_spec.loader is not None
    service = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = service  # dataclasses look their module up
    module_spec.loader.exec_module(service)

    assert tuple(service.KNOWN_SETTINGS) == knobs.SETTING_KEYS
    for raw in (
        {"error_rate": "0"},
        {"error_rate": "1", "extra_latency_ms": "60000"},
        {"extra_latency_ms": ".5", "fail_jobs_matching": "[0-9]+$"},
        {"fail_jobs_matching": "^doomed-(a|b)"},
    ):
        canonical = knobs.validate(raw)
        parsed = service.parse_knobs(canonical, source="manifest.json")
        assert parsed.error_rate == canonical.get("error_rate", 0.0)
        assert parsed.extra_latency_ms == canonical.get("extra_latency_ms", 0.0)
