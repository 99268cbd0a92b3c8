"""sqlfluff lint of migrations through the real sqlfluff, with the pyproject configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagster_project.core.migrations import lint
from dagster_project.core.settings import PROJECT_ROOT

CLEAN_SQL = "CREATE TABLE orders (\n    id BIGINT PRIMARY KEY,\n    note TEXT\n);\n"
LOWERCASE_SQL = "CREATE TABLE orders (id BIGINT);\n\nalter table orders ADD COLUMN note TEXT;\n"


def write(directory: Path, name: str, sql: str) -> Path:
    path = directory / name
    path.write_text(sql, encoding="utf-8")
    return path


def pyproject_with(tmp_path: Path, policy: str) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[tool.sqlfluff.core]\ndialect = "postgres"\n\n'
        f'[tool.sqlfluff.rules.capitalisation.keywords]\ncapitalisation_policy = "{policy}"\n',
        encoding="utf-8",
    )
    return path


def test_finding_carries_file_line_rule_and_description(tmp_path: Path) -> None:
    clean = write(tmp_path, "0001_clean.sql", CLEAN_SQL)
    lower = write(tmp_path, "0002_lower.sql", LOWERCASE_SQL)
    report = lint.lint_migrations([clean, lower])
    assert report.files == [str(clean), str(lower)]
    assert not report.ok
    assert all(f.file == str(lower) for f in report.findings)
    keyword_findings = [f for f in report.findings if f.rule == "CP01"]
    assert {f.line for f in keyword_findings} == {3}
    assert keyword_findings[0].description == "Keywords must be upper case."
    assert keyword_findings[0].name == "capitalisation.keywords"


def test_project_pyproject_config_is_the_one_used() -> None:
    config = lint.load_sqlfluff_config()
    assert config["core"]["dialect"] == "postgres"
    assert config["rules"]["capitalisation.keywords"]["capitalisation_policy"] == "upper"
    assert lint.DEFAULT_PYPROJECT == PROJECT_ROOT / "pyproject.toml"


def test_capitalisation_policy_from_pyproject_is_honoured(tmp_path: Path) -> None:
    upper_sql = write(tmp_path, "0001_upper.sql", "SELECT 1 AS one;\n")
    lower_sql = write(tmp_path, "0002_lower.sql", "select 1 as one;\n")
    upper_policy = lint.lint_migrations(
        [upper_sql, lower_sql], pyproject=pyproject_with(tmp_path, "upper")
    )
    assert {f.file for f in upper_policy.findings if f.rule == "CP01"} == {str(lower_sql)}
    lower_policy = lint.lint_migrations(
        [upper_sql, lower_sql], pyproject=pyproject_with(tmp_path, "lower")
    )
    # A different config is a different cache key: nothing came from the cache.
    assert lower_policy.cached == 0
    assert {f.file for f in lower_policy.findings if f.rule == "CP01"} == {str(upper_sql)}


def test_parse_error_is_a_finding_with_its_line(tmp_path: Path) -> None:
    broken = write(tmp_path, "0001_broken.sql", "CREATE TABLE a (id INT);\nSELEC x;\n")
    report = lint.lint_migrations([broken])
    parse_errors = [f for f in report.findings if f.rule == "PRS"]
    assert [(f.file, f.line) for f in parse_errors] == [(str(broken), 2)]


def test_unchanged_files_come_from_the_cache(tmp_path: Path) -> None:
    files = [
        write(tmp_path, f"{n:04d}_cache_probe_{n}.sql", f"CREATE TABLE cache_probe_{n} (id INT);\n")
        for n in range(1, 4)
    ]
    cold = lint.lint_migrations(files)
    assert cold.cached == 0
    warm = lint.lint_migrations(files)
    assert warm.cached == 3
    assert warm.findings == cold.findings
    files[1].write_text("create table cache_probe_2 (id INT);\n", encoding="utf-8")
    edited = lint.lint_migrations(files)
    assert edited.cached == 2
    assert {f.file for f in edited.findings if f.rule == "CP01"} == {str(files[1])}


def test_missing_file_and_missing_config_are_named(tmp_path: Path) -> None:
    with pytest.raises(lint.LintError, match=r"0009_missing\.sql"):
        lint.lint_migrations([tmp_path / "0009_missing.sql"])
    sql = write(tmp_path, "0001_a.sql", "SELECT 1;\n")
    empty = tmp_path / "empty.toml"
    empty.write_text("[tool.other]\nx = 1\n", encoding="utf-8")
    with pytest.raises(lint.LintError, match=r"empty.toml has no \[tool.sqlfluff\]"):
        lint.lint_migrations([sql], pyproject=empty)
