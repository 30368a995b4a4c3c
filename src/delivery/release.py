"""Conventional commits: check messages, and plan a release (version, changelog, tag).

Format (the spec's): ``<type>(<scope>): <subject>`` with type feat, fix, docs, test, refactor
or chore; the scope is optional. ``!`` after the type/scope, or a ``BREAKING CHANGE:`` footer,
marks a breaking change.

Bumps: breaking → major (minor while the major is 0), feat → minor, anything else → patch.

The gate (`check`, the `commits` session on a pull request's range) takes the spec's six
types only. A release reads the history as it is: Conventional Commits' other types that it
already holds (perf, style, ci, build, revert) go to their changelog sections and are
counted aloud; a message that does not parse at all still stops a release.
"""

from __future__ import annotations

import re
import subprocess  # nosec B404
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

TYPES = ("feat", "fix", "docs", "test", "refactor", "chore")
#: Conventional Commits' other types, read from history by a release (never let in by `check`).
HISTORY_TYPES = ("perf", "style", "ci", "build", "revert")
HEADER = re.compile(
    r"^(?P<type>[a-z]+)(?:\((?P<scope>[a-z0-9][a-z0-9._/-]*)\))?(?P<breaking>!)?"
    r": (?P<subject>\S.*)$"
)
SECTIONS = {
    "feat": "Features",
    "fix": "Bug fixes",
    "perf": "Performance",
    "refactor": "Refactoring",
    "revert": "Reverts",
    "docs": "Documentation",
    "test": "Tests",
    "chore": "Maintenance",
    "style": "Maintenance",
    "ci": "Maintenance",
    "build": "Maintenance",
}
VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class ReleaseError(RuntimeError):
    """A release cannot be made now; the message says why in one line."""


@dataclass(frozen=True)
class Commit:
    sha: str
    type: str
    scope: str | None
    subject: str
    breaking: bool


def parse(sha: str, message: str, types: Sequence[str] = TYPES) -> Commit:
    """Parse one commit message, or raise ValueError saying what is wrong with it."""
    header = message.splitlines()[0] if message else ""
    match = HEADER.match(header)
    if match is None:
        raise ValueError(f"{sha[:7]}: {header!r} does not follow <type>(<scope>): <subject>")
    if match["type"] not in types:
        raise ValueError(f"{sha[:7]}: type {match['type']!r} is not one of {', '.join(TYPES)}")
    breaking = bool(match["breaking"]) or "BREAKING CHANGE:" in message
    return Commit(sha, match["type"], match["scope"], match["subject"], breaking)


def check(commits: Iterable[tuple[str, str]], types: Sequence[str] = TYPES) -> list[str]:
    """Every problem with these (sha, message) pairs; empty when all follow the format."""
    problems = []
    for sha, message in commits:
        if message.startswith(("Merge ", 'Revert "')):
            continue  # made by git itself
        try:
            parse(sha, message, types)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def next_version(current: str, commits: Sequence[Commit]) -> str | None:
    """The version after ``current`` given these commits, or None if nothing warrants one."""
    match = VERSION.match(current)
    if match is None:
        raise ReleaseError(f"current version {current!r} is not X.Y.Z")
    major, minor, patch = (int(part) for part in match.groups())
    if not commits:
        return None
    if any(c.breaking for c in commits):
        return f"{major + 1}.0.0" if major > 0 else f"0.{minor + 1}.0"
    if any(c.type == "feat" for c in commits):
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def changelog_section(version: str, commits: Sequence[Commit], day: date) -> str:
    lines = [f"## v{version} ({day.isoformat()})", ""]
    breaking = [c for c in commits if c.breaking]
    if breaking:
        lines += ["### Breaking changes", ""]
        lines += [f"- {_entry(c)}" for c in breaking] + [""]
    for title in dict.fromkeys(SECTIONS.values()):  # in order, each title once
        entries = [c for c in commits if SECTIONS[c.type] == title]
        if entries:
            lines += [f"### {title}", ""] + [f"- {_entry(c)}" for c in entries] + [""]
    return "\n".join(lines)


def _entry(commit: Commit) -> str:
    scope = f"**{commit.scope}**: " if commit.scope else ""
    return f"{scope}{commit.subject} ({commit.sha[:7]})"


# -- git and files ------------------------------------------------------------------------------


def git(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(  # nosec B603 B607 - git with fixed arguments
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ReleaseError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def commits_in(rev_range: str, cwd: Path | None = None) -> list[tuple[str, str]]:
    """(sha, full message) of every commit in ``rev_range``, oldest first."""
    out = git("log", "--reverse", "--format=%H%x1f%B%x1e", rev_range, cwd=cwd)
    pairs = []
    for record in out.split("\x1e"):
        if record.strip():
            sha, _, message = record.strip("\n").partition("\x1f")
            pairs.append((sha, message.strip()))
    return pairs


def last_tag(cwd: Path | None = None) -> str | None:
    tags = git("tag", "--list", "v*", "--sort=-v:refname", cwd=cwd).split()
    return next((t for t in tags if VERSION.match(t.removeprefix("v"))), None)


def project_version(pyproject: Path) -> str:
    match = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.MULTILINE)
    if match is None:
        raise ReleaseError(f'no version = "…" in {pyproject}')
    return match[1]


@dataclass(frozen=True)
class Plan:
    current: str
    version: str
    tag: str
    commits: list[Commit]
    changelog: str


def plan(root: Path, today: date) -> Plan | None:
    """What a release now would be: None when no commit since the last tag warrants one."""
    if git("status", "--porcelain", cwd=root).strip():
        raise ReleaseError("the working tree has uncommitted changes; commit or stash them first")
    branch = git("rev-parse", "--abbrev-ref", "HEAD", cwd=root).strip()
    if branch != "main":
        raise ReleaseError(f"releases are made from main, not {branch!r}")
    tag = last_tag(root)
    rev_range = f"{tag}..HEAD" if tag else "HEAD"
    raw = commits_in(rev_range, root)
    readable = (*TYPES, *HISTORY_TYPES)
    problems = check(raw, readable)
    if problems:
        raise ReleaseError("commits do not follow the format: " + "; ".join(problems))
    commits = [
        parse(sha, msg, readable) for sha, msg in raw if not msg.startswith(("Merge ", 'Revert "'))
    ]
    current = tag.removeprefix("v") if tag else project_version(root / "pyproject.toml")
    version = next_version(current, commits) if tag else current
    if version is None:
        return None
    return Plan(
        current, version, f"v{version}", commits, changelog_section(version, commits, today)
    )


def apply(root: Path, release: Plan) -> None:
    """Write the version and the changelog, commit them, and tag the commit."""
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(
        re.sub(r'^version = "[^"]+"', f'version = "{release.version}"', text, count=1, flags=re.M)
    )
    changelog = root / "CHANGELOG.md"
    previous = changelog.read_text() if changelog.exists() else "# Changelog\n"
    head, _, rest = previous.partition("\n")
    changelog.write_text(f"{head}\n\n{release.changelog}\n{rest.lstrip()}".rstrip() + "\n")
    if (root / "uv.lock").exists():  # the lock records the project's own version too
        subprocess.run(  # nosec B603 B607 - uv with fixed arguments
            ["uv", "lock", "--offline", "--quiet"], cwd=root, check=True, capture_output=True
        )
        git("add", "uv.lock", cwd=root)
    git("add", "pyproject.toml", "CHANGELOG.md", cwd=root)
    git("commit", "-q", "-m", f"chore(release): {release.tag}", cwd=root)
    git("tag", "-a", release.tag, "-m", f"Release {release.tag}", cwd=root)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m delivery.release")
    sub = parser.add_subparsers(dest="command", required=True)
    check_cmd = sub.add_parser("check", help="check the commit messages of a range")
    check_cmd.add_argument("range", nargs="?", default="origin/main..HEAD")
    release_cmd = sub.add_parser("plan", help="show the next release; --apply makes it")
    release_cmd.add_argument("--apply", action="store_true")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        if args.command == "check":
            pairs = commits_in(args.range, root)
            problems = check(pairs)
            for problem in problems:
                print(f"  {problem}")
            ok = len(pairs) - len(problems)
            print(f"commits {args.range}: {ok} of {len(pairs)} follow <type>(<scope>): <subject>")
            return 1 if problems else 0
        release = plan(root, date.today())
        if release is None:
            print("nothing to release: no commits since the last tag")
            return 0
        moved = (
            f"{release.current} -> {release.version}"
            if release.current != release.version
            else f"{release.version}, the first (no v* tag yet)"
        )
        print(f"release {moved} ({len(release.commits)} commits)")
        print(release.changelog)
        others = Counter(c.type for c in release.commits if c.type not in TYPES)
        if others:
            counted = ", ".join(f"{t} {n}" for t, n in sorted(others.items()))
            print(
                f"note: {sum(others.values())} commits use types outside the spec's ({counted}); "
                "the changelog files them, and `nox -s commits` refuses such types in new "
                "pull requests"
            )
        if args.apply:
            apply(root, release)
            print(f"tagged {release.tag}; push with: git push origin main {release.tag}")
        else:
            print(f"dry run: `nox -s release -- --apply` writes this and tags {release.tag}")
        return 0
    except ReleaseError as exc:
        print(f"error: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
