"""The worker's own guarantees, driven in this process: child crashes, leases, draining."""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_platform import task_runner
from ml_platform.dispatch import InProcessDispatcher
from ml_platform.engine.states import RunState
from ml_platform.service import Platform
from ml_platform.worker import Runtime, Worker
from tests import workflows

pytestmark = pytest.mark.integration


_WORKERS: list[Worker] = []


@pytest.fixture(autouse=True)
def _close_workers() -> Iterator[None]:
    yield
    while _WORKERS:
        _WORKERS.pop().close()


def _runtime(platform: Platform, run_id: str) -> Runtime:
    dispatcher = InProcessDispatcher()
    worker = Worker(platform, dispatcher, concurrency=2)
    _WORKERS.append(worker)
    return Runtime(platform, dispatcher, worker, only_run=run_id)


def test_a_task_process_killed_mid_task_fails_the_attempt_and_is_retried(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    submitted = sqlite_platform.submit(workflows.crash_pipeline, {"marker": str(marker)})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        runtime.tick()
    [child] = runtime.worker.children.values()
    os.kill(child.runner.process.pid, signal.SIGKILL)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    attempts = sqlite_platform.attempts(submitted.run_id)
    assert [a.state for a in attempts] == ["failed", "succeeded"]
    assert attempts[0].error == "task process killed by signal SIGKILL"


def test_a_worker_that_lost_its_lease_stops_the_task(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    submitted = sqlite_platform.submit(workflows.crash_pipeline, {"marker": str(marker)})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    while not marker.exists():
        runtime.worker.step() if runtime.worker.children else runtime.tick()
    [child] = runtime.worker.children.values()
    # Another scheduler decides the lease expired (e.g. this worker was paused too long).
    sqlite_platform.settings.lease_seconds = 0.2
    runtime.worker._beat()
    time.sleep(0.3)
    assert sqlite_platform.reap() == 1
    runtime.worker._beat()
    assert runtime.worker.children == {}
    assert child.runner.process.poll() is not None  # the orphaned attempt's process was killed
    sqlite_platform.settings.lease_seconds = 5
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    assert [a.state for a in sqlite_platform.attempts(submitted.run_id)] == ["lost", "succeeded"]


def test_draining_finishes_running_work_and_takes_no_more(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    submitted = sqlite_platform.submit(workflows.arithmetic, {"n": 4})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    runtime.worker.concurrency = 1
    while not runtime.worker.children:
        runtime.tick()
    runtime.worker.draining = True
    while runtime.worker.children:
        runtime.tick()
    states = [a.state for a in sqlite_platform.attempts(submitted.run_id)]
    assert states.count("succeeded") == 1 and states.count("running") == 0
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        Worker(sqlite_platform, InProcessDispatcher(), concurrency=0)


@pytest.mark.parametrize(("limit", "processes"), [(0, 1), (1, 3)])
def test_task_processes_are_reused_up_to_the_configured_limit(
    sqlite_platform: Platform, limit: int, processes: int
) -> None:
    sqlite_platform.settings.max_tasks_per_process = limit
    submitted = sqlite_platform.submit(workflows.three_steps, {})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    runtime.worker.concurrency = 1
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    pids = {t.result["value"] for t in sqlite_platform.task_runs(submitted.run_id) if t.result}
    assert len(pids) == processes
    assert os.getpid() not in pids  # never in the worker's own process
    assert len(runtime.worker.idle) == (1 if limit == 0 else 0)


def test_a_warm_process_with_an_older_copy_of_the_task_hands_it_to_a_fresh_one() -> None:
    first = {
        "run_id": "r",
        "node_id": "a",
        "number": 1,
        "task_ref": "tests.workflows:double",
        "code_version": workflows.double.code_version,
        "inputs": {"args": [2], "kwargs": {}},
        "options": {},
        "artifacts_dir": "/nonexistent",
        "inline_result_bytes": 1024,
    }
    changed = {**first, "node_id": "b", "code_version": "0" * 64}
    with tempfile.TemporaryDirectory() as folder:
        log = str(Path(folder) / "log.txt")
        requests = io.BytesIO(
            b"".join(json.dumps({**r, "log": log}).encode() + b"\n" for r in (first, changed))
        )
        replies = io.BytesIO()
        saved = os.dup(1), os.dup(2)
        try:
            assert task_runner.serve(requests, replies) == 0
        finally:
            for fd, saved_fd in ((1, saved[0]), (2, saved[1])):
                os.dup2(saved_fd, fd)
                os.close(saved_fd)
    done, stale = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert done["state"] == "succeeded" and done["result"] == {"value": 4}
    assert stale == {"stale": True}
