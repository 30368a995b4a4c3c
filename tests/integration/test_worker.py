"""The worker's own guarantees, driven in this process: child crashes, leases, draining."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ml_platform.dispatch import InProcessDispatcher
from ml_platform.engine.states import RunState
from ml_platform.service import Platform
from ml_platform.worker import Runtime, Worker
from tests import workflows

pytestmark = pytest.mark.integration


def _runtime(platform: Platform, run_id: str) -> Runtime:
    dispatcher = InProcessDispatcher()
    worker = Worker(platform, dispatcher, concurrency=2)
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
    os.kill(child.process.pid, signal.SIGKILL)
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
    assert child.process.poll() is not None  # the orphaned attempt's process was killed
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
