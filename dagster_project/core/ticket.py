"""The audit ticket: the sign-off document of one production change.

A self-contained HTML page (the monitoring snapshots embedded as data URIs, inline CSS) and a
Markdown twin, both from the same facts: the five required fields (token masked), the
compliance checklist with each item's evidence, the gates the release passed, the deploy stages
as the Dagster instance has them, the canary steps and verdicts, the entry's hash and the
signed checkpoint that covers it. Both are stored in the evidence store (content-addressed,
never overwritten); `SignOff` names them by hash.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dagster_project.core import audit, evidence
from dagster_project.core.checklist import passed as checklist_passed
from dagster_project.core.contracts import ChecklistItem, Checkpoint, RunFacts, SignOff

REQUIRED = audit.REQUIRED_FIELDS


def write(
    entry: audit.AuditEntry,
    rows: Sequence[ChecklistItem],
    checkpoint: Checkpoint | None,
    run: RunFacts | None = None,
) -> SignOff:
    """Render the ticket of `entry` and store both files; returns their paths and hashes."""
    sections = _sections(entry, rows, checkpoint, run)
    markdown = _markdown(sections)
    page = _html(sections)
    md_path, md_sha = evidence.store_bytes(markdown.encode("utf-8"), "md")
    html_path, html_sha = evidence.store_bytes(page.encode("utf-8"), "html")
    return SignOff(
        ticket_html=str(html_path),
        ticket_html_sha256=html_sha,
        ticket_markdown=str(md_path),
        ticket_markdown_sha256=md_sha,
        checklist_passed=checklist_passed(list(rows)),
        checkpoint=checkpoint,
    )


def file_stem(entry: audit.AuditEntry) -> str:
    """A readable name for copies outside the store: `<release>-<outcome>-seq<N>`."""
    payload = entry.payload
    return f"{payload.get('release')}-{payload.get('outcome')}-seq{entry.seq}"


# A section: (title, paragraphs, table header, table rows, images as (name, path, sha256)).
Section = tuple[str, list[str], list[str], list[list[str]], list[tuple[str, str, str]]]


def _sections(
    entry: audit.AuditEntry,
    rows: Sequence[ChecklistItem],
    checkpoint: Checkpoint | None,
    run: RunFacts | None,
) -> list[Section]:
    shown = audit.masked(entry)  # the token masked wherever it appears
    p: dict[str, Any] = shown["payload"]
    ok = checklist_passed(list(rows))
    failing = [r.item for r in rows if r.passed is False]
    verdict = "READY TO SIGN OFF" if ok else f"NOT READY: {', '.join(failing) or 'no checklist'}"
    sections: list[Section] = [
        (
            f"Audit ticket: {p.get('product')} {p.get('release')} ({p.get('outcome')})",
            [f"Sign-off: {verdict}", f"Change {shown['change_id']}"],
            [],
            [],
            [],
        ),
        ("Required fields", [], ["field", "value"], [[f, str(p.get(f))] for f in REQUIRED], []),
        (
            "Change",
            [],
            ["field", "value"],
            [
                [f, str(p.get(f))]
                for f in (
                    "run_id",
                    "approver",
                    "audited_by",
                    "previous_artifact_sha256",
                    "reason",
                    "smoke_verdict",
                    "slo_verdict",
                )
            ],
            [],
        ),
        (
            "Compliance checklist",
            [],
            ["item", "result", "evidence"],
            [[r.item, _result(r.passed), r.detail] for r in rows],
            [],
        ),
        (
            "Gates passed before production",
            [] if p.get("gates") else ["none recorded in the entry"],
            ["check", "status"],
            [[g["check"], g["status"]] for g in p.get("gates") or []],
            [],
        ),
        (
            "Deploy stages (Dagster instance)",
            [f"run {run.run_id}: {run.status}"] if run else ["not read (no Dagster run)"],
            ["stage", "run", "artifact sha256"],
            [[m.stage, str(m.run_id), str(m.artifact_sha256)] for m in run.stages] if run else [],
            [],
        ),
        (
            "Canary steps and verdicts",
            [f"SLO verdict: {p.get('slo_verdict')}", f"smoke: {p.get('smoke_verdict')}"],
            ["step", "weight", "metric", "baseline", "canary", "threshold", "p", "verdict", "why"],
            [
                [
                    str(s.get(k))
                    for k in (
                        "step",
                        "weight",
                        "metric",
                        "baseline",
                        "canary",
                        "threshold",
                        "p_value",
                        "verdict",
                        "reason",
                    )
                ]
                for s in p.get("slo_steps") or []
            ],
            [],
        ),
        (
            "Monitoring snapshots",
            [] if p.get("snapshots") else ["none recorded"],
            ["name", "sha256", "stored at"],
            [[s["name"], s["sha256"], s["path"]] for s in p.get("snapshots") or []],
            [(s["name"], s["path"], s["sha256"]) for s in p.get("snapshots") or []],
        ),
        (
            "Audit trail",
            [],
            ["field", "value"],
            [
                ["entry seq", str(entry.seq)],
                ["entry hash", entry.entry_hash],
                ["previous hash", entry.prev_hash],
                ["recorded at", shown["recorded_at"]],
                *_checkpoint_rows(checkpoint),
            ],
            [],
        ),
    ]
    return sections


def _checkpoint_rows(checkpoint: Checkpoint | None) -> list[list[str]]:
    if checkpoint is None:
        return [["checkpoint", "none covers this entry"]]
    return [
        ["checkpoint seq", str(checkpoint.seq)],
        ["checkpoint head hash", checkpoint.head_hash],
        ["checkpoint time", checkpoint.time],
        ["checkpoint key id", checkpoint.key_id],
        ["checkpoint signature", checkpoint.signature],
    ]


def _result(value: bool | None) -> str:
    return "n/a" if value is None else "PASSED" if value else "FAILED"


def _markdown(sections: list[Section]) -> str:
    out: list[str] = []
    for index, (title, paragraphs, header, rows, _images) in enumerate(sections):
        out += [f"{'#' if index == 0 else '##'} {title}", ""]
        out += [f"{text}  " for text in paragraphs]
        if paragraphs:
            out.append("")
        if header:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;font-size:.9em;"
    "word-break:break-all}th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}"
)


def _html(sections: list[Section]) -> str:
    e = html.escape
    body: list[str] = []
    for index, (title, paragraphs, header, rows, images) in enumerate(sections):
        body.append(f"<h{1 if index == 0 else 2}>{e(title)}</h{1 if index == 0 else 2}>")
        body += [f"<p>{e(text)}</p>" for text in paragraphs]
        if header:
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</table>")
        for name, path, sha in images:
            body.append(_figure(name, path, sha))
    title = e(sections[0][0])
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _figure(name: str, path: str, sha256: str) -> str:
    e = html.escape
    problem = evidence.check(path, sha256)
    if problem:
        return f"<p><strong>{e(name)}: not embedded, {e(problem)}</strong></p>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    mime = "image/png" if path.endswith(".png") else "application/octet-stream"
    return (
        f'<figure><img alt="{e(name)}" src="data:{mime};base64,{data}">'
        f"<figcaption>{e(name)} (sha256 {e(sha256)})</figcaption></figure>"
    )
