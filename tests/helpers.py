"""Helpers that drive the real service without child processes, for fast integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ml_platform.engine.states import AttemptState, RunState
from ml_platform.service import ClaimedAttempt, Outcome, Platform
from ml_platform.task_runner import is_running, run_attempt


def execute(platform: Platform, claimed: ClaimedAttempt) -> Outcome:
    """Run a claimed attempt in this process with the task runner's own code."""
    settings = platform.settings
    data: dict[str, Any] = run_attempt(
        {
            "run_id": claimed.run_id,
            "node_id": claimed.node_id,
            "number": claimed.number,
            "task_ref": claimed.task_ref,
            "code_version": claimed.code_version,  # as a worker sends it: stale code fails
            "inputs": claimed.inputs,
            "options": claimed.options,
            "artifacts_dir": str(settings.artifacts_dir),
            "inline_result_bytes": settings.inline_result_bytes,
        }
    )
    return Outcome(
        state=AttemptState(data["state"]),
        result=data.get("result"),
        error=data.get("error"),
        retryable=data.get("retryable", True),
        skipped=data.get("skipped", False),
        metrics=data["metrics"],
        params=data["params"],
        artifacts=data["artifacts"],
    )


def run_inline(
    platform: Platform, run_id: str, worker_id: str = "inline", rounds: int = 200
) -> RunState:
    """Claim, run and finish every due attempt of a run until it ends."""
    for _ in range(rounds):
        state = RunState(platform.run(run_id)[0].state)
        if state in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED):
            return state
        progressed = False
        for attempt_id, _ in platform.schedule(run_id):
            claimed = platform.claim(attempt_id, worker_id)
            if claimed is not None:
                platform.finish(claimed, worker_id, execute(platform, claimed))
                progressed = True
        if not progressed:
            time.sleep(0.02)  # a retry may be waiting for its backoff delay
    raise AssertionError(f"run {run_id} did not end in {rounds} rounds")


def wait_for(
    condition: Callable[[], object],
    timeout: float = 60.0,
    *,
    what: str = "",
    interval: float = 0.05,
) -> None:
    """Poll ``condition`` every ``interval`` s until it is true; fail after ``timeout`` s,
    naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout} s: {what or 'condition'}")
        time.sleep(interval)


def wait_until_ready(url: str, timeout: float = 60.0) -> None:
    """Poll ``url``/readyz until it answers 200 (a server started by a test)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:  # one client: a new one per poll costs 20-40 ms
        while True:
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the server at {url} did not become ready"
            time.sleep(0.2)


def pids_in(path: Path) -> list[int]:
    """The pids a test task wrote to ``path``, one per line."""
    return [int(word) for word in path.read_text().split()] if path.exists() else []


def wait_until_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait for every process to end; return those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if is_running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left
