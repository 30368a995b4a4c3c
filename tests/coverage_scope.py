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

Anything else (pytest, the tools the tests run) is left as it is, except the xdist workers
while they collect (tests/conftest.py): each of them imports every test module, and with them
the same modules of ours, so one worker (gw0) measures those module bodies and the others
import them untraced (≈ 4 s of a core each); what any worker imports later is measured.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import SourceFileLoader
from typing import Any


def _runs_module(name: str) -> bool:
    argv = sys.orig_argv
    return ("-m", name) in zip(argv, argv[1:])


#: The loader's own exec_module, which untraced_module_bodies replaces and
#: traced_module_bodies restores.
_EXEC_MODULE = SourceFileLoader.exec_module


def _exec_untraced(self: Any, module: Any) -> None:
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        _EXEC_MODULE(self, module)
    finally:
        sys.settrace(tracer)


def untraced_module_bodies() -> None:
    SourceFileLoader.exec_module = _exec_untraced  # type: ignore[method-assign]


def traced_module_bodies() -> None:
    """Undo untraced_module_bodies: modules imported from now on are measured whole."""
    SourceFileLoader.exec_module = _EXEC_MODULE  # type: ignore[method-assign]


def install() -> None:
    if _runs_module("ml_platform"):
        os.environ.pop("COVERAGE_PROCESS_CONFIG", None)
    elif not _runs_module("ml_platform.task_runner"):
        return
    if sys.gettrace() is not None:  # measured
        untraced_module_bodies()
