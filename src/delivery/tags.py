"""Image tags by the spec's rules, with docker/metadata-action's semantics.

| build of | tags |
|---|---|
| a branch `B` (push) | `B` sanitized, `B-<short sha>`; `latest` when B is the default branch |
| pull request `N` | `pr-N`, `pr-N-<short sha>` |
| git tag `vX.Y.Z` | `X.Y.Z`, `X.Y`, `X` (no `X` when X is 0); a pre-release only `X.Y.Z-pre` |

A tag matches the OCI grammar ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``.
"""

from __future__ import annotations

import os
import re
import subprocess  # nosec B404
from collections.abc import Callable, Mapping
from dataclasses import dataclass

TAG_GRAMMAR = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
SEMVER = re.compile(
    r"^v?(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)
SHORT_SHA = 7
MAX_TAG = 128


class TagError(ValueError):
    """The build's reference cannot be turned into tags; the message says why."""


@dataclass(frozen=True)
class BuildRef:
    """What is being built: from the GitHub Actions environment, else from git."""

    sha: str
    branch: str | None = None
    pull_request: int | None = None
    git_tag: str | None = None
    default_branch: str = "main"


def sanitize(name: str) -> str:
    """A branch name as a valid tag: invalid runs become '-', no leading '.' or '-', ≤128."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lstrip(".-")
    return cleaned[:MAX_TAG].rstrip(".-") or "branch"


def _with_sha(base: str, sha: str) -> str:
    suffix = f"-{sha[:SHORT_SHA]}"
    return base[: MAX_TAG - len(suffix)].rstrip(".-") + suffix


def compute_tags(ref: BuildRef) -> list[str]:
    """The image's tags, most specific first, without duplicates."""
    if not re.fullmatch(r"[0-9a-f]{7,40}", ref.sha):
        raise TagError(f"{ref.sha!r} is not a git commit sha")
    tags: list[str] = []
    if ref.git_tag is not None:
        match = SEMVER.match(ref.git_tag)
        if match is None:
            raise TagError(f"git tag {ref.git_tag!r} is not a semantic version like v1.2.3")
        major, minor, patch, pre = (match[k] for k in ("major", "minor", "patch", "pre"))
        if pre:
            tags.append(f"{major}.{minor}.{patch}-{pre}")
        else:
            tags += [f"{major}.{minor}.{patch}", f"{major}.{minor}"]
            if major != "0":
                tags.append(major)
    elif ref.pull_request is not None:
        tags += [f"pr-{ref.pull_request}", f"pr-{ref.pull_request}-{ref.sha[:SHORT_SHA]}"]
    elif ref.branch:
        name = sanitize(ref.branch)
        if name == "latest" and ref.branch != ref.default_branch:
            name = "branch-latest"  # `latest` belongs to the default branch alone
        tags += [name, _with_sha(name, ref.sha)]
        if ref.branch == ref.default_branch:
            tags.append("latest")
    else:
        raise TagError("nothing to tag: no branch, pull request or git tag (a detached HEAD?)")
    return list(dict.fromkeys(tags))


def deploy_tag(ref: BuildRef) -> str:
    """The immutable tag a deploy pins: the full version of a release, else `<name>-<sha>`."""
    tags = compute_tags(ref)
    return tags[0] if ref.git_tag is not None else tags[1]


def _git(args: list[str]) -> str:
    result = subprocess.run(  # nosec B603 B607 - git with fixed arguments
        ["git", *args], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def current_ref(
    env: Mapping[str, str] | None = None, git: Callable[[list[str]], str] = _git
) -> BuildRef:
    """The build's reference from GitHub Actions' variables when present, else from git."""
    env = os.environ if env is None else env
    default = env.get("DEFAULT_BRANCH") or env.get("GITHUB_DEFAULT_BRANCH") or "main"
    ref = env.get("GITHUB_REF", "")
    sha = env.get("GITHUB_SHA") or git(["rev-parse", "HEAD"])
    if not sha:
        raise TagError("no commit: set GITHUB_SHA or run inside a git repository")
    if ref.startswith("refs/tags/"):
        # A release deploys from the branch that holds its commit (the protection rules name
        # branches): the default branch if it does, as far as this checkout can tell.
        holders = {
            line.strip().removeprefix("origin/")
            for line in git(["branch", "-a", "--format=%(refname:short)", "--contains", sha])
            .replace("remotes/", "")
            .splitlines()
        }
        branch = default if default in holders else next(iter(sorted(holders)), None)
        return BuildRef(
            sha, branch=branch, git_tag=ref.removeprefix("refs/tags/"), default_branch=default
        )
    if match := re.fullmatch(r"refs/pull/(\d+)/(merge|head)", ref):
        return BuildRef(sha, pull_request=int(match[1]), default_branch=default)
    if ref.startswith("refs/heads/"):
        return BuildRef(sha, branch=ref.removeprefix("refs/heads/"), default_branch=default)
    head = git(["rev-parse", "--abbrev-ref", "HEAD"])
    branch = None if head in ("", "HEAD") else head
    exact = git(["describe", "--tags", "--exact-match", "HEAD"])
    if exact and SEMVER.match(exact):  # a release tag wins for the image; the branch stays
        return BuildRef(sha, branch=branch, git_tag=exact, default_branch=default)
    return BuildRef(sha, branch=branch, default_branch=default)


def main() -> int:
    """Print the tags of the current build, one per line (for the image session)."""
    try:
        tags = compute_tags(current_ref())
    except TagError as exc:
        print(f"error: {exc}")
        return 1
    print("\n".join(tags))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
