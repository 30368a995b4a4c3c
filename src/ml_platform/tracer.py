"""Workflows by reference: imported and traced here, or in a fresh, short-lived process.

A long-lived process (the API server, its scheduler) must never trace a workflow with the
copy of its module it imported earlier: the code on disk may have changed since, and the new
version, its code hash and its cache keys must describe the code that will run. Nor should
it run user module code in itself at all. So it traces each submission in a new process:
``python -m ml_platform.tracer`` reads ``{"reference": ..., "params": ...}`` as JSON on stdin
and writes ``{"traced": ...}`` or ``{"error": {"kind": ..., "message": ...}}`` on stdout.
Whatever the module does at import -- print, exit, hang, crash -- ends as a WorkflowError.
"""

from __future__ import annotations

import importlib
import json
import os
import signal

# Runs this package's own tracer with a fixed argv, never a shell.
import subprocess  # nosec B404
import sys
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
    top = parts[0]
    in_project = (root / f"{top}.py").is_file() or (root / top / "__init__.py").is_file()
    listed = any(
        module_name == prefix or module_name.startswith(prefix + ".") for prefix in prefixes
    )
    if not (in_project or listed):
        raise WorkflowError(
            f"module {module_name!r} is not one this server loads workflows from: the project's "
            f"own modules in {root} and {', '.join(prefixes) or 'no others'} "
            "(MLP_WORKFLOW_MODULES)"
        )


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
    """Trace ``reference`` (with ``params``, validated) in a fresh Python process."""
    env = dict(os.environ)
    # The reference is imported as this process would find it (its working directory too).
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
    request = json.dumps({"reference": reference, "params": params})
    # Fixed argv: our own interpreter and module; the reference travels as data on stdin.
    process = subprocess.Popen(  # nosec B603
        [sys.executable, "-m", "ml_platform.tracer"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # a group of its own: whatever the module starts ends with it
    )
    try:
        out, err = process.communicate(request.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkflowError(
            f"loading workflow {reference!r} took longer than {timeout:g} s "
            "(MLP_TRACE_TIMEOUT_SECONDS); it was stopped"
        ) from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    try:
        reply: dict[str, Any] = json.loads(out)
    except ValueError:
        tail = err.decode(errors="replace").strip()[-STDERR_TAIL:]
        raise WorkflowError(
            f"loading workflow {reference!r} failed: its process exited with code "
            f"{process.returncode} without an answer" + (f": {tail}" if tail else "")
        ) from None
    if "error" in reply:
        error = reply["error"]
        kind = ParamError if error["kind"] == "params" else WorkflowError
        raise kind(error["message"])
    return TracedWorkflow.from_json(reply["traced"])


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


def main() -> int:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the module prints goes to stderr, never into the answer
    request = json.loads(sys.stdin.read())
    answer = _answer(request)
    replies.write(json.dumps(answer))
    replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
