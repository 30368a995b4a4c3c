"""The security pipeline's library: parsers on real outputs, the policy, the summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from delivery.security import parsers
from delivery.security.__main__ import main
from delivery.security.findings import Finding, Severity, Status, ToolResult, load_results
from delivery.security.policy import (
    Exception_,
    Policy,
    PolicyError,
    evaluate,
    load_policy,
)
from delivery.security.report import markdown, sarif, summary_json

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[2]
TODAY = date(2026, 11, 26)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# -- parsers, on outputs the tools produced here ------------------------------------------------


@pytest.mark.unit
def test_bandit_report() -> None:
    findings = parsers.bandit(fixture("bandit.json"))
    by_rule = {f.rule.split(":")[0]: f for f in findings}
    assert by_rule["B602"].severity is Severity.HIGH and by_rule["B602"].line == 15
    assert by_rule["B324"].severity is Severity.HIGH
    assert by_rule["B608"].severity is Severity.MEDIUM
    assert by_rule["B404"].severity is Severity.LOW
    assert by_rule["B602"].remediation and by_rule["B602"].remediation.startswith("https://")


@pytest.mark.unit
def test_semgrep_local_rules_cover_every_class_the_spec_lists() -> None:
    findings = parsers.semgrep(fixture("semgrep.json"))
    rules = {f.rule: f.severity for f in findings}
    assert rules == {
        "sql-injection-string-built-query": Severity.HIGH,
        "xss-unescaped-html-response": Severity.HIGH,
        "hardcoded-secret": Severity.CRITICAL,
        "insecure-hash-for-security": Severity.MEDIUM,
        "insecure-cipher-or-random-token": Severity.HIGH,
        "command-injection-shell": Severity.HIGH,
    }
    rule_file = (ROOT / "security/semgrep/python-security.yml").read_text()
    for category in (
        "sql-injection",
        "xss",
        "hardcoded-secret",
        "insecure-crypto",
        "command-injection",
    ):
        assert f"category: {category}" in rule_file


@pytest.mark.unit
def test_pip_audit_offline_report_means_nothing_was_checked() -> None:
    with pytest.raises(parsers.NothingChecked, match="48 of 48 dependencies skipped"):
        parsers.pip_audit(fixture("pip-audit-offline.json"))
    with pytest.raises(parsers.NothingChecked, match="no dependencies were audited"):
        parsers.pip_audit('{"dependencies": [], "fixes": []}')
    online = {
        "dependencies": [
            {
                "name": "jinja2",
                "version": "3.1.3",
                "vulns": [
                    {
                        "id": "GHSA-h75v-3vvj-5mfj",
                        "fix_versions": ["3.1.4"],
                        "aliases": [],
                        "description": "xmlattr filter",
                    }
                ],
            },
            {"name": "rich", "version": "15.0.0", "vulns": []},
        ],
        "fixes": [],
    }
    [finding] = parsers.pip_audit(json.dumps(online))
    assert finding.severity is Severity.HIGH and finding.remediation == "upgrade to 3.1.4"
    # Some audited, one skipped (as pip-audit writes it for a package its service lacks):
    # the skipped one is a finding, not a silent pass.
    lacking = "Dependency not found on PyPI and could not be audited: in-house-utils ({})"
    skipped = {"name": "in-house-utils", "skip_reason": lacking.format("0.3.0")}
    online["dependencies"].append(skipped)
    vulnerable, unaudited = parsers.pip_audit(json.dumps(online))
    assert vulnerable.rule == "GHSA-h75v-3vvj-5mfj"
    assert (unaudited.rule, unaudited.severity, unaudited.path) == (
        "not-audited",
        Severity.MEDIUM,
        "in-house-utils",
    )
    assert "not found on PyPI" in unaudited.message
    # Its next version is the same finding: the SLA keeps counting from its first sight.
    skipped["skip_reason"] = lacking.format("0.4.0")
    [_, bumped] = parsers.pip_audit(json.dumps(online))
    assert bumped.fingerprint == unaudited.fingerprint and "0.4.0" in bumped.message


@pytest.mark.unit
def test_safety_gitleaks_trufflehog_and_trivy_documented_formats() -> None:
    first, second = parsers.safety(fixture("safety.json"))
    assert first.severity is Severity.MEDIUM and first.path == "jinja2==3.1.3"
    assert second.severity is Severity.HIGH  # no severity published: the safe assumption
    [leak] = parsers.gitleaks(fixture("gitleaks.json"))
    assert leak.severity is Severity.CRITICAL and leak.path == "settings.env"
    [hog] = parsers.trufflehog(fixture("trufflehog.jsonl"))
    assert hog.rule == "AWS" and hog.line == 1
    trivy = {f.rule: f for f in parsers.trivy(fixture("trivy.json"))}
    assert trivy["CVE-2024-0001"].severity is Severity.CRITICAL
    assert trivy["CVE-2024-0002"].severity is Severity.MEDIUM  # UNKNOWN
    assert trivy["DS002"].severity is Severity.HIGH
    assert trivy["aws-access-key-id"].severity is Severity.CRITICAL


@pytest.mark.unit
def test_detect_secrets_hadolint_checkov_and_zizmor_reports() -> None:
    secrets = parsers.detect_secrets(fixture("detect-secrets.json"))
    assert {(f.rule, f.path) for f in secrets} >= {("AWS Access Key", "settings.env")}
    assert all(f.severity is Severity.CRITICAL for f in secrets)
    lint = {f.rule: f for f in parsers.hadolint(fixture("hadolint.json"))}
    assert lint["DL3020"].severity is Severity.HIGH and lint["DL3007"].severity is Severity.MEDIUM
    checks = {f.rule: f for f in parsers.checkov(fixture("checkov.json"))}
    assert {"CKV_DOCKER_2", "CKV_DOCKER_3", "CKV_DOCKER_7"} <= set(checks)
    assert checks["CKV_DOCKER_7"].path.endswith("planted/Dockerfile")
    workflow = {f.rule: f for f in parsers.zizmor(fixture("zizmor.json"))}
    assert workflow["template-injection"].severity is Severity.HIGH
    assert workflow["template-injection"].path == ".github/workflows/ci.yml"


@pytest.mark.unit
def test_kubernetes_validate_report() -> None:
    findings = parsers.kubernetes_validate(fixture("kubernetes-validate.txt"))
    assert [(f.path, f.severity) for f in findings] == [
        ("k8s-staging.yaml:deployment/ml-platform", Severity.HIGH),
        ("k8s-staging.yaml:deployment/ml-platform-worker", Severity.HIGH),
    ]
    assert "spec.replicas: 'two' is not of type 'integer'" in findings[0].message


@pytest.mark.unit
def test_licenses_are_judged_by_the_allowed_list() -> None:
    packages = [
        {"Name": "ok", "Version": "1", "License": "MIT"},
        {"Name": "both", "Version": "1", "License": "Apache-2.0 AND BSD-2-Clause"},
        {"Name": "either", "Version": "1", "License": "GPL-3.0-only OR MIT"},
        {"Name": "gpl", "Version": "1", "License": "GNU General Public License v3 (GPLv3)"},
        {"Name": "lgpl", "Version": "1", "License": "LGPL-3.0-only"},
        {"Name": "odd", "Version": "1", "License": "UNKNOWN"},
        {"Name": "other", "Version": "1", "License": "Artistic-2.0"},
    ]
    found = {
        f.path: f.severity
        for f in parsers.pip_licenses(json.dumps(packages), ["MIT", "Apache-2.0", "BSD-2-Clause"])
    }
    assert found == {
        "gpl==1": Severity.HIGH,
        "lgpl==1": Severity.MEDIUM,
        "odd==1": Severity.MEDIUM,
        "other==1": Severity.LOW,
    }


@pytest.mark.unit
def test_malformed_reports_are_errors_not_passes() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        parsers.bandit("Traceback (most recent call last):")


# -- policy --------------------------------------------------------------------------------------


def finding(severity: Severity, rule: str = "R1", path: str = "src/x.py") -> Finding:
    return Finding("bandit", rule, severity, path, 1, f"{rule} in {path}")


@pytest.mark.unit
def test_the_gate_fails_on_critical_and_high_unless_excepted() -> None:
    result = ToolResult(
        "bandit", Status.CHECKED, [finding(Severity.HIGH), finding(Severity.LOW, "R2")]
    )
    assert not evaluate(Policy(), [result], today=TODAY).passed
    excepted = Policy(
        exceptions=(
            Exception_("false positive", "me", TODAY + timedelta(days=1), tool="bandit", rule="R1"),
        )
    )
    verdict = evaluate(excepted, [result], today=TODAY)
    assert verdict.passed and verdict.evaluated[0].excepted_by is not None


@pytest.mark.unit
def test_expired_exceptions_and_unchecked_tools_fail_the_gate() -> None:
    clean = ToolResult("bandit", Status.CHECKED, [])
    expired = Policy(exceptions=(Exception_("old", "me", TODAY - timedelta(days=1), rule="R9"),))
    assert evaluate(expired, [clean], today=TODAY).expired_exceptions
    assert not evaluate(expired, [clean], today=TODAY).passed
    offline = ToolResult("pip-audit", Status.NOT_CHECKED, reason="database unreachable")
    assert not evaluate(Policy(), [clean, offline], today=TODAY).passed
    allowed = evaluate(Policy(), [clean, offline], today=TODAY, allow_unchecked=["pip-audit"])
    assert allowed.passed and [r.tool for r in allowed.allowed_unchecked] == ["pip-audit"]
    required = Policy(required_tools=("bandit", "semgrep"))
    missing = evaluate(required, [clean], today=TODAY)
    assert [r.tool for r in missing.not_checked] == ["semgrep"]


@pytest.mark.unit
def test_sla_due_dates_and_overdue_findings() -> None:
    policy = Policy()
    medium = finding(Severity.MEDIUM)
    first = {medium.fingerprint: TODAY - timedelta(days=31)}
    verdict = evaluate(
        policy, [ToolResult("bandit", Status.CHECKED, [medium])], today=TODAY, first_seen=first
    )
    [evaluated] = verdict.evaluated
    assert evaluated.due == TODAY - timedelta(days=1) and evaluated.overdue
    assert not verdict.passed
    assert policy.due(Severity.LOW, TODAY) is None
    assert policy.due(Severity.HIGH, TODAY) == TODAY + timedelta(days=7)
    assert policy.due(Severity.CRITICAL, TODAY) == TODAY


@pytest.mark.unit
def test_policy_file_is_validated(tmp_path: Path) -> None:
    assert load_policy(ROOT / "security/policy.toml").required_tools
    bad = tmp_path / "policy.toml"
    bad.write_text('[[exceptions]]\nrule = "B101"\nreason = "x"\nowner = "y"\n')
    with pytest.raises(PolicyError, match=r"exceptions\[0\] needs expires"):
        load_policy(bad)
    bad.write_text('[[exceptions]]\nreason = "x"\nowner = "y"\nexpires = 2027-01-01\n')
    with pytest.raises(PolicyError, match="fingerprint or a rule"):
        load_policy(bad)
    bad.write_text('[sla]\nHIGH = "soon"\n')
    with pytest.raises(PolicyError, match="sla.HIGH"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="no policy file"):
        load_policy(tmp_path / "missing.toml")


severities = st.sampled_from(list(Severity))
findings_strategy = st.lists(
    st.builds(
        finding, severities, st.sampled_from(["R1", "R2", "R3"]), st.sampled_from(["a.py", "b.py"])
    ),
    max_size=8,
)
exceptions_strategy = st.lists(
    st.builds(
        Exception_,
        st.just("reason"),
        st.just("owner"),
        st.dates(min_value=TODAY - timedelta(days=10), max_value=TODAY + timedelta(days=10)),
        st.none(),
        st.none(),
        st.sampled_from(["R1", "R2", "R3"]),
    ),
    max_size=3,
)


@pytest.mark.property
@given(
    findings=findings_strategy,
    finding_=st.builds(finding, severities),
    exceptions=exceptions_strategy,
    age=st.integers(min_value=0, max_value=60),
)
def test_adding_a_finding_never_turns_a_failing_gate_green(
    findings: list[Finding], finding_: Finding, exceptions: list[Exception_], age: int
) -> None:
    policy = Policy(exceptions=tuple(exceptions))
    seen = {f.fingerprint: TODAY - timedelta(days=age) for f in [*findings, finding_]}
    before = evaluate(
        policy, [ToolResult("t", Status.CHECKED, findings)], today=TODAY, first_seen=seen
    )
    after = evaluate(
        policy,
        [ToolResult("t", Status.CHECKED, [*findings, finding_])],
        today=TODAY,
        first_seen=seen,
    )
    if not before.passed:
        assert not after.passed
    assert len(after.blocking) >= len(before.blocking)


@pytest.mark.property
@given(severities, st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 1, 1)))
def test_due_dates_follow_the_sla(severity: Severity, seen: date) -> None:
    due = Policy().due(severity, seen)
    days = {Severity.CRITICAL: 0, Severity.HIGH: 7, Severity.MEDIUM: 30}
    assert due == (seen + timedelta(days=days[severity]) if severity in days else None)


@pytest.mark.property
@given(st.dates(min_value=TODAY - timedelta(days=30), max_value=TODAY + timedelta(days=30)))
def test_an_exception_covers_its_finding_exactly_until_it_expires(expires: date) -> None:
    high = finding(Severity.HIGH)
    policy = Policy(exceptions=(Exception_("r", "o", expires, fingerprint=high.fingerprint),))
    verdict = evaluate(policy, [ToolResult("t", Status.CHECKED, [high])], today=TODAY)
    assert verdict.passed == (expires >= TODAY)


# -- summaries ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_summaries_and_sarif() -> None:
    high = finding(Severity.HIGH)
    results = [
        ToolResult("bandit", Status.CHECKED, [high]),
        ToolResult("pip-audit", Status.NOT_CHECKED, reason="vulnerability database unreachable"),
        ToolResult("hadolint", Status.NOT_PRESENT, reason="no Dockerfile yet"),
    ]
    verdict = evaluate(Policy(), results, today=TODAY, allow_unchecked=["pip-audit"])
    text = markdown(verdict, TODAY)
    assert text.splitlines()[2] == "> **NOT CHECKED, allowed for this run:** pip-audit"
    assert "**Gate: FAILED**" in text and "| bandit | checked | 1 |" in text
    assert "| pip-audit | **NOT CHECKED** | 0 | vulnerability database unreachable |" in text
    data = summary_json(verdict, TODAY)
    assert data["passed"] is False and data["findings"][0]["blocking"] is True
    log = sarif(results[0])
    run = log["runs"][0]
    assert log["version"] == "2.1.0" and run["tool"]["driver"]["name"] == "bandit"
    assert run["results"][0]["level"] == "error"
    assert run["results"][0]["partialFingerprints"]["mlp/v1"] == high.fingerprint
    assert run["tool"]["driver"]["rules"][0]["properties"]["security-severity"] == "8.0"


# -- end to end: the real scanners on planted code --------------------------------------------


def _git_repo(tmp_path: Path, files: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, text in files.items():
        (repo / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    return repo


@pytest.mark.integration
def test_a_planted_aws_key_fails_the_secrets_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _git_repo(
        tmp_path,
        {
            "settings.env": "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\n",  # pragma: allowlist secret
            "ok.txt": "hello\n",
        },
    )
    scan = subprocess.run(
        [sys.executable, "-m", "detect_secrets", "scan", "settings.env", "ok.txt"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    (repo / "scan.json").write_text(scan.stdout)
    (repo / "baseline.json").write_text('{"results": {}}')
    out = tmp_path / "normalized"
    code = main(
        [
            "--policy",
            str(ROOT / "security/policy.toml"),
            "--first-seen",
            str(tmp_path / "none.json"),
            "normalize",
            "detect-secrets",
            str(repo / "scan.json"),
            "--baseline",
            str(repo / "baseline.json"),
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert "CRITICAL AWS Access Key at settings.env:1" in capsys.readouterr().out
    # Once accepted in the baseline (e.g. a documented test key), the same scan passes.
    (repo / "baseline.json").write_text(scan.stdout)
    assert (
        main(
            [
                "--policy",
                str(ROOT / "security/policy.toml"),
                "normalize",
                "detect-secrets",
                str(repo / "scan.json"),
                "--baseline",
                str(repo / "baseline.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )


@pytest.mark.integration
def test_planted_shell_injection_fails_bandit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _git_repo(
        tmp_path,
        {
            "tool.py": (
                "import subprocess\n\n\ndef run(user_input):\n"
                "    return subprocess.call('ls ' + user_input, shell=True)\n"
            )
        },
    )
    report = tmp_path / "bandit.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bandit",
            "-r",
            str(repo),
            "-f",
            "json",
            "-o",
            str(report),
            "--exit-zero",
            "-q",
        ],
        check=True,
        capture_output=True,
    )
    code = main(
        [
            "--policy",
            str(ROOT / "security/policy.toml"),
            "normalize",
            "bandit",
            str(report),
            "--out",
            str(tmp_path / "normalized"),
        ]
    )
    assert code == 1
    assert "HIGH     B602:subprocess_popen_with_shell_equals_true" in capsys.readouterr().out


@pytest.mark.integration
def test_security_report_fails_on_an_expired_exception(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[gate]\nfail_on = ["CRITICAL", "HIGH"]\nrequired_tools = ["bandit"]\n'
        '[[exceptions]]\ntool = "bandit"\nrule = "B101:assert_used"\nreason = "tests"\n'
        'owner = "platform-team"\nexpires = 2026-01-31\n'
    )
    results = tmp_path / "normalized"
    ToolResult("bandit", Status.CHECKED, []).save(results)
    args = [
        "--policy",
        str(policy),
        "--first-seen",
        str(tmp_path / "seen.json"),
        "--today",
        "2026-11-26",
        "report",
        "--results",
        str(results),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "expired exception: bandit:B101:assert_used:*" in printed
    assert "security gate FAILED: 0 blocking findings, 1 expired exceptions" in printed
    summary = json.loads((tmp_path / "out/security-summary.json").read_text())
    assert summary["passed"] is False and summary["expired_exceptions"]
    assert load_results(results)[0].tool == "bandit"
    assert (tmp_path / "out/security-first-seen.json").exists()


@pytest.mark.unit
def test_mark_and_bad_invocations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "n")
    assert (
        main(
            [
                "mark",
                "safety",
                "--status",
                "not_checked",
                "--reason",
                "db unreachable",
                "--out",
                out,
            ]
        )
        == 1
    )
    assert (
        main(
            [
                "mark",
                "hadolint",
                "--status",
                "not_present",
                "--reason",
                "no Dockerfile",
                "--out",
                out,
            ]
        )
        == 0
    )
    assert "safety: NOT CHECKED — db unreachable" in capsys.readouterr().out
    assert main(["--policy", str(tmp_path / "nope.toml"), "report", "--results", out]) == 2


def _commit(repo: Path, files: dict[str, str], when: str) -> None:
    for name, text in files.items():
        (repo / name).write_text(text)
    dated = {**os.environ, "GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}
    for args in (
        ["add", "-A"],
        ["-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "x"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True, env=dated)


@pytest.mark.integration
@pytest.mark.parametrize(("written", "passes"), [("2026-10-01T12:00:00", False), ("today", True)])
def test_a_medium_finding_past_its_sla_blocks_dated_by_git_history(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    written: str,
    passes: bool,
) -> None:
    """No ledger kept anywhere: the day the line was committed is the day it was first seen."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    when = date.today().isoformat() + "T00:00:00" if written == "today" else written
    _commit(repo, {"app.py": "import os\n\nos.chmod('x', 0o777)\n"}, when)
    _commit(repo, {"README": "later change elsewhere\n"}, date.today().isoformat() + "T00:00:00")
    monkeypatch.chdir(repo)
    medium = Finding("bandit", "B103:set_bad_file_permissions", Severity.MEDIUM, "app.py", 3, "x")
    results = tmp_path / "normalized"
    ToolResult("bandit", Status.CHECKED, [medium]).save(results)
    code = main(
        [
            "--policy",
            str(ROOT / "security/policy.toml"),
            "--first-seen",
            str(tmp_path / "no-ledger.json"),
            "report",
            "--results",
            str(results),
            "--out",
            str(tmp_path / "out"),
            "--allow-unchecked",
            ",".join(load_policy(ROOT / "security/policy.toml").required_tools),
        ]
    )
    printed = capsys.readouterr().out
    assert (code == 0) is passes, printed
    seen = json.loads((tmp_path / "out/security-first-seen.json").read_text())
    assert seen[medium.fingerprint] == when[:10]
    if not passes:
        assert "security gate FAILED: 1 blocking" in printed
