"""Crash benchmarks: workers killed with SIGKILL, again and again.

- *rounds*: a one-task run; the worker running it is killed half a second into the task and
  replaced. Measures the time until the task runs again (the lease must expire first: the
  bench uses a short lease, stated in the report), and counts from the task's own start/end
  marks and the database: executions started beyond the one killed and its retry, attempts
  committed as succeeded beyond one, and runs that did not succeed.
- *storms*: 40 plain one-second tasks (default ``retries=0``) on two workers of two slots;
  a busy worker is killed five times at random moments and replaced. The run must succeed with
  every task, no result committed twice, and no task body still running after its worker died
  (the dead worker's task processes are looked for a second after each kill, and their marks
  show whether any body ended after it). Once with warm task processes, once with a fresh
  process per attempt (``MLP_MAX_TASKS_PER_PROCESS=1``).
- *start-up kills*: a fresh process per attempt, one worker; the worker is killed the moment its
  claim is committed, while its task process is starting. Counts the task processes left.
"""

from __future__ import annotations

import os
import random
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
from benchmarks.sizes import (
    CRASH_TASK_SECONDS,
    STARTUP_KILLS,
    STORM_KILLS,
    STORM_TASK_SECONDS,
    STORM_TASKS,
)
from ml_platform.engine.states import RUN_TERMINAL, RunState
from ml_platform.store.models import Attempt
from ml_platform.task_runner import is_running, task_processes_of

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


@dataclass
class Storm:
    """One storm: plain tasks, busy workers killed at random moments."""

    label: str
    tasks: int
    succeeded: int
    run_state: str
    kills: int
    lost_attempts: int
    duplicates_committed: int
    bodies_after_death: int
    seconds: float


def _busy_workers(mode: Distributed, run_id: str) -> list[int]:
    live = {worker.pid for worker in mode.workers}
    return sorted(
        {
            int(a.worker_id.split(":")[1])
            for a in _attempts(mode, run_id)
            if a.state == "running" and a.worker_id
        }
        & live
    )


def _kill(mode: Distributed, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    victim = next(w for w in mode.workers if w.pid == pid)
    victim.wait()
    mode.workers.remove(victim)


def _ends_after(folder: Path, pids: set[int], moment: float) -> set[int]:
    """Task processes among ``pids`` that marked a body's end after ``moment``."""
    late = set()
    for path in folder.glob("task-*.txt"):
        for line in path.read_text().splitlines():
            kind, pid, when = line.split()
            if kind == "end" and int(pid) in pids and float(when) > moment:
                late.add(int(pid))
    return late


def storm(mode: Distributed, label: str, seed: int) -> Storm:
    folder = Path(tempfile.mkdtemp(prefix="mlp-storm-", dir=mode.home))
    chooser = random.Random(seed)  # nosec B311 - when to kill, not a secret
    began = time.monotonic()
    submitted = mode.platform.submit(workloads.storm, {"folder": str(folder)})
    mode.dispatcher.publish(submitted.queued)
    survivors: set[int] = set()
    killed = []
    for _ in range(STORM_KILLS):
        time.sleep(chooser.uniform(0.2, 1.5))
        busy = _wait(lambda: _busy_workers(mode, submitted.run_id), 60, "no busy worker")
        victim = chooser.choice(busy)
        bodies = set(task_processes_of(victim))
        moment = time.time()
        _kill(mode, victim)
        killed.append((victim, bodies, moment))
        mode.start_workers(1)
    time.sleep(1.0)
    for victim, bodies, moment in killed:
        survivors |= {pid for pid in bodies if is_running(pid)}
        survivors |= set(task_processes_of(victim))
        survivors |= _ends_after(folder, bodies, moment)
    _wait(
        lambda: RunState(mode.platform.run(submitted.run_id)[0].state) in RUN_TERMINAL,
        300,
        "the storm's run did not end",
    )
    tasks = mode.platform.task_runs(submitted.run_id)
    attempts = _attempts(mode, submitted.run_id)
    return Storm(
        label=label,
        tasks=len(tasks),
        succeeded=sum(t.state == "succeeded" for t in tasks),
        run_state=mode.platform.run(submitted.run_id)[0].state,
        kills=len(killed),
        lost_attempts=sum(a.state == "lost" for a in attempts),
        duplicates_committed=sum(a.state == "succeeded" for a in attempts) - len(tasks),
        bodies_after_death=len(survivors),
        seconds=time.monotonic() - began,
    )


def startup_kills(mode: Distributed, rounds: int) -> dict[str, int]:
    """Kill a worker the moment it claimed an attempt: its task process is starting then."""
    orphans = during_startup = 0
    folder = Path(tempfile.mkdtemp(prefix="mlp-startup-", dir=mode.home))
    for _ in range(rounds):
        submitted = mode.platform.submit(
            workloads.storm, {"folder": str(folder), "n": 1, "seconds": 1.0}
        )
        mode.dispatcher.publish(submitted.queued)
        mode.start_workers(1)
        pid = mode.workers[-1].pid
        _wait(lambda: pid in _busy_workers(mode, submitted.run_id), 30, "no claim")
        _kill(mode, pid)
        marks = folder / "task-0.txt"
        started = marks.exists() and "start " in marks.read_text()
        during_startup += not started
        time.sleep(1.0)
        orphans += len(task_processes_of(pid))
        marks.unlink(missing_ok=True)
        mode.platform.cancel(submitted.run_id)
    return {"rounds": rounds, "orphans": orphans, "during_startup": during_startup}


def run(
    database_url: str, redis_url: str, rounds: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    os.environ["MLP_LEASE_SECONDS"] = str(LEASE_SECONDS)
    results: list[Round] = []
    storms: list[Storm] = []
    try:
        mode = Distributed(database_url, redis_url)
        try:
            mode.start_workers()
            folder = Path(tempfile.mkdtemp(prefix="mlp-crash-", dir=mode.home))
            for number in range(1, rounds + 1):
                outcome = crash_round(mode, folder / f"round-{number}.txt")
                results.append(outcome)
                progress(
                    f"crash {number}/{rounds}: ran again after {outcome.recovery:.2f} s, "
                    f"{outcome.duplicates_committed} double-committed, {outcome.lost} lost"
                )
        finally:
            mode.close()
        for seed, (label, per_process) in enumerate(
            [("warm task processes", "0"), ("a fresh process per attempt", "1")]
        ):
            os.environ["MLP_MAX_TASKS_PER_PROCESS"] = per_process
            mode = Distributed(database_url, redis_url, concurrency=2)
            try:
                mode.start_workers()
                storms.append(storm(mode, label, seed))
            finally:
                mode.close()
            last = storms[-1]
            progress(
                f"storm ({label}): run {last.run_state}, {last.succeeded}/{last.tasks} "
                f"succeeded, {last.kills} kills, {last.duplicates_committed} double-committed, "
                f"{last.bodies_after_death} bodies after their worker died"
            )
        os.environ["MLP_MAX_TASKS_PER_PROCESS"] = "1"
        mode = Distributed(database_url, redis_url)
        try:
            startup = startup_kills(mode, STARTUP_KILLS)
        finally:
            mode.close()
        progress(
            f"start-up kills: {startup['rounds']} kills, {startup['during_startup']} before "
            f"the task body started, {startup['orphans']} task processes left"
        )
    finally:
        os.environ.pop("MLP_LEASE_SECONDS", None)
        os.environ.pop("MLP_MAX_TASKS_PER_PROCESS", None)
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
        "storms": [asdict(s) for s in storms],
        "startup_kills": startup,
        "storm_task_seconds": STORM_TASK_SECONDS,
        "storm_tasks": STORM_TASKS,
        "lease_seconds": LEASE_SECONDS,
        "kill_after_seconds": KILL_AFTER_SECONDS,
        "task_seconds": CRASH_TASK_SECONDS,
    }
