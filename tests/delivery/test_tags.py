"""Image tags: the spec's rules, docker/metadata-action's semantics, the OCI grammar."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from delivery.deploy import DeployError
from delivery.tags import (
    TAG_GRAMMAR,
    BuildRef,
    TagError,
    compute_tags,
    current_ref,
    deploy_tag,
    sanitize,
)

SHA = "abc1234def5678abc1234def5678abc1234def56"  # pragma: allowlist secret


@pytest.mark.unit
@pytest.mark.parametrize(
    ("ref", "tags"),
    [
        (BuildRef(SHA, branch="main"), ["main", "main-abc1234", "latest"]),
        (BuildRef(SHA, branch="develop"), ["develop", "develop-abc1234"]),
        (BuildRef(SHA, branch="feature/Add JWT"), ["feature-Add-JWT", "feature-Add-JWT-abc1234"]),
        (BuildRef(SHA, pull_request=123), ["pr-123", "pr-123-abc1234"]),
        (BuildRef(SHA, branch="latest"), ["branch-latest", "branch-latest-abc1234"]),
        (BuildRef(SHA, git_tag="v1.2.3"), ["1.2.3", "1.2", "1"]),
        (BuildRef(SHA, git_tag="v0.4.1"), ["0.4.1", "0.4"]),
        (BuildRef(SHA, git_tag="v2.0.0-rc.1"), ["2.0.0-rc.1"]),
        (
            BuildRef(SHA, branch="trunk", default_branch="trunk"),
            ["trunk", "trunk-abc1234", "latest"],
        ),
    ],
)
def test_the_spec_tags(ref: BuildRef, tags: list[str]) -> None:
    assert compute_tags(ref) == tags


@pytest.mark.unit
def test_deploys_pin_an_immutable_tag() -> None:
    assert deploy_tag(BuildRef(SHA, branch="main")) == "main-abc1234"
    assert deploy_tag(BuildRef(SHA, pull_request=7)) == "pr-7-abc1234"
    assert deploy_tag(BuildRef(SHA, git_tag="v1.2.3")) == "1.2.3"  # not the moving "1.2"


@pytest.mark.unit
def test_bad_references_are_clear_errors() -> None:
    with pytest.raises(TagError, match="not a semantic version"):
        compute_tags(BuildRef(SHA, git_tag="release-7"))
    with pytest.raises(TagError, match="not a git commit sha"):
        compute_tags(BuildRef("zzz", branch="main"))
    with pytest.raises(TagError, match="detached HEAD"):
        compute_tags(BuildRef(SHA))


@pytest.mark.unit
def test_reference_from_github_actions_variables_or_git() -> None:
    no_git = lambda args: ""  # noqa: E731 - a git that knows nothing
    assert current_ref({"GITHUB_REF": "refs/heads/main", "GITHUB_SHA": SHA}, no_git) == BuildRef(
        SHA, branch="main"
    )
    assert (
        current_ref({"GITHUB_REF": "refs/pull/9/merge", "GITHUB_SHA": SHA}, no_git).pull_request
        == 9
    )
    assert (
        current_ref({"GITHUB_REF": "refs/tags/v3.1.0", "GITHUB_SHA": SHA}, no_git).git_tag
        == "v3.1.0"
    )
    answers = {"rev-parse HEAD": SHA, "rev-parse --abbrev-ref HEAD": "feature/x"}
    local = current_ref({}, lambda args: answers.get(" ".join(args), ""))
    assert local == BuildRef(SHA, branch="feature/x")
    tagged = {**answers, "describe --tags --exact-match HEAD": "v1.0.0"}
    assert current_ref({}, lambda args: tagged.get(" ".join(args), "")).git_tag == "v1.0.0"
    with pytest.raises(TagError, match="no commit"):
        current_ref({}, no_git)


shas = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)
branches = st.one_of(
    st.sampled_from(["main", "latest", "develop"]), st.text(min_size=1, max_size=300)
)
versions = st.builds(
    lambda a, b, c, pre: f"v{a}.{b}.{c}" + (f"-{pre}" if pre else ""),
    st.integers(0, 999),
    st.integers(0, 999),
    st.integers(0, 999),
    st.one_of(
        st.none(), st.from_regex(r"[0-9A-Za-z]{1,8}(\.[0-9A-Za-z]{1,8}){0,2}", fullmatch=True)
    ),
)
refs = st.one_of(
    st.builds(BuildRef, shas, branch=branches),
    st.builds(BuildRef, shas, pull_request=st.integers(1, 10**9)),
    st.builds(BuildRef, shas, git_tag=versions),
)


@pytest.mark.property
@given(refs)
def test_every_tag_is_valid_and_latest_only_on_main(ref: BuildRef) -> None:
    tags = compute_tags(ref)
    assert tags and len(tags) == len(set(tags))
    for tag in tags:
        assert TAG_GRAMMAR.match(tag), tag
        assert len(tag) <= 128
    assert ("latest" in tags) == (ref.branch == "main")


@pytest.mark.property
@given(refs)
def test_the_same_inputs_always_give_the_same_tags(ref: BuildRef) -> None:
    assert compute_tags(ref) == compute_tags(BuildRef(**ref.__dict__))


@pytest.mark.property
@given(branches)
def test_sanitized_names_are_valid_tags(name: str) -> None:
    assert TAG_GRAMMAR.match(sanitize(name))


@pytest.mark.unit
def test_a_release_tag_on_main_deploys_from_main_with_its_version() -> None:
    """A tagged HEAD of main: the release tag pins the image, the branch passes the rules."""
    from delivery.deploy import check_allowed
    from delivery.environments import load_environment
    from tests.delivery.test_deploy import CONFIG

    local = {
        "rev-parse HEAD": SHA,
        "rev-parse --abbrev-ref HEAD": "main",
        "describe --tags --exact-match HEAD": "v1.4.0",
    }
    ref = current_ref({}, lambda args: local.get(" ".join(args), ""))
    assert ref.branch == "main" and deploy_tag(ref) == "1.4.0"
    production = load_environment(CONFIG, "production")
    check_allowed(production, ref.branch, approved=True)  # no "this is no branch"
    # In CI a tag push names no branch: the branch that holds the commit does.
    contains = f"branch -a --format=%(refname:short) --contains {SHA}"
    ci = current_ref(
        {"GITHUB_REF": "refs/tags/v1.4.0", "GITHUB_SHA": SHA},
        lambda args: {contains: "origin/main\norigin/release-1"}.get(" ".join(args), ""),
    )
    assert ci.branch == "main" and deploy_tag(ci) == "1.4.0"
    alone = current_ref({"GITHUB_REF": "refs/tags/v1.4.0", "GITHUB_SHA": SHA}, lambda args: "")
    with pytest.raises(DeployError, match="this is no branch"):
        check_allowed(production, alone.branch, approved=True)
