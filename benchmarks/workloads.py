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
