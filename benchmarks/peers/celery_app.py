"""Celery 5 with the Redis broker (and result backend, which chords need)."""

from __future__ import annotations

import os
import time

from celery import Celery, chain, chord, group

from benchmarks.peers.marks import ended, started

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    worker_prefetch_multiplier=4,
    task_ignore_result=False,
    result_expires=600,
    broker_connection_retry_on_startup=True,
)


@app.task
def noop(key: str, value: int = 0) -> int:
    started(key)
    return value


@app.task
def after(previous: int, key: str, value: int, last: bool = False) -> int:
    started(key)
    if last:
        ended(key)
    return value


@app.task
def join(values: list[int], key: str) -> int:
    started(key)
    ended(key)
    return len(values)


@app.task
def sleep_for(key: str, seconds: float) -> None:
    started(key)
    time.sleep(seconds)
    ended(key)


def fanout(key: str, width: int) -> None:
    chain(noop.s(key), chord([after.s(key, i) for i in range(width)], join.s(key))).apply_async()


def chain_of(key: str, length: int) -> None:
    steps = [after.s(key, i, i == length - 1) for i in range(1, length)]
    chain(noop.s(key), *steps).apply_async()


def sleeps(key: str, count: int, seconds: float) -> None:
    group(sleep_for.s(key, seconds) for _ in range(count)).apply_async()
