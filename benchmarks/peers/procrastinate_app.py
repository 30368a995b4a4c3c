"""Procrastinate 3 on PostgreSQL (a durable peer: every job is a row it commits).

As its docs recommend: the psycopg 3 connector, one `procrastinate worker` process with
``--concurrency 2`` (two jobs at a time, sync tasks in its threads), woken by LISTEN/NOTIFY.
Procrastinate has no DAG: a chain step defers the next; the fan-out's leaves count themselves
in Redis and the last one defers the join, as a user would write it.
"""

from __future__ import annotations

import os
import time

import procrastinate

from benchmarks.peers.marks import client, ended, started

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("BENCH_PG_URL", ""))
)


@app.task(name="root")
def root(key: str, width: int) -> None:
    started(key)
    leaf.batch_defer(*({"key": key, "width": width} for _ in range(width)))


@app.task(name="leaf")
def leaf(key: str, width: int) -> None:
    started(key)
    if client().incr(f"{key}:done") == width:
        join.defer(key=key)


@app.task(name="join")
def join(key: str) -> None:
    started(key)
    ended(key)


@app.task(name="step")
def step(key: str, index: int, length: int) -> None:
    started(key)
    if index + 1 == length:
        ended(key)
    else:
        step.defer(key=key, index=index + 1, length=length)


@app.task(name="sleep_for")
def sleep_for(key: str, seconds: float) -> None:
    started(key)
    time.sleep(seconds)
    ended(key)


def fanout(key: str, width: int) -> None:
    root.defer(key=key, width=width)


def chain_of(key: str, length: int) -> None:
    step.defer(key=key, index=0, length=length)


def sleeps(key: str, count: int, seconds: float) -> None:
    sleep_for.batch_defer(*({"key": key, "seconds": seconds} for _ in range(count)))
