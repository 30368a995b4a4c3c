"""The read side at scale: a database of 100,000 runs, 1,000,000 task runs and as many
attempts, and what a person or Prometheus asks of it through a real `mlp server`.

The rows are made by PostgreSQL itself (`generate_series`), one workflow in the default
project, ten task runs and one attempt per run, spread over 100 days. Then, through HTTP,
each request repeated: the API's first page of runs, a run page (the run and its tasks with
their attempts), `/metrics`. Latency percentiles per request kind.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess  # nosec B404 - our own CLI with fixed arguments
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url

from benchmarks import workloads
from benchmarks.measure import percentile
from benchmarks.ours import ROOT, drop_database, reset_database
from ml_platform.config import Settings
from ml_platform.service import Platform

RUNS = 100_000
TASKS_PER_RUN = 10
REPEAT = 60
PASSWORD = "a heavy database of runs 42"  # pragma: allowlist secret
SECRET = "bench-only-secret-key-0123456789abcdefghijklmn"  # pragma: allowlist secret

SEED = [
    """INSERT INTO runs (id, workflow_id, state, params, cancel_requested, created_at,
                         started_at, finished_at)
       SELECT md5(g::text), %(workflow)s,
              CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'succeeded' END,
              json_build_object('n', g), false,
              now() - make_interval(secs => g * 86.4),
              now() - make_interval(secs => g * 86.4) + interval '1 second',
              now() - make_interval(secs => g * 86.4) + interval '31 seconds'
       FROM generate_series(1, %(runs)s) AS g""",
    """INSERT INTO task_runs (run_id, node_id, position, task_ref, code_version, upstream,
                              inputs, options, state, current_attempt, lost_attempts, result,
                              started_at, finished_at)
       SELECT r.id, 'noop[' || t || ']', t, 'benchmarks.workloads:noop', 'v1', '[]'::json,
              '{}'::json, '{}'::json, 'succeeded', 1, 0, json_build_object('value', t),
              r.started_at + make_interval(secs => t), r.started_at + make_interval(secs => t + 2)
       FROM runs r, generate_series(0, %(tasks)s - 1) AS t""",
    """INSERT INTO attempts (task_run_id, run_id, number, state, worker_id, not_before,
                             created_at, started_at, finished_at)
       SELECT id, run_id, 1, 'succeeded', 'worker-1', started_at, started_at, started_at,
              finished_at
       FROM task_runs""",
    "VACUUM ANALYZE",  # now, not by autovacuum in the middle of the measurements
]


def _seed(database_url: str, workflow_id: int, progress: Callable[[str], None]) -> float:
    began = time.monotonic()
    libpq = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        for statement in SEED:
            conn.execute(statement, {"workflow": workflow_id, "runs": RUNS, "tasks": TASKS_PER_RUN})
            progress(f"scale: {' '.join(statement.split()[:3])} done")
    return time.monotonic() - began


def _timed(client: httpx.Client, path: str, headers: dict[str, str]) -> list[float]:
    client.get(path, headers=headers).raise_for_status()  # warm: plans and caches
    spans = []
    for _ in range(REPEAT):
        began = time.perf_counter()
        client.get(path, headers=headers).raise_for_status()
        spans.append(time.perf_counter() - began)
    return spans


def _figures(spans: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(spans) * 1000,
        "p95_ms": percentile(spans, 0.95) * 1000,
        "max_ms": max(spans) * 1000,
    }


def run(database_url: str, redis_url: str, progress: Callable[[str], None]) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="mlp-bench-scale-"))
    try:
        return _run(database_url, redis_url, progress, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _run(
    database_url: str, redis_url: str, progress: Callable[[str], None], home: Path
) -> dict[str, Any]:
    url = reset_database(database_url)
    settings = Settings(database_url_override=url, home=home)
    platform = Platform(settings).start()
    try:
        workflow_id = platform.register(workloads.chain).id
    finally:
        platform.close()
    seconds = _seed(url, workflow_id, progress)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "MLP_REDIS_PREFIX": f"mlp-bench-scale-{os.getpid()}",
        "ML_PLATFORM_HOME": str(home),
        "SECRET_KEY": SECRET,
        "PYTHONPATH": str(ROOT),
    }
    cli = [sys.executable, "-m", "ml_platform"]
    subprocess.run(  # nosec B603
        [*cli, "users", "create", "scaler", "--admin", "--password-stdin"],
        env=env,
        input=PASSWORD,
        text=True,
        check=True,
        capture_output=True,
    )
    port = 18765
    server = subprocess.Popen(  # nosec B603
        [*cli, "server", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            _wait_ready(client, server)
            token = client.post(
                "/api/v1/auth/token", json={"username": "scaler", "password": PASSWORD}
            ).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            runs = "/api/v1/projects/default/runs"
            newest = client.get(f"{runs}?limit=1", headers=auth).json()["items"][0]["id"]
            middle = client.get(f"{runs}?limit=1&offset={RUNS // 2}", headers=auth)
            oldest = middle.json()["items"][0]["id"]
            progress("scale: timing requests")
            figures = {
                "runs_page": _figures(_timed(client, f"{runs}?limit=50", auth)),
                "runs_page_filtered": _figures(
                    _timed(client, f"{runs}?limit=50&state=failed", auth)
                ),
                "run": _figures(
                    _timed(client, f"{runs}/{oldest}", auth)
                    + _timed(client, f"{runs}/{newest}", auth)
                ),
                "run_tasks": _figures(_timed(client, f"{runs}/{oldest}/tasks", auth)),
                "metrics": _figures(_timed(client, "/metrics", {})),
            }
            signed = client.post(
                "/ui/login", data={"username": "scaler", "password": PASSWORD}
            )  # the UI's session cookies stay in the client
            if signed.status_code != 303:
                raise RuntimeError(f"the UI's sign-in answered {signed.status_code}")
            figures["ui_runs"] = _figures(_timed(client, "/ui/p/default/runs", {}))
            figures["ui_run"] = _figures(_timed(client, f"/ui/p/default/runs/{oldest}", {}))
    finally:
        server.terminate()
        server.wait(timeout=60)
        drop_database(database_url)
    return {
        "runs": RUNS,
        "task_runs": RUNS * TASKS_PER_RUN,
        "attempts": RUNS * TASKS_PER_RUN,
        "seed_seconds": seconds,
        "repeat": REPEAT,
        "requests": figures,
    }


def _wait_ready(client: httpx.Client, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("mlp server did not become ready")
        time.sleep(0.5)
