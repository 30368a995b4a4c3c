"""The warm task process: ``python -m ml_platform.task_runner REPLY_FD``.

A worker keeps a few of these processes and hands them attempts one after another, so an
attempt costs a pipe round trip instead of a Python start-up and the workflow module's
imports. Each request is one JSON line on stdin naming the attempt and its log file; the
process points its stdout and stderr at that file, runs the task, and writes the outcome as
one JSON line to REPLY_FD. It exits on its own when the worker that started it dies, so a
killed worker never leaves a task running unseen. A process that finds its copy of a task
older than the one submitted exits with a ``stale`` reply, and the worker starts a fresh one.
"""

from __future__ import annotations

import json
import os
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


def _watch_parent(parent: int) -> NoReturn:
    while True:
        if os.getppid() != parent:
            os._exit(ORPHAN_EXIT_CODE)
        time.sleep(0.5)


def import_task(reference: str) -> Task[..., Any]:
    module_name, _, attr_path = reference.partition(":")
    obj: Any = __import__(module_name, fromlist=["_"])
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Task):
        raise TypeError(f"{reference} is not a task (decorate it with @task)")
    return obj


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
        inputs = decode_inputs(payload["inputs"], store)
        value = task_.fn(*inputs["args"], **inputs["kwargs"])
        outcome = {
            "state": "succeeded",
            "result": encode_value(value, store, payload["inline_result_bytes"]),
        }
    except Skip as exc:
        outcome = {"state": "succeeded", "skipped": True, "error": f"skipped: {exc}"}
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


def serve(requests: BinaryIO, replies: BinaryIO) -> int:
    """Run the attempts read from ``requests`` one by one; answer each on ``replies``."""
    ran = 0
    for line in requests:
        request = json.loads(line)
        _point_output_at(request["log"])
        if ran and _is_stale(request):
            replies.write(b'{"stale": true}\n')
            return 0
        outcome = run_attempt(request)
        ran += 1
        sys.stdout.flush()
        sys.stderr.flush()
        replies.write(json.dumps(outcome).encode() + b"\n")
        replies.flush()
    return 0


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
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with os.fdopen(int(argv[0]), "wb", buffering=0) as replies:
        return serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
