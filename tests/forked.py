"""``python -m ml_platform ARGS`` for the tests, forked from a warm copy instead of started.

A test that kills workers starts several, and each start costs ≈ 0.9 s of a core under
coverage: Python, then the imports of the CLI, SQLAlchemy, psycopg and redis. The *zygote*
(``python -m tests.forked --zygote FD``) pays that once: it imports the CLI and the worker,
holds no thread and no connection, and forks one child per request (≈ 10 ms). The child
becomes what a fresh ``python -m ml_platform ARGS`` would be — the requester's environment,
working directory and ``sys.path[0]``, its stdin, stdout and stderr, default signal handling
— runs ``ml_platform.__main__`` and exits with its code. The zygote reports that code to the
requester, whose handle answers as a ``subprocess.Popen`` does (pid, poll, wait,
communicate, send_signal, kill, stdout).

The same pattern as ``ml_platform.tracer``'s zygote; the entry point itself (``python -m
ml_platform``) is still started as a process by every other test that starts one.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, NoReturn

from ml_platform.tracer import _die_with_parent, _Zygote

ROOT = Path(__file__).resolve().parents[1]
_STATUS = struct.Struct("!q")


class Forked:
    """The requester's handle on one forked ``mlp`` process (the parts of Popen tests use)."""

    def __init__(self, pid: int, status: socket.socket, stdout: IO[str] | None) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._status = status

    def poll(self) -> int | None:
        return self.wait(timeout=0.0, raising=False)

    def wait(self, timeout: float | None = None, raising: bool = True) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self._status.settimeout(timeout)
        try:
            data = self._status.recv(_STATUS.size, socket.MSG_WAITALL)
        except (TimeoutError, BlockingIOError):
            if raising:
                raise subprocess.TimeoutExpired(f"mlp (pid {self.pid})", timeout or 0.0) from None
            return None
        if len(data) != _STATUS.size:  # the zygote died, and its children with it (_child)
            self.returncode = -signal.SIGKILL
        else:
            self.returncode = _STATUS.unpack(data)[0]
        self._status.close()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """Read stdout to its end and wait, within ``timeout`` (as Popen does; "" when the
        output went to a file)."""
        read: list[str] = []
        if self.stdout is not None and not self.stdout.closed:
            stdout = self.stdout
            reader = threading.Thread(target=lambda: read.append(stdout.read()), daemon=True)
            reader.start()
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(f"mlp (pid {self.pid})", timeout or 0.0)
            stdout.close()
        self.wait(timeout)
        return "".join(read), None

    def send_signal(self, number: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, number)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote(_Zygote):
    """Starts the zygote on first use (as ``ml_platform.tracer`` starts its own); ``spawn``
    asks it for a child."""

    module = "tests.forked"
    cwd = ROOT

    def spawn(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path = ROOT,
        output: IO[Any] | None = None,
    ) -> Forked:
        """``python -m ml_platform *args``; its stdout and stderr go to ``output`` (a file), else
        to a text pipe, the handle's ``stdout``."""
        status, child_status = socket.socketpair()
        if output is None:
            read_end, write_end = os.pipe()
        else:
            read_end, write_end = -1, os.dup(output.fileno())
        stdin = os.open(os.devnull, os.O_RDONLY)
        request = json.dumps({"args": args, "env": env, "cwd": str(cwd)}).encode()
        try:
            with self._lock:
                if self._process is None or self._process.poll() is not None:
                    self._start()
                assert self._control is not None
                socket.send_fds(
                    self._control,
                    [struct.pack("!I", len(request)) + request],
                    [child_status.fileno(), stdin, write_end],
                )
                pid = _STATUS.unpack(self._control.recv(_STATUS.size, socket.MSG_WAITALL))[0]
        finally:
            for fd in (child_status.fileno(), stdin, write_end):
                os.close(fd)
            child_status.detach()
        return Forked(pid, status, open(read_end, encoding="utf-8") if output is None else None)


ZYGOTE = Zygote()
atexit.register(ZYGOTE.stop, 5.0)


# The zygote's side.


def _become(request: dict[str, Any], stdin: int, output: int) -> int:
    """In the forked child: become ``python -m ml_platform ARGS`` as the request describes it."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the rest is as a fresh process has them
    os.dup2(stdin, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(stdin)
    os.close(output)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from the environment (TMPDIR), as a new process does
    # As tests/coverage_scope.py does for an `mlp` process: its task processes are not measured.
    os.environ.pop("COVERAGE_PROCESS_CONFIG", None)
    sys.path[0] = request["cwd"]
    importlib.invalidate_caches()
    sys.argv = ["-m", *request["args"]]
    try:
        runpy.run_module("ml_platform", run_name="__main__", alter_sys=True)
        code: int = 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    return code


def _child(request: dict[str, Any], fds: list[int], zygotes: list[int]) -> NoReturn:
    """``zygotes``: the zygote's own descriptors (its sockets, the other children's status
    sockets), none of which the child may hold."""
    signal.set_wakeup_fd(-1)  # before its descriptor is closed
    zygote = os.getppid()
    _die_with_parent()  # a zygote that dies (its test process gone) takes its children along
    if os.getppid() != zygote:
        os._exit(1)
    status, stdin, output = fds
    for fd in zygotes:
        os.close(fd)
    os.close(status)  # the zygote reports; the child holds no copy
    code = 1
    try:
        code = _become(request, stdin, output)
    except BaseException:  # noqa: B036 - a child never returns into the zygote's loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()
        finally:
            os._exit(code)


def serve(control_fd: int) -> int:
    """Fork a child per request; report each child's exit code on its status socket."""
    _die_with_parent()
    # What a child would import first, paid once, here.
    import ml_platform.cli  # noqa: F401
    import ml_platform.server  # noqa: F401
    import ml_platform.worker  # noqa: F401

    control = socket.socket(fileno=control_fd)
    wakeup_read, wakeup_write = socket.socketpair()
    wakeup_read.setblocking(False)
    wakeup_write.setblocking(False)
    signal.set_wakeup_fd(wakeup_write.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, int] = {}  # pid -> its status socket's fd
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wakeup_read, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is control:
                try:
                    header, fds, _, _ = socket.recv_fds(control, 4, 3)
                except OSError:
                    return 0
                if not header:
                    return 0  # the requester closed its end
                (length,) = struct.unpack("!I", header)
                body = b""
                while len(body) < length:
                    body += control.recv(length - len(body))
                pid = os.fork()
                if pid == 0:
                    own = [control.fileno(), wakeup_read.fileno(), wakeup_write.fileno()]
                    _child(json.loads(body), fds, [*own, selector.fileno(), *children.values()])
                children[pid] = fds[0]
                for fd in fds[1:]:
                    os.close(fd)
                control.sendall(_STATUS.pack(pid))
            else:
                try:
                    while wakeup_read.recv(512):
                        pass
                except BlockingIOError:
                    pass
        _reap(children)


def _reap(children: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, _STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass  # the requester is gone
            os.close(fd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zygote"]:
        sys.exit(serve(int(sys.argv[2])))
    sys.exit("usage: python -m tests.forked --zygote FD")
