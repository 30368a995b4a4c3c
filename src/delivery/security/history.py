"""First-seen dates that persist across CI runs without a ledger to keep: git history.

A finding at a line of a tracked file has been there at least since the commit that last
wrote that line (``git blame``; this needs a full clone, and CI fetches the whole history). A
vulnerable dependency (``name==version``) has been there since the commit that put that
version into uv.lock. Where git cannot tell — an untracked file, a finding without a line, a
shallow clone — nothing is said, and the committed ledger (security/first-seen.json) or today
counts. The earliest date wins.
"""

from __future__ import annotations

import re
import subprocess  # nosec B404
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from pathlib import Path

from delivery.security.findings import Finding

Git = Callable[[list[str]], str]
LOCK = "uv.lock"


def _git(args: list[str]) -> str:
    result = subprocess.run(  # nosec B603 B607 - git with arguments built here
        ["git", *args], capture_output=True, text=True, check=False
    )
    return result.stdout if result.returncode == 0 else ""


def line_written(path: str, line: int, git: Git = _git) -> date | None:
    """The day the commit that last wrote ``path:line`` was made; None if git cannot tell."""
    out = git(["blame", "--root", "--porcelain", "-L", f"{line},{line}", "--", path])
    if not out:
        return None
    match = re.search(r"^committer-time (\d+)$", out, re.M)
    return datetime.fromtimestamp(int(match[1]), UTC).date() if match else None


def _lock_line(lock_text: str, name: str, version: str) -> int | None:
    lines = lock_text.splitlines()
    wanted = re.compile(rf'^name = "{re.escape(name)}"$', re.I)
    for number, text in enumerate(lines, start=1):
        if wanted.match(text) and number < len(lines):
            if lines[number].strip() == f'version = "{version}"':
                return number + 1
    return None


def first_seen_from_git(
    findings: Iterable[Finding], root: Path = Path("."), git: Git = _git
) -> dict[str, date]:
    """For each finding git can date, the day its line (or its locked version) was written."""
    if git(["rev-parse", "--is-shallow-repository"]).strip() != "false":
        return {}  # a shallow clone (or no git): its oldest commit would date everything
    lock = root / LOCK
    lock_text = lock.read_text() if lock.exists() else ""
    seen: dict[str, date] = {}
    for finding in findings:
        path, line = finding.path, finding.line
        if line is None and "==" in path and lock_text:
            name, _, version = path.partition("==")
            path, line = LOCK, _lock_line(lock_text, name, version)
        if line is None or not (root / path).is_file():
            continue
        day = line_written(path, line, git)
        if day is not None:
            seen[finding.fingerprint] = min(day, seen.get(finding.fingerprint, day))
    return seen


def earliest(*sources: dict[str, date]) -> dict[str, date]:
    merged: dict[str, date] = {}
    for source in sources:
        for fingerprint, day in source.items():
            merged[fingerprint] = min(day, merged.get(fingerprint, day))
    return merged
