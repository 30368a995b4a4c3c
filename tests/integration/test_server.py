"""`mlp server` + two `mlp worker` processes on PostgreSQL and Redis, driven by the CLI client."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from typer.testing import CliRunner

from ml_platform import cli
from ml_platform.cli import app
from tests.conftest import RedisTarget
from tests.forked import ZYGOTE, Forked
from tests.helpers import wait_for, wait_until_ready
from tests.services import free_port, libpq_url

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


def mlp(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`mlp ARGS` with ``env`` as its environment, run here: the CLI's own code as `python -m
    ml_platform` runs it, without a process start (≈ 0.5 s of a core each, under coverage).
    The server, the workers and `mlp logs -f` below are processes of their own."""
    result = CliRunner().invoke(app, list(args), input=stdin, env=env)
    error = "" if result.exception is None else repr(result.exception)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, error)


@dataclass
class Cluster:
    """A server and two one-slot workers (``processes``, the server first)."""

    url: str
    env: dict[str, str]
    processes: list[Forked]

    def restart_server(self, down_for: float) -> None:
        """SIGTERM the server, wait for it to end, start a new one on the same port
        ``down_for`` seconds later."""
        self.processes[0].terminate()
        self.processes[0].wait(timeout=30)
        time.sleep(down_for)  # the outage, as long as a slow restart's
        port = self.url.rsplit(":", 1)[1]
        with open(os.devnull, "w") as devnull:
            self.processes[0] = ZYGOTE.spawn(["server", "--port", port], self.env, output=devnull)


@pytest.fixture
def cluster(distributed_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # The CLI's console fixed its width when this process imported it: as wide as COLUMNS.
    monkeypatch.setattr(cli.console, "width", 200)
    env = dict(
        distributed_env,
        MLP_LEASE_SECONDS="3",
        MLP_POLL_SECONDS="0.2",
        SECRET_KEY="k3y-for-tests-only-7f0c4e2a9b1d8e6f5a4c3b2a1908f7e6",
        # No proxy here is trusted: an X-Forwarded-For from 127.0.0.1 must not be believed.
        FORWARDED_ALLOW_IPS="10.255.255.1",
        COLUMNS="200",
    )
    assert mlp(env, "db", "upgrade").returncode == 0
    created = mlp(env, "users", "create", "alice", "--admin", "--password-stdin", stdin=PASSWORD)
    assert created.returncode == 0, created.stdout + created.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Forked from a warm copy of `python -m ml_platform` (tests/forked.py); the README's test
    # below starts its server and worker as a person does.
    with open(os.devnull, "w") as devnull:
        processes = [
            ZYGOTE.spawn(args, env, output=devnull)
            for args in (
                ["server", "--port", str(port)],
                ["worker", "--concurrency", "1"],
                ["worker", "--concurrency", "1"],
            )
        ]
    try:
        wait_until_ready(url)
        yield Cluster(url, env, processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_demo_runs_through_the_api_on_two_workers(
    cluster: Cluster, redis_target: RedisTarget, redis_client: redis.Redis, tmp_path: Path
) -> None:
    url, env = cluster.url, cluster.env
    refused = mlp(env, "runs", "--server", url)
    assert refused.returncode == 2 and "not logged in" in refused.stdout
    bad = mlp(env, "login", "--server", url, "-u", "alice", "--password-stdin", stdin="wrong")
    assert bad.returncode == 2 and "wrong username or password" in bad.stdout
    login = mlp(env, "login", "--server", url, "-u", "alice", "--password-stdin", stdin=PASSWORD)
    assert login.returncode == 0, login.stdout
    credentials = Path(env["ML_PLATFORM_HOME"]) / "credentials.json"
    assert oct(credentials.stat().st_mode & 0o777) == "0o600"

    # Six naps of 0.4 s on two one-slot workers: both take part. (The example ML pipeline runs
    # through a server and a worker in test_the_readme_distributed_steps_work_as_written.)
    run = mlp(env, "run", "tests.workflows:naps", "-p", "n=6", "-p", "seconds=0.4", "--server", url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"total\s+│ succeeded\s+│ 1\s+│[^│]*│ count=6", run.stdout), run.stdout
    match = re.search(r"run ([0-9a-f]{8}) ", run.stdout)
    assert match is not None
    run_id = match.group(1)

    listed = mlp(env, "runs", "--server", url)
    assert run_id in listed.stdout and "succeeded" in listed.stdout
    shown = mlp(env, "show", run_id, "--server", url)
    assert "nap[5]" in shown.stdout and "7 succeeded" in shown.stdout, shown.stdout

    token = httpx.post(
        f"{url}/api/v1/auth/token", json={"username": "alice", "password": PASSWORD}
    ).json()["access_token"]
    tasks = httpx.get(
        f"{url}/api/v1/projects/default/runs/{run_id}/tasks",
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    workers = {a["worker_id"] for t in tasks for a in t["attempts"]}
    assert len(workers) == 2, workers  # both workers ran part of the fan-out
    metrics = httpx.get(f"{url}/metrics").text
    assert 'mlp_runs{state="succeeded"} 1.0' in metrics
    # One succeeded attempt per task: six naps and their total.
    assert "mlp_task_duration_seconds_count 7.0" in metrics
    failed = mlp(env, "run", "tests.workflows:failing_pipeline", "--server", url)
    assert failed.returncode == 1 and "explode: RuntimeError: boom" in failed.stdout
    failed_id = re.search(r"run ([0-9a-f]{8}) ", failed.stdout)
    assert failed_id is not None
    log = mlp(env, "logs", failed_id.group(1), "explode", "--server", url)
    assert "Traceback" in log.stdout and "RuntimeError: boom" in log.stdout, log.stdout
    missing = mlp(env, "show", "ffffffff", "--server", url)
    assert missing.returncode == 2 and "no run with id" in missing.stdout

    # A run's artifact, downloaded from the server and checked against its digest.
    models = mlp(env, "run", "tests.workflows:two_models", "--server", url)
    models_id = re.search(r"run ([0-9a-f]{8}) ", models.stdout)
    assert models.returncode == 0 and models_id is not None, models.stdout
    saved = tmp_path / "model.pkl"
    got = mlp(
        env, "artifacts", models_id.group(1), "fit[1]/model", "-o", str(saved), "--server", url
    )
    assert got.returncode == 0, got.stdout
    assert pickle.loads(saved.read_bytes())["seed"] == 2
    shown_models = mlp(env, "show", models_id.group(1), "--server", url).stdout
    assert "artifact model from fit[1]: pickle" in shown_models, shown_models
    marked = mlp(env, "run", "tests.workflows:failing_with", "-p", "message=[bold]x[/bold]",
                 "--server", url)  # fmt: skip
    marked_id = re.search(r"run ([0-9a-f]{8}) ", marked.stdout)
    assert marked.returncode == 1 and marked_id is not None, marked.stdout
    assert "explode: RuntimeError: [bold]x[/bold]" in marked.stdout, marked.stdout
    shown_error = mlp(env, "show", marked_id.group(1), "--server", url).stdout
    assert "RuntimeError: [bold]x[/bold]" in shown_error, shown_error

    # Schedules from the CLI: the server fires an active one; a paused one makes no run.
    for name in ("kept", "paused"):
        made = mlp(env, "schedules", "create", name, "tests.workflows:arithmetic", "0 3 * * *",
                   "-p", "n=2", "--server", url)  # fmt: skip
        assert made.returncode == 0 and "next tick" in made.stdout, made.stdout
    assert mlp(env, "schedules", "pause", "paused", "--server", url).returncode == 0
    table = mlp(env, "schedules", "list", "--server", url).stdout
    assert re.search(r"kept .*│ active", table) and re.search(r"paused .*│ paused", table)
    with psycopg.connect(libpq_url(cluster.env["DATABASE_URL"]), autocommit=True) as conn:
        conn.execute("UPDATE schedules SET next_fire_at = timezone('utc', now())")  # both due

    def made_by(name: str) -> list[object]:
        runs = httpx.get(
            f"{url}/api/v1/projects/default/runs",
            params={"schedule": name},
            headers={"Authorization": f"Bearer {token}"},
        )
        items: list[object] = runs.json()["items"]
        return items

    wait_for(lambda: made_by("kept"), timeout=30, what="the server to fire the due schedule")
    assert made_by("paused") == []  # the same look at due schedules passed it over
    assert mlp(env, "schedules", "delete", "paused", "--server", url).returncode == 0
    gone = mlp(env, "schedules", "pause", "paused", "--server", url)
    assert gone.returncode == 2 and "no schedule named 'paused'" in gone.stdout

    # The deployment smoke suite, for real, against this server (authenticated checks too).
    smoke = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/smoke",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-cov",
            "--base-url",
            url,
            "--smoke-user",
            "alice",
            "--smoke-password",
            PASSWORD,
        ],
        cwd=ROOT,
        # An HTTP client of the server: nothing of ours to measure in it.
        env={k: v for k, v in env.items() if not k.startswith("COVERAGE_")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "5 passed" in smoke.stdout
    _logs_follow_a_running_task_through_the_server(url, env, token)
    _a_watch_outlives_a_restart_of_the_server(cluster)
    _logout_ends_the_sign_in_on_the_server_and_proxies_are_not_believed(
        url, env, redis_target, redis_client
    )


def _logs_follow_a_running_task_through_the_server(
    url: str, env: dict[str, str], token: str
) -> None:
    """A remote worker ships what the task prints; `mlp logs -f --server` shows it at once."""
    headers = {"Authorization": f"Bearer {token}"}
    body = {"workflow": "tests.workflows:chatty_pipeline", "params": {"seconds": 4.0}}
    run = httpx.post(f"{url}/api/v1/projects/default/runs", json=body, headers=headers)
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "ml_platform", "logs", run_id, "chatty", "-f", "--server", url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert follower.stdout is not None
        for line in follower.stdout:
            if "first line" in line:
                break
        tasks = httpx.get(
            f"{url}/api/v1/projects/default/runs/{run_id}/tasks", headers=headers
        ).json()
        assert tasks[0]["attempts"][-1]["state"] == "running"  # shown while it still runs
        rest, _ = follower.communicate(timeout=60)
        assert "second line" in rest and "chatty attempt 1 ended: succeeded" in rest, rest
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def _a_watch_outlives_a_restart_of_the_server(cluster: Cluster) -> None:
    """`mlp run --server` watching a run while the server restarts (a deploy): it cannot
    reach the server for a moment, says so, asks again, and reports the run's end, exit 0.
    (It used to stop at once, exit 1, as if the run had failed.)"""
    watcher = ZYGOTE.spawn(
        ["run", "tests.workflows:naps", "-p", "n=2", "-p", "seconds=2", "--server", cluster.url],
        cluster.env,
    )
    try:
        assert watcher.stdout is not None
        seen = [next(watcher.stdout)]
        assert "submitted to" in seen[0], seen  # it watches from now on, twice a second
        cluster.restart_server(down_for=1.5)
        rest, _ = watcher.communicate(timeout=60)
        output = "".join(seen) + rest
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, output
    assert "cannot reach" in output and "asking again in" in output, output
    assert re.search(r"run [0-9a-f]{8} of tests.workflows:naps succeeded", output), output


def _logout_ends_the_sign_in_on_the_server_and_proxies_are_not_believed(
    url: str, env: dict[str, str], redis_target: RedisTarget, redis_client: redis.Redis
) -> None:
    credentials = Path(env["ML_PLATFORM_HOME"]) / "credentials.json"
    saved = json.loads(credentials.read_text())[url]
    out = mlp(env, "logout", "--server", url)
    assert out.returncode == 0 and "the sign-in has ended on the server" in out.stdout, out.stdout
    assert url not in json.loads(credentials.read_text())
    # A copy of the tokens taken before the logout is worth nothing now.
    me = httpx.get(
        f"{url}/api/v1/users/me", headers={"Authorization": f"Bearer {saved['access_token']}"}
    )
    assert me.status_code == 401 and me.json()["error"]["code"] == "token_revoked"
    renew = httpx.post(f"{url}/api/v1/auth/refresh", json={"refresh_token": saved["refresh_token"]})
    assert renew.status_code == 401
    assert "not logged in" in mlp(env, "runs", "--server", url).stdout
    # A forged X-Forwarded-For from an untrusted peer: the limit counts the real address.
    wrong = {"username": "alice", "password": "not the password"}  # pragma: allowlist secret
    forged = httpx.post(
        f"{url}/api/v1/auth/token", json=wrong, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert forged.status_code == 401
    keys = {k.decode() for k in redis_client.scan_iter(f"{redis_target.prefix}:login-failures:*")}
    assert f"{redis_target.prefix}:login-failures:ip:127.0.0.1" in keys, keys
    assert not any("203.0.113.9" in key for key in keys), keys


def test_the_readme_distributed_steps_work_as_written(
    postgres_clean: str, redis_target: RedisTarget, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """README.md's "Server, API and workers" block, run line by line in bash as a person
    would type it, on this test's database, Redis and a free port. The additions: the
    password prompts read what a person would type, and the line after `mlp server &`
    waits until the server accepts connections (a person types slower)."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"### Server, API and workers\n.*?```bash\n(.*?)```", readme, re.S)
    assert found, "README.md lost its distributed block"
    port = free_port()
    python = shlex.quote(sys.executable)
    # On exit the server and the worker get SIGTERM and are waited for: nothing is left.
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null; wait || true' EXIT"]
    for line in found.group(1).splitlines():
        line = (
            line.replace("postgresql://postgres@127.0.0.1:5432/test", postgres_clean)
            .replace("redis://127.0.0.1:6379/0", redis_target.url)
            .replace("8000", str(port))
            .replace("uv run mlp ", f"{python} -m ml_platform ")
        )
        # The password prompts get what a person would type, each its own.
        answers = {"users create": "$MLP_PW$'\\n'$MLP_PW", " login ": "$MLP_PW"}
        for command, answer in answers.items():
            if command in line:
                code, _, comment = line.partition("  #")
                line = f"{code.rstrip()} <<< {answer}  #{comment}"
        lines.append(line)
        if "ml_platform server" in line:
            # Bash's own connect (uvicorn listens once the app has started): no Python
            # process, with coverage's start-up, every 0.1 s.
            lines.append(f"until (: </dev/tcp/127.0.0.1/{port}) 2>/dev/null; do sleep 0.1; done")
    env = dict(
        os.environ,
        HOME=str(tmp_path),
        ML_PLATFORM_HOME=str(tmp_path / "home"),
        MLP_REDIS_PREFIX=redis_target.prefix,
        MLP_PW=PASSWORD,
        COLUMNS="200",
    )
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY"):
        env.pop(name, None)  # the block sets them itself
    done = subprocess.run(
        ["bash", "-c", "\n".join(lines)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "user alice created (admin) in postgresql" in done.stdout
    assert "training_pipeline" in done.stdout and "succeeded" in done.stdout
    # The example ML pipeline, through the server and a worker: every grid point evaluated,
    # the best model registered, 15 task runs succeeded.
    assert re.search(
        r"evaluate\[3\]\s+│ succeeded\s+│ 1\s+│[^│]*│ accuracy=", done.stdout
    ), done.stdout
    assert re.search(r"register_model\s+│ succeeded", done.stdout), done.stdout
    assert "15 succeeded" in done.stdout, done.stdout
