"""The verdict for people (Markdown, fit for a CI step summary), for machines (JSON), and SARIF."""

from __future__ import annotations

import json
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

from delivery.security.findings import Finding, Severity, Status, ToolResult
from delivery.security.policy import Verdict

SARIF_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
}
#: GitHub code scanning reads this number to rank alerts (CVSS-like).
SECURITY_SEVERITY = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "2.0",
}


def markdown(verdict: Verdict, today: date) -> str:
    lines = ["# Security summary", ""]
    if verdict.allowed_unchecked:
        names = ", ".join(r.tool for r in verdict.allowed_unchecked)
        lines += [f"> **NOT CHECKED, allowed for this run:** {names}", ""]
    status = "PASSED" if verdict.passed else "FAILED"
    counts = Counter(e.finding.severity for e in verdict.evaluated if e.excepted_by is None)
    lines += [
        f"**Gate: {status}** — {len(verdict.blocking)} blocking, "
        + ", ".join(f"{counts.get(s, 0)} {s.name}" for s in sorted(Severity, reverse=True))
        + f", {sum(1 for e in verdict.evaluated if e.excepted_by)} excepted ({today.isoformat()})",
        "",
        "| tool | status | findings | note |",
        "|---|---|---|---|",
    ]
    for result in verdict.results:
        shown = {
            Status.CHECKED: "checked",
            Status.NOT_CHECKED: "**NOT CHECKED**",
            Status.NOT_PRESENT: "nothing to check",
        }[result.status]
        lines.append(
            f"| {result.tool} | {shown} | {len(result.findings)} | {_cell(result.reason)} |"
        )
    if verdict.expired_exceptions:
        lines += ["", "## Expired exceptions (fail the gate)", ""]
        lines += [f"- {e.label}: {_cell(e.reason)}" for e in verdict.expired_exceptions]
    if verdict.evaluated:
        lines += [
            "",
            "## Findings",
            "",
            "| severity | tool | rule | where | due | status |",
            "|---|---|---|---|---|---|",
        ]
        ordered = sorted(verdict.evaluated, key=lambda e: (-e.finding.severity, e.finding.tool))
        blocking = {id(e) for e in verdict.blocking}
        for e in ordered:
            f = e.finding
            where = f"{f.path}:{f.line}" if f.line else f.path
            due = e.due.isoformat() if e.due else "next release"
            state = (
                f"excepted until {e.excepted_by.expires}"
                if e.excepted_by
                else ("**blocking**" if id(e) in blocking else "open")
            )
            if e.overdue and not e.excepted_by:
                state += " (overdue)"
            cells = [f.severity.name, f.tool, _cell(f.rule), _cell(where), due, state]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def summary_json(verdict: Verdict, today: date) -> dict[str, Any]:
    return {
        "date": today.isoformat(),
        "passed": verdict.passed,
        "tools": {
            r.tool: {"status": r.status.value, "reason": r.reason, "findings": len(r.findings)}
            for r in verdict.results
        },
        "allowed_unchecked": [r.tool for r in verdict.allowed_unchecked],
        "expired_exceptions": [e.label for e in verdict.expired_exceptions],
        "findings": [
            {
                **e.finding.to_json(),
                "first_seen": e.first_seen.isoformat(),
                "due": e.due.isoformat() if e.due else None,
                "excepted": e.excepted_by is not None,
                "blocking": e in verdict.blocking,
                "overdue": e.overdue,
            }
            for e in verdict.evaluated
        ],
    }


def sarif(result: ToolResult) -> dict[str, Any]:
    """One SARIF 2.1.0 log for one tool: GitHub rejects several runs of a tool in one upload."""
    rules: dict[str, Finding] = {}
    for finding in result.findings:
        rules.setdefault(finding.rule, finding)
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": result.tool,
                        "informationUri": "https://github.com/ml-platform/ml-platform",
                        "rules": [_sarif_rule(rule, f) for rule, f in rules.items()],
                    }
                },
                "automationDetails": {"id": f"{result.tool}/"},
                "results": [_sarif_result(f) for f in result.findings],
            }
        ],
    }


def _sarif_rule(rule: str, finding: Finding) -> dict[str, Any]:
    described: dict[str, Any] = {
        "id": rule,
        "shortDescription": {"text": finding.message[:200] or rule},
        "properties": {"security-severity": SECURITY_SEVERITY[finding.severity]},
    }
    if finding.remediation and finding.remediation.startswith("https://"):
        described["helpUri"] = finding.remediation
    return described


def _sarif_result(finding: Finding) -> dict[str, Any]:
    location: dict[str, Any] = {"artifactLocation": {"uri": finding.path}}
    if finding.line:
        location["region"] = {"startLine": finding.line}
    return {
        "ruleId": finding.rule,
        "level": SARIF_LEVEL[finding.severity],
        "message": {"text": finding.message or finding.rule},
        "locations": [{"physicalLocation": location}],
        "partialFingerprints": {"mlp/v1": finding.fingerprint},
    }


def write_all(verdict: Verdict, today: date, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "security-summary.md", out / "security-summary.json"]
    written[0].write_text(markdown(verdict, today))
    written[1].write_text(json.dumps(summary_json(verdict, today), indent=2) + "\n")
    sarif_dir = out / "sarif"
    sarif_dir.mkdir(exist_ok=True)
    for result in verdict.results:
        if result.status is Status.CHECKED:
            path = sarif_dir / f"{result.tool}.sarif"
            path.write_text(json.dumps(sarif(result), indent=2) + "\n")
            written.append(path)
    ledger = out / "security-first-seen.json"
    ledger.write_text(json.dumps(verdict.first_seen(), indent=2, sort_keys=True) + "\n")
    written.append(ledger)
    return written
