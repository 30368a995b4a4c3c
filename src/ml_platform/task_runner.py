"""The warm task process: ``python -m ml_platform.task_runner REPLY_FD WORKER_PID``.

A worker keeps a few of these processes and hands them attempts one after another, so an
attempt costs a pipe round trip instead of a Python start-up and the workflow module's
imports. Each request is one JSON line on stdin naming the attempt and its log file; the
process points its stdout and stderr at that file, runs the task, and writes the outcome as
one JSON line to REPLY_FD. A process that finds its copy of a task older than the one
submitted exits with a ``stale`` reply, and the worker starts a fresh one.

An attempt's processes live and die with it. The worker starts this process as the leader of
a process group of its own; whatever the task starts joins that group. On Linux:

- this process asks the kernel for SIGKILL when its worker dies (``PR_SET_PDEATHSIG``), then
  checks that its parent is still the worker whose pid it was given: a worker that died
  before the request is seen by that check, one that dies after it by the kernel. No window.
- a *warden* (forked at start-up, in a group of its own, holding nothing) asks the kernel to
  be told when this process dies, however it dies, and then kills the whole group: the
  task's children and grandchildren go with it.
- this process is a child subreaper, so what a task leaves running becomes its child; after
  each attempt one ``waitid`` tells whether anything is left, and it is killed.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from ml_platform.artifacts import ArtifactStore, encode_value
from ml_platform.inputs import decode_inputs
from ml_platform.sdk import Skip, Task, TaskContext, _reset_context, _set_context, qualified_name

ORPHAN_EXIT_CODE = 70
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: The signal the kernel sends the warden when the task process dies.
WARDEN_SIGNAL = signal.SIGUSR1
#: Whether this process is a task process bound to its worker (bind_to_worker on Linux).
_GUARDED = False


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def bind_to_worker(worker_pid: int) -> None:
    """Make this process, and everything it will start, end when the worker ``worker_pid`` does."""
    if not sys.platform.startswith("linux"):
        threading.Thread(target=_watch_parent, args=(worker_pid,), daemon=True).start()
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:  # the worker died before the kernel was asked to tell
        os._exit(ORPHAN_EXIT_CODE)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _start_warden()
    global _GUARDED
    _GUARDED = True


def _watch_parent(worker_pid: int) -> NoReturn:
    """Where the kernel cannot tell (not Linux): poll for the worker's death."""
    while True:
        if os.getppid() != worker_pid:
            os._exit(ORPHAN_EXIT_CODE)
        time.sleep(0.5)


#: What the warden runs once it is bound: a fresh interpreter without site (≈ 9 MiB), not the
#: copy of the task process it was forked as (≈ 14 MiB; with a worker of 2 slots, 4 wardens).
#: WARDEN_SIGNAL is blocked across the exec, so one sent meanwhile is pending, not lost.
_WARDEN_CODE = (
    "import os, signal, sys\n"
    "signal.sigwait({int(sys.argv[1])})\n"
    "try:\n"
    "    os.killpg(int(sys.argv[2]), signal.SIGKILL)\n"
    "except ProcessLookupError:\n"
    "    pass\n"
)


def _start_warden() -> None:
    """Fork the warden, which kills this process group as soon as this process is gone."""
    group = os.getpgid(0)
    task_process = os.getpid()
    warden = os.fork()
    if warden != 0:
        # Out of our group before any task runs, as the shells do it: from both sides, whichever
        # runs first (the child may not run for a while on a busy machine, and a task that ends
        # meanwhile would kill it with what it left in the group).
        try:
            os.setpgid(warden, warden)
        except OSError:
            pass  # it exec'd already (EACCES), having left the group itself
        return
    try:  # the warden: holds no pipe or file of the task process, ignores terminal signals
        os.setpgid(0, 0)
        for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
            if fd > 2:
                try:
                    os.close(fd)
                except OSError:
                    pass  # the directory listing's own descriptor
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_IGN)  # ignored dispositions survive the exec
        signal.pthread_sigmask(signal.SIG_BLOCK, {WARDEN_SIGNAL})
        _prctl(PR_SET_PDEATHSIG, WARDEN_SIGNAL)  # kept across the exec (not a set-uid binary)
        if os.getppid() == task_process:  # else it is gone already
            argv = [sys.executable, "-S", "-I", "-c", _WARDEN_CODE, str(WARDEN_SIGNAL.value)]
            try:  # its fixed code, this interpreter: no shell, no input
                os.execv(sys.executable, [*argv, str(group)])
            except OSError:
                signal.sigwait({WARDEN_SIGNAL})  # no interpreter to exec: wait as we are
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing was left in the group
    finally:
        os._exit(0)


def group_members(group: int) -> list[int]:
    """The processes of process group ``group`` (Linux: read from /proc)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # ended meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == group and fields[0] != b"Z":
            members.append(int(name))
    return members


def is_running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not; Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


def task_processes_of(worker_pid: int) -> list[int]:
    """The task processes that worker ``worker_pid`` started and that still run (Linux)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        # python -m ml_platform.task_runner REPLY_FD WORKER_PID
        if b"ml_platform.task_runner" in argv and argv[-2:-1] == [str(worker_pid).encode()]:
            if is_running(int(name)):
                found.append(int(name))
    return found


def end_leftovers() -> int:
    """Kill what the last attempt started and left running; return how many were killed."""
    if not _GUARDED:  # only a task process ends what is left in its group
        return 0
    group = os.getpgid(0)
    me = os.getpid()
    try:  # as a subreaper, anything left in our group is our child or has a living parent
        os.waitid(os.P_PGID, group, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0
    killed = 0
    for _ in range(10):  # a process may fork while the group is read: read again
        others = [pid for pid in group_members(group) if pid != me]
        if not others:
            break
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        _reap_group(group)
    _reap_group(group)
    return killed


def _reap_group(group: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-group, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)  # killed, not yet dead


def import_task(reference: str) -> Task[..., Any]:
    module_name, _, attr_path = reference.partition(":")
    obj: Any = __import__(module_name, fromlist=["_"])
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Task):
        raise TypeError(f"{reference} is not a task (decorate it with @task)")
    return obj


class CodeChanged(RuntimeError):
    """The task's code on disk is not the code the run was submitted with."""


def _is_retryable(exc: BaseException, retry_on: list[str] | None) -> bool:
    if retry_on is None:
        return True
    names = {qualified_name(cls) for cls in type(exc).__mro__}
    return bool(names.intersection(retry_on))


def run_attempt(payload: dict[str, Any]) -> dict[str, Any]:
    """Run the attempt described by ``payload`` and return its outcome as JSON-ready data."""
    store = ArtifactStore(Path(payload["artifacts_dir"]))
    ctx = TaskContext(
        run_id=payload["run_id"],
        task_id=payload["node_id"],
        attempt=payload["number"],
        artifacts_dir=store.root,
    )
    outcome: dict[str, Any]
    token = _set_context(ctx)
    try:
        task_ = import_task(payload["task_ref"])
        expected = payload.get("code_version")
        if expected and task_.code_version != expected:
            raise CodeChanged(
                f"the code of {payload['task_ref']} changed after the run was submitted "
                f"(submitted {expected[:12]}, found {task_.code_version[:12]}); submit the "
                "run again to use the new code"
            )
        inputs = decode_inputs(payload["inputs"], store)
        value = task_.fn(*inputs["args"], **inputs["kwargs"])
        outcome = {
            "state": "succeeded",
            "result": encode_value(value, store, payload["inline_result_bytes"]),
        }
    except Skip as exc:
        outcome = {"state": "succeeded", "skipped": True, "error": f"skipped: {exc}"}
    except CodeChanged as exc:
        print(exc)
        outcome = {"state": "failed", "error": f"CodeChanged: {exc}", "retryable": False}
    except BaseException as exc:  # the task's own failure, whatever it is, is the outcome
        traceback.print_exc()
        outcome = {
            "state": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "retryable": _is_retryable(exc, payload["options"].get("retry_on")),
        }
    finally:
        _reset_context(token)
    outcome.update(metrics=ctx.metrics, params=ctx.params, artifacts=ctx.artifacts)
    return outcome


def _point_output_at(log_path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class Requests:
    """The worker's requests, one JSON line each, read from a file descriptor; the line after
    one can be looked at without waiting (see serve)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def line(self, wait: bool = True) -> bytes | None:
        """The next line; None at the end, or, when not waiting, if no whole line has come."""
        while b"\n" not in self._buffer:
            if not wait and not select.select([self.fd], [], [], 0)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def put_back(self, line: bytes) -> None:
        self._buffer = line + b"\n" + self._buffer


def _revoked(requests: Requests, request: dict[str, Any]) -> bool:
    """Whether the worker took back this request while it waited behind the previous one: a
    revoke naming its attempt follows it (one that comes later is too late, and ignored)."""
    following = requests.line(wait=False)
    if following is None:
        return False
    revoke = json.loads(following).get("revoke")
    if revoke is not None and revoke == request.get("attempt"):
        return True
    requests.put_back(following)
    return False


def serve(requests: Requests, replies: BinaryIO) -> int:
    """Run the attempts read from ``requests`` one by one; answer each on ``replies``.

    The worker may send a request while the previous one runs, so that it starts the moment
    the previous one is answered; until then it may take it back (``{"revoke": attempt}``),
    and the answer is ``{"revoked": true}``."""
    ran = 0
    # What an attempt may change of its process and the next one must not inherit.
    home = os.getcwd(), dict(os.environ._data), list(sys.path)  # type: ignore[attr-defined]
    while (line := requests.line()) is not None:
        request = json.loads(line)
        if "revoke" in request:
            continue  # too late: its attempt had started, and has its own answer
        if _revoked(requests, request):
            replies.write(b'{"revoked": true}\n')
            replies.flush()
            continue
        try:
            _point_output_at(request["log"])
        except OSError as exc:  # its directory gone (a cleaner of /tmp), the disk full
            replies.write(json.dumps(_unlogged(request["log"], exc)).encode() + b"\n")
            replies.flush()
            continue
        if ran and _is_stale(request):
            replies.write(b'{"stale": true}\n')
            return 0
        began = time.perf_counter()
        outcome = run_attempt(request)
        outcome["seconds"] = time.perf_counter() - began  # the worker batches short tasks
        ran += 1
        sys.stdout.flush()
        sys.stderr.flush()
        killed = end_leftovers()
        if killed:
            print(f"[ml_platform] stopped {killed} process(es) the task left running", flush=True)
        _restore(*home)
        replies.write(json.dumps(outcome).encode() + b"\n")
        replies.flush()
    return 0


def _restore(cwd: str, environ: dict[bytes, bytes], path: list[str]) -> None:
    """Put back the working directory, the environment and ``sys.path`` an attempt changed:
    the next attempt in this warm process starts where a fresh process would (a task that
    did ``os.chdir`` into a directory it then removed failed the next one's relative paths;
    a CUDA_VISIBLE_DEVICES it set chose the next one's GPU). Compared first, the environment
    as the bytes ``os.environ`` keeps (``_data``): ≈ 2 µs, against ≈ 20 decoding it."""
    try:
        moved = os.getcwd() != cwd
    except FileNotFoundError:  # it removed the directory it was in
        moved = True
    if moved:
        os.chdir(cwd)
    if os.environ._data != environ:  # type: ignore[attr-defined]
        os.environb.clear()
        os.environb.update(environ)
    if sys.path != path:
        sys.path[:] = path


def _unlogged(log_path: str, exc: OSError) -> dict[str, Any]:
    """The answer for an attempt whose log cannot be opened: not begun, and lost to the
    infrastructure (retried on MLP_MAX_LOST, not on the task's retries), saying why -- the
    output still goes to the attempt before's log, which nobody reads any more."""
    return {
        "state": "lost",
        "error": f"the task process cannot write the attempt's log {log_path}: {exc.strerror}",
        "seconds": 0.0,
        "metrics": [],
        "params": {},
        "artifacts": [],
    }


def _is_stale(request: dict[str, Any]) -> bool:
    """Whether the task's code changed on disk since this process imported it."""
    expected = request.get("code_version")
    if not expected:
        return False
    try:
        return bool(import_task(request["task_ref"]).code_version != expected)
    except Exception:  # a fresh process reports the import error properly
        return True


def main(argv: list[str]) -> int:
    bind_to_worker(int(argv[1]))
    with os.fdopen(int(argv[0]), "wb", buffering=0) as replies:
        return serve(Requests(sys.stdin.fileno()), replies)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
