"""Each tool's report, normalized to Findings. The severity mapping of every tool is here.

| tool | its field | → our severity |
|---|---|---|
| bandit | `issue_severity` HIGH / MEDIUM / LOW | same |
| semgrep | `extra.severity` ERROR / WARNING / INFO (a rule's | HIGH / MEDIUM / LOW |
|  | `metadata.severity` wins) |  |
| pip-audit | no severity in its output | HIGH (a known vulnerability of unknown weight) |
| safety | `severity.cvssv3.base_severity`, else none | that, else HIGH |
| detect-secrets, gitleaks, trufflehog | a secret | CRITICAL |
| pip-licenses | strong copyleft / weak copyleft / unknown / other | HIGH / MEDIUM / MEDIUM / LOW |
| hadolint | error / warning / info, style | HIGH / MEDIUM / LOW |
| checkov | `severity` when its platform gives one, else | MEDIUM |
| zizmor | `determinations.severity` High / Medium / Low / Info | HIGH / MEDIUM / LOW / LOW |
| trivy | `Severity` CRITICAL / HIGH / MEDIUM / LOW / UNKNOWN | same; UNKNOWN → MEDIUM |
| kubernetes-validate, check-jsonschema | a manifest or workflow the schema rejects | HIGH |
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from delivery.security.findings import Finding, Severity, fingerprint


class NothingChecked(Exception):
    """The report shows the tool checked nothing (e.g. its database was unreachable)."""


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the report is not JSON: {exc}") from None


def bandit(text: str) -> list[Finding]:
    report = _json(text)
    return [
        Finding(
            tool="bandit",
            rule=f"{r['test_id']}:{r['test_name']}",
            severity=Severity.parse(r["issue_severity"]),
            path=r["filename"],
            line=r.get("line_number"),
            message=r["issue_text"],
            remediation=r.get("more_info"),
        )
        for r in report.get("results", [])
    ]


SEMGREP_LEVELS = {"ERROR": Severity.HIGH, "WARNING": Severity.MEDIUM, "INFO": Severity.LOW}


def semgrep(text: str) -> list[Finding]:
    report = _json(text)
    findings = []
    for r in report.get("results", []):
        extra = r.get("extra", {})
        override = extra.get("metadata", {}).get("severity")
        severity = Severity.parse(override) if override else SEMGREP_LEVELS[extra["severity"]]
        findings.append(
            Finding(
                tool="semgrep",
                rule=r["check_id"].rsplit(".", 1)[-1],
                severity=severity,
                path=r["path"],
                line=r.get("start", {}).get("line"),
                message=extra.get("message", "").strip(),
                remediation=extra.get("fix") or extra.get("metadata", {}).get("remediation"),
            )
        )
    return findings


def pip_audit(text: str) -> list[Finding]:
    """pip-audit's JSON. Raises NothingChecked when every dependency was skipped.

    Offline, its default service answers "not found" for each package, and pip-audit then
    says "No known vulnerabilities found" and exits 0: the skips are the only trace. When only
    some were skipped (a package its service does not know, a service that failed midway),
    each of those is a MEDIUM finding of its own, ``not-audited``: never a silent pass for
    what was not checked; one that cannot be audited is excepted in the policy, with a reason.
    """
    report = _json(text)
    dependencies = report.get("dependencies", [])
    skipped = [d for d in dependencies if "skip_reason" in d]
    if not dependencies or len(skipped) == len(dependencies):
        reason = skipped[0]["skip_reason"] if skipped else "no dependencies were audited"
        raise NothingChecked(
            f"vulnerability database unreachable: {len(skipped)} of {len(dependencies)} "
            f"dependencies skipped ({reason})"
        )
    findings = []
    for dep in dependencies:
        for vuln in dep.get("vulns", []):
            fixes = vuln.get("fix_versions") or []
            findings.append(
                Finding(
                    tool="pip-audit",
                    rule=vuln["id"],
                    severity=Severity.HIGH,
                    path=f"{dep['name']}=={dep['version']}",
                    line=None,
                    message=vuln.get("description", "").strip() or vuln["id"],
                    remediation=f"upgrade to {', '.join(fixes)}" if fixes else None,
                )
            )
    findings += [
        Finding(
            tool="pip-audit",
            rule="not-audited",
            severity=Severity.MEDIUM,
            # pip-audit names a skipped dependency's version only in its reason.
            path=dep["name"],
            line=None,
            message=f"not audited: {dep['skip_reason']}",
            remediation="audit it another way, or except it in security/policy.toml",
            # Not from the reason, which names the version: a new version of the same package
            # is the same finding, its SLA counted from when it was first seen.
            fingerprint=fingerprint("pip-audit", "not-audited", dep["name"], ""),
        )
        for dep in skipped
    ]
    return findings


def safety(text: str) -> list[Finding]:
    """safety's JSON (``safety check --json`` / ``safety scan --output json`` v3 layout)."""
    report = _json(text)
    findings = []
    for v in report.get("vulnerabilities", []):
        cvss = (v.get("severity") or {}).get("cvssv3") or {}
        level = cvss.get("base_severity")
        findings.append(
            Finding(
                tool="safety",
                rule=str(v.get("vulnerability_id") or v.get("CVE") or "unknown"),
                severity=Severity.parse(level) if level else Severity.HIGH,
                path=f"{v['package_name']}=={v['analyzed_version']}",
                line=None,
                message=(v.get("advisory") or "").strip()[:500],
                remediation=(
                    f"versions without it: {', '.join(v['fixed_versions'])}"
                    if v.get("fixed_versions")
                    else None
                ),
            )
        )
    return findings


def detect_secrets(text: str) -> list[Finding]:
    report = _json(text)
    return [
        Finding(
            tool="detect-secrets",
            rule=secret["type"],
            severity=Severity.CRITICAL,
            path=path,
            line=secret.get("line_number"),
            message=f"possible {secret['type']} committed",
            remediation="remove it, rotate the credential, and purge it from history",
            fingerprint=_secret_fingerprint("detect-secrets", path, secret["hashed_secret"]),
        )
        for path, secrets in report.get("results", {}).items()
        for secret in secrets
    ]


def gitleaks(text: str) -> list[Finding]:
    """gitleaks' JSON report (a list of findings with RuleID, File, StartLine, Secret…)."""
    report = _json(text) or []
    return [
        Finding(
            tool="gitleaks",
            rule=item["RuleID"],
            severity=Severity.CRITICAL,
            path=item["File"],
            line=item.get("StartLine"),
            message=item.get("Description") or f"possible {item['RuleID']} committed",
            remediation="remove it, rotate the credential, and purge it from history",
            fingerprint=_secret_fingerprint("gitleaks", item["File"], item.get("Fingerprint", "")),
        )
        for item in report
    ]


def trufflehog(text: str) -> list[Finding]:
    """trufflehog's ``--json`` output: one JSON object per line."""
    findings = []
    for line in text.splitlines():
        if not line.strip():
            continue
        item = _json(line)
        if "DetectorName" not in item:
            continue  # log lines, not findings
        meta = item.get("SourceMetadata", {}).get("Data", {})
        source: dict[str, Any] = next(iter(meta.values()), {}) if meta else {}
        path = source.get("file", "?")
        findings.append(
            Finding(
                tool="trufflehog",
                rule=item["DetectorName"],
                severity=Severity.CRITICAL,
                path=path,
                line=source.get("line"),
                message=("verified " if item.get("Verified") else "")
                + f"{item['DetectorName']} secret",
                remediation="remove it, rotate the credential, and purge it from history",
                fingerprint=_secret_fingerprint("trufflehog", path, item.get("Raw", "")[:8]),
            )
        )
    return findings


def _secret_fingerprint(tool: str, path: str, secret_id: str) -> str:
    return fingerprint(tool, "secret", path, secret_id)


STRONG_COPYLEFT = re.compile(r"\b(A?GPL|GNU (Affero )?General Public|SSPL|EUPL)\b", re.I)
WEAK_COPYLEFT = re.compile(r"\b(LGPL|Lesser General Public|MPL|Mozilla Public|EPL|CDDL)\b", re.I)


def pip_licenses(text: str, allowed: Iterable[str]) -> list[Finding]:
    """pip-licenses' JSON: every package whose license is not in the policy's allowed list."""
    allowed_set = {a.lower() for a in allowed}
    findings = []
    for pkg in _json(text):
        license_ = (pkg.get("License") or "UNKNOWN").strip()
        if _license_allowed(license_, allowed_set):
            continue
        if license_.upper() == "UNKNOWN" or not license_:
            severity, kind = Severity.MEDIUM, "unknown license"
        elif STRONG_COPYLEFT.search(license_) and not WEAK_COPYLEFT.search(license_):
            severity, kind = Severity.HIGH, "strong copyleft license"
        elif WEAK_COPYLEFT.search(license_):
            severity, kind = Severity.MEDIUM, "weak copyleft license"
        else:
            severity, kind = Severity.LOW, "license not in the allowed list"
        findings.append(
            Finding(
                tool="pip-licenses",
                rule=kind.replace(" ", "-"),
                severity=severity,
                path=f"{pkg['Name']}=={pkg['Version']}",
                line=None,
                message=f"{kind}: {license_}",
                remediation="review it; allow it in security/policy.toml or replace the package",
            )
        )
    return findings


def _license_allowed(expression: str, allowed: set[str]) -> bool:
    """An SPDX-like expression: any alternative (OR, ';') whose every part (AND) is allowed."""
    if expression.lower() in allowed:
        return True
    alternatives = re.split(r";|\s+OR\s+|\|", expression, flags=re.I)
    return any(
        all(
            part.strip(" ()").lower() in allowed for part in re.split(r"\s+AND\s+", alt, flags=re.I)
        )
        for alt in alternatives
    )


HADOLINT_LEVELS = {
    "error": Severity.HIGH,
    "warning": Severity.MEDIUM,
    "info": Severity.LOW,
    "style": Severity.LOW,
}


def hadolint(text: str) -> list[Finding]:
    return [
        Finding(
            tool="hadolint",
            rule=item["code"],
            severity=HADOLINT_LEVELS.get(item["level"], Severity.MEDIUM),
            path=item["file"],
            line=item.get("line"),
            message=item["message"],
            remediation=(
                f"https://github.com/hadolint/hadolint/wiki/{item['code']}"
                if item["code"].startswith("DL")
                else None
            ),
        )
        for item in _json(text)
    ]


def checkov(text: str) -> list[Finding]:
    report = _json(text)
    blocks = report if isinstance(report, list) else [report]
    findings = []
    for block in blocks:
        for check in block.get("results", {}).get("failed_checks", []):
            level = check.get("severity")
            findings.append(
                Finding(
                    tool="checkov",
                    rule=check["check_id"],
                    severity=Severity.parse(level) if level else Severity.MEDIUM,
                    path=str(check.get("repo_file_path") or check.get("file_path", "?")).lstrip(
                        "/"
                    ),
                    line=(check.get("file_line_range") or [None])[0],
                    message=f"{check.get('check_name', check['check_id'])} "
                    f"({check.get('resource')})",
                    remediation=check.get("guideline"),
                )
            )
    return findings


ZIZMOR_LEVELS = {
    "high": Severity.HIGH,
    "medium": Severity.MEDIUM,
    "low": Severity.LOW,
    "informational": Severity.LOW,
    "unknown": Severity.MEDIUM,
}


def zizmor(text: str) -> list[Finding]:
    findings = []
    for item in _json(text):
        location = (item.get("locations") or [{}])[0]
        symbolic = location.get("symbolic", {})
        local = symbolic.get("key", {}).get("Local", {})
        path = local.get("given_path") or local.get("verbatim_path")  # the name changed in 1.x
        concrete = location.get("concrete", {}).get("location", {})
        findings.append(
            Finding(
                tool="zizmor",
                rule=item["ident"],
                severity=ZIZMOR_LEVELS.get(
                    str(item.get("determinations", {}).get("severity", "unknown")).lower(),
                    Severity.MEDIUM,
                ),
                path=path or "?",
                line=(concrete.get("start_point", {}).get("row", -1) + 1) or None,
                message=item.get("desc", item["ident"]),
                remediation=item.get("url"),
            )
        )
    return findings


KUBE_ERROR = re.compile(
    r"^ERROR (?P<file>\S+) did not validate for resource (?P<resource>\S+) "
    r"against version (?P<version>\S+): (?P<message>.*)$"
)


def kubernetes_validate(text: str) -> list[Finding]:
    """kubernetes-validate's text output: one ERROR line per resource the schema rejects."""
    return [
        Finding(
            tool="kubernetes-validate",
            rule="schema",
            severity=Severity.HIGH,
            path=f"{match['file']}:{match['resource']}",
            line=None,
            message=f"Kubernetes {match['version']} rejects it: {match['message']}",
        )
        for line in text.splitlines()
        if (match := KUBE_ERROR.match(line.strip()))
    ]


TRIVY_LEVELS = {**{s.name: s for s in Severity}, "UNKNOWN": Severity.MEDIUM}


def trivy(text: str) -> list[Finding]:
    """trivy's JSON (``--format json``): vulnerabilities, misconfigurations and secrets."""
    report = _json(text)
    findings = []
    for result in report.get("Results", []) or []:
        target = result.get("Target", "?")
        for v in result.get("Vulnerabilities", []) or []:
            fixed = v.get("FixedVersion")
            findings.append(
                Finding(
                    tool="trivy",
                    rule=v["VulnerabilityID"],
                    severity=TRIVY_LEVELS.get(v.get("Severity", "UNKNOWN"), Severity.MEDIUM),
                    path=f"{target}:{v['PkgName']}=={v.get('InstalledVersion', '?')}",
                    line=None,
                    message=v.get("Title") or v["VulnerabilityID"],
                    remediation=f"upgrade to {fixed}" if fixed else None,
                )
            )
        for m in result.get("Misconfigurations", []) or []:
            findings.append(
                Finding(
                    tool="trivy",
                    rule=m.get("ID") or m.get("AVDID", "misconfiguration"),
                    severity=TRIVY_LEVELS.get(m.get("Severity", "UNKNOWN"), Severity.MEDIUM),
                    path=target,
                    line=None,
                    message=m.get("Title") or m.get("Message", ""),
                    remediation=m.get("Resolution"),
                )
            )
        for s in result.get("Secrets", []) or []:
            findings.append(
                Finding(
                    tool="trivy",
                    rule=s.get("RuleID", "secret"),
                    severity=Severity.CRITICAL,
                    path=target,
                    line=s.get("StartLine"),
                    message=s.get("Title", "secret in image layer"),
                    remediation="remove it from the image and rotate it",
                )
            )
    return findings
