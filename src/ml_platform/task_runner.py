"""The child process that runs one attempt: ``python -m ml_platform.task_runner IN OUT``.

It reads the attempt from the JSON file IN, runs the task, and writes the outcome to OUT
atomically. Its stdout and stderr are the attempt's log. It exits on its own when the worker
that started it dies, so a killed worker never leaves a task running unseen.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

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


def main(argv: list[str]) -> int:
    source, target = Path(argv[0]), Path(argv[1])
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    payload = json.loads(source.read_text())
    outcome = run_attempt(payload)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, target)
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
