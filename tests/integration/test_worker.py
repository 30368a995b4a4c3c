"""The worker's own guarantees, driven in this process: child crashes, leases, draining."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from ml_platform import task_runner
from ml_platform import worker as worker_module
from ml_platform.config import Settings
from ml_platform.dispatch import InProcessDispatcher
from ml_platform.engine.states import RUN_TERMINAL, AttemptState, RunState
from ml_platform.service import Outcome, Platform
from ml_platform.store.db import make_engine, reading, upgrade
from ml_platform.store.models import Attempt
from ml_platform.task_runner import is_running
from ml_platform.worker import Runtime, Worker
from tests import workflows
from tests.conftest import throwaway_database
from tests.helpers import pids_in, wait_for, wait_until_dead

pytestmark = pytest.mark.integration


_WORKERS: list[Worker] = []


@pytest.fixture(autouse=True)
def _close_workers() -> Iterator[None]:
    yield
    while _WORKERS:
        _WORKERS.pop().close()


def _runtime(platform: Platform, run_id: str, concurrency: int = 2) -> Runtime:
    dispatcher = InProcessDispatcher()
    worker = Worker(platform, dispatcher, concurrency=concurrency)
    _WORKERS.append(worker)
    return Runtime(platform, dispatcher, worker, only_run=run_id)


#: A real `mlp worker`, and a real `mlp server`, whose loops are replaced by a look at the
#: garbage collector.
_GC_PROBES = {
    "worker": """
import gc, sys
from ml_platform import worker
def probe(runtime, shutdown):
    print("frozen", gc.get_freeze_count(), flush=True)
    return "probed"
worker.run_until_shutdown = probe
sys.exit(worker.main(["--concurrency", "1"]))
""",
    "server": """
import gc, uvicorn
from ml_platform.config import load_settings
from ml_platform.server import serve
uvicorn.Server.run = lambda self: print("frozen", gc.get_freeze_count(), flush=True)
serve(load_settings(), "127.0.0.1", 0, 1)
""",
}


@pytest.mark.parametrize("process", sorted(_GC_PROBES))
def test_a_long_lived_process_keeps_what_it_made_to_start_out_of_the_collectors_reach(
    process: str, home: Path
) -> None:
    """What a worker or a server made to start (modules, the engine, the mappings, the routes)
    lasts as long as it: frozen, out of the cyclic collector's reach, so that a full collection
    while it works does not go through it all again (benchmarked: worker.freeze_what_lasts)."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    # Fixed argv: this interpreter and a probe of our own.
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", _GC_PROBES[process]],
        env=env,
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    frozen = int(done.stdout.split("frozen ", 1)[1].split()[0])
    assert frozen > 10_000, done.stdout


#: The last id PostgreSQL's 32-bit integer holds.
INT4_MAX = 2**31 - 1
ID_SEQUENCES = ["task_runs_id_seq", "attempts_id_seq", "params_id_seq", "artifacts_id_seq"]


def test_ids_past_2_to_the_31_keep_a_migrated_installation_running(home: Path) -> None:
    """An installation made before migration 0015, migrated, whose task runs, attempts,
    params and artifacts have used up PostgreSQL's 32-bit ids: a fan-out that writes every
    kind of row (output, params, metric points, artifacts, a cached copy) still runs through
    the worker and reads back. Before, every submission failed ("nextval: reached maximum
    value of sequence") and the batched finish's recordset ("out of range for type integer")."""
    with throwaway_database() as url:
        engine = make_engine(url)
        try:
            upgrade(engine, "0014")
            upgrade(engine)
            with engine.begin() as connection:
                for sequence in ID_SEQUENCES:
                    connection.execute(text(f"SELECT setval('{sequence}', {INT4_MAX - 2})"))
        finally:
            engine.dispose()
        settings = Settings(home=home, database_url_override=url, lease_seconds=2.0)
        platform = Platform(settings).start()
        try:
            runs = []
            for _ in range(2):  # the second reuses the first's results: cached_from
                submitted = platform.submit(workflows.recorded_fan, {"n": 4})
                runtime = _runtime(platform, submitted.run_id)
                assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
                runs.append(submitted.run_id)
            first, second = runs
            attempts = platform.attempts(first)
            assert len(attempts) == 5 and max(a.id for a in attempts) > INT4_MAX  # across it
            assert max(t.id for t in platform.task_runs(first)) > INT4_MAX
            reused = [t for t in platform.task_runs(second) if t.cached_from is not None]
            assert len(reused) == 4 and max(t.cached_from or 0 for t in reused) > INT4_MAX
            artifacts = platform.artifacts_of(first)
            assert len(artifacts) == 4 and max(a.id for _, a in artifacts) > INT4_MAX
            assert platform.task_params([first])[(first, "recorded[2]")] == {"x": 2}
            summaries = platform.metric_summaries([first])[first]
            [loss] = [m for m in summaries if m.task == "recorded[3]"]
            assert loss.points == 3
            assert "recording 1" in (platform.log(first, "recorded[1]").log or "")
            with platform.db.engine.begin() as connection:  # a part of a log still being shipped
                connection.execute(
                    text("INSERT INTO log_parts (attempt_id, start, text) VALUES (:a, 0, 'x')"),
                    {"a": max(a.id for a in attempts)},
                )
        finally:
            platform.close()


def test_a_task_process_killed_mid_task_fails_the_attempt_and_is_retried(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    submitted = sqlite_platform.submit(workflows.crash_pipeline, {"marker": str(marker)})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        runtime.tick()
    [child] = runtime.worker.children.values()
    os.kill(child.runner.process.pid, signal.SIGKILL)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    attempts = sqlite_platform.attempts(submitted.run_id)
    assert [a.state for a in attempts] == ["failed", "succeeded"]
    assert attempts[0].error == "task process killed by signal SIGKILL"


def _until_spawned(runtime: Runtime, pids: Path) -> list[int]:
    """Run passes until the spawner task noted its pid and those of its child and grandchild."""
    deadline = time.monotonic() + 30
    while len(pids_in(pids)) < 3:
        assert time.monotonic() < deadline, "the task never started its processes"
        runtime.worker.step() if runtime.worker.children else runtime.tick()
    return pids_in(pids)


def test_a_worker_that_lost_its_lease_stops_the_task_and_all_it_started(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    submitted = sqlite_platform.submit(workflows.spawning, {"pids": str(pids)})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    started = _until_spawned(runtime, pids)
    # Another scheduler decides the lease expired (e.g. this worker was paused too long).
    sqlite_platform.settings.lease_seconds = 0.2
    runtime.worker._beat()
    time.sleep(0.3)
    assert sqlite_platform.reap() == 1
    runtime.worker._beat()
    assert runtime.worker.children == {}
    # SIGTERM to the attempt's process group, SIGKILL after the grace: none is left.
    assert wait_until_dead(started) == []
    runtime.worker.close()
    assert runtime.worker.stopping == []
    states = [a.state for a in sqlite_platform.attempts(submitted.run_id)]
    assert states == ["lost", "queued"]  # retried on the lost budget though retries=0


def test_a_timeout_ends_the_task_its_child_and_its_grandchild(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    submitted = sqlite_platform.submit(workflows.spawning_past_timeout, {"pids": str(pids)})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    assert runtime.drive(submitted.run_id, timeout=30) is RunState.FAILED
    assert len(pids_in(pids)) == 3
    assert wait_until_dead(pids_in(pids)) == []
    [attempt] = sqlite_platform.attempts(submitted.run_id)
    assert "timeout" in (attempt.error or "")


def test_a_timed_out_task_keeps_what_it_printed_and_fails_as_timed_out(
    platform: Platform,
) -> None:
    """Its log (with a NUL, which PostgreSQL's text cannot hold) is stored with the timeout's
    failure; on PostgreSQL the NUL once failed the commit, and the attempt ended as "killed by
    signal SIGTERM" instead, the timeout's retry rule unapplied."""
    submitted = platform.submit(workflows.printed_then_timed_out, {})
    runtime = _runtime(platform, submitted.run_id)
    assert runtime.drive(submitted.run_id, timeout=30) is RunState.FAILED
    [attempt] = platform.attempts(submitted.run_id)
    assert (attempt.error or "").startswith("TimeoutError: task exceeded its 0.5 s timeout")
    assert attempt.log == "before\ufffdafter\n"


def test_the_next_attempt_in_a_warm_process_starts_where_a_fresh_one_would(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    """An attempt chdirs into a directory it removes, sets CUDA_VISIBLE_DEVICES and adds to
    sys.path; the next attempt in the same task process finds none of it."""
    folder = str(tmp_path / "scratch")
    submitted = sqlite_platform.submit(workflows.wander_then_look, {"folder": folder})
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    looked = next(
        t for t in sqlite_platform.task_runs(submitted.run_id) if t.node_id == "looks_around"
    )
    assert looked.result == {
        "value": {"same process": True, "cwd": os.getcwd(), "gpu": None, "path": False}
    }


def test_cancel_ends_the_task_its_child_and_its_grandchild(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    submitted = sqlite_platform.submit(workflows.spawning, {"pids": str(pids)})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    started = _until_spawned(runtime, pids)
    sqlite_platform.cancel(submitted.run_id)
    assert runtime.drive(submitted.run_id, timeout=30) is RunState.CANCELLED
    assert wait_until_dead(started) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_cancel_stops_a_running_task_within_seconds_not_at_the_next_heartbeat(
    kind: str, home: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With the default lease (30 s: a heartbeat every 10 s), a cancelled run's running task
    stops as soon as the worker next looks (it does so as often as it ships logs, each
    second), with its child and grandchild."""
    url = request.getfixturevalue("postgres_clean") if kind == "postgresql" else None
    platform = Platform(Settings(home=home, database_url_override=url)).start()
    assert platform.settings.heartbeat_seconds == 10
    try:
        pids = tmp_path / "pids"
        submitted = platform.submit(workflows.spawning, {"pids": str(pids)})
        runtime = _runtime(platform, submitted.run_id)
        started = _until_spawned(runtime, pids)
        runtime.worker.step()  # the first heartbeat is behind it: the next is 10 s away
        asked = time.monotonic()
        platform.cancel(submitted.run_id)
        assert runtime.drive(submitted.run_id, timeout=30) is RunState.CANCELLED
        assert time.monotonic() - asked < 4
        assert wait_until_dead(started) == []
        [attempt] = platform.attempts(submitted.run_id)
        assert attempt.state == "cancelled" and attempt.error == "run cancelled"
    finally:
        platform.close()


def test_processes_a_task_leaves_running_end_with_its_attempt(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    submitted = sqlite_platform.submit(workflows.spawning, {"pids": str(pids), "leave": True})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    assert runtime.drive(submitted.run_id, timeout=30) is RunState.SUCCEEDED
    task_process, *left = pids_in(pids)
    assert wait_until_dead(left, timeout=2) == []
    assert is_running(task_process)  # the warm process itself stays for the next attempt
    assert "stopped 2 process(es) the task left running" in (
        sqlite_platform.attempts(submitted.run_id)[0].log or ""
    )
    runtime.worker.close()
    assert wait_until_dead([task_process]) == []


def test_a_task_process_whose_worker_died_before_it_started_exits_at_once() -> None:
    """The worker's pid is given, not read: a child that finds another parent never runs."""
    read_end, write_end = os.pipe()
    not_the_parent = os.getppid()
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_platform.task_runner", str(write_end), str(not_the_parent)],
        stdin=subprocess.PIPE,
        pass_fds=(write_end,),
    )
    os.close(write_end)
    try:
        assert process.wait(timeout=30) == task_runner.ORPHAN_EXIT_CODE
    finally:
        os.close(read_end)
        assert process.stdin is not None
        process.stdin.close()


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


def _children(pid: int) -> list[int]:
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or not is_running(int(name)):
            continue
        try:
            if _status(int(name), "PPid") == pid:
                children.append(int(name))
        except OSError:  # it ended since the listing (another test's process, say)
            continue
    return children


def test_the_warden_is_a_fresh_small_interpreter_not_a_copy_of_the_task_process() -> None:
    """Every task process has a warden: it runs `python -S -I` (≈ 9 MiB), not the task
    process's interpreter with its imports that it was forked from (≈ 14 MiB)."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_platform.task_runner", str(write_end), str(os.getpid())],
        stdin=subprocess.PIPE,
        pass_fds=(write_end,),
        start_new_session=True,  # as a worker starts it: the warden ends this group
    )
    os.close(write_end)
    try:
        deadline = time.monotonic() + 30
        while True:
            wardens = _children(process.pid)
            if wardens and b"-S" in Path(f"/proc/{wardens[0]}/cmdline").read_bytes():
                break
            assert time.monotonic() < deadline, "no warden exec'd"
            time.sleep(0.01)
        [warden] = wardens
        assert os.getpgid(warden) == warden  # a group of its own: the task's kills spare it
        task_kib, warden_kib = _status(process.pid, "VmRSS"), _status(warden, "VmRSS")
        assert warden_kib < task_kib - 2048, (warden_kib, task_kib)
        process.kill()  # the warden outlives it only to end its group
        assert wait_until_dead([warden], timeout=5) == []
    finally:
        process.kill()
        process.wait(timeout=30)
        os.close(read_end)
        assert process.stdin is not None
        process.stdin.close()


@pytest.mark.parametrize(
    ("interpreter", "dies"), [("its own", "at once"), ("its own", "later"), ("gone", "later")]
)
def test_a_task_process_that_dies_has_its_group_ended_by_its_warden(
    tmp_path: Path, interpreter: str, dies: str
) -> None:
    """At once: the warden is still starting (before or while it execs its interpreter; its
    signal waits, blocked, across the exec). Later: it waits in the interpreter it exec'd,
    or, when it could not exec one (the venv removed under it), as the copy it is."""
    pids = tmp_path / "pids"
    gone = "sys.executable = '/nonexistent/python'\n" if interpreter == "gone" else ""
    settle = "time.sleep(0.5)\n" if dies == "later" else ""
    probe = (
        "import os, subprocess, sys, time\n"
        "from ml_platform import task_runner\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        f"{gone}"
        "task_runner._start_warden()\n"
        f"{settle}"
        "os._exit(0)\n"
    )
    for _ in range(3):
        leader = subprocess.Popen([sys.executable, "-c", probe], process_group=0)
        assert leader.wait(timeout=30) == 0
        [sleeper] = pids_in(pids)
        assert wait_until_dead([sleeper], timeout=5) == []


def test_a_warden_slow_to_run_is_out_of_the_group_before_a_task_can_end_it() -> None:
    """On a busy machine the forked warden may not run for a while: a task that ends meanwhile
    must not find it in its group, where the task's leftovers are killed (it once stopped "3
    process(es)" of a task that left 2, the third its own warden). Here the warden's first
    steps wait 1 s; the task process kills its leftovers at once, then dies: the warden is
    spared, and still ends the group (a child left after the first kill)."""
    probe = (
        "import os, subprocess, sys, time\n"
        "from ml_platform import task_runner\n"
        "fork = os.fork\n"
        "def slow_fork():\n"
        "    pid = fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(1.0)\n"
        "    return pid\n"
        "os.fork = slow_fork\n"
        "task_runner._prctl(task_runner.PR_SET_CHILD_SUBREAPER, 1)\n"
        "task_runner._GUARDED = True\n"
        "task_runner._start_warden()\n"
        "os.fork = fork\n"
        "quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}\n"
        "left = subprocess.Popen(['sleep', '300'], **quiet)\n"
        "killed = task_runner.end_leftovers()\n"
        "late = subprocess.Popen(['sleep', '300'], **quiet)\n"
        "print(killed, late.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    leader = subprocess.run(
        [sys.executable, "-c", probe], process_group=0, capture_output=True, text=True, timeout=30
    )
    assert leader.returncode == 0, leader.stderr
    killed, late = map(int, leader.stdout.split())
    try:
        assert killed == 1  # the sleep, not the warden
        assert wait_until_dead([late], timeout=5) == []  # the warden lived to end the group
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(late, signal.SIGKILL)


def test_draining_finishes_running_work_and_takes_no_more(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    submitted = sqlite_platform.submit(workflows.arithmetic, {"n": 4})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    runtime.worker.concurrency = 1
    while not runtime.worker.children:
        runtime.tick()
    runtime.worker.draining = True
    while runtime.worker.children:
        runtime.tick()
    states = [a.state for a in sqlite_platform.attempts(submitted.run_id)]
    assert states.count("succeeded") == 1 and states.count("running") == 0
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        Worker(sqlite_platform, InProcessDispatcher(), concurrency=0)


@pytest.mark.parametrize(("limit", "processes"), [(0, 1), (1, 3)])
def test_task_processes_are_reused_up_to_the_configured_limit(
    sqlite_platform: Platform, limit: int, processes: int
) -> None:
    sqlite_platform.settings.max_tasks_per_process = limit
    submitted = sqlite_platform.submit(workflows.three_steps, {})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    runtime.worker.concurrency = 1
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    pids = {t.result["value"] for t in sqlite_platform.task_runs(submitted.run_id) if t.result}
    assert len(pids) == processes
    assert os.getpid() not in pids  # never in the worker's own process
    assert len(runtime.worker.idle) == (1 if limit == 0 else 0)


@pytest.mark.parametrize("deaf", [False, True])
def test_a_task_process_a_worker_retires_gets_sigterm_then_sigkill_after_the_grace(
    sqlite_platform: Platform, tmp_path: Path, deaf: bool
) -> None:
    """Idle task processes end as running ones do: SIGTERM, SIGKILL only after the grace. What a
    task registered for it (a tracker's flush) runs when its worker stops; a process deaf to
    SIGTERM is killed once the grace is over, and the worker's close waits for no more."""
    sqlite_platform.settings.kill_grace_seconds = 1.0
    marker = tmp_path / "flushed"
    submitted = sqlite_platform.submit(workflows.flushing, {"path": str(marker), "deaf": deaf})
    runtime = _runtime(sqlite_platform, submitted.run_id)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    [runner] = runtime.worker.idle
    began = time.monotonic()
    runtime.worker.close()
    took = time.monotonic() - began
    assert runner.dead() and not runtime.worker.stopping
    if deaf:
        assert runner.process.returncode == -signal.SIGKILL and not marker.exists()
        assert 1.0 <= took < 5.0, took
    else:
        assert runner.process.returncode == 0 and took < 1.0, took
        assert marker.read_text() == f"flushed by {runner.process.pid}"


def _requests(*lines: dict[str, Any]) -> task_runner.Requests:
    """A task process's requests, as the worker writes them: JSON lines on a pipe."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    os.close(write_end)
    return task_runner.Requests(read_end)


def _serve(*lines: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a task process's loop here on these requests (its output pointed at each one's log,
    this process's given back afterwards); its answers."""
    replies = io.BytesIO()
    saved = os.dup(1), os.dup(2)
    requests = _requests(*lines)
    try:
        assert task_runner.serve(requests, replies) == 0
    finally:
        os.close(requests.fd)
        for fd, saved_fd in ((1, saved[0]), (2, saved[1])):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
    return [json.loads(line) for line in replies.getvalue().splitlines()]


#: A task process's request to run tests.workflows:double on 2 (a log path to be added).
DOUBLE_TWO: dict[str, Any] = {
    "run_id": "r",
    "node_id": "a",
    "number": 1,
    "task_ref": "tests.workflows:double",
    "code_version": workflows.double.code_version,
    "inputs": {"args": [2], "kwargs": {}},
    "options": {},
    "artifacts_dir": "/nonexistent",
    "inline_result_bytes": 1024,
}


def test_a_warm_process_with_an_older_copy_of_the_task_hands_it_to_a_fresh_one() -> None:
    changed = {**DOUBLE_TWO, "node_id": "b", "code_version": "0" * 64}
    with tempfile.TemporaryDirectory() as folder:
        log = str(Path(folder) / "log.txt")
        done, stale = _serve(*({**r, "log": log} for r in (DOUBLE_TWO, changed)))
    assert done["state"] == "succeeded" and done["result"] == {"value": 4}
    assert stale == {"stale": True}


def test_an_attempt_whose_log_cannot_be_opened_is_lost_saying_why_and_the_process_serves_on() -> (
    None
):
    """The worker's log directory gone under a warm process (a cleaner of /tmp): the attempt
    never begins and is answered as lost, with the reason, instead of the process dying with
    its traceback in the attempt before's log; the next attempt runs."""
    with tempfile.TemporaryDirectory() as folder:
        gone = str(Path(folder) / "gone" / "log.txt")
        log = str(Path(folder) / "log.txt")
        lost, done = _serve({**DOUBLE_TWO, "log": gone}, {**DOUBLE_TWO, "log": log})
    assert lost["state"] == "lost" and gone in lost["error"] and "No such file" in lost["error"]
    assert {"metrics", "params", "artifacts"} <= set(lost)  # what the worker reads of one
    assert done["state"] == "succeeded" and done["result"] == {"value": 4}


def test_a_worker_whose_log_directory_went_under_a_warm_process_loses_one_attempt_not_the_run(
    sqlite_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second step's log is named in a directory that is gone by the time its warm
    process opens it: that attempt is lost to the infrastructure, saying why, and retried;
    the run succeeds."""
    submitted = sqlite_platform.submit(workflows.three_steps, {})
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    real = runtime.worker._request
    named: list[int] = []

    def in_a_gone_directory(claimed: Any) -> tuple[dict[str, Any], Path]:
        request, log_path = real(claimed)
        named.append(claimed.attempt_id)
        if len(named) == 2:
            log_path = tmp_path / "gone" / log_path.name
            request["log"] = str(log_path)
        return request, log_path

    monkeypatch.setattr(runtime.worker, "_request", in_a_gone_directory)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    attempts = sqlite_platform.attempts(submitted.run_id)
    [lost] = [a for a in attempts if a.state == "lost"]
    assert lost.id == named[1] and "cannot write the attempt's log" in (lost.error or "")
    assert sorted(a.state for a in attempts) == ["lost"] + ["succeeded"] * 3
    assert {t.lost_attempts for t in sqlite_platform.task_runs(submitted.run_id)} == {0, 1}


def test_a_request_sent_ahead_runs_after_the_one_before_unless_taken_back_in_time() -> None:
    """The worker sends a claim ahead behind a running attempt; the process begins it as soon
    as it has answered, unless a revoke naming it came before that (answer: revoked, unrun).
    A revoke that comes once it began is too late and changes nothing."""

    def request(attempt: int, value: int, log: str) -> dict[str, Any]:
        return {
            "attempt": attempt,
            "run_id": "r",
            "node_id": f"n{attempt}",
            "number": 1,
            "task_ref": "tests.workflows:double",
            "code_version": workflows.double.code_version,
            "inputs": {"args": [value], "kwargs": {}},
            "options": {},
            "artifacts_dir": "/nonexistent",
            "inline_result_bytes": 1024,
            "log": log,
        }

    with tempfile.TemporaryDirectory() as folder:
        log = str(Path(folder) / "log.txt")
        answers = _serve(
            request(1, 1, log),
            request(2, 2, log),
            {"revoke": 2},  # in time: 2 waits behind 1
            request(3, 3, log),
            request(4, 4, log),
            {"revoke": 3},  # too late: 3 began once 1 (and 2) were answered
        )
    assert [a.get("result", a) for a in answers] == [
        {"value": 2},
        {"revoked": True},
        {"value": 6},
        {"value": 8},
    ]


def test_the_server_loop_looks_for_due_schedules_once_per_poll_not_once_per_pass(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle loop makes a pass every fifth of a poll (a busy one, hundreds a second): the
    cron query belongs to the poll's cadence."""
    from ml_platform.config import Settings
    from ml_platform.server import build

    settings = Settings(home=home, poll_seconds=0.2)
    platform, _dispatcher, loop = build(settings, concurrency=1)
    looked: list[float] = []
    fire = platform.fire_schedules

    def counted_fire() -> list[Any]:
        looked.append(time.monotonic())
        return fire()

    monkeypatch.setattr(platform, "fire_schedules", counted_fire)
    passes = 0
    tick = loop.runtime.tick

    def counted_tick() -> None:
        nonlocal passes
        passes += 1
        tick()

    monkeypatch.setattr(loop.runtime, "tick", counted_tick)
    loop.start()
    time.sleep(1.2)
    loop.stop()
    platform.close()
    # Idle, the loop makes about five passes per poll (~30 here; fewer on a busy machine) and
    # looks for schedules on one of them (a look on every pass would make the two equal).
    assert 2 <= len(looked) <= 8 and passes >= 2 * len(looked), (passes, looked)
    assert all(b - a >= 0.19 for a, b in zip(looked, looked[1:])), looked


def test_a_chain_of_short_steps_runs_on_one_transaction_a_step(sqlite_platform: Platform) -> None:
    """Finish and continue through the worker: once its process is warm, each short step
    starts in the commit that ended the one before, on the same worker (no dispatch)."""
    submitted = sqlite_platform.submit(workflows.relay, {"n": 6})
    dispatcher = InProcessDispatcher()
    worker = Worker(sqlite_platform, dispatcher, concurrency=1)
    _WORKERS.append(worker)
    dispatcher.publish(submitted.queued)
    runtime = Runtime(sqlite_platform, dispatcher, worker, only_run=submitted.run_id)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    attempts = sqlite_platform.attempts(submitted.run_id)
    assert len(attempts) == 6 and {a.worker_id for a in attempts} == {worker.worker_id}
    # The first step's time includes importing the workflow module: not a short task.
    for before, after in zip(attempts[1:], attempts[2:]):
        assert after.started_at == before.finished_at, (before, after)
    results = {t.node_id: t.result for t in sqlite_platform.task_runs(submitted.run_id)}
    assert results["double[5]"] == {"value": 64.0}  # each step read the one before


def _calls(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> list[Any]:
    """The first argument of each call of ``target.name`` from now on (each call goes on)."""
    seen: list[Any] = []
    original = getattr(target, name)

    def recorded(first: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(first)
        return original(first, *args, **kwargs)

    monkeypatch.setattr(target, name, recorded)
    return seen


def test_short_attempts_are_claimed_ahead_and_committed_in_batches(
    sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fan-out of tasks shorter than a commit on one slot: the worker claims a batch of
    them ahead and commits their outcomes together, several to a transaction, each task run
    once and every attempt ending succeeded."""
    submitted = sqlite_platform.submit(workflows.arithmetic, {"n": 60})
    together = _calls(monkeypatch, sqlite_platform, "finish_and_claim")
    alone = _calls(monkeypatch, sqlite_platform, "finish")
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    attempts = sqlite_platform.attempts(submitted.run_id)
    assert len(attempts) == 61 and {a.state for a in attempts} == {"succeeded"}
    batches = [len(finished) for finished in together]
    assert max(batches) > 1 and len([b for b in batches if b]) < 60 / 2, batches
    assert len(alone) <= 1, batches  # none committed on its own (but perhaps the first)
    results = {t.node_id: t.result for t in sqlite_platform.task_runs(submitted.run_id)}
    assert results["total"] == {"value": float(sum(2 * i for i in range(60)))}


def test_outcomes_of_unlike_lengths_still_share_their_commit(
    sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A brief task among short ones, while the worker holds claims ahead: the outcomes it
    collected (the short ones held for their batch, and the brief one) are committed in one
    transaction that claims nothing more (enough is claimed), never one by one."""
    submitted = sqlite_platform.submit(workflows.mixed_lengths, {})
    alone = _calls(monkeypatch, sqlite_platform, "finish")
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    attempts = sqlite_platform.attempts(submitted.run_id)
    assert len(attempts) == 48 and {a.state for a in attempts} == {"succeeded"}
    assert len(alone) <= 1, [c.node_id for c in alone]  # perhaps the very first


def test_a_chain_on_its_own_worker_does_not_ask_the_dispatcher_before_every_step(
    sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain's short steps continue on the worker that finished the step before: after the
    dispatcher had nothing, the worker does not ask it again before each step (a Redis round
    trip for nothing), only every QUIET_SECONDS; work published meanwhile is still taken."""
    # Long enough that a loaded machine (coverage, four test processes on two cores) cannot
    # make a step outlast it: the count below is then about the rule, not the machine.
    monkeypatch.setattr(worker_module, "QUIET_SECONDS", 1.0)
    submitted = sqlite_platform.submit(workflows.relay, {"n": 40})
    dispatcher = InProcessDispatcher()
    asked = _calls(monkeypatch, dispatcher, "receive")
    worker = Worker(sqlite_platform, dispatcher, concurrency=1)
    _WORKERS.append(worker)
    dispatcher.publish(submitted.queued)
    runtime = Runtime(sqlite_platform, dispatcher, worker)
    other = None
    while sqlite_platform.run(submitted.run_id)[0].state not in ("succeeded", "failed"):
        runtime.tick()
        done = sum(t.state == "succeeded" for t in sqlite_platform.task_runs(submitted.run_id))
        if other is None and done >= 20:  # work published while the chain goes on
            other = sqlite_platform.submit(workflows.echo_pipeline, {"value": "meanwhile"})
            dispatcher.publish(other.queued)
    assert sqlite_platform.run(submitted.run_id)[0].state == "succeeded"
    assert len(asked) < 40 / 2, asked  # not before each of the 40 steps
    assert other is not None
    assert runtime.drive(other.run_id, timeout=30) is RunState.SUCCEEDED


def _ended_at(stamps: Path) -> dict[str, float]:
    """When each stamped nap ended (wall clock), by node id."""
    words = [line.split() for line in stamps.read_text().splitlines()]
    return {f"stamped_nap[{index}]": float(at) for index, at in words}


def _started_at(attempt: Attempt) -> float:
    started = attempt.started_at
    assert started is not None
    return (started if started.tzinfo else started.replace(tzinfo=UTC)).timestamp()


def test_brief_attempts_start_on_claims_made_while_the_ones_before_ran(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    """Claims ahead: while a brief attempt runs, the worker commits the outcome of the one
    before together with a claim of the next; when the running one ends, the next starts on
    that claim, with no claim (and no dispatch) between the two tasks."""
    stamps = tmp_path / "ends"
    params = {"path": str(stamps), "n": 8, "seconds": 0.1}
    submitted = sqlite_platform.submit(workflows.stamped_naps, params)
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    ended = _ended_at(stamps)
    tasks = {t.id: t.node_id for t in sqlite_platform.task_runs(submitted.run_id)}
    naps = sorted(
        (a for a in sqlite_platform.attempts(submitted.run_id) if tasks[a.task_run_id] in ended),
        key=_started_at,
    )
    assert [a.state for a in naps] == ["succeeded"] * 8  # each once, none lost
    ahead = [
        _started_at(after) < ended[tasks[before.task_run_id]]
        for before, after in zip(naps, naps[1:], strict=False)
    ]
    # The first nap is not known to be brief until it ends (and includes the module's import).
    assert sum(ahead) >= 5, ahead


def test_a_claim_sent_ahead_begins_when_the_task_before_ends_without_waiting_for_the_worker(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    """The next brief attempt is sent to the busy task process behind the running one: it
    begins the moment that one is answered, even while the worker is busy elsewhere (here: not
    stepping at all), instead of after the worker's next pass."""
    stamps = tmp_path / "ends"
    params = {"path": str(stamps), "n": 6, "seconds": 0.5}  # see _until_reserved
    submitted = sqlite_platform.submit(workflows.stamped_naps, params)
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    _until_reserved(runtime)
    _send_ahead(runtime)
    [ahead] = runtime.worker.reserved

    def ended() -> bool:
        return ahead.claimed.node_id in (_ended_at(stamps) if stamps.exists() else {})

    assert not ended()
    # The worker does nothing: the running nap ends, and the one sent ahead runs and ends.
    wait_for(ended, timeout=15, what="the nap sent ahead to run while the worker waits")
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    attempts = sqlite_platform.attempts(submitted.run_id)
    assert sorted(a.state for a in attempts) == ["succeeded"] * 7  # each once: 6 naps, 1 join


def test_a_task_process_killed_with_a_claim_sent_ahead_to_it_runs_that_claim_elsewhere(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    """kill -9 of a task process while a claim is sent ahead to it: its running attempt fails
    (and is retried), and the claim sent ahead, which never began there, runs once in a fresh
    process on the same claim."""
    stamps = tmp_path / "ends"
    params = {"path": str(stamps), "n": 4, "seconds": 0.5}  # see _until_reserved
    submitted = sqlite_platform.submit(workflows.stamped_naps, params)
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    ahead = _until_reserved(runtime)
    _send_ahead(runtime)
    [(running, child)] = runtime.worker.children.items()
    os.kill(child.runner.process.pid, signal.SIGKILL)
    runtime.drive(submitted.run_id, timeout=60)  # failed: the killed nap had no retries
    attempts = {a.id: a for a in sqlite_platform.attempts(submitted.run_id)}
    assert attempts[running].state == "failed"
    assert "killed by signal SIGKILL" in (attempts[running].error or "")
    assert attempts[ahead].state == "succeeded"  # the same claim, begun in another process
    tasks = {t.id: t.node_id for t in sqlite_platform.task_runs(submitted.run_id)}
    assert tasks[attempts[ahead].task_run_id] in _ended_at(stamps)
    ended = [line.split()[0] for line in stamps.read_text().splitlines()]
    assert len(ended) == len(set(ended))  # none ran twice


EDITED_NAPS = """
import time

from ml_platform.sdk import task, workflow


@task
def nap(x: int, seconds: float, path: str) -> int:
    time.sleep(seconds)
    with open(path, "a") as stamps:
        stamps.write(f"{{x}} {body}\\n")
    return x


@workflow
def naps(path: str, n: int = 2, seconds: float = 0.1) -> None:
    for i in range(n):
        nap(i, seconds, path)
"""


def test_a_stale_task_process_loses_nothing_that_was_sent_ahead_to_it(
    sqlite_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm task process holding an older copy of the task's module answers `stale` to a
    newer attempt and exits; the claim already sent ahead to it never began there. Both run
    once, in a fresh process, on their first attempt: no hand-back, no retry."""
    code = tmp_path / "code"
    code.mkdir()
    module = code / "edited_naps.py"
    module.write_text(EDITED_NAPS.format(body="first"))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
    stamps = tmp_path / "stamps"
    first = sqlite_platform.submit(
        importlib.import_module("edited_naps").naps, {"path": str(stamps), "n": 1, "seconds": 0}
    )
    runtime = _runtime(sqlite_platform, first.run_id, concurrency=1)
    assert runtime.drive(first.run_id, timeout=60) is RunState.SUCCEEDED
    [warm] = runtime.worker.idle  # it imported the first copy of the module

    module.write_text(EDITED_NAPS.format(body="second, edited"))
    sys.modules.pop("edited_naps")
    second = sqlite_platform.submit(
        importlib.import_module("edited_naps").naps, {"path": str(stamps), "n": 2, "seconds": 0.3}
    )
    worker = runtime.worker
    runtime.dispatcher.publish(second.queued)
    for delivery in runtime.dispatcher.receive(2):
        claimed = sqlite_platform.claim(delivery.attempt_id, worker.worker_id)
        assert claimed is not None
        worker.reserved.append(worker_module._Reserved(claimed, delivery, time.monotonic()))
    # One starts in the warm process, the other is sent ahead to it. The process is held
    # meanwhile: else it may find its copy stale and exit before the second is sent.
    os.kill(warm.process.pid, signal.SIGSTOP)
    try:
        worker._start_reserved()
        [child] = worker.children.values()
        [ahead] = worker.reserved
        assert child.runner is warm and ahead.runner is warm
    finally:
        os.kill(warm.process.pid, signal.SIGCONT)

    after = Runtime(sqlite_platform, runtime.dispatcher, worker, only_run=second.run_id)
    assert after.drive(second.run_id, timeout=60) is RunState.SUCCEEDED
    assert not wait_until_dead([warm.process.pid])
    attempts = sqlite_platform.attempts(second.run_id)
    assert [(a.number, a.state) for a in attempts] == [(1, "succeeded")] * 2, attempts
    assert {t.lost_attempts for t in sqlite_platform.task_runs(second.run_id)} == {0}
    assert sorted(stamps.read_text().splitlines()) == [
        "0 first",
        "0 second, edited",
        "1 second, edited",
    ]


def _until_reserved(runtime: Runtime) -> int:
    """Run passes until the worker claims ahead; the tests then act while the running nap
    still runs. Naps of 0.5 s: brief enough to be claimed ahead (< BRIEF_SECONDS), long enough
    to outlast a few passes on a slow, loaded machine (at 0.2 s, the nap ended first once)."""
    deadline = time.monotonic() + 30
    while not runtime.worker.reserved:
        assert time.monotonic() < deadline, "the worker never claimed ahead"
        runtime.tick()
    return runtime.worker.reserved[0].claimed.attempt_id


def _send_ahead(runtime: Runtime) -> None:
    """One more pass: the claim made ahead is sent to the busy task process, behind its task."""
    runtime.tick()
    [ahead] = runtime.worker.reserved
    assert ahead.runner is not None and not ahead.revoking


def _holds(runtime: Runtime, attempt_id: int) -> bool:
    worker = runtime.worker
    held = [*worker.children, *(r.claimed.attempt_id for r in worker.reserved)]
    return attempt_id in held or attempt_id in {c.claimed.attempt_id for c in worker.ended}


@pytest.mark.parametrize("sent_ahead", [False, True], ids=["waiting", "sent ahead"])
@pytest.mark.parametrize("why", ["draining", "waited too long for a slot"])
def test_a_claim_made_ahead_is_handed_back_unrun_and_charges_nothing(
    sqlite_platform: Platform, tmp_path: Path, why: str, sent_ahead: bool
) -> None:
    """A drain takes no more work, and a claim made ahead that waits too long (the task
    before turned out long) may be run sooner elsewhere: either way it is handed back without
    running, retried at once, on no budget; the run still succeeds. One already sent to the
    busy task process is revoked there, and never begins."""
    stamps = tmp_path / "ends"
    params = {"path": str(stamps), "n": 4, "seconds": 0.5}  # see _until_reserved
    submitted = sqlite_platform.submit(workflows.stamped_naps, params)
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    reserved = _until_reserved(runtime)
    if sent_ahead:
        _send_ahead(runtime)
    if why == "draining":
        runtime.worker.draining = True
    else:
        runtime.worker.reserved[0].since -= 60
    runtime.tick()
    # Ended in that pass, even one sent ahead (its process would tell only once the task
    # before ended, which may be long): another worker may take its retry at once.
    [given] = [a for a in sqlite_platform.attempts(submitted.run_id) if a.id == reserved]
    assert (given.state, given.error) == ("lost", f"handed back: {why}")
    deadline = time.monotonic() + 30
    while _holds(runtime, reserved):  # one sent ahead: until its process has answered
        assert time.monotonic() < deadline, "the claim made ahead was never let go"
        runtime.tick()
    again = [
        a for a in sqlite_platform.attempts(submitted.run_id) if a.task_run_id == given.task_run_id
    ]
    assert [a.state for a in again][:1] == ["lost"] and len(again) == 2  # retried at once
    node = next(
        t.node_id for t in sqlite_platform.task_runs(submitted.run_id) if t.id == given.task_run_id
    )
    if why == "draining":
        assert node not in _ended_at(stamps)  # it never ran
    [task] = [t for t in sqlite_platform.task_runs(submitted.run_id) if t.id == given.task_run_id]
    assert task.lost_attempts == 0  # a hand-back is not a loss
    while runtime.worker.has_work:
        runtime.tick()
    assert not runtime.worker.reserved
    ended = _runtime(sqlite_platform, submitted.run_id, concurrency=1).drive(
        submitted.run_id, timeout=60
    )
    story = [
        (a.task_run_id, a.number, a.state, a.error, (a.log or "")[-1500:])
        for a in sqlite_platform.attempts(submitted.run_id)
    ]
    assert ended is RunState.SUCCEEDED, story


def test_a_hand_back_with_the_database_away_leaves_claims_ahead_to_their_lease(
    sqlite_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutting down while the database does not answer: the claim made ahead cannot be
    handed back; the worker says so and lets it go (its lease runs out, the reaper retries
    it) instead of failing the shutdown."""
    params = {"path": str(tmp_path / "ends"), "n": 4, "seconds": 0.5}
    submitted = sqlite_platform.submit(workflows.stamped_naps, params)
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    events: list[str] = []
    runtime.worker.on_event = events.append
    reserved = _until_reserved(runtime)

    def away(*_: object, **__: object) -> None:
        raise OperationalError("UPDATE attempts", {}, Exception("the database went away"))

    monkeypatch.setattr(sqlite_platform, "finish", away)
    runtime.worker.hand_back("shut down")
    assert runtime.worker.reserved == [] and not runtime.worker.children
    assert any(e.startswith("could not hand back stamped_nap[") for e in events), events
    monkeypatch.undo()
    [held] = [a for a in sqlite_platform.attempts(submitted.run_id) if a.id == reserved]
    assert held.state == "running"  # still leased: the reaper's to retry once it expires


@pytest.mark.parametrize("sent_ahead", [False, True], ids=["waiting", "sent ahead"])
def test_a_cancel_stops_a_claim_made_ahead_as_it_starts(
    sqlite_platform: Platform, tmp_path: Path, sent_ahead: bool
) -> None:
    """A run cancelled while the worker holds a claim ahead for it (waiting for a slot, or
    sent to the busy task process): that attempt ends cancelled, its task never finishes, and
    the worker holds nothing of the run afterwards."""
    stamps = tmp_path / "ends"
    # Naps brief enough to be claimed ahead (< BRIEF_SECONDS), long enough that the worker's
    # next look for cancels (every CANCEL_LOOK_SECONDS) comes before one ends, on a loaded
    # machine too (at 0.2 s, one ended first once, with 4 test workers on 2 cores).
    params = {"path": str(stamps), "n": 6, "seconds": 0.5}
    submitted = sqlite_platform.submit(workflows.stamped_naps, params)
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    reserved = _until_reserved(runtime)
    if sent_ahead:
        _send_ahead(runtime)
    [task_run_id] = [r.claimed.task_run_id for r in runtime.worker.reserved]
    assert sqlite_platform.cancel(submitted.run_id) is RunState.RUNNING  # its attempts stop
    deadline = time.monotonic() + 30
    while runtime.worker.has_work:
        assert time.monotonic() < deadline, "the worker kept the cancelled run's attempts"
        runtime.tick()
    [ended] = [a for a in sqlite_platform.attempts(submitted.run_id) if a.id == reserved]
    assert ended.state == "cancelled"
    node = next(
        t.node_id for t in sqlite_platform.task_runs(submitted.run_id) if t.id == task_run_id
    )
    assert node not in _ended_at(stamps)  # it never finished
    assert sqlite_platform.run(submitted.run_id)[0].state == RunState.CANCELLED


def test_only_the_log_directories_of_this_host_s_gone_workers_are_removed(tmp_path: Path) -> None:
    """What a worker removes as it makes its log directory (the kill itself:
    test_process_faults.py): a directory of a process of this host that is gone; not a live
    one's, not another host's whose name goes on from this one's, not another user's (where
    the tests run as root, which can make one), not a file."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now
    prefix = "mlp-logs-vm-"
    names = {
        f"{prefix}{dead.pid}-abc_12": False,
        f"{prefix}{os.getpid()}-def": True,  # alive
        f"mlp-logs-vm-2-{dead.pid}-ghi": True,  # host "vm-2"
        "elsewhere": True,
    }
    others = f"{prefix}{dead.pid}-jkl"  # a gone worker of another user: not ours to remove
    if os.getuid() == 0:
        names[others] = True
    for name in names:
        (tmp_path / name).mkdir()
    if others in names:
        os.chown(tmp_path / others, 65534, 65534)
    (tmp_path / f"{prefix}{dead.pid}-file").write_text("")  # not a directory
    worker_module._remove_gone_workers_logs(tmp_path, prefix)
    assert {name for name, kept in names.items() if kept} | {f"{prefix}{dead.pid}-file"} == {
        p.name for p in tmp_path.iterdir()
    }


def test_a_step_whose_answer_is_lost_after_its_commit_is_fenced_out_and_the_next_reaped(
    postgres_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain's step is one statement (service.hot_path): it ends the attempt and starts and
    claims the next step for this worker. Here PostgreSQL commits it and the connection breaks
    before the answer arrives, so the worker cannot know it was kept. The transaction path
    then finds the attempt ended and is fenced out: the step ran and was committed once. The
    next step, claimed for this worker without its knowing, is reaped when its lease runs
    out and retried; every step is committed once and the run succeeds."""
    platform = postgres_platform
    real = platform._continue_in
    broken: list[str] = []

    def committed_then_broken(conn: Any, claimed: Any, *args: Any) -> Any:
        rows, ends_run = real(conn, claimed, *args)
        if not broken and rows and rows[0].ended and not ends_run:
            broken.append(claimed.node_id)
            conn.invalidate()  # the connection is gone, after PostgreSQL's commit
            raise OperationalError("FINISH_AND_CONTINUE", {}, ConnectionError("connection lost"))
        return rows, ends_run

    monkeypatch.setattr(platform, "_continue_in", committed_then_broken)
    submitted = platform.submit(workflows.relay, {"n": 3})
    runtime = _runtime(platform, submitted.run_id, concurrency=1)
    events: list[str] = []
    runtime.worker.on_event = events.append
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    assert len(broken) == 1, "no step was continued in one statement"
    tasks = sorted(platform.task_runs(submitted.run_id), key=lambda t: t.position)
    attempts = platform.attempts(submitted.run_id)
    states = [[a.state for a in attempts if a.task_run_id == t.id] for t in tasks]
    after = [t.node_id for t in tasks].index(broken[0]) + 1
    # The broken step: once. The next: lost with its lease (never begun), then run once.
    assert states[after - 1] == ["succeeded"], states
    assert states[after] == ["lost", "succeeded"], states
    assert all(s == ["succeeded"] for i, s in enumerate(states) if i != after), states
    assert tasks[after].lost_attempts == 1
    assert [t.state for t in tasks] == ["succeeded"] * 3
    # The worker says its outcome was kept, not discarded: it asked once it was fenced out.
    assert f"succeeded {broken[0]} (attempt 1; committed, though the commit's answer was lost)" in (
        events
    ), events
    assert not any(e.startswith("discarded") for e in events), events


def test_a_fenced_out_outcome_is_said_to_be_discarded_unless_it_was_the_one_committed(
    sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the worker says when its outcome is refused: discarded when another ended the
    attempt (here a cancel); kept when the attempt ended as this very outcome, by this worker
    (a commit whose answer was lost); discarded when the database cannot tell."""
    platform = sqlite_platform
    worker = Worker(platform, InProcessDispatcher(), concurrency=1, worker_id="w1")
    _WORKERS.append(worker)
    done = Outcome(AttemptState.SUCCEEDED, result={"value": 1})
    first = platform.submit(workflows.echo_pipeline, {})
    claimed = platform.claim(first.queued[0].attempt_id, "w1")
    assert claimed is not None
    platform.cancel(first.run_id)  # the attempt ends cancelled: not this worker's outcome
    assert worker._fenced_out(claimed, done) == (
        f"discarded {claimed.node_id}: attempt 1 is no longer held by w1"
    )
    second = platform.submit(workflows.echo_pipeline, {})
    claimed = platform.claim(second.queued[0].attempt_id, "w1")
    assert claimed is not None
    platform.finish(claimed, "w1", done)
    assert worker._fenced_out(claimed, done) == (
        f"succeeded {claimed.node_id} (attempt 1; committed, though the commit's answer was lost)"
    )
    assert worker._fenced_out(claimed, Outcome(AttemptState.FAILED, error="x")).startswith(
        "discarded"
    )

    def away(_attempt_id: int) -> None:
        raise OperationalError("SELECT attempts", {}, Exception("the database went away"))

    monkeypatch.setattr(platform, "attempt_end", away)  # the database away: it cannot tell
    assert worker._fenced_out(claimed, done).startswith("discarded")


def test_attempt_logs_live_in_the_worker_s_own_directory_which_goes_with_it(
    sqlite_platform: Platform,
) -> None:
    """A worker names each attempt's log in a directory of its own (mode 0700: no other user
    can put a link where a task process will write) and leaves the file's creation to the
    task process; the logs arrive as before, and the directory is removed when the worker
    closes."""
    submitted = sqlite_platform.submit(workflows.chatty_pipeline, {"seconds": 0.0})
    runtime = _runtime(sqlite_platform, submitted.run_id, concurrency=1)
    worker = runtime.worker
    while not worker.children:
        runtime.tick()
    [child] = worker.children.values()
    folder = child.log_path.parent
    assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
    assert folder.name.startswith("mlp-logs-")
    assert runtime.drive(submitted.run_id, timeout=60) is RunState.SUCCEEDED
    [attempt] = sqlite_platform.attempts(submitted.run_id)
    assert attempt.log is not None and "first line" in attempt.log and "second line" in attempt.log

    # Taken from under the worker between two tasks (a cleaner of /tmp): the next attempt
    # runs and logs all the same, in a directory made anew.
    shutil.rmtree(folder)
    again = sqlite_platform.submit(workflows.chatty_pipeline, {"seconds": 0.0})
    runtime.only_run = again.run_id
    assert runtime.drive(again.run_id, timeout=60) is RunState.SUCCEEDED
    [attempt] = sqlite_platform.attempts(again.run_id)
    assert attempt.state == "succeeded" and attempt.log and "second line" in attempt.log
    assert worker._logs is not None and worker._logs != folder
    folder = worker._logs
    worker.close()
    assert not folder.exists()


def test_a_fan_out_a_worker_queues_has_the_tables_it_grew_analyzed(home: Path) -> None:
    """A task that fans out (here `task.map` over 60 elements, made when it ends) grows the
    tables in the worker's commit, not at the submission: the worker has them analyzed once
    it has published the fan-out (Database.refresh_statistics), so that the claims of its
    tasks are planned on what the tables hold."""
    with throwaway_database() as url:
        platform = Platform(Settings(home=home, database_url_override=url)).start()
        try:
            submitted = platform.submit(workflows.mapped_naps, {"n": 60, "seconds": 0.0})
            runtime = _runtime(platform, submitted.run_id)
            assert runtime.drive(submitted.run_id, timeout=120) is RunState.SUCCEEDED
            with reading(platform.db.engine) as conn:
                analyzed = conn.execute(
                    text("SELECT relname, reltuples FROM pg_class WHERE relname = ANY(:names)"),
                    {"names": ["task_runs", "attempts"]},
                ).all()
        finally:
            platform.close()
    # 3 task runs submitted (too few to analyze), 60 made and queued by the worker's commit.
    assert {name: rows >= 60 for name, rows in analyzed} == {"task_runs": True, "attempts": True}


class _CountingDispatcher(InProcessDispatcher):
    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def receive(self, limit: int, block_seconds: float = 0.0) -> list[Any]:
        self.looks += 1
        return super().receive(limit, block_seconds)


def test_a_long_task_beside_a_free_slot_keeps_the_worker_looking_a_few_times_a_second(
    home: Path, tmp_path: Path
) -> None:
    """With an attempt running and a slot free, the worker looks for new work again 5 ms
    after anything happened and twice as late after each empty look, up to a fifth of its
    poll (0.1 s here): about a dozen looks in a second, not two hundred; new work still
    starts within that."""
    platform = Platform(Settings(home=home, poll_seconds=0.5)).start()
    dispatcher = _CountingDispatcher()
    worker = Worker(platform, dispatcher, concurrency=2)
    runtime = Runtime(platform, dispatcher, worker)
    try:
        marker = tmp_path / "running"
        long_run = platform.submit(workflows.long_pipeline, {"marker": str(marker)})
        dispatcher.publish(long_run.queued)
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "the long task did not start"
            runtime.tick()
        dispatcher.looks = 0
        began = time.monotonic()
        while time.monotonic() - began < 1.0:
            runtime.tick()
        assert 1 <= dispatcher.looks <= 30, dispatcher.looks  # one every 5 ms: ≈ 200

        short = platform.submit(workflows.arithmetic, {"n": 1})
        dispatcher.publish(short.queued)
        published = time.monotonic()
        while not platform.attempts(short.run_id) or not any(
            a.started_at for a in platform.attempts(short.run_id)
        ):
            assert time.monotonic() - published < 5, "new work waited for the long task"
            runtime.tick()
        assert worker.children  # the long task still runs beside it
    finally:
        worker.stop_all("the test is over")
        worker.close()
        platform.close()


def test_a_pool_slot_freed_by_one_run_starts_another_runs_waiting_task(platform: Platform) -> None:
    """Two runs share a pool of one slot. When the first run's task ends, the worker that
    finished it admits the second run's waiting task and dispatches it at once. Before, it
    waited for a scheduler's full pass (every 2 s by default), which this test never runs."""
    platform.set_pool("tests-pool", 1)
    first = platform.submit(workflows.pooled_pipeline, {})
    second = platform.submit(workflows.pooled_pipeline, {})
    assert len(first.queued) == 1 and second.queued == []  # the slot is the first run's
    dispatcher = InProcessDispatcher()
    worker = Worker(platform, dispatcher, concurrency=1)
    _WORKERS.append(worker)
    dispatcher.publish(first.queued)
    deadline = time.monotonic() + 30
    while RunState(platform.run(second.run_id)[0].state) not in RUN_TERMINAL:
        assert time.monotonic() < deadline, [a.state for a in platform.attempts(second.run_id)]
        if not worker.step():
            worker.wait_for_replies(0.05)
    assert (
        platform.run(first.run_id)[0].state
        == platform.run(second.run_id)[0].state
        == (RunState.SUCCEEDED)
    )
