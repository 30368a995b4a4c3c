"""Faults of real processes: killed workers, task processes that start as their worker dies,
drains and hand-backs on SIGTERM, a server that must run the code submitted to it.

Workers and servers are real `mlp` processes on the session's PostgreSQL and Redis (or the
embedded SQLite, where the test is about the embedded server).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_platform.client import Client
from ml_platform.config import Settings
from ml_platform.service import Platform
from ml_platform.task_runner import task_processes_of
from ml_platform.worker import log_dir_prefix
from tests import workflows
from tests.forked import ZYGOTE, Forked
from tests.helpers import pids_in, wait_for, wait_until_dead, wait_until_ready
from tests.integration.test_server import PASSWORD
from tests.services import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def env(distributed_env: dict[str, str]) -> dict[str, str]:
    return dict(distributed_env, MLP_LOST_BACKOFF_SECONDS="0.1", MLP_KILL_GRACE_SECONDS="1")


@pytest.fixture
def platform(distributed_platform: Platform) -> Platform:
    return distributed_platform


@pytest.fixture
def spawn(env: dict[str, str]) -> Iterator[Spawn]:
    """Start `mlp ARGS…` with the test's environment (plus ``extra``); stopped at the end."""
    started: list[Forked] = []

    def start(*args: str, extra: dict[str, str] | None = None, cwd: Path = ROOT) -> Any:
        # Forked from a warm copy of `python -m ml_platform` (tests/forked.py).
        process = ZYGOTE.spawn(list(args), {**env, **(extra or {})}, cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        if process.stdout is not None and not process.stdout.closed:
            process.communicate()


def worker_pid(worker_id: str | None) -> int:
    return int((worker_id or "::").split(":")[1])


def running_on(platform: Platform, run_id: str) -> dict[int, list[str]]:
    """The running attempts of a run by worker pid: {pid: [node ids]}."""
    by_pid: dict[int, list[str]] = {}
    attempts = platform.attempts(run_id)  # first: each one's task run is stored before it
    task_of = {t.id: t.node_id for t in platform.task_runs(run_id)}
    for attempt in attempts:
        if attempt.state == "running":
            by_pid.setdefault(worker_pid(attempt.worker_id), []).append(
                task_of[attempt.task_run_id]
            )
    return by_pid


def test_kill_9_of_busy_workers_fails_no_task_of_default_retries(
    platform: Platform, spawn: Spawn, tmp_path: Path
) -> None:
    """Plain tasks (retries=0): every attempt a killed worker held is lost, then retried."""
    # Their temporary directory of their own: no worker of another test removes their logs.
    logs = tmp_path / "tmp"
    logs.mkdir()
    tmp = {"TMPDIR": str(logs)}
    pool = {p.pid: p for p in (spawn("worker", "-c", "2", extra=tmp) for _ in range(2))}
    submitted = platform.submit(workflows.naps, {"n": 8, "seconds": 1.0})

    def busy() -> list[int]:  # live workers running attempts (the dead keep theirs a while)
        running = running_on(platform, submitted.run_id)
        return [pid for pid in running if pid in pool and log_dirs_of(pid, logs)]

    victims = []
    for kill in range(2):
        wait_for(busy, what="a busy worker")
        victim_pid = busy()[0]
        victim = pool.pop(victim_pid)
        victim.kill()
        victim.communicate()
        victims.append(victim_pid)
        assert wait_until_dead(task_processes_of(victim_pid), timeout=2) == []
        if kill == 0:  # after the second kill, the survivor finishes alone
            fresh = spawn("worker", "-c", "2", extra=tmp)
            pool[fresh.pid] = fresh
    wait_for(lambda: platform.run(submitted.run_id)[0].state in ("succeeded", "failed"))
    assert platform.run(submitted.run_id)[0].state == "succeeded"
    tasks = platform.task_runs(submitted.run_id)
    assert {t.state for t in tasks} == {"succeeded"}
    attempts = platform.attempts(submitted.run_id)
    lost = [a for a in attempts if a.state == "lost"]
    assert lost and all("lease expired" in (a.error or "") for a in lost)
    assert sum(t.lost_attempts for t in tasks) == len(lost)
    # Fencing: each task's result was committed once, by one attempt.
    assert sum(a.state == "succeeded" for a in attempts) == len(tasks)
    # Nothing of a killed worker removes its attempts' log directory: the next worker here
    # does as it makes its own, and keeps a live worker's (its own).
    for survivor in pool.values():
        survivor.terminate()
        survivor.communicate()
    last = spawn("worker", "-c", "1", extra=tmp)
    again = platform.submit(workflows.naps, {"n": 1, "seconds": 0.0})
    wait_for(lambda: platform.run(again.run_id)[0].state == "succeeded")
    assert not any(log_dirs_of(pid, logs) for pid in victims)
    assert log_dirs_of(last.pid, logs)


def log_dirs_of(worker_pid: int, folder: Path) -> list[Path]:
    """The attempt-log directories of the worker with that pid (Worker._log_dir)."""
    return list(folder.glob(f"{log_dir_prefix()}{worker_pid}-*"))


def test_a_killed_workers_task_process_child_and_grandchild_all_end(
    platform: Platform, spawn: Spawn, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    worker = spawn("worker", "-c", "1")
    submitted = platform.submit(workflows.spawning, {"pids": str(pids)})
    wait_for(lambda: len(pids_in(pids)) == 3, what="the task's processes")
    worker.kill()
    worker.communicate()
    assert wait_until_dead(pids_in(pids), timeout=2) == []
    platform.cancel(submitted.run_id)


def test_a_worker_killed_while_its_task_process_starts_leaves_no_orphan(
    platform: Platform, spawn: Spawn
) -> None:
    """A fresh task process per attempt: the kill lands while the process is starting."""
    submitted = platform.submit(workflows.naps, {"n": 4, "seconds": 0.5})
    fresh = {"MLP_MAX_TASKS_PER_PROCESS": "1"}
    for _ in range(2):  # the crash benchmark does it 20 times
        worker = spawn("worker", "-c", "1", extra=fresh)
        wait_for(lambda: worker.pid in running_on(platform, submitted.run_id), what="a claim")
        worker.kill()  # claimed a moment ago: its task process is being started
        worker.communicate()
        assert wait_until_dead(task_processes_of(worker.pid), timeout=2) == []
    spawn("worker", "-c", "2")
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
    assert {t.state for t in platform.task_runs(submitted.run_id)} == {"succeeded"}


def test_sigterm_lets_the_running_attempt_finish_and_exits_0(
    platform: Platform, spawn: Spawn
) -> None:
    worker = spawn("worker", "-c", "1")
    submitted = platform.submit(workflows.naps, {"n": 1, "seconds": 1.5})
    wait_for(lambda: running_on(platform, submitted.run_id), what="a running attempt")
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    assert "draining: 1 running attempt(s)" in output and "stopped: drained" in output
    [nap] = [t for t in platform.task_runs(submitted.run_id) if t.node_id == "nap"]
    assert nap.state == "succeeded"


@pytest.mark.parametrize("how", ["past the drain deadline", "at a second SIGTERM"])
def test_a_worker_that_stops_hands_back_without_charging_retries(
    platform: Platform, spawn: Spawn, tmp_path: Path, how: str
) -> None:
    pids = tmp_path / "pids"
    drain = "0.5" if how == "past the drain deadline" else "300"
    worker = spawn("worker", "-c", "1", extra={"MLP_DRAIN_SECONDS": drain})
    submitted = platform.submit(workflows.spawning, {"pids": str(pids), "seconds": 300.0})
    wait_for(lambda: len(pids_in(pids)) == 3, what="the task's processes")
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    if how == "at a second SIGTERM":
        time.sleep(0.5)  # draining now, for up to 300 s
        worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    assert time.monotonic() - started < 10  # not the 300 s of the task, nor of the drain
    assert "handed back 1 attempt(s)" in output
    assert wait_until_dead(pids_in(pids), timeout=2) == []
    [task] = platform.task_runs(submitted.run_id)
    first, retry = platform.attempts(submitted.run_id)
    assert (first.state, retry.state, task.state) == ("lost", "queued", "queued")
    assert (first.error or "").startswith("handed back")
    assert task.lost_attempts == 0  # a hand-back charges no budget at all
    platform.cancel(submitted.run_id)


def test_sigterm_to_an_embedded_server_drains_hands_back_and_a_restart_finishes(
    spawn: Spawn, tmp_path: Path
) -> None:
    home = tmp_path / "embedded"
    embedded = {
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "ML_PLATFORM_HOME": str(home),
        "MLP_DRAIN_SECONDS": "2",
    }
    platform = Platform(Settings(home=home)).start()
    try:
        port = str(free_port())
        server = spawn("server", "--port", port, "-c", "2", extra=embedded)
        wait_until_ready(f"http://127.0.0.1:{port}")
        submitted = platform.submit(workflows.short_and_long, {"short": 0.5, "long": 3.0})
        wait_for(
            lambda: sum(map(len, running_on(platform, submitted.run_id).values())) == 2,
            what="both naps running",
        )
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
        states = {t.node_id: t.state for t in platform.task_runs(submitted.run_id)}
        assert states == {"nap[0]": "succeeded", "nap[1]": "queued"}, output
        handed = [a for a in platform.attempts(submitted.run_id) if a.state == "lost"]
        assert len(handed) == 1 and (handed[0].error or "").startswith("handed back")

        server = spawn("server", "--port", port, "-c", "2", extra=embedded)
        wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded", timeout=60)
        assert {t.lost_attempts for t in platform.task_runs(submitted.run_id)} == {0}
    finally:
        platform.close()


STALE_MODULE = """
from ml_platform.sdk import task, workflow


@task(cache=True)
def body() -> str:
    return {value!r}


@workflow
def pipeline() -> None:
    body()
"""


def test_a_running_server_runs_the_code_submitted_to_it(spawn: Spawn, tmp_path: Path) -> None:
    """Edit a task between two submissions: the second run has a new version, misses the
    cache and executes the new body, without a restart of the server."""
    code = tmp_path / "code"
    code.mkdir()
    module = code / "edited_pipeline.py"
    module.write_text(textwrap.dedent(STALE_MODULE.format(value="first body")))
    home = tmp_path / "embedded"
    embedded = {"DATABASE_URL": "", "REDIS_URL": "", "ML_PLATFORM_HOME": str(home)}
    created = subprocess.run(
        [sys.executable, "-m", "ml_platform", "users", "create", "alice", "--admin"]
        + ["--password-stdin"],
        env={**os.environ, **embedded},
        input=PASSWORD,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn("server", "--port", str(port), "-c", "1", extra=embedded, cwd=code)
    wait_until_ready(url)
    client = Client(url)
    client.login("alice", PASSWORD)

    def run_once() -> tuple[dict[str, object], dict[str, object]]:
        run = client.submit("edited_pipeline:pipeline", {})
        wait_for(lambda: client.run(str(run["id"]))["state"] in ("succeeded", "failed"))
        [task] = client.tasks(str(run["id"]))
        return client.run(str(run["id"])), task

    first_run, first_task = run_once()
    assert (first_run["state"], first_run["workflow_version"]) == ("succeeded", 1)
    module.write_text(textwrap.dedent(STALE_MODULE.format(value="the edited body")))
    later = time.time() + 2  # a newer mtime than the bytecode cache, whatever the clock
    os.utime(module, (later, later))
    second_run, second_task = run_once()
    assert (second_run["state"], second_run["workflow_version"]) == ("succeeded", 2)
    assert second_task["state"] == "succeeded"  # ran: not a cache hit on the old body
    logs = client.logs(str(second_run["id"]), "body", None)
    assert logs["state"] == "succeeded"
    platform = Platform(Settings(home=home)).start()
    try:
        results = [t.result for t in platform.task_runs(str(second_run["id"]))]
    finally:
        platform.close()
    assert results == [{"value": "the edited body"}]
    client.close()


def _children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of each child of ``pid``, from /proc."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
        if int(ppid) == pid:
            found.append((int(name), state.decode()))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace of its own needs root")
def test_as_a_containers_pid_1_the_worker_reaps_the_orphans_it_inherits(tmp_path: Path) -> None:
    """In a container `mlp worker` is PID 1: every task process's warden ends as its orphan.
    And the process numbers outside its namespace mean nothing in it: it leaves alone the log
    directory of a live worker outside (here: this test's process) in the /tmp it shares."""
    outside = Path(tempfile.mkdtemp(prefix=f"{log_dir_prefix()}{os.getpid()}-"))
    home = tmp_path / "embedded"
    platform = Platform(Settings(home=home)).start()
    env = dict(
        os.environ,
        DATABASE_URL="",
        REDIS_URL="",
        ML_PLATFORM_HOME=str(home),
        MLP_MAX_TASKS_PER_PROCESS="1",
        MLP_POLL_SECONDS="0.1",
    )
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    namespace = subprocess.Popen(
        [*argv, sys.executable, "-m", "ml_platform", "worker", "-c", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        submitted = platform.submit(workflows.naps, {"n": 4, "seconds": 0.1})
        wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
        wait_for(lambda: _children_of(namespace.pid), what="the worker as PID 1")
        [(init, _)] = _children_of(namespace.pid)
        time.sleep(0.5)  # a few passes after the last attempt's process ended
        zombies = [pid for pid, state in _children_of(init) if state == "Z"]
        assert zombies == []
        os.kill(init, signal.SIGTERM)
        assert namespace.wait(timeout=30) == 0
        assert outside.is_dir()  # its worker is alive, if not in the namespace's eyes
    finally:
        if namespace.poll() is None:
            namespace.kill()
            namespace.wait()
        platform.close()
        shutil.rmtree(outside, ignore_errors=True)
