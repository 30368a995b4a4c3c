"""Commit messages and releases, on real throwaway git repositories."""

from __future__ import annotations

import subprocess
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from delivery.release import (
    Commit,
    ReleaseError,
    apply,
    check,
    main,
    next_version,
    parse,
    plan,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "message",
    [
        "feat(auth): add JWT token refresh endpoint",
        "fix: handle an empty grid",
        "refactor(engine)!: plan with states",
        "chore(deps): bump uv\n\nBREAKING CHANGE: needs uv 0.5",
    ],
)
def test_good_messages(message: str) -> None:
    parse("a" * 40, message)


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ("Add stuff", "does not follow"),
        ("feature(x): nope", "type 'feature' is not one of"),
        ("feat(x):missing space", "does not follow"),
    ],
)
def test_bad_messages_are_named(message: str, problem: str) -> None:
    [found] = check([("b" * 40, message)])
    assert problem in found and found.startswith("bbbbbbb:")


def test_merges_are_not_judged() -> None:
    assert check([("c" * 40, "Merge branch 'x' into main")]) == []


def _commit(type_: str, breaking: bool = False) -> Commit:
    return Commit("d" * 40, type_, None, "s", breaking)


@pytest.mark.parametrize(
    ("current", "types", "expected"),
    [
        ("1.2.3", [("fix", False)], "1.2.4"),
        ("1.2.3", [("fix", False), ("feat", False)], "1.3.0"),
        ("1.2.3", [("docs", False), ("feat", True)], "2.0.0"),
        ("0.4.1", [("feat", True)], "0.5.0"),
        ("1.2.3", [], None),
    ],
)
def test_next_version(current: str, types: list[tuple[str, bool]], expected: str | None) -> None:
    assert next_version(current, [_commit(t, b) for t, b in types]) == expected


@pytest.mark.property
@given(
    st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50)),
    st.lists(
        st.tuples(
            st.sampled_from(["feat", "fix", "docs", "test", "refactor", "chore"]), st.booleans()
        ),
        min_size=1,
    ),
)
def test_the_next_version_is_always_greater(
    version: tuple[int, int, int], types: list[tuple[str, bool]]
) -> None:
    current = ".".join(map(str, version))
    bumped = next_version(current, [_commit(t, b) for t, b in types])
    assert bumped is not None
    assert tuple(map(int, bumped.split("."))) > version


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    run("init", "-q", "-b", "main")
    run("config", "user.email", "dev@example.com")
    run("config", "user.name", "Dev")
    (repo / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1.4.0"\n')
    (repo / "CHANGELOG.md").write_text("# Changelog\n\n## v1.4.0 (2026-01-01)\n\n- first\n")
    run("add", "-A")
    run("commit", "-q", "-m", "chore: start")
    run("tag", "-a", "v1.4.0", "-m", "v1.4.0")
    for message in (
        "fix(api): refuse empty params",
        "feat(engine): retry with backoff",
        "docs: readme",
    ):
        (repo / "f.txt").write_text(message)
        run("add", "-A")
        run("commit", "-q", "-m", message)
    return repo


def test_release_in_a_throwaway_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _repo(tmp_path)
    release = plan(repo, date(2026, 11, 26))
    assert release is not None
    assert (release.current, release.version, release.tag) == ("1.4.0", "1.5.0", "v1.5.0")
    assert "### Features\n\n- **engine**: retry with backoff" in release.changelog
    assert "### Bug fixes\n\n- **api**: refuse empty params" in release.changelog
    monkeypatch.chdir(repo)
    assert main(["plan"]) == 0
    assert "release 1.4.0 -> 1.5.0 (3 commits)" in capsys.readouterr().out
    apply(repo, release)
    assert 'version = "1.5.0"' in (repo / "pyproject.toml").read_text()
    changelog = (repo / "CHANGELOG.md").read_text()
    assert changelog.index("## v1.5.0") < changelog.index("## v1.4.0")
    tags = subprocess.run(["git", "tag"], cwd=repo, capture_output=True, text=True).stdout.split()
    assert "v1.5.0" in tags
    assert plan(repo, date(2026, 11, 26)) is None  # nothing new since the tag
    assert main(["check", "v1.4.0..HEAD"]) == 0


def test_release_refuses_a_dirty_tree_another_branch_and_bad_commits(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "untracked.txt").write_text("x")
    with pytest.raises(ReleaseError, match="uncommitted changes"):
        plan(repo, date(2026, 11, 26))
    (repo / "untracked.txt").unlink()
    subprocess.run(["git", "checkout", "-q", "-b", "feature"], cwd=repo, check=True)
    with pytest.raises(ReleaseError, match="from main, not 'feature'"):
        plan(repo, date(2026, 11, 26))
    subprocess.run(["git", "checkout", "-q", "main"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "wip"], cwd=repo, check=True)
    with pytest.raises(ReleaseError, match="'wip' does not follow"):
        plan(repo, date(2026, 11, 26))


def test_a_release_files_conventional_types_the_history_holds_and_the_gate_still_refuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """This repository's history holds perf, style, ci and revert commits: the release
    refused them all, so no release could ever be planned. It files them now; the gate on a
    pull request's commits (`check`) still takes the spec's six types only."""
    repo = _repo(tmp_path)
    for message in ("perf(engine): batch the claims", "ci: cache uv", "style: black"):
        (repo / "f.txt").write_text(message)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run(["git", "commit", "-q", "-m", message], cwd=repo, check=True)
    release = plan(repo, date(2026, 12, 6))
    assert release is not None and release.version == "1.5.0"
    assert "### Performance\n\n- **engine**: batch the claims" in release.changelog
    maintenance = release.changelog.split("### Maintenance\n\n")[1]
    assert maintenance.startswith("- cache uv") and "- black" in maintenance
    assert release.changelog.count("### Maintenance") == 1
    monkeypatch.chdir(repo)
    assert main(["plan"]) == 0
    assert "note: 3 commits use types outside the spec's (ci 1, perf 1, style 1)" in (
        capsys.readouterr().out
    )
    assert main(["check", "v1.4.0..HEAD"]) == 1
    assert "type 'perf' is not one of feat, fix" in capsys.readouterr().out


def test_the_first_release_is_the_projects_version_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _repo(tmp_path)
    subprocess.run(["git", "tag", "-d", "v1.4.0"], cwd=repo, check=True, capture_output=True)
    monkeypatch.chdir(repo)
    assert main(["plan"]) == 0
    assert "release 1.4.0, the first (no v* tag yet) (4 commits)" in capsys.readouterr().out
