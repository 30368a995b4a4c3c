"""The one findings model every scanner's output is normalized to."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any


class Severity(IntEnum):
    """The spec's severity levels; a higher value is more urgent."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown severity {text!r}; use CRITICAL, HIGH, MEDIUM or LOW"
            ) from None


class Status(StrEnum):
    """Whether a tool actually checked anything."""

    CHECKED = "checked"
    #: The tool could not do its job (e.g. its database is unreachable): nothing was checked.
    NOT_CHECKED = "not_checked"
    #: Nothing of the kind exists yet (e.g. no Dockerfile): nothing to check.
    NOT_PRESENT = "not_present"


@dataclass(frozen=True)
class Finding:
    tool: str
    rule: str
    severity: Severity
    path: str
    line: int | None
    message: str
    remediation: str | None = None
    #: Stable across runs: the same problem in the same place keeps its fingerprint even when
    #: line numbers shift (the line is not part of it, the matched content is).
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            object.__setattr__(
                self, "fingerprint", fingerprint(self.tool, self.rule, self.path, self.message)
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["severity"] = self.severity.name
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        return cls(**{**data, "severity": Severity.parse(data["severity"])})


def fingerprint(tool: str, rule: str, path: str, detail: str) -> str:
    material = "\x1f".join((tool, rule, path, detail))
    return hashlib.sha256(material.encode()).hexdigest()[:24]


@dataclass
class ToolResult:
    """What one tool run produced: its status, findings, and why it did not check if it did not."""

    tool: str
    status: Status
    findings: list[Finding] = field(default_factory=list)
    reason: str = ""
    #: The raw report files the findings came from (for the CI artifacts).
    reports: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "status": self.status.value,
            "reason": self.reason,
            "reports": self.reports,
            "findings": [f.to_json() for f in self.findings],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToolResult:
        return cls(
            tool=data["tool"],
            status=Status(data["status"]),
            reason=data.get("reason", ""),
            reports=list(data.get("reports", [])),
            findings=[Finding.from_json(f) for f in data.get("findings", [])],
        )

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.tool}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def load_results(directory: Path) -> list[ToolResult]:
    return [
        ToolResult.from_json(json.loads(path.read_text()))
        for path in sorted(directory.glob("*.json"))
    ]
