"""Run the workloads once on one peer: ``python -m benchmarks.peers SYSTEM WORKLOAD...``."""

from __future__ import annotations

import json
import os
import signal

# Starts the peers' own worker CLIs with fixed arguments, never a shell.
import subprocess  # nosec B404
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.measure import PeakRss
from benchmarks.sizes import CHAIN_LENGTH, FANOUT_WIDTH, SLEEP_SECONDS, SLEEP_TASKS

SIZES = {
    "fanout": FANOUT_WIDTH + 2,
    "chain": CHAIN_LENGTH,
    "sleeps": SLEEP_TASKS,
}


def _emit(
    workload: str, t0: float, starts: list[float], end: float, rss: int, **extra: Any
) -> None:
    record = {
        "workload": workload,
        "makespan": end - t0,
        "tasks": len(starts),
        "starts": sorted(s - t0 for s in starts),
        "peak_rss": rss,
        **extra,
    }
    print(json.dumps(record), flush=True)


def _on_worker(argv: list[str], app: Any, workloads: list[str]) -> None:
    """Start the peer's worker CLI, warm it up with a chain, then run the workloads through
    ``app``'s fanout, chain_of and sleeps; the tasks leave their marks in Redis."""
    from benchmarks.peers import marks

    marks.client().flushdb()
    # Fixed argv: the peer's own CLI from its own venv.
    worker = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )  # nosec B603
    try:
        warm = uuid.uuid4().hex
        app.chain_of(warm, CHAIN_LENGTH)
        marks.wait_for(warm, 1, timeout=120)
        for workload in workloads:
            key = uuid.uuid4().hex
            peak = PeakRss(lambda: [worker.pid])
            peak.start()
            t0 = time.time()
            if workload == "fanout":
                app.fanout(key, FANOUT_WIDTH)
                starts, end = marks.wait_for(key, 1)
            elif workload == "chain":
                app.chain_of(key, CHAIN_LENGTH)
                starts, end = marks.wait_for(key, 1)
            else:
                app.sleeps(key, SLEEP_TASKS, SLEEP_SECONDS)
                starts, end = marks.wait_for(key, SLEEP_TASKS)
            _emit(workload, t0, starts, end, peak.stop())
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        marks.client().flushdb()


def _broker_peer(system: str, workloads: list[str]) -> None:
    """Celery or Dramatiq: worker processes started here, tasks leave marks in Redis."""
    if system == "celery":
        from benchmarks.peers import celery_app as app

        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.peers.celery_app",
            "worker",
            "--concurrency",
            "2",
            "--pool",
            "prefork",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ]
    else:
        from benchmarks.peers import dramatiq_app as app  # type: ignore[no-redef]

        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "benchmarks.peers.dramatiq_app",
            "--processes",
            "2",
            "--threads",
            "1",
        ]
    _on_worker(argv, app, workloads)


@contextmanager
def _fresh_database() -> Iterator[None]:
    """The PostgreSQL peer's database (BENCH_PG_URL) made anew, and dropped after."""
    import psycopg
    from psycopg import sql

    url = os.environ["BENCH_PG_URL"]
    name = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(drop)


def _procrastinate(workloads: list[str]) -> None:
    """A fresh database with Procrastinate's schema, one `procrastinate worker -c 2`."""
    from benchmarks.peers import procrastinate_app as app

    argv = [
        sys.executable,
        "-m",
        "procrastinate",
        "--app",
        "benchmarks.peers.procrastinate_app.app",
        "worker",
        "--concurrency",
        "2",
    ]
    with _fresh_database(), app.app.open():
        app.app.schema_manager.apply_schema()
        _on_worker(argv, app, workloads)


def _dbos(workloads: list[str]) -> None:
    """A fresh database; one DBOS worker process serving a queue of 2 (it makes its schema)."""
    from benchmarks.peers import dbos_app as app

    with _fresh_database():
        _on_worker([sys.executable, "-m", "benchmarks.peers.dbos_app"], app, workloads)


def _dask(workloads: list[str]) -> None:
    from benchmarks.peers.dask_run import Dask

    dask = Dask()
    try:
        dask.chain_of(CHAIN_LENGTH)  # warm-up
        for workload in workloads:
            peak = PeakRss(lambda: [os.getpid()])
            peak.start()
            if workload == "fanout":
                t0, starts, end = dask.fanout(FANOUT_WIDTH)
            elif workload == "chain":
                t0, starts, end = dask.chain_of(CHAIN_LENGTH)
            else:
                t0, starts, end = dask.sleeps(SLEEP_TASKS, SLEEP_SECONDS)
            _emit(workload, t0, starts, end, peak.stop())
    finally:
        dask.close()


def _prefect(workloads: list[str]) -> None:
    from benchmarks.peers import prefect_run

    prefect_run.chain_flow(CHAIN_LENGTH)  # warm-up: starts the local API
    for workload in workloads:
        peak = PeakRss(lambda: [os.getpid()])
        peak.start()
        began = time.time()
        if workload == "fanout":
            t0, starts, end = prefect_run.fanout_flow(FANOUT_WIDTH)
        elif workload == "chain":
            t0, starts, end = prefect_run.chain_flow(CHAIN_LENGTH)
        else:
            t0, starts, end = prefect_run.sleeps_flow(SLEEP_TASKS, SLEEP_SECONDS)
        flow_seconds = time.time() - began
        _emit(workload, t0, starts, end, peak.stop(), flow_seconds=flow_seconds)


def main(argv: list[str]) -> int:
    system, workloads = argv[0], argv[1:] or list(SIZES)
    if system in ("celery", "dramatiq"):
        _broker_peer(system, workloads)
    elif system == "dask":
        _dask(workloads)
    elif system == "prefect":
        _prefect(workloads)
    elif system == "procrastinate":
        _procrastinate(workloads)
    elif system == "dbos":
        _dbos(workloads)
    else:
        print(f"unknown peer {system!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
