"""DBOS Transact 3 on PostgreSQL (a durable peer: each workflow and step is a row it commits).

As its docs describe a worker with two slots: one process that launches DBOS and serves a
`Queue` with ``worker_concurrency=2``; the benchmark enqueues through a `DBOSClient`. The
queue is polled every 5 ms (``polling_interval_sec``; the default is 1 s, which would add up
to a second to every step of a chain). Each task is a workflow of its own on the queue, so that
two run at a time. DBOS has no DAG to declare: a chain step enqueues the next; the fan-out's
leaves count themselves in Redis and the last one enqueues the join, as with Procrastinate.

``python -m benchmarks.peers.dbos_app`` is the worker; it stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from dbos import DBOS, DBOSClient

from benchmarks.peers.marks import client, ended, started

QUEUE = "bench"


def _enqueue_here(workflow: object, *args: object) -> None:
    """From inside a workflow: the queue the worker registered."""
    queue = DBOS.retrieve_queue(QUEUE)
    assert queue is not None
    queue.enqueue(workflow, *args)


def _url() -> str:
    return os.environ.get("BENCH_PG_URL", "")


@DBOS.workflow(name="root")
def root(key: str, width: int) -> None:
    started(key)
    for _ in range(width):
        _enqueue_here(leaf, key, width)


@DBOS.workflow(name="leaf")
def leaf(key: str, width: int) -> None:
    started(key)
    if client().incr(f"{key}:done") == width:
        _enqueue_here(join, key)


@DBOS.workflow(name="join")
def join(key: str) -> None:
    started(key)
    ended(key)


@DBOS.workflow(name="step")
def step(key: str, index: int, length: int) -> None:
    started(key)
    if index + 1 == length:
        ended(key)
    else:
        _enqueue_here(step, key, index + 1, length)


@DBOS.workflow(name="sleep_for")
def sleep_for(key: str, seconds: float) -> None:
    started(key)
    time.sleep(seconds)
    ended(key)


_client: DBOSClient | None = None


def _ready_client() -> DBOSClient:
    """A client, once the worker has made DBOS's schema and registered the queue."""
    deadline = time.monotonic() + 120
    while True:
        try:
            found = DBOSClient(system_database_url=_url())
            if found.retrieve_queue(QUEUE) is not None:
                return found
            found.destroy()
        except Exception:  # noqa: BLE001 - the schema is not there yet
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _enqueue(workflow: str, *args: object) -> None:
    global _client
    if _client is None:
        _client = _ready_client()
    _client.enqueue({"queue_name": QUEUE, "workflow_name": workflow}, *args)


def fanout(key: str, width: int) -> None:
    _enqueue("root", key, width)


def chain_of(key: str, length: int) -> None:
    _enqueue("step", key, 0, length)


def sleeps(key: str, count: int, seconds: float) -> None:
    for _ in range(count):
        _enqueue("sleep_for", key, seconds)


def serve() -> None:
    DBOS(config={"name": "mlp-bench", "system_database_url": _url(), "log_level": "WARNING"})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=2, polling_interval_sec=0.005)
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=0)


if __name__ == "__main__":
    serve()
