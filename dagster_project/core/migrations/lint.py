"""Lint migrations with sqlfluff (postgres dialect), configured from `pyproject.toml`.

sqlfluff's simple API ignores `[tool.sqlfluff]` in pyproject.toml, so the section is read
with sqlfluff's own TOML loader and passed explicitly to `FluffConfig`. One in-process
`Linter` lints every file that is not cached (a process per file would pay sqlfluff's ~1 s
import and dialect load each time).

Results are cached per file under `$RELEASE_HOME/cache/sqlfluff/<key>.json`, where the key is
the SHA-256 of the configuration fingerprint (config + sqlfluff version) and the file's
content. A warm run never imports sqlfluff, so an unchanged set re-lints in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from dagster_project.core.settings import PROJECT_ROOT, release_home

DEFAULT_PYPROJECT = PROJECT_ROOT / "pyproject.toml"
# The issue pins the dialect; an override wins over whatever the config file says.
CORE_OVERRIDES: dict[str, Any] = {"dialect": "postgres"}
# Bumped when the cached record format changes, so old entries are simply not found.
_CACHE_FORMAT = 1


class LintError(RuntimeError):
    """sqlfluff could not be configured or crashed on a file; the message names which."""


@dataclass(frozen=True)
class LintFinding:
    file: str
    line: int
    rule: str  # sqlfluff rule code, e.g. CP01; PRS for a parse error
    description: str
    name: str = ""  # sqlfluff rule name, e.g. capitalisation.keywords

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule} {self.description}"


@dataclass
class LintReport:
    findings: list[LintFinding] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    cached: int = 0  # how many files were answered from the cache
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "findings": [asdict(f) for f in self.findings],
            "files": list(self.files),
            "cached": self.cached,
            "seconds": round(self.seconds, 4),
        }


def load_sqlfluff_config(pyproject: Path = DEFAULT_PYPROJECT) -> dict[str, Any]:
    """The `[tool.sqlfluff]` section in sqlfluff's own shape (dotted rule sections condensed)."""
    if not pyproject.is_file():
        raise LintError(f"sqlfluff configuration file {pyproject} does not exist")
    with pyproject.open("rb") as handle:
        try:
            section = tomllib.load(handle).get("tool", {}).get("sqlfluff")
        except tomllib.TOMLDecodeError as exc:
            raise LintError(f"{pyproject} is not valid TOML: {exc}") from exc
    if not section:
        raise LintError(f"{pyproject} has no [tool.sqlfluff] section")
    from sqlfluff.core.config.toml import load_toml_file_config

    return dict(load_toml_file_config(str(pyproject)))


def cache_dir() -> Path:
    path = release_home() / "cache" / "sqlfluff"
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_fingerprint(pyproject: Path = DEFAULT_PYPROJECT) -> str:
    """What, besides a file's content, decides its findings: the raw [tool.sqlfluff] section,
    the overrides and the sqlfluff version. Computed without importing sqlfluff."""
    try:
        with pyproject.open("rb") as handle:
            section = tomllib.load(handle).get("tool", {}).get("sqlfluff", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LintError(f"cannot read sqlfluff configuration from {pyproject}: {exc}") from exc
    material = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "sqlfluff": metadata.version("sqlfluff"),
            "config": section,
            "overrides": CORE_OVERRIDES,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _cache_key(fingerprint: str, content: bytes) -> str:
    return hashlib.sha256(fingerprint.encode() + b"\0" + content).hexdigest()


def _read_cache(key: str) -> list[dict[str, Any]] | None:
    path = cache_dir() / f"{key}.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["findings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable entries are simply linted again


def _write_cache(key: str, findings: list[dict[str, Any]]) -> None:
    path = cache_dir() / f"{key}.json"
    # Write-then-rename so a concurrent reader never sees half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"findings": findings}), encoding="utf-8")
    tmp.replace(path)


def lint_migrations(
    paths: list[Path] | list[str], *, pyproject: Path = DEFAULT_PYPROJECT
) -> LintReport:
    """Lint each SQL file in `paths` (in the order given); cached files are not re-linted."""
    started = time.perf_counter()
    fingerprint = config_fingerprint(pyproject)
    report = LintReport()
    to_lint: list[tuple[Path, str, str]] = []  # (path, content, cache key)
    per_file: dict[str, list[dict[str, Any]]] = {}
    for raw in paths:
        path = Path(raw)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise LintError(f"cannot read migration file {path}: {exc.strerror}") from exc
        report.files.append(str(path))
        key = _cache_key(fingerprint, content)
        cached = _read_cache(key)
        if cached is None:
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LintError(f"migration file {path} is not UTF-8: {exc}") from exc
            to_lint.append((path, text, key))
        else:
            report.cached += 1
            per_file[str(path)] = cached
    if to_lint:
        for (path, _text, key), findings in zip(
            to_lint, _lint_with_sqlfluff(to_lint, pyproject), strict=True
        ):
            _write_cache(key, findings)
            per_file[str(path)] = findings
    for name in report.files:
        report.findings.extend(LintFinding(file=name, **f) for f in per_file[name])
    report.seconds = time.perf_counter() - started
    return report


def _lint_with_sqlfluff(
    files: list[tuple[Path, str, str]], pyproject: Path
) -> list[list[dict[str, Any]]]:
    """Findings (without the file name, which the cache must not depend on) per file."""
    from sqlfluff.core import FluffConfig, Linter
    from sqlfluff.core.errors import SQLFluffUserError

    try:
        config = FluffConfig(configs=load_sqlfluff_config(pyproject), overrides=CORE_OVERRIDES)
    except SQLFluffUserError as exc:
        raise LintError(f"invalid sqlfluff configuration in {pyproject}: {exc}") from exc
    linter = Linter(config=config)
    results: list[list[dict[str, Any]]] = []
    for path, text, _key in files:
        try:
            linted = linter.lint_string(text, fname=str(path))
        except Exception as exc:  # sqlfluff bugs surface as arbitrary exceptions
            raise LintError(f"sqlfluff crashed on {path}: {exc}") from exc
        findings = [
            {
                "line": int(violation.line_no),
                "rule": violation.rule_code(),
                "description": violation.desc(),
                "name": getattr(getattr(violation, "rule", None), "name", "") or "",
            }
            for violation in linted.get_violations()
        ]
        results.append(sorted(findings, key=lambda f: (f["line"], f["rule"])))
    return results
