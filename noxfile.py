"""Quality, test, security and release sessions. CI calls these by name and nothing else.

Every session installs from uv.lock into its own virtualenv (``uv sync --frozen``), so a
local run equals a CI run. The virtualenvs are kept between runs: ``uv sync`` is exact (it
removes what the lock does not list), so a kept one is the lock's, and the next run saves the
≈ 6 s of making and byte-compiling a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess  # nosec B404
from collections.abc import Iterator
from pathlib import Path

import nox
import nox.command

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.reuse_venv = "yes"

PYTHON = "3.11"
#: pytest-xdist workers for the tests session (PYTEST_WORKERS overrides).
TEST_WORKERS = os.environ.get("PYTEST_WORKERS", "4")
LINT_PATHS = ["src", "tests", "benchmarks", "noxfile.py"] + (
    ["tasks.py"] if os.path.exists("tasks.py") else []
)


def sync(session: nox.Session, *groups: str, project: bool = True) -> None:
    """Install the locked dependency groups (and the project unless told not to)."""
    session.env["UV_PROJECT_ENVIRONMENT"] = session.virtualenv.location
    # Bytecode at install: where PYTHONDONTWRITEBYTECODE is set (as on our CI machines), every
    # process would otherwise compile SQLAlchemy & co. from source again (≈ 1 s each).
    args = ["uv", "sync", "--frozen", "--no-default-groups", "--compile-bytecode"]
    if project:
        args += [arg for group in groups for arg in ("--group", group)]
    else:
        args += ["--no-install-project"] + [arg for g in groups for arg in ("--only-group", g)]
    session.run_install(*args, silent=True)


@nox.session(python=PYTHON, default=False)
def fmt(session: nox.Session) -> None:
    """Format the code in place with black and isort."""
    sync(session, "lint", project=False)
    session.run("isort", *LINT_PATHS)
    session.run("black", *LINT_PATHS)


@nox.session(python=PYTHON, tags=["quality"])
def lint(session: nox.Session) -> None:
    """Check formatting (black, isort) and lint (flake8); changes nothing."""
    sync(session, "lint", project=False)
    session.run("black", "--check", *LINT_PATHS)
    session.run("isort", "--check-only", "--diff", *LINT_PATHS)
    session.run("flake8", *LINT_PATHS)


@nox.session(python=PYTHON, tags=["quality"])
def typecheck(session: nox.Session) -> None:
    """Type-check src/, tests/ and the task files with mypy in strict mode."""
    sync(session, "typecheck")
    # Files on the command line replace the configured ones: name them all.
    session.run("mypy", *(session.posargs or [*LINT_PATHS]))


@nox.session(python=PYTHON, tags=["tests"])
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (real PostgreSQL); coverage gate and reports."""
    sync(session, "test")
    # How far coverage reaches into the processes the tests start: tests/coverage_scope.py.
    for site_packages in Path(session.virtualenv.location).glob("lib/python*/site-packages"):
        shutil.copyfile("tests/coverage_scope.py", site_packages / "_mlp_coverage_scope.py")
        shutil.copyfile("tests/mlp_coverage_scope.pth", site_packages / "zz-mlp-coverage-scope.pth")
    # Our own modules' bytecode too: the suite starts a few hundred Python processes.
    session.env["PYTHONDONTWRITEBYTECODE"] = ""
    if os.environ.get("CI", "").lower() == "true":
        session.env.setdefault("HYPOTHESIS_PROFILE", "ci")
    # Also the data files of processes killed mid-save in an earlier run (empty, unreadable).
    for stale in [Path("coverage.xml"), Path(".coverage"), *Path().glob(".coverage.*")]:
        stale.unlink(missing_ok=True)
    # The 85 % gate (pyproject.toml) holds for the whole suite; a chosen subset reports only.
    gate = [] if not session.posargs else ["--cov-fail-under=0"]
    # Most tests wait on processes and services, not on a core: more workers than cores.
    # PostgreSQL and Redis: see tests/services.py (given, running, or started for the session).
    workers = [] if "-n" in session.posargs else ["-n", TEST_WORKERS, "--dist", "worksteal"]
    # tests/smoke runs against a deployment (`nox -s smoke`, `invoke smoke`), not here.
    session.run(
        "pytest",
        "--cov",
        "--cov-report=term-missing:skip-covered",
        "--cov-report=html",
        "--cov-report=xml",
        *gate,
        *workers,
        *(session.posargs or ["tests", "--ignore=tests/smoke", "--ignore=tests/fuzz"]),
    )


@nox.session(python=PYTHON, tags=["security"])
def fuzz(session: nox.Session) -> None:
    """Schemathesis over the OpenAPI document against a real `mlp server` (PostgreSQL + Redis)
    as anonymous, viewer, editor and admin; the gate is every check passing and no 5xx.
    Reports under reports/fuzz/. Bounded by MLP_FUZZ_EXAMPLES and MLP_FUZZ_SECONDS."""
    sync(session, "fuzz")
    session.run("pytest", "tests/fuzz", "-p", "no:cacheprovider", "-n", "0", "-s", *session.posargs)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against Celery, Dramatiq, Dask, Prefect, Procrastinate and DBOS; rewrites
    docs/benchmarks.md.

    Posargs choose sections (workloads, map, wide, transport, crash, scale, pipeline, ...);
    see benchmarks/__main__.py.
    Needs the machine's PostgreSQL and Redis (DATABASE_URL, REDIS_URL to point elsewhere).
    """
    sync(session, "bench")
    peers = Path(".nox") / "bench-peers"
    if not (peers / "bin" / "python").exists():
        session.run("uv", "venv", "--quiet", "--python", PYTHON, str(peers))
    session.run(
        "uv",
        "pip",
        "install",
        "--quiet",
        "--python",
        str(peers / "bin" / "python"),
        "-r",
        "benchmarks/peers-requirements.txt",
    )
    # absolute(), not resolve(): a venv's python is a symlink to the base interpreter.
    session.env["BENCH_PEERS_PYTHON"] = str((peers / "bin" / "python").absolute())
    session.run("python", "-m", "benchmarks", *session.posargs)


# -- security ---------------------------------------------------------------------------------
# Each scanner writes its raw report under reports/<the spec's artifact name>/ and then hands it
# to `python -m delivery.security`, which normalizes it, applies security/policy.toml and fails
# the session on what the policy forbids. `security_report` merges them all.

REPORTS = Path("reports")
SECURITY_ENV = {"PYTHONPATH": "src"}


def reports_dir(name: str) -> Path:
    path = REPORTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def gate(session: nox.Session, *args: str) -> None:
    """Normalize a tool's report and apply the policy (fails the session when it must)."""
    session.run("python", "-m", "delivery.security", *args, env=SECURITY_ENV)


class EveryTool:
    """Run every tool of a session even when one fails, then fail once naming them all."""

    def __init__(self, session: nox.Session) -> None:
        self.session = session
        self.failed: list[str] = []

    @contextlib.contextmanager
    def tool(self, name: str) -> Iterator[None]:
        try:
            yield
        except nox.command.CommandFailed:
            self.failed.append(name)

    def verdict(self) -> None:
        if self.failed:
            self.session.error(f"failed: {', '.join(self.failed)} (every tool ran; see above)")


def runtime_python(session: nox.Session) -> str:
    """A venv beside the session's with only the locked runtime dependencies; its python.

    Synced even with -R (a no-op when up to date): -R skips installs, and this venv is new.
    """
    location = f"{session.virtualenv.location}-runtime"
    session.run(
        "uv",
        "sync",
        "--frozen",
        "--no-default-groups",
        "--no-install-project",
        env={"UV_PROJECT_ENVIRONMENT": location},
        silent=True,
    )
    return f"{location}/bin/python"


def locked_requirements(session: nox.Session, out: Path) -> Path:
    """The locked runtime dependencies as a pinned requirements file, for the auditors."""
    requirements = out / "requirements.txt"
    session.run(
        "uv",
        "export",
        "--frozen",
        "--no-default-groups",
        "--no-emit-project",
        "--no-hashes",
        "--output-file",
        str(requirements),
        silent=True,
    )
    return requirements


@nox.session(python=PYTHON, tags=["security"])
def bandit(session: nox.Session) -> None:
    """Bandit over src/: JSON and SARIF in reports/bandit-security-report/."""
    sync(session, "sast", project=False)
    out = reports_dir("bandit-security-report")
    common = ["-c", "pyproject.toml", "-r", "src", "--exit-zero", "-q"]
    session.run("bandit", *common, "-f", "json", "-o", str(out / "bandit.json"))
    session.run("bandit", *common, "-f", "sarif", "-o", str(out / "bandit.sarif"))
    gate(session, "normalize", "bandit", str(out / "bandit.json"))


@nox.session(python=PYTHON, tags=["security"])
def semgrep(session: nox.Session) -> None:
    """Semgrep with the local rules in security/semgrep/ (plus registry packs in GitHub CI)."""
    sync(session, "sast", project=False)
    quiet = {"SEMGREP_ENABLE_VERSION_CHECK": "0", "SEMGREP_SEND_METRICS": "off"}
    # The rules first: each must find its planted samples (security/semgrep/*.py) and only them.
    session.run("semgrep", "--test", "--metrics", "off", "security/semgrep", env=quiet)
    out = reports_dir("semgrep-report")
    configs = ["--config", "security/semgrep"]
    if os.environ.get("GITHUB_ACTIONS") == "true":  # the registry needs the network
        configs += ["--config", "p/python", "--config", "p/secrets"]
    session.run(
        "semgrep",
        "scan",
        *configs,
        "--metrics",
        "off",
        "--disable-version-check",
        "--quiet",
        "--json-output",
        str(out / "semgrep.json"),
        "--sarif-output",
        str(out / "semgrep.sarif"),
        "src",
        "noxfile.py",
        "tasks.py",
        env=quiet,
    )
    gate(session, "normalize", "semgrep", str(out / "semgrep.json"))


@nox.session(python=PYTHON, tags=["security"])
def audit(session: nox.Session) -> None:
    """pip-audit of the locked runtime dependencies (needs its vulnerability database online)."""
    sync(session, "audit", project=False)
    out = reports_dir("pip-audit-report")
    requirements = locked_requirements(session, out)
    base = [
        "pip-audit",
        "-r",
        str(requirements),
        "--no-deps",
        "--disable-pip",
        "--progress-spinner",
        "off",
    ]
    # Offline it prints "No known vulnerabilities found" and exits 0 while auditing nothing:
    # its own words stay out of the log (shown if it fails); the JSON's skip reasons tell, and
    # the gate says what was checked, or NOT CHECKED.
    session.run(
        *base, "-f", "json", "-o", str(out / "pip-audit.json"), success_codes=[0, 1], silent=True
    )
    session.run(
        *base,
        *("-f", "cyclonedx-json", "-o", str(out / "pip-audit.cdx.json")),
        success_codes=[0, 1],
        silent=True,
    )
    gate(session, "normalize", "pip-audit", str(out / "pip-audit.json"))


@nox.session(python=PYTHON, tags=["security"])
def safety(session: nox.Session) -> None:
    """safety over the locked runtime dependencies (needs its vulnerability database online)."""
    sync(session, "safety", project=False)
    out = reports_dir("safety-report")
    requirements = locked_requirements(session, out)
    report = out / "safety.json"
    report.unlink(missing_ok=True)
    try:
        output = session.run(
            "safety", "check", "-r", str(requirements), "--json", silent=True, success_codes=[0, 64]
        )
    except nox.command.CommandFailed:
        output = None
    if not output or not str(output).lstrip().startswith("{"):
        gate(
            session,
            "mark",
            "safety",
            "--status",
            "not_checked",
            "--reason",
            "vulnerability database unreachable: safety could not reach its server",
        )
        return
    report.write_text(str(output))
    gate(session, "normalize", "safety", str(report))


@nox.session(python=PYTHON, tags=["security"])
def secrets(session: nox.Session) -> None:
    """Secrets: detect-secrets over tracked files (baseline); gitleaks and trufflehog over the
    whole history (required in GitHub CI, which installs them; NOT CHECKED where absent)."""
    sync(session, "secrets", project=False)
    out = reports_dir("secrets-report")
    files = session.run("git", "ls-files", silent=True, external=True)
    # The lock holds only hashes of packages, the baseline only hashes of accepted secrets,
    # and the scanners' test fixtures plant fake secrets on purpose.
    skip = {"uv.lock", ".secrets.baseline"}
    tracked = [
        f
        for f in str(files).splitlines()
        if f and f not in skip and not f.startswith("tests/delivery/fixtures/")
    ]
    scan = session.run("detect-secrets", "scan", *tracked, silent=True)
    (out / "detect-secrets.json").write_text(str(scan))
    gate(
        session,
        "normalize",
        "detect-secrets",
        str(out / "detect-secrets.json"),
        "--baseline",
        ".secrets.baseline",
    )
    found = scanners(session)
    if "gitleaks" in found:
        session.run(
            found["gitleaks"],
            "git",
            ".",
            "--report-format",
            "json",
            "--report-path",
            str(out / "gitleaks.json"),
            "--exit-code",
            "0",
            external=True,
        )
        gate(session, "normalize", "gitleaks", str(out / "gitleaks.json"))
    if "trufflehog" in found:
        leaks = session.run(
            found["trufflehog"],
            "git",
            "file://.",
            "--json",
            "--no-update",
            silent=True,
            external=True,
        )
        (out / "trufflehog.json").write_text(str(leaks))
        gate(session, "normalize", "trufflehog", str(out / "trufflehog.json"))


def scanners(session: nox.Session) -> dict[str, str]:
    """gitleaks and trufflehog: from PATH; in GitHub Actions the pinned, checksum-verified
    releases (delivery.scanners), required there; elsewhere a missing one is NOT CHECKED."""
    in_github = os.environ.get("GITHUB_ACTIONS") == "true"
    folder = Path(session.virtualenv.location) / "scanners"
    found = {}
    for tool in ("gitleaks", "trufflehog"):
        path = shutil.which(tool)
        if path is None and in_github:
            session.run(
                "python", "-m", "delivery.scanners", "install", str(folder), tool, env=SECURITY_ENV
            )
            path = str(folder / tool)
        if path is not None:
            found[tool] = path
            continue
        session.run(
            "python",
            "-m",
            "delivery.security",
            "mark",
            tool,
            "--status",
            "not_checked",
            "--reason",
            f"{tool} is not installed here (GitHub CI installs its pinned release)",
            env=SECURITY_ENV,
            success_codes=[0, 1],  # recorded for the summary; the report decides
        )
    return found


@nox.session(python=PYTHON, tags=["security"])
def licenses(session: nox.Session) -> None:
    """Licenses of the runtime dependencies (JSON + Markdown), judged by security/policy.toml."""
    sync(session, "licenses", project=False)
    target = runtime_python(session)
    out = reports_dir("licenses")
    common = ["pip-licenses", f"--python={target}", "--with-urls", "--with-system"]
    session.run(*common, "--format=json", f"--output-file={out / 'licenses.json'}")
    session.run(*common, "--format=markdown", f"--output-file={out / 'licenses.md'}")
    gate(session, "normalize", "pip-licenses", str(out / "licenses.json"))


@nox.session(python=PYTHON, tags=["security"])
def sbom(session: nox.Session) -> None:
    """CycloneDX SBOM of the runtime dependencies: reports/sbom/sbom.cdx.json."""
    sync(session, "sbom", project=False)
    target = runtime_python(session)
    out = reports_dir("sbom")
    session.run(
        "cyclonedx-py",
        "environment",
        target,
        "--output-format",
        "JSON",
        "--output-file",
        str(out / "sbom.cdx.json"),
    )


@nox.session(python=PYTHON, tags=["security"])
def iac(session: nox.Session) -> None:
    """Dockerfile (hadolint, checkov), workflows (schema, zizmor), Kubernetes manifests.
    Every tool runs even when another fails; the session then fails once."""
    sync(session, "iac", project=False)
    out = reports_dir("iac-report")
    every = EveryTool(session)
    checkov_targets: list[str] = []
    if Path("Dockerfile").exists():
        with every.tool("hadolint"):
            with (out / "hadolint.json").open("w") as report:
                session.run(
                    "hadolint",
                    "--format",
                    "json",
                    "--no-fail",
                    "Dockerfile",
                    stdout=report,
                    stderr=subprocess.DEVNULL,
                )
            gate(session, "normalize", "hadolint", str(out / "hadolint.json"))
        checkov_targets += ["--file", "Dockerfile"]
    else:
        gate(session, "mark", "hadolint", "--status", "not_present", "--reason", "no Dockerfile")
    folder = Path(".github/workflows")
    workflows = sorted(str(p) for pattern in ("*.yml", "*.yaml") for p in folder.glob(pattern))
    if workflows:
        with every.tool("check-jsonschema"):
            session.run(
                "check-jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows
            )
        with every.tool("zizmor"):
            with (out / "zizmor.json").open("w") as report:
                session.run(
                    "zizmor",
                    "--offline",
                    "--format",
                    "json",
                    *workflows,
                    stdout=report,
                    stderr=subprocess.DEVNULL,
                    success_codes=list(range(0, 20)),
                )
            gate(session, "normalize", "zizmor", str(out / "zizmor.json"))
    else:
        gate(session, "mark", "zizmor", "--status", "not_present", "--reason", "no workflows yet")
    overlays = sorted(p for p in Path("k8s/overlays").glob("*") if p.is_dir())
    if overlays:
        if shutil.which("kubectl") is None:
            session.error("kubectl is needed to render the overlays (kubectl kustomize)")
        rendered = []
        for overlay in overlays:
            target = out / f"k8s-{overlay.name}.yaml"
            with target.open("w") as manifest:
                session.run("kubectl", "kustomize", str(overlay), stdout=manifest, external=True)
            rendered.append(str(target))
        with every.tool("kubernetes-validate"):
            with (out / "kubernetes-validate.txt").open("w") as report:
                session.run(
                    "kubernetes-validate",
                    "--strict",
                    "--kubernetes-version",
                    "1.31.0",
                    *rendered,
                    stdout=report,
                    success_codes=[0, 1],
                )
            gate(session, "normalize", "kubernetes-validate", str(out / "kubernetes-validate.txt"))
        checkov_targets += [arg for path in rendered for arg in ("--file", path)]
    else:
        gate(
            session,
            "mark",
            "kubernetes-validate",
            "--status",
            "not_present",
            "--reason",
            "no Kubernetes overlays",
        )
    if checkov_targets:
        with every.tool("checkov"):
            with (out / "checkov.json").open("w") as report:
                session.run(
                    "checkov",
                    *checkov_targets,
                    "--skip-download",
                    "--output",
                    "json",
                    "--quiet",
                    stdout=report,
                    stderr=subprocess.DEVNULL,
                    success_codes=[0, 1],
                )
            gate(session, "normalize", "checkov", str(out / "checkov.json"))
    else:
        gate(
            session,
            "mark",
            "checkov",
            "--status",
            "not_present",
            "--reason",
            "no Dockerfile or Kubernetes manifests yet",
        )
    every.verdict()


@nox.session(python=PYTHON, tags=["security"])
def security_report(session: nox.Session) -> None:
    """Merge every tool's findings, apply security/policy.toml, write the summaries and SARIF.

    `nox -s security_report -- --allow-unchecked audit,safety` tolerates those tools being
    NOT CHECKED (only offline, e.g. in .ci/run); the summary says so in its first lines.
    """
    session.run("python", "-m", "delivery.security", "report", *session.posargs, env=SECURITY_ENV)


# -- build and release ------------------------------------------------------------------------

IMAGE = os.environ.get("IMAGE_NAME", "ghcr.io/ml-platform/ml-platform")


@nox.session(python=PYTHON, tags=["release"])
def build(session: nox.Session) -> None:
    """Wheel and sdist into dist/, checked with twine, with the runtime SBOM beside them."""
    sync(session, "release", project=False)
    shutil.rmtree("dist", ignore_errors=True)
    session.run("uv", "build", "--out-dir", "dist")
    dists = [str(p) for p in Path("dist").iterdir() if p.name.endswith((".whl", ".tar.gz"))]
    session.run("twine", "check", "--strict", *dists)
    session.run("python", "-m", "delivery.build", "check-dist", "dist", env=SECURITY_ENV)
    target = runtime_python(session)
    session.run(
        "cyclonedx-py",
        "environment",
        target,
        "--output-format",
        "JSON",
        "--output-file",
        "dist/ml-platform.cdx.json",
    )


def docker_engine() -> bool:
    """Whether a Docker engine answers (the docker CLI alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False)
    return probe.returncode == 0


def image_tags(session: nox.Session) -> list[str]:
    out = session.run("python", "-m", "delivery.tags", silent=True, env=SECURITY_ENV)
    return [f"{IMAGE}:{tag}" for tag in str(out).split()]


@nox.session(python=PYTHON, tags=["release"])
def image(session: nox.Session) -> None:
    """Build the image with its computed tags: docker buildx (registry cache) or podman.

    `nox -s image -- --push` pushes (docker only); other posargs go to the builder, e.g.
    `-- --build-arg BASE_IMAGE=localhost/ml-platform-base:bookworm`. Prints tags and digest.
    """
    sync(session, "release", project=False)
    tags = image_tags(session)
    labels = session.run("python", "-m", "delivery.build", "labels", silent=True, env=SECURITY_ENV)
    build_args = [arg for line in str(labels).split() for arg in ("--build-arg", line)]
    tag_args = [arg for tag in tags for arg in ("--tag", tag)]
    tag_args += [arg for arg in session.posargs if arg != "--push"]
    if docker_engine():
        Path("dist").mkdir(exist_ok=True)
        cache = f"type=registry,ref={IMAGE}:buildcache"
        push = "--push" if "--push" in session.posargs else "--load"
        session.run(
            "docker",
            "buildx",
            "build",
            *tag_args,
            *build_args,
            "--cache-from",
            cache,
            *(["--cache-to", f"{cache},mode=max"] if push == "--push" else []),
            "--metadata-file",
            "dist/image-metadata.json",
            push,
            ".",
            external=True,
        )
    elif shutil.which("podman"):
        if "--push" in session.posargs:
            session.error("--push needs docker buildx and a registry; podman builds locally only")
        session.run(
            "podman", "build", "--isolation", "chroot", *tag_args, *build_args, ".", external=True
        )
        digest = session.run(
            "podman",
            "image",
            "inspect",
            "--format",
            "{{.Digest}}",
            tags[0],
            external=True,
            silent=True,
        )
        session.log(f"digest: {str(digest).strip()}")
    else:
        session.error("neither a Docker engine (docker info) nor podman is available here")
    session.log("tags: " + " ".join(tags))
    metadata = Path("dist/image-metadata.json")
    if metadata.exists():
        session.log("digest: " + json.loads(metadata.read_text()).get("containerimage.digest", "?"))


@nox.session(python=PYTHON, default=False)
def image_e2e(session: nox.Session) -> None:
    """Build the image with podman on a locally bootstrapped base, run it, smoke-test it."""
    sync(session, "test")
    session.run("python", "-m", "delivery.container", "e2e", env=SECURITY_ENV)


@nox.session(python=PYTHON, tags=["release"])
def scan_image(session: nox.Session) -> None:
    """Trivy on the built image: table + JSON + SARIF, fails on fixable CRITICAL/HIGH."""
    trivy = shutil.which("trivy")
    if trivy is None:
        session.error("trivy is not installed here (CI installs a pinned release); nothing scanned")
    target = session.posargs[0] if session.posargs else image_tags(session)[0]
    out = reports_dir("trivy-container-report")
    common = ["trivy", "image", "--ignore-unfixed", "--severity", "CRITICAL,HIGH", target]
    session.run(*common, "--format", "table", "--output", str(out / "trivy.txt"), external=True)
    session.run(*common, "--format", "sarif", "--output", str(out / "trivy.sarif"), external=True)
    session.run(*common, "--format", "json", "--output", str(out / "trivy.json"), external=True)
    gate(session, "normalize", "trivy", str(out / "trivy.json"))


@nox.session(python=PYTHON, default=False)
def commits(session: nox.Session) -> None:
    """Check commit messages: `<type>(<scope>): <subject>` (range: posargs or origin/main..HEAD)."""
    session.run("python", "-m", "delivery.release", "check", *session.posargs, env=SECURITY_ENV)


@nox.session(python=PYTHON, default=False)
def release(session: nox.Session) -> None:
    """Next version from the commits since the last tag, CHANGELOG.md and tag; `-- --apply`."""
    session.run("python", "-m", "delivery.release", "plan", *session.posargs, env=SECURITY_ENV)
