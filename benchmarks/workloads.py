"""The benchmark workloads as ml_platform workflows (the peers' versions live in ``peers``)."""

from __future__ import annotations

import os
import time

from benchmarks.sizes import (
    CHAIN_LENGTH,
    CRASH_TASK_SECONDS,
    FANOUT_WIDTH,
    SLEEP_SECONDS,
    SLEEP_TASKS,
    STORM_TASK_SECONDS,
    STORM_TASKS,
)
from ml_platform.sdk import Backoff, task, workflow


@task
def noop(value: int = 0) -> int:
    return value


@task
def after(previous: int, value: int) -> int:
    return value


@task
def join(values: list[int]) -> int:
    return len(values)


@task
def sleep_for(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


@task(retries=3, retry_backoff=Backoff(base=0.1, factor=1.0, max_delay=0.1, jitter=0.0))
def slow(seconds: float, marker: str) -> str:
    """Notes each execution's start and end in ``marker``: the crash benchmark counts them."""
    with open(marker, "a") as handle:
        handle.write(f"start {os.getpid()} {time.time()}\n")
    time.sleep(seconds)
    with open(marker, "a") as handle:
        handle.write(f"end {os.getpid()} {time.time()}\n")
    return "done"


@workflow
def fanout(width: int = FANOUT_WIDTH) -> None:
    root = noop(0)
    join([after(root, i) for i in range(width)])


@task
def count_to(n: int) -> list[int]:
    return list(range(n))


@workflow
def mapped_fanout(width: int = FANOUT_WIDTH) -> None:
    """The fan-out above, but over a list a task computed (`task.map`): 1 → width → 1."""
    join(after.map(count_to(width), previous=0))


@workflow
def chain(length: int = CHAIN_LENGTH) -> None:
    value = noop(0)
    for i in range(1, length):
        value = after(value, i)


@workflow
def sleeps(count: int = SLEEP_TASKS, seconds: float = SLEEP_SECONDS) -> None:
    for i in range(count):
        sleep_for(seconds, i)


@workflow
def crash(marker: str, seconds: float = CRASH_TASK_SECONDS) -> None:
    slow(seconds, marker)


@task
def marked(index: int, seconds: float, folder: str) -> int:
    """A plain task (default ``retries=0``) that notes its start and end with pid and time."""
    path = os.path.join(folder, f"task-{index}.txt")
    with open(path, "a") as handle:
        handle.write(f"start {os.getpid()} {time.time()}\n")
    time.sleep(seconds)
    with open(path, "a") as handle:
        handle.write(f"end {os.getpid()} {time.time()}\n")
    return index


@workflow
def storm(folder: str, n: int = STORM_TASKS, seconds: float = STORM_TASK_SECONDS) -> None:
    for i in range(n):
        marked(i, seconds, folder)
