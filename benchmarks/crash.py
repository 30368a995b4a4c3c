"""Crash benchmark: kill -9 the worker running a 5 s task, again and again.

Each round submits a one-task run, waits until a worker has started it, kills that worker
with SIGKILL a second later and starts a replacement. It measures the time until the task
runs again (the lease must expire first: the bench uses a short lease, stated in the
report), and counts from the task's own start/end marks and the database: executions
started beyond the one killed and its retry, attempts committed as succeeded beyond one,
and runs that did not succeed.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from benchmarks import workloads
from benchmarks.ours import Distributed
from benchmarks.sizes import CRASH_TASK_SECONDS
from ml_platform.engine.states import RUN_TERMINAL, RunState
from ml_platform.store.models import Attempt

LEASE_SECONDS = 2.0
KILL_AFTER_SECONDS = 0.5


@dataclass
class Round:
    recovery: float  # seconds from the kill to the retry's start
    executions: int  # starts the task itself recorded
    succeeded_attempts: int
    run_state: str

    @property
    def duplicates_started(self) -> int:
        return max(0, self.executions - 2)

    @property
    def duplicates_committed(self) -> int:
        return max(0, self.succeeded_attempts - 1)

    @property
    def lost(self) -> int:
        return 0 if self.run_state == RunState.SUCCEEDED else 1


def _attempts(mode: Distributed, run_id: str) -> list[Attempt]:
    with mode.platform.db.session() as session:
        return list(
            session.scalars(select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.id))
        )


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"crash benchmark: {what} after {timeout} s")
        time.sleep(0.01)


def crash_round(mode: Distributed, marker: Path) -> Round:
    submitted = mode.platform.submit(workloads.crash, {"marker": str(marker)})
    mode.dispatcher.publish(submitted.queued)
    first = _wait(
        lambda: [a for a in _attempts(mode, submitted.run_id) if a.started_at], 30, "no start"
    )[0]
    pid = int(first.worker_id.split(":")[1])
    time.sleep(KILL_AFTER_SECONDS)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    victim = next(w for w in mode.workers if w.pid == pid)
    victim.wait()
    mode.workers.remove(victim)
    mode.start_workers(1)
    retry = _wait(
        lambda: [a for a in _attempts(mode, submitted.run_id)[1:] if a.started_at], 60, "no retry"
    )[0]
    _wait(
        lambda: RunState(mode.platform.run(submitted.run_id)[0].state) in RUN_TERMINAL,
        60,
        "the run did not end",
    )
    attempts = _attempts(mode, submitted.run_id)
    lines = marker.read_text().splitlines()
    return Round(
        recovery=retry.started_at.timestamp() - killed_at,
        executions=sum(1 for line in lines if line.startswith("start")),
        succeeded_attempts=sum(1 for a in attempts if a.state == "succeeded"),
        run_state=mode.platform.run(submitted.run_id)[0].state,
    )


def run(
    database_url: str, redis_url: str, rounds: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    os.environ["MLP_LEASE_SECONDS"] = str(LEASE_SECONDS)
    mode = Distributed(database_url, redis_url)
    results: list[Round] = []
    try:
        mode.start_workers()
        folder = Path(tempfile.mkdtemp(prefix="mlp-crash-"))
        for number in range(1, rounds + 1):
            outcome = crash_round(mode, folder / f"round-{number}.txt")
            results.append(outcome)
            progress(
                f"crash {number}/{rounds}: ran again after {outcome.recovery:.2f} s, "
                f"{outcome.duplicates_committed} double-committed, {outcome.lost} lost"
            )
    finally:
        mode.close()
        os.environ.pop("MLP_LEASE_SECONDS", None)
    return {
        "rounds": [
            asdict(r)
            | {
                "duplicates_started": r.duplicates_started,
                "duplicates_committed": r.duplicates_committed,
                "lost": r.lost,
            }
            for r in results
        ],
        "lease_seconds": LEASE_SECONDS,
        "kill_after_seconds": KILL_AFTER_SECONDS,
        "task_seconds": CRASH_TASK_SECONDS,
    }
