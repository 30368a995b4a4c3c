"""security/policy.toml: the gate, the SLAs, the exceptions, and the verdict they give."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from delivery.security.findings import Finding, Severity, Status, ToolResult

#: The spec's SLAs: CRITICAL immediately, HIGH in 7 days, MEDIUM in 30, LOW in the next release.
DEFAULT_SLA_DAYS: dict[Severity, int | None] = {
    Severity.CRITICAL: 0,
    Severity.HIGH: 7,
    Severity.MEDIUM: 30,
    Severity.LOW: None,
}


class PolicyError(ValueError):
    """The policy file is malformed; the message names the entry."""


@dataclass(frozen=True)
class Exception_:
    """An accepted finding: matched by fingerprint, or by tool and rule (and path glob)."""

    reason: str
    owner: str
    expires: date
    fingerprint: str | None = None
    tool: str | None = None
    rule: str | None = None
    path: str | None = None

    def matches(self, finding: Finding) -> bool:
        if self.fingerprint is not None:
            return finding.fingerprint == self.fingerprint
        if self.tool is not None and finding.tool != self.tool:
            return False
        if self.rule is not None and finding.rule != self.rule:
            return False
        return self.path is None or fnmatch.fnmatch(finding.path, self.path)

    @property
    def label(self) -> str:
        target = self.fingerprint or f"{self.tool or '*'}:{self.rule or '*'}:{self.path or '*'}"
        return f"{target} (owner {self.owner}, expires {self.expires.isoformat()})"


@dataclass(frozen=True)
class Policy:
    fail_on: frozenset[Severity] = frozenset({Severity.CRITICAL, Severity.HIGH})
    sla_days: Mapping[Severity, int | None] = field(default_factory=lambda: dict(DEFAULT_SLA_DAYS))
    exceptions: tuple[Exception_, ...] = ()
    allowed_licenses: frozenset[str] = frozenset()
    required_tools: tuple[str, ...] = ()

    def due(self, severity: Severity, first_seen: date) -> date | None:
        days = self.sla_days.get(severity)
        return None if days is None else first_seen + timedelta(days=days)


def load_policy(path: Path) -> Policy:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"no policy file at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    gate = data.get("gate", {})
    fail_on = frozenset(Severity.parse(s) for s in gate.get("fail_on", ["CRITICAL", "HIGH"]))
    sla: dict[Severity, int | None] = dict(DEFAULT_SLA_DAYS)
    for name, days in data.get("sla", {}).items():
        if days != "next release" and not (isinstance(days, int) and days >= 0):
            raise PolicyError(f'sla.{name} must be a number of days or "next release"')
        sla[Severity.parse(name)] = None if days == "next release" else days
    exceptions = []
    for index, entry in enumerate(data.get("exceptions", [])):
        where = f"exceptions[{index}]"
        missing = [key for key in ("reason", "owner", "expires") if not entry.get(key)]
        if missing:
            raise PolicyError(f"{where} needs {', '.join(missing)}")
        if not isinstance(entry["expires"], date):
            raise PolicyError(f"{where}.expires must be a date like 2027-01-31")
        if not (entry.get("fingerprint") or entry.get("rule")):
            raise PolicyError(f"{where} needs a fingerprint or a rule to match")
        exceptions.append(
            Exception_(
                reason=entry["reason"],
                owner=entry["owner"],
                expires=entry["expires"],
                fingerprint=entry.get("fingerprint"),
                tool=entry.get("tool"),
                rule=entry.get("rule"),
                path=entry.get("path"),
            )
        )
    licenses = frozenset(data.get("licenses", {}).get("allowed", []))
    required = tuple(gate.get("required_tools", []))
    return Policy(fail_on, sla, tuple(exceptions), licenses, required)


@dataclass(frozen=True)
class Evaluated:
    finding: Finding
    first_seen: date
    due: date | None
    excepted_by: Exception_ | None
    overdue: bool


@dataclass
class Verdict:
    evaluated: list[Evaluated]
    blocking: list[Evaluated]
    expired_exceptions: list[Exception_]
    not_checked: list[ToolResult]
    allowed_unchecked: list[ToolResult]
    results: list[ToolResult]

    @property
    def passed(self) -> bool:
        return not (self.blocking or self.expired_exceptions or self.not_checked)

    def first_seen(self) -> dict[str, str]:
        return {e.finding.fingerprint: e.first_seen.isoformat() for e in self.evaluated}


def evaluate(
    policy: Policy,
    results: Iterable[ToolResult],
    *,
    today: date,
    first_seen: Mapping[str, date] | None = None,
    allow_unchecked: Iterable[str] = (),
) -> Verdict:
    """Apply the policy. The gate fails on a finding of a failing severity that no live
    exception covers, on any finding past its SLA, on any expired exception, and on any tool
    that did not check (unless explicitly allowed). Adding a finding never makes it pass."""
    results = list(results)
    present = {r.tool for r in results}
    results += [
        ToolResult(tool, Status.NOT_CHECKED, reason="no result: its session did not run")
        for tool in policy.required_tools
        if tool not in present
    ]
    allowed = set(allow_unchecked)
    seen = dict(first_seen or {})
    evaluated: list[Evaluated] = []
    for result in results:
        for finding in result.findings:
            since = seen.get(finding.fingerprint, today)
            due = policy.due(finding.severity, since)
            live = [e for e in policy.exceptions if e.expires >= today and e.matches(finding)]
            overdue = due is not None and due < today
            evaluated.append(Evaluated(finding, since, due, live[0] if live else None, overdue))
    blocking = [
        e
        for e in evaluated
        if e.excepted_by is None and (e.finding.severity in policy.fail_on or e.overdue)
    ]
    return Verdict(
        evaluated=evaluated,
        blocking=blocking,
        expired_exceptions=[e for e in policy.exceptions if e.expires < today],
        not_checked=[
            r for r in results if r.status is Status.NOT_CHECKED and r.tool not in allowed
        ],
        allowed_unchecked=[
            r for r in results if r.status is Status.NOT_CHECKED and r.tool in allowed
        ],
        results=results,
    )
