"""The GitHub workflows: only named sessions and tasks, pinned actions, the spec's job graph."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = {p.name: p for p in sorted((ROOT / ".github/workflows").glob("*.yml"))}
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
#: Setup commands a step may run besides `uv run nox …` and `uv run invoke …`.
SETUP = [
    re.compile(r'^python3 -m pip install --user "uv==\$\{UV_VERSION\}" "nox==\$\{NOX_VERSION\}"$'),
    re.compile(r"^aws eks update-kubeconfig --name ml-platform-(staging|production) "),
    re.compile(r'^cat reports/security-summary\.md >> "\$GITHUB_STEP_SUMMARY"$'),
]
WORK = re.compile(r"^uv run (nox (-s [\w_]+|-t [\w]+)( -- .*)?|invoke [\w-]+( .*)?)$")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(WORKFLOWS[name].read_text())
    return data


def steps() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (name, job_name, step)
        for name in WORKFLOWS
        for job_name, job in load(name)["jobs"].items()
        for step in job["steps"]
    ]


def test_both_workflows_exist_and_parse() -> None:
    assert set(WORKFLOWS) == {"ci-cd.yml", "security-scan.yml"}
    for name in WORKFLOWS:
        assert load(name)["jobs"]


def test_every_run_step_only_calls_a_session_a_task_or_a_setup_command() -> None:
    for workflow, job, step in steps():
        for line in str(step.get("run", "")).strip().splitlines():
            line = line.strip()
            if not line:
                continue
            assert WORK.match(line) or any(
                p.match(line) for p in SETUP
            ), f"{workflow}:{job}: {line}"


def _named(pattern: str) -> set[str]:
    found = set()
    for _, _, step in steps():
        for match in re.finditer(pattern, str(step.get("run", ""))):
            found.add(match.group(1))
    return found


def test_every_named_session_and_task_exists() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "nox", "-l", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    every = subprocess.run(  # non-default sessions too (--json lists the selected ones)
        [sys.executable, "-m", "nox", "-l"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    sessions = {line[2:].split()[0] for line in every.splitlines() if line[:2] in ("* ", "- ")}
    tags = {tag for s in json.loads(listed.stdout) for tag in s.get("tags", [])}
    assert _named(r"nox -s ([\w_]+)") <= sessions
    assert _named(r"nox -t (\w+)") <= tags
    tasks = subprocess.run(
        [sys.executable, "-m", "invoke", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for task in _named(r"invoke ([\w-]+)"):
        assert re.search(rf"^\s+{task}\s", tasks, re.M), task


def test_actions_are_pinned_by_full_commit_sha_with_a_version_comment() -> None:
    for name, path in WORKFLOWS.items():
        for line in path.read_text().splitlines():
            if "uses:" in line:
                ref, _, comment = line.split("uses:", 1)[1].strip().partition(" # ")
                assert PINNED.match(ref), f"{name}: {line.strip()}"
                assert re.match(r"v\d+(\.\d+)*$", comment.strip()), f"{name}: {line.strip()}"


def test_least_privilege_and_hygiene() -> None:
    for name in WORKFLOWS:
        workflow = load(name)
        assert workflow["permissions"] == {"contents": "read"}, name
        assert "concurrency" in workflow, name
        for job_name, job in workflow["jobs"].items():
            assert job.get("timeout-minutes"), f"{name}:{job_name}"
            extra = set(job.get("permissions", {})) - {"contents"}
            assert extra <= {"security-events", "id-token", "packages"}, f"{name}:{job_name}"
            for step in job["steps"]:
                if str(step.get("uses", "")).startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False, f"{name}:{job_name}"
                run = str(step.get("run", ""))
                assert "secrets." not in run and "${{" not in run, f"{name}:{job_name}: {run}"


def test_the_pipeline_graph_is_the_specs() -> None:
    jobs = load("ci-cd.yml")["jobs"]
    needs = {name: set(job.get("needs", [])) for name, job in jobs.items()}
    assert needs["quality"] == needs["tests"] == set()  # in parallel
    assert needs["build"] == {"quality", "tests"}
    assert needs["scan"] == {"build"}
    assert needs["deploy-staging"] == {"scan"}
    assert needs["deploy-production"] == {"deploy-staging"}
    assert {"deploy-production", "deploy-staging"} <= needs["notify"]
    assert (
        jobs["deploy-staging"]["if"]
        == jobs["deploy-production"]["if"]
        == "github.ref == 'refs/heads/main' || startsWith(github.ref, 'refs/tags/v')"
    )  # main, or a release tag (its commit must be on main: delivery.tags, check_allowed)
    assert jobs["deploy-production"]["environment"]["name"] == "production"
    assert jobs["deploy-staging"]["environment"]["url"] == "https://staging.ml-platform.example.com"
    for deploy in ("deploy-staging", "deploy-production"):
        assert jobs[deploy]["permissions"]["id-token"] == "write"  # OIDC, no long-lived keys
        aws = next(
            s for s in jobs[deploy]["steps"] if "configure-aws-credentials" in s.get("uses", "")
        )
        assert "role-to-assume" in aws["with"] and "aws-access-key-id" not in aws["with"]
    services = jobs["tests"]["services"]
    assert (
        services["postgres"]["image"] == "postgres:15" and services["redis"]["image"] == "redis:7"
    )
    assert "--health-cmd" in services["postgres"]["options"]
    assert jobs["tests"]["env"]["HYPOTHESIS_PROFILE"] == "ci"


def test_security_scan_runs_daily_and_uploads_each_sarif_on_its_own() -> None:
    workflow = load("security-scan.yml")
    raw: dict[Any, Any] = workflow
    triggers = raw[True] if True in raw else raw["on"]  # YAML 1.1 reads the key `on` as True
    assert triggers["schedule"] == [{"cron": "0 2 * * *"}]
    assert triggers["push"]["branches"] == ["main"]
    categories = [
        step["with"]["category"]
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if "codeql-action/upload-sarif" in str(step.get("uses", ""))
    ]
    assert sorted(categories) == ["bandit", "semgrep", "trivy"]  # one upload per tool
    codeql = workflow["jobs"]["codeql"]["steps"][1]
    assert codeql["with"]["queries"] == "security-and-quality"
    names = {
        step["with"]["name"]
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if "upload-artifact" in str(step.get("uses", ""))
    }
    spec = {
        "bandit-security-report",
        "semgrep-report",
        "trivy-container-report",
        "safety-report",
        "pip-audit-report",
        "licenses",
    }
    assert spec <= names


def test_pull_requests_check_their_commit_messages() -> None:
    quality = load("ci-cd.yml")["jobs"]["quality"]
    [step] = [s for s in quality["steps"] if "nox -s commits" in str(s.get("run", ""))]
    assert step["if"] == "github.event_name == 'pull_request'"
    assert step["run"] == 'uv run nox -s commits -- "origin/${BASE_REF}..HEAD"'
    checkout = quality["steps"][0]
    assert checkout["with"]["fetch-depth"] == 0


def test_the_secrets_job_installs_no_scanner_by_itself() -> None:
    """The secrets session installs gitleaks and trufflehog (pinned, verified); no `go install`
    (trufflehog's go.mod has replace directives: it cannot be installed that way)."""
    text = WORKFLOWS["security-scan.yml"].read_text()
    assert "go install" not in text and "uv run nox -s secrets" in text
