"""Workflows by reference: imported and traced here, or in a fresh, short-lived process.

A long-lived process (the API server, its scheduler) must never trace a workflow with the
copy of its module it imported earlier: the code on disk may have changed since, and the new
version, its code hash and its cache keys must describe the code that will run. Nor should
it run user module code in itself at all. So it traces each submission in a new process.

Starting Python for each one cost ≈ 130 ms of a core. Instead, the first trace starts a
*zygote* (``python -m ml_platform.tracer --zygote FD``): a process that has imported this
module and nothing of the user's, and forks one child per trace (≈ 10 ms). The child is the
fresh process: its own session (whatever the module starts ends with it), the requester's
working directory, ``sys.path`` and environment, import caches dropped; it imports the module,
traces, answers ``{"traced": ...}`` or ``{"error": {"kind": ..., "message": ...}}`` on its
own socket, and exits. What the module prints goes to a second socket, never into the
answer. Whatever the module does at import -- print, exit, hang, crash -- ends as a
WorkflowError; a dead zygote is started again; the zygote ends when its parent does (its
control socket closes).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import signal
import socket
import struct

# Runs this package's own tracer with a fixed argv, never a shell.
import subprocess  # nosec B404
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_platform.sdk import ParamError, TracedWorkflow, Workflow, WorkflowError

#: How much of a dead tracer's stderr an error message quotes.
STDERR_TAIL = 600


def parse_reference(reference: str) -> tuple[str, str]:
    """``package.module:attribute`` split in two, or WorkflowError: dotted identifiers only."""
    module_name, sep, attr_path = reference.partition(":")
    parts = module_name.split(".") + attr_path.split(".")
    if not sep or not all(part.isidentifier() for part in parts):
        raise WorkflowError(
            f"workflow reference {reference!r} must look like 'package.module:workflow_name'"
        )
    return module_name, attr_path


def check_allowed(reference: str, prefixes: list[str], root: Path) -> None:
    """Refuse, before any import, a reference outside the modules a server may load.

    Allowed: the packages and modules in ``root`` (the server's working directory: the
    project's own code) and those under one of ``prefixes`` (``MLP_WORKFLOW_MODULES``).
    Never a ``__main__`` module or a private (``_``-prefixed) name.
    """
    module_name, attr_path = parse_reference(reference)
    parts = module_name.split(".")
    if any(part.startswith("_") for part in parts + attr_path.split(".")):
        raise WorkflowError(f"workflow reference {reference!r} names a private or main module")
    listed = any(
        module_name == prefix or module_name.startswith(prefix + ".") for prefix in prefixes
    )
    outside = None if listed else _outside(parts, root)
    if outside is not None:
        raise WorkflowError(
            f"module {module_name!r} is not among those workflows are loaded from: the "
            f"project's own modules in {root} ({outside}) and "
            f"{', '.join(prefixes) or 'no others'} (MLP_WORKFLOW_MODULES)"
        )


def _outside(parts: list[str], root: Path) -> str | None:
    """Why importing the module ``parts`` names, with ``root`` first on the path as the
    tracer and the workers have it, would not take every module and package on its way from
    ``root``; None when it would. A directory without ``__init__.py`` is a package too (a
    namespace package, as `mlp run` takes it), but the import may take part of such a name
    from elsewhere: a module of the same namespace in another directory on the path, or a
    regular package of that name anywhere on it, which Python prefers to a namespace
    directory. So the import's own finder is asked, level by level: it looks at files only,
    and runs nothing."""
    from importlib.machinery import PathFinder

    root = root.resolve()
    if parts[0] in sys.builtin_module_names:
        return f"{parts[0]} is built into Python"
    PathFinder.invalidate_caches()  # a module written a moment ago is seen, as the tracer sees it
    search: list[str] = [str(root), *(p for p in sys.path if p and Path(p) != root)]
    for depth, part in enumerate(parts, 1):
        name = ".".join(parts[:depth])
        if not search:
            return f"{'.'.join(parts[: depth - 1])} is a module, not a package"
        # Asked by its last part alone: the finder looks only at the names in ``search``, and
        # a dotted name would have it look for the parent among the modules imported here.
        spec = PathFinder.find_spec(part, search)
        if spec is None:
            top = parts[0]
            return (
                f"no {top}.py, {top}/__init__.py or {top}/ there"
                if depth == 1
                else f"no module {name} there"
            )
        if spec.has_location and spec.origin is not None:  # a module or a regular package
            if not Path(spec.origin).resolve().is_relative_to(root):
                return f"{name} would be imported from outside it"
        search = list(spec.submodule_search_locations or [])
    return None


def load_workflow(reference: str) -> Workflow:
    """Import ``package.module:workflow_name`` in this process and return the workflow."""
    module_name, attr_path = parse_reference(reference)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise WorkflowError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module's own import failed: say how, whatever it was
        raise WorkflowError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    except SystemExit as exc:  # a script's top level: argparse, sys.exit()
        raise WorkflowError(
            f"cannot import module {module_name!r}: it exited while being imported"
            f" (SystemExit: {exc.code}); code that runs it as a script belongs under"
            " `if __name__ == '__main__':`"
        ) from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise WorkflowError(f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Workflow):
        raise WorkflowError(
            f"{reference} is a {type(obj).__name__}, not a workflow (decorate it with @workflow)"
        )
    return obj


def trace_in_subprocess(
    reference: str, params: Mapping[str, Any] | None, *, timeout: float
) -> TracedWorkflow:
    """Trace ``reference`` (with ``params``, validated) in a fresh process (a zygote's child)."""
    request = {
        "reference": reference,
        "params": params,
        # The reference is imported as this process would find it (its working directory too).
        "cwd": os.getcwd(),
        "path": [p for p in [os.getcwd(), *sys.path] if p],
        "env": dict(os.environ),
    }
    reply, output = _ZYGOTE.run(json.dumps(request).encode(), timeout, reference)
    try:
        answer: dict[str, Any] = json.loads(reply)
    except ValueError:
        tail = output.decode(errors="replace").strip()[-STDERR_TAIL:]
        raise WorkflowError(
            f"loading workflow {reference!r} failed: its process ended without an answer"
            + (f": {tail}" if tail else "")
        ) from None
    if "error" in answer:
        error = answer["error"]
        kind = ParamError if error["kind"] == "params" else WorkflowError
        raise kind(error["message"])
    return TracedWorkflow.from_json(answer["traced"])


class _Zygote:
    """The requester's side: starts the zygote when needed, hands it a child's sockets."""

    #: The zygote's module: ``python -m MODULE --zygote FD`` serves on the socket FD, started
    #: in ``cwd`` (None: this process's working directory).
    module = "ml_platform.tracer"
    cwd: Path | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def _start(self) -> None:
        self.stop()  # whatever is left of a dead one
        ours, theirs = socket.socketpair()
        # Fixed argv: our own interpreter and module; requests travel as data on sockets.
        self._process = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", self.module, "--zygote", str(theirs.fileno())],
            cwd=self.cwd,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        self._control = ours

    def _fork(self, channel: socket.socket, output: socket.socket) -> int:
        """The pid of a new child that owns the other ends of ``channel`` and ``output``."""
        with self._lock:
            for _ in range(2):  # a zygote that died (killed, out of memory) is replaced once
                if (
                    self._control is None
                    or self._process is None
                    or self._process.poll() is not None
                ):
                    self._start()
                assert self._control is not None
                try:
                    socket.send_fds(self._control, [b"F"], [channel.fileno(), output.fileno()])
                    pid = self._control.recv(8)
                except OSError:
                    pid = b""
                if len(pid) == 8:
                    return int(struct.unpack("!q", pid)[0])
                self.stop()
        raise WorkflowError("the workflow tracer could not be started")

    def run(self, request: bytes, timeout: float, reference: str) -> tuple[bytes, bytes]:
        """The child's answer (b"" if it died without one) and what it printed."""
        channel, child_channel = socket.socketpair()
        output, child_output = socket.socketpair()
        try:
            pid = self._fork(child_channel, child_output)
        finally:
            child_channel.close()
            child_output.close()
        try:
            channel.sendall(request)
            channel.shutdown(socket.SHUT_WR)
            reply, printed = _read_both(channel, output, time.monotonic() + timeout)
            if reply is None:
                raise WorkflowError(
                    f"loading workflow {reference!r} took longer than {timeout:g} s "
                    "(MLP_TRACE_TIMEOUT_SECONDS); it was stopped"
                )
            return reply, printed
        finally:
            channel.close()
            output.close()
            try:
                os.killpg(pid, signal.SIGKILL)  # the child, and all it started
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, grace: float = 0.0) -> None:
        """Close the zygote's control socket (it then exits by itself) and wait up to
        ``grace`` seconds for it before killing it."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            try:
                self._process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def forget(self) -> None:
        """In a forked copy of the requester: drop the parent's zygote (its socket too, so
        that the zygote still sees its parent's end); this process starts its own if needed."""
        if self._control is not None:
            self._control.close()
        self._lock = threading.Lock()
        self._control = None
        self._process = None


_ZYGOTE = _Zygote()
# At exit the zygote ends before its requester does: nothing of it outlives the process.
atexit.register(_ZYGOTE.stop, 5.0)
os.register_at_fork(after_in_child=_ZYGOTE.forget)


def _read_both(
    channel: socket.socket, output: socket.socket, deadline: float
) -> tuple[bytes | None, bytes]:
    """The child's answer (b"" if it died without one; None if it had not ended by the
    deadline) and what it printed. Both sockets are drained together, so a module that prints
    a lot cannot block. Once the answer is in (or the child died), its output is read until
    the child is gone, for a moment at most: a process the module started may hold it open."""
    answer: list[bytes] = []
    printed: list[bytes] = []
    answered = False
    with selectors.DefaultSelector() as selector:
        selector.register(channel, selectors.EVENT_READ, answer)
        selector.register(output, selectors.EVENT_READ, printed)
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if data := sock.recv(65536):
                    key.data.append(data)
                    continue
                selector.unregister(sock)
                if sock is channel:
                    answered = True
                    deadline = min(deadline, time.monotonic() + (0.5 if answer else 1.0))
    return (b"".join(answer) if answered else None), b"".join(printed)


def _answer(request: Mapping[str, Any]) -> dict[str, Any]:
    try:
        traced = load_workflow(request["reference"]).trace(request["params"])
    except ParamError as exc:
        return {"error": {"kind": "params", "message": str(exc)}}
    except WorkflowError as exc:
        return {"error": {"kind": "workflow", "message": str(exc)}}
    except BaseException as exc:  # SystemExit, KeyboardInterrupt…: the module's doing
        message = f"loading workflow {request['reference']!r} raised {type(exc).__name__}: {exc}"
        return {"error": {"kind": "workflow", "message": message}}
    return {"traced": traced.to_json()}


def _child(channel_fd: int, output_fd: int) -> None:
    """In the forked child: become the fresh process the request describes, answer, exit."""
    zygote = os.getppid()
    _die_with_parent()
    if os.getppid() != zygote:  # it ended before we could ask
        os._exit(1)
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.dup2(output_fd, 1)  # what the module prints goes to the output socket, never the answer
    os.dup2(output_fd, 2)
    os.close(output_fd)
    channel = socket.socket(fileno=channel_fd)
    request = json.loads(b"".join(iter(lambda: channel.recv(65536), b"")))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = request["path"]
    importlib.invalidate_caches()
    answer = _answer(request)
    channel.sendall(json.dumps(answer).encode())
    channel.close()
    sys.stdout.flush()
    sys.stderr.flush()


def _die_with_parent() -> None:
    """Linux: this process is killed when the zygote ends (its requester is gone), so a module
    that hangs at import does not outlive the server that asked for it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the trace's timeout still applies
        pass


def _warm_up() -> None:
    """Pay once, here, what the first trace in a process pays (pydantic builds its validators
    and JSON schemas: ≈ 60 ms), so that no child pays it. Our own code only."""
    from ml_platform.sdk import task, workflow

    @task
    def one(value: int) -> int:
        return value

    @workflow
    def warm_up(value: int = 1) -> None:
        one(value)

    json.dumps(warm_up.trace({"value": 1}).to_json())


def serve(control_fd: int) -> int:
    """The zygote: fork a child for each pair of sockets received, until the parent is gone."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    _warm_up()
    control = socket.socket(fileno=control_fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 2)
        except OSError:
            return 0
        if not message:
            return 0  # the parent closed its end: it is gone or done
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                control.close()
                _child(*fds)
            except BaseException:  # noqa: B036 - a child never returns into the zygote's loop
                code = 1
            os._exit(code)
        for fd in fds:
            os.close(fd)
        control.sendall(struct.pack("!q", pid))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zygote"]:
        sys.exit(serve(int(sys.argv[2])))
    sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'ml_platform.tracer'} --zygote FD")
