"""Prefect 3, local: tasks submitted concurrently (ThreadPoolTaskRunner) inside a flow.

Prefect saves each task run's state through its API (a local Prefect server on SQLite,
started once by the benchmark: PREFECT_API_URL). The workload's figures are taken inside the
flow, as for the others; the whole flow, state saving included, is ``flow_seconds``.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner


@task
def noop(value: int = 0) -> float:
    return time.time()


@task
def after(previous: Any, value: int) -> float:
    return time.time()


@task
def join(values: list[float]) -> tuple[float, float]:
    now = time.time()
    return now, now


@task
def sleep_for(seconds: float, value: int) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


@flow(task_runner=ThreadPoolTaskRunner(max_workers=2), persist_result=False, log_prints=False)
def fanout_flow(width: int) -> tuple[float, list[float], float]:
    t0 = time.time()
    root = noop.submit(0)
    leaves = [after.submit(root, i) for i in range(width)]
    end = join.submit(leaves)
    join_start, join_end = end.result()
    starts = [root.result(), *(leaf.result() for leaf in leaves), join_start]
    return t0, starts, join_end


@flow(task_runner=ThreadPoolTaskRunner(max_workers=2), persist_result=False)
def chain_flow(length: int) -> tuple[float, list[float], float]:
    t0 = time.time()
    futures = [noop.submit(0)]
    for i in range(1, length):
        futures.append(after.submit(futures[-1], i))
    starts = [f.result() for f in futures]
    return t0, starts, max(starts)


@flow(task_runner=ThreadPoolTaskRunner(max_workers=2), persist_result=False)
def sleeps_flow(count: int, seconds: float) -> tuple[float, list[float], float]:
    t0 = time.time()
    futures = [sleep_for.submit(seconds, i) for i in range(count)]
    spans = [f.result() for f in futures]
    return t0, [s for s, _ in spans], max(e for _, e in spans)
