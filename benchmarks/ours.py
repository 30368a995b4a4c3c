"""ml_platform under the benchmark workloads: distributed (PostgreSQL + Redis) and embedded."""

from __future__ import annotations

import os
import shutil
import signal

# The bench starts our own CLI with fixed arguments, never a shell.
import subprocess  # nosec B404
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from benchmarks import workloads
from benchmarks.measure import PeakRss
from ml_platform.config import Settings
from ml_platform.dispatch import InProcessDispatcher
from ml_platform.engine.states import RUN_TERMINAL, RunState
from ml_platform.sdk import Workflow
from ml_platform.service import Platform
from ml_platform.store.models import utcnow
from ml_platform.worker import Runtime, Worker, make_dispatcher

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "mlp_bench"
WORKERS = 2


def _admin_url(database_url: str) -> str:
    url = make_url(database_url)
    return url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )


def reset_database(database_url: str) -> str:
    """Drop and create the bench database; return its URL."""
    with psycopg.connect(_admin_url(database_url), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    url = make_url(database_url).set(drivername="postgresql+psycopg", database=BENCH_DB)
    return url.render_as_string(hide_password=False)


def drop_database(database_url: str) -> None:
    with psycopg.connect(_admin_url(database_url), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


@dataclass
class RunFigures:
    """What one run of a workload measured, from the database's own timestamps."""

    makespan: float
    tasks: int
    starts: list[float] = field(default_factory=list)  # seconds from submit to each start
    peak_rss: int = 0


def _figures(platform: Platform, run_id: str, submitted_at: Any) -> RunFigures:
    run, _ = platform.run(run_id)
    if run.state != RunState.SUCCEEDED:
        raise RuntimeError(f"benchmark run {run_id[:8]} ended {run.state}")
    attempts = platform.attempts(run_id)
    starts = sorted((a.started_at - submitted_at).total_seconds() for a in attempts)
    assert run.finished_at is not None  # nosec B101 - a succeeded run has ended
    return RunFigures((run.finished_at - submitted_at).total_seconds(), len(attempts), starts)


def _wait_for_end(platform: Platform, run_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while RunState(platform.run(run_id)[0].state) not in RUN_TERMINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark run {run_id[:8]} did not end within {timeout} s")
        # The figures come from the run's own timestamps, not from this loop: look rarely,
        # so that the bench process takes no CPU from the workers it measures.
        time.sleep(0.1)


def _wait_for_ready(worker: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Wait until a worker says it is ready. Its output (a line per task) goes to a file, as
    the peers' goes to /dev/null: read through a pipe, every line would wake this process, on
    the cores the workload runs on."""
    deadline = time.monotonic() + timeout
    while b"ready" not in log.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            output = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the bench's worker did not start: {output}")
        time.sleep(0.05)


class Distributed:
    """Two ``mlp worker`` processes on PostgreSQL and Redis; this process submits."""

    def __init__(self, database_url: str, redis_url: str, concurrency: int = 1) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mlp-bench-"))
        self.env = {
            **os.environ,  # MLP_LEASE_SECONDS and the like reach the workers
            "DATABASE_URL": reset_database(database_url),
            "REDIS_URL": redis_url,
            "MLP_REDIS_PREFIX": f"mlp-bench-{os.getpid()}",
            "ML_PLATFORM_HOME": str(self.home),
            "PYTHONPATH": str(ROOT),
        }
        self.database_url = database_url
        self.concurrency = concurrency
        self.workers: list[subprocess.Popen[bytes]] = []
        settings = Settings(
            database_url_override=self.env["DATABASE_URL"],
            redis_url=redis_url,
            redis_prefix=self.env["MLP_REDIS_PREFIX"],
            home=self.home,
        )
        self.platform = Platform(settings).start()
        self.dispatcher = make_dispatcher(self.platform, "bench-submitter")

    def start_workers(self, count: int = WORKERS) -> None:
        for _ in range(count):
            # Fixed argv: our own CLI through this interpreter.
            log = self.home / f"worker-{len(self.workers)}.log"
            with log.open("wb") as out:
                worker = subprocess.Popen(  # nosec B603
                    [
                        sys.executable,
                        "-m",
                        "ml_platform",
                        "worker",
                        "--concurrency",
                        str(self.concurrency),
                    ],
                    env=self.env,
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.workers.append(worker)
            _wait_for_ready(worker, log)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.wait(timeout=60)
        self.workers.clear()

    def run(self, wf: Workflow, params: dict[str, Any], timeout: float = 300) -> RunFigures:
        sampler = PeakRss(lambda: [w.pid for w in self.workers])
        sampler.start()
        submitted_at = utcnow()
        submitted = self.platform.submit(wf, params)
        self.dispatcher.publish(submitted.queued)
        try:
            _wait_for_end(self.platform, submitted.run_id, timeout)
        finally:
            peak = sampler.stop()
        figures = _figures(self.platform, submitted.run_id, submitted_at)
        figures.peak_rss = peak
        return figures

    def close(self) -> None:
        """Stop the workers, then remove what this mode made: its database and its home (the
        crash section's marks are in it too)."""
        try:
            self.stop_workers()
            self.platform.close()
            drop_database(self.database_url)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


class Embedded:
    """The embedded default: SQLite and the in-process dispatcher, in this process.

    One worker serves every run, as in an embedded `mlp server`: its task processes stay
    warm from one run to the next, as the distributed workers' and the peers' do. (A cold
    `mlp run` starts them first: ≈ 60-90 ms once, see docs/benchmarks-analysis.md.)
    """

    def __init__(self, concurrency: int = WORKERS) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mlp-bench-embedded-"))
        self.platform = Platform(Settings(home=self.home)).start()
        self.concurrency = concurrency
        self.dispatcher = InProcessDispatcher()
        self.worker = Worker(self.platform, self.dispatcher, concurrency=concurrency)

    def run(
        self,
        wf: Workflow,
        params: dict[str, Any],
        timeout: float = 300,
        on_progress: Callable[[Platform, str], None] | None = None,
    ) -> RunFigures:
        sampler = PeakRss(lambda: [os.getpid()])
        sampler.start()
        runtime = Runtime(self.platform, self.dispatcher, self.worker)
        try:
            submitted_at = utcnow()
            submitted = self.platform.submit(wf, params)
            self.dispatcher.publish(submitted.queued)
            run_id = submitted.run_id
            watch = None if on_progress is None else (lambda: on_progress(self.platform, run_id))
            runtime.drive(run_id, timeout=timeout, on_progress=watch)
        finally:
            peak = sampler.stop()
        figures = _figures(self.platform, submitted.run_id, submitted_at)
        figures.peak_rss = peak
        return figures

    def close(self) -> None:
        try:
            self.worker.close()
            self.platform.close()
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


@contextmanager
def distributed(database_url: str, redis_url: str, concurrency: int = 1) -> Iterator[Distributed]:
    mode = Distributed(database_url, redis_url, concurrency)
    try:
        mode.start_workers()
        yield mode
    finally:
        mode.close()


WORKLOADS: dict[str, tuple[Workflow, dict[str, Any]]] = {
    "fanout": (workloads.fanout, {}),
    "mapped_fanout": (workloads.mapped_fanout, {}),
    "chain": (workloads.chain, {}),
    "sleeps": (workloads.sleeps, {}),
}
