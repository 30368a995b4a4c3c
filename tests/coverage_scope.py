"""How far coverage reaches into the processes the tests start.

noxfile.py installs this module into the tests session's site-packages, with a ``.pth`` file
that imports it in every Python process of that environment, after coverage's own ``.pth``
has started measuring (``[tool.coverage.run] patch = ["subprocess"]``). In the processes
that matter here it changes two things, each to spare a core what measures nothing new:

- An ``mlp`` process the tests start (``python -m ml_platform …``: a server, a worker, the
  CLI) is measured; the task processes it starts are not. Each would pay coverage's start-up
  and its save (≈ 0.15 s of a core), a few hundred times a run. Task processes started by the
  tests' own processes (an in-process worker, the CLI run in-process) are still measured.
- In an ``mlp`` process and in a task process, module bodies run untraced: the imports are
  most of such a process's start-up, and tracing them costs ≈ 0.3 s of a core more. The
  tests' own processes import the same modules, traced, so their bodies are measured there;
  what the process then does — every function it calls — is measured as before.

Anything else (pytest, its xdist workers, the tools the tests run) is left as it is.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import SourceFileLoader
from typing import Any


def _runs_module(name: str) -> bool:
    argv = sys.orig_argv
    return ("-m", name) in zip(argv, argv[1:])


def _untraced_module_bodies() -> None:
    exec_module = SourceFileLoader.exec_module

    def exec_untraced(self: Any, module: Any) -> None:
        tracer = sys.gettrace()
        sys.settrace(None)
        try:
            exec_module(self, module)
        finally:
            sys.settrace(tracer)

    SourceFileLoader.exec_module = exec_untraced  # type: ignore[method-assign]


def install() -> None:
    if _runs_module("ml_platform"):
        os.environ.pop("COVERAGE_PROCESS_CONFIG", None)
    elif not _runs_module("ml_platform.task_runner"):
        return
    if sys.gettrace() is not None:  # measured
        _untraced_module_bodies()
