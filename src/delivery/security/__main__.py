"""``python -m delivery.security``: what the nox security sessions call after each tool.

normalize TOOL REPORT     parse a tool's report, save its findings, gate this tool alone
mark TOOL --status S      record a tool that did not check (not_checked) or had nothing to check
report                    merge every tool's findings, apply the policy, write the summaries
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import date
from pathlib import Path

from delivery.security import parsers
from delivery.security.findings import Status, ToolResult, load_results
from delivery.security.history import earliest, first_seen_from_git
from delivery.security.policy import PolicyError, Verdict, evaluate, load_policy
from delivery.security.report import write_all

PARSERS = {
    "bandit": parsers.bandit,
    "semgrep": parsers.semgrep,
    "pip-audit": parsers.pip_audit,
    "safety": parsers.safety,
    "gitleaks": parsers.gitleaks,
    "trufflehog": parsers.trufflehog,
    "hadolint": parsers.hadolint,
    "checkov": parsers.checkov,
    "zizmor": parsers.zizmor,
    "trivy": parsers.trivy,
    "kubernetes-validate": parsers.kubernetes_validate,
}


#: Session names that differ from their tool's name (both are accepted by --allow-unchecked).
SESSION_TOOLS = {
    "audit": "pip-audit",
    "secrets": "detect-secrets",  # pragma: allowlist secret
    "licenses": "pip-licenses",
}


def _verdict_line(tool: str, verdict: Verdict) -> str:
    found = len(verdict.evaluated)
    blocking = len(verdict.blocking)
    state = "PASSED" if verdict.passed else "FAILED"
    return f"{tool}: {found} finding{'s' * (found != 1)}, {blocking} blocking — {state}"


def _today(text: str | None) -> date:
    return date.fromisoformat(text) if text else date.today()


def _first_seen(path: Path, results: list[ToolResult]) -> dict[str, date]:
    """The ledger's dates and git history's, the earliest of both for each finding."""
    ledger = (
        {fp: date.fromisoformat(day) for fp, day in json.loads(path.read_text()).items()}
        if path.exists()
        else {}
    )
    findings = [f for result in results for f in result.findings]
    return earliest(ledger, first_seen_from_git(findings))


def cmd_normalize(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    text = "\n".join(Path(p).read_text() for p in args.reports)
    result: ToolResult
    try:
        if args.tool == "pip-licenses":
            findings = parsers.pip_licenses(text, policy.allowed_licenses)
        elif args.tool == "detect-secrets":
            baseline = json.loads(args.baseline.read_text()) if args.baseline else {"results": {}}
            accepted = {f.fingerprint for f in parsers.detect_secrets(json.dumps(baseline))}
            findings = [f for f in parsers.detect_secrets(text) if f.fingerprint not in accepted]
        else:
            findings = PARSERS[args.tool](text)
        result = ToolResult(args.tool, Status.CHECKED, findings, reports=list(args.reports))
    except parsers.NothingChecked as exc:
        result = ToolResult(
            args.tool, Status.NOT_CHECKED, reason=str(exc), reports=list(args.reports)
        )
    result.save(args.out)
    if result.status is Status.NOT_CHECKED:
        print(f"{args.tool}: NOT CHECKED — {result.reason}")
        return 1
    # One tool alone: the other required tools are the report's business, not this session's.
    alone = dataclasses.replace(policy, required_tools=())
    verdict = evaluate(
        alone,
        [result],
        today=_today(args.today),
        first_seen=_first_seen(args.first_seen, [result]),
    )
    for item in verdict.blocking:
        f = item.finding
        late = f" (overdue: due {item.due}, first seen {item.first_seen})" if item.overdue else ""
        print(
            f"  {f.severity.name:8} {f.rule} at {f.path}:{f.line or ''}{late} — {f.message[:120]}"
        )
    print(_verdict_line(args.tool, verdict))
    return 0 if not verdict.blocking else 1


def cmd_mark(args: argparse.Namespace) -> int:
    status = Status(args.status)
    ToolResult(args.tool, status, reason=args.reason).save(args.out)
    label = "NOT CHECKED" if status is Status.NOT_CHECKED else "nothing to check"
    print(f"{args.tool}: {label} — {args.reason}")
    return 1 if status is Status.NOT_CHECKED else 0


def cmd_report(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    results = load_results(args.results)
    allowed = [SESSION_TOOLS.get(t, t) for t in (args.allow_unchecked or "").split(",") if t]
    today = _today(args.today)
    verdict = evaluate(
        policy,
        results,
        today=today,
        first_seen=_first_seen(args.first_seen, results),
        allow_unchecked=allowed,
    )
    written = write_all(verdict, today, args.out)
    if allowed:
        print(f"NOT CHECKED and allowed for this run: {', '.join(allowed)}")
    for result in results:
        print(
            f"  {result.tool:15} {result.status.value:12} {len(result.findings):4} findings  "
            f"{result.reason}"
        )
    for exc in verdict.expired_exceptions:
        print(f"  expired exception: {exc.label}")
    for result in verdict.not_checked:
        print(f"  NOT CHECKED: {result.tool} — {result.reason}")
    print(f"wrote {', '.join(str(p) for p in written[:2])} and {len(written) - 2} more")
    print(
        f"security gate {'PASSED' if verdict.passed else 'FAILED'}: "
        f"{len(verdict.blocking)} blocking "
        f"findings, {len(verdict.expired_exceptions)} expired exceptions, "
        f"{len(verdict.not_checked)} tools not checked"
    )
    return 0 if verdict.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m delivery.security")
    parser.add_argument("--policy", type=Path, default=Path("security/policy.toml"))
    parser.add_argument("--first-seen", type=Path, default=Path("security/first-seen.json"))
    parser.add_argument("--today", help="evaluate as of this date (YYYY-MM-DD)")
    sub = parser.add_subparsers(dest="command", required=True)

    normalize = sub.add_parser("normalize")
    normalize.add_argument("tool", choices=sorted([*PARSERS, "pip-licenses", "detect-secrets"]))
    normalize.add_argument("reports", nargs="+")
    normalize.add_argument("--baseline", type=Path)
    normalize.add_argument("--out", type=Path, default=Path("reports/normalized"))
    normalize.set_defaults(run=cmd_normalize)

    mark = sub.add_parser("mark")
    mark.add_argument("tool")
    mark.add_argument(
        "--status", choices=[Status.NOT_CHECKED.value, Status.NOT_PRESENT.value], required=True
    )
    mark.add_argument("--reason", required=True)
    mark.add_argument("--out", type=Path, default=Path("reports/normalized"))
    mark.set_defaults(run=cmd_mark)

    report = sub.add_parser("report")
    report.add_argument("--results", type=Path, default=Path("reports/normalized"))
    report.add_argument("--out", type=Path, default=Path("reports"))
    report.add_argument("--allow-unchecked", help="comma-separated tools allowed to be NOT CHECKED")
    report.set_defaults(run=cmd_report)

    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except (PolicyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
