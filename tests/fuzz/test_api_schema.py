"""Schemathesis over the OpenAPI document against a real `mlp server` (PostgreSQL + Redis),
as anonymous, viewer, editor and admin. Run by `nox -s fuzz`, not by the tests session.

The gate: every check Schemathesis has passes (0 server errors, every status code and body as
the document declares, auth not ignored, …) except the ones named in EXCLUDED with the reason,
and the server's own access log shows no 5xx. Figures and the reports go to reports/fuzz/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import RedisTarget
from tests.helpers import wait_until_ready
from tests.services import free_port

pytestmark = pytest.mark.fuzz
ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports" / "fuzz"
PASSWORD = "fuzzing is believing 42"  # pragma: allowlist secret
SECRET = "k3y-for-tests-only-7f0c4e2a9b1d8e6f5a4c3b2a1908f7e6"  # pragma: allowlist secret
#: Examples per operation and seconds per role: bounded so the session stays short in CI.
MAX_EXAMPLES = int(os.environ.get("MLP_FUZZ_EXAMPLES", "25"))
MAX_SECONDS = int(os.environ.get("MLP_FUZZ_SECONDS", "10"))
EXCLUDED = {
    # The API refuses values that satisfy the schema but that no schema can describe: NUL
    # bytes and lone surrogates, workflow references outside MLP_WORKFLOW_MODULES, crons that
    # never fire, usernames and projects that do not exist. Those refusals are 4xx by design.
    "positive_data_acceptance": "refusals beyond JSON Schema are by design",
}
#: Sign-out ends the fuzzer's own session: every later request would be a 401.
SIGNED_IN_EXCLUDES = ["--exclude-path", "/api/v1/auth/logout"]


@dataclass
class Server:
    url: str
    log: Path
    tokens: dict[str, str]


def _st() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("schemathesis is not installed in this environment: run `nox -s fuzz`")
    return found


@pytest.fixture(scope="module")
def server(
    postgres_url: str, redis_target: RedisTarget, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("fuzz-home")
    env = dict(
        os.environ,
        DATABASE_URL=postgres_url,
        REDIS_URL=redis_target.url,
        MLP_REDIS_PREFIX=f"{redis_target.prefix}:fuzz",
        ML_PLATFORM_HOME=str(home),
        SECRET_KEY=SECRET,
    )
    run = [sys.executable, "-m", "ml_platform"]
    subprocess.run([*run, "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*run, "users", "create", "alice", "--admin", "--password-stdin"],
        env=env,
        input=PASSWORD,
        text=True,
        check=True,
        capture_output=True,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    REPORTS.mkdir(parents=True, exist_ok=True)
    log = REPORTS / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*run, "server", "--port", str(port)], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_until_ready(url)
        tokens = {"alice": _login(url, "alice")}
        admin = {"Authorization": f"Bearer {tokens['alice']}"}
        for name, role in (("erin", "editor"), ("victor", "viewer")):
            body = {"username": name, "password": PASSWORD}
            httpx.post(f"{url}/api/v1/users", json=body, headers=admin).raise_for_status()
            member = {"username": name, "role": role}
            httpx.put(
                f"{url}/api/v1/projects/default/members", json=member, headers=admin
            ).raise_for_status()
            tokens[name] = _login(url, name)
        # Something for the read operations to find (a run, its tasks) besides random ids.
        submitted = {"workflow": "ml_platform.examples.smoke:smoke", "params": {}}
        httpx.post(f"{url}/api/v1/projects/default/runs", json=submitted, headers=admin)
        yield Server(url, log, tokens)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _login(url: str, username: str) -> str:
    response = httpx.post(
        f"{url}/api/v1/auth/token", json={"username": username, "password": PASSWORD}
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


# Anonymous first and the admin last: the admin may change the others' roles.
@pytest.mark.parametrize("role", ["anonymous", "viewer", "editor", "admin"])
def test_the_api_holds_against_generated_requests(server: Server, role: str) -> None:
    user = {"viewer": "victor", "editor": "erin", "admin": "alice"}.get(role)
    auth = (
        ["-H", f"Authorization: Bearer {server.tokens[user]}", *SIGNED_IN_EXCLUDES] if user else []
    )
    report = REPORTS / role
    argv = [
        _st(),
        "run",
        f"{server.url}/openapi.json",
        *auth,
        "--checks",
        "all",
        "--exclude-checks",
        ",".join(EXCLUDED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_SECONDS),
        "--phases",
        "examples,coverage,fuzzing",
        "--continue-on-failure",
        "--seed",
        "20261204",
        "--report",
        "junit,ndjson",
        "--report-dir",
        str(report),
        "--no-color",
    ]
    before = len(server.log.read_text().splitlines())
    done = subprocess.run(  # in the report folder: its cache lands there, not in the tree
        argv, capture_output=True, text=True, timeout=MAX_SECONDS + 120, cwd=report.parent
    )
    (report / "output.txt").write_text(done.stdout + done.stderr)
    lines = server.log.read_text().splitlines()[before:]
    requests = sum(1 for line in lines if '" ' in line and "HTTP/1.1" in line)
    errors = [line for line in lines if re.search(r'" 5\d\d ', line)]
    summary = {
        "role": role,
        "requests": requests,
        "server_errors": len(errors),
        "exit": done.returncode,
    }
    (report / "summary.json").write_text(json.dumps(summary))
    print(f"fuzz {role}: {requests} requests, {len(errors)} server errors")
    assert not errors, "\n".join(errors[:20])
    assert done.returncode == 0, done.stdout[-6000:]
    assert requests > 100  # it really ran
