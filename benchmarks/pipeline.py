"""The pipeline's own speed: nox session creation (uv against virtualenv), quality, tests.

Cold means a fresh ``--envdir`` (new virtualenvs; uv's download cache stays warm, as on a CI
runner that restores it); warm means the same sessions again with ``-R`` (reuse, no install).

The tests session is also measured in CPU seconds (nox and every process it started and
waited for: the tests, their servers, workers and task processes, Chromium; not the
PostgreSQL and Redis servers), and warm once more without coverage: on a machine of N cores
no run can take less than its CPU over N, so these say how far each lever could go.
"""

from __future__ import annotations

import resource
import shutil

# Runs nox with fixed argv, never a shell.
import subprocess  # nosec B404
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPETITIONS = 2
#: Where a failed session's whole output is kept (the error names only the failures).
FAILURE_LOG = ROOT / "reports" / "bench-nox-failure.log"


def _nox(*args: str) -> float:
    began = time.monotonic()
    # Fixed argv: nox through this interpreter.
    done = subprocess.run(  # nosec B603
        [sys.executable, "-m", "nox", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - began
    if done.returncode != 0:
        kept = FAILURE_LOG
        kept.parent.mkdir(exist_ok=True)
        kept.write_text(done.stdout + done.stderr)
        failures = [
            line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))
        ]
        raise RuntimeError(
            f"nox {' '.join(args)} failed (its output: {kept}):\n"
            + "\n".join(failures)
            + done.stderr[-2000:]
        )
    return elapsed


def children_cpu() -> float:
    """CPU seconds of this process's children so far: of each one waited for, with its own
    children that it waited for, and theirs."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _nox_with_cpu(*args: str) -> tuple[float, float]:
    """``_nox``'s wall seconds, and the CPU seconds of nox and of what it started."""
    before = children_cpu()
    wall = _nox(*args)
    return wall, children_cpu() - before


def _cold_and_warm(
    progress: Callable[[str], None], label: str, *args: str
) -> dict[str, list[float]]:
    cold, warm = [], []
    for _ in range(REPETITIONS):
        envdir = Path(tempfile.mkdtemp(prefix="mlp-bench-nox-"))
        try:
            cold.append(_nox(*args, "--envdir", str(envdir)))
            warm.append(_nox(*args, "--envdir", str(envdir), "-R"))
        finally:
            shutil.rmtree(envdir, ignore_errors=True)
        progress(f"{label}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s")
    return {"cold": cold, "warm": warm}


CLI_REPETITIONS = 5
CLI_RUNS = 1_000


def cli(progress: Callable[[str], None]) -> dict[str, list[float]]:
    """How long `mlp` takes to answer, beside `python -c pass`: --help, --version, and
    `mlp runs` on an embedded home holding 1,000 runs (medians of CLI_REPETITIONS)."""
    import os

    from benchmarks import workloads
    from ml_platform.config import Settings
    from ml_platform.service import Platform

    home = Path(tempfile.mkdtemp(prefix="mlp-bench-cli-"))
    try:
        platform = Platform(Settings(home=home)).start()
        try:
            traced = workloads.fanout.trace({"width": 1})
            for _ in range(CLI_RUNS):
                platform.submit(traced)
        finally:
            platform.close()
        env = {**os.environ, "ML_PLATFORM_HOME": str(home), "PYTHONPATH": str(ROOT)}
        commands = {
            "python -c pass": ["-c", "pass"],
            "mlp --help": ["-m", "ml_platform", "--help"],
            "mlp --version": ["-m", "ml_platform", "--version"],
            f"mlp runs ({CLI_RUNS:,} runs, embedded)": ["-m", "ml_platform", "runs"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(CLI_REPETITIONS):
            for name, argv in commands.items():
                began = time.monotonic()
                # Fixed argv: this interpreter.
                subprocess.run(  # nosec B603
                    [sys.executable, *argv], env=env, capture_output=True, check=True
                )
                times[name].append(time.monotonic() - began)
        progress("cli: " + ", ".join(f"{n} {min(t):.2f} s" for n, t in times.items()))
        return times
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(progress: Callable[[str], None], *, include_tests: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {"cli": cli(progress)}
    for backend in ("uv", "virtualenv"):
        times = []
        for _ in range(REPETITIONS):
            envdir = Path(tempfile.mkdtemp(prefix="mlp-bench-nox-"))
            try:
                times.append(
                    _nox(
                        "-s",
                        "lint",
                        "--install-only",
                        "--force-venv-backend",
                        backend,
                        "--envdir",
                        str(envdir),
                    )
                )
            finally:
                shutil.rmtree(envdir, ignore_errors=True)
        figures[f"create_{backend}"] = times
        progress(f"session creation with {backend}: {min(times):.1f}-{max(times):.1f} s")
    figures["quality"] = _cold_and_warm(progress, "nox -t quality", "-t", "quality")
    if include_tests:
        figures["tests"] = _tests(progress)
    return figures


#: The tests session's own arguments (noxfile.py) with coverage off: the same tests.
WITHOUT_COVERAGE = ["--", "--no-cov", "tests", "--ignore=tests/smoke", "--ignore=tests/fuzz"]


def _tests(progress: Callable[[str], None]) -> dict[str, list[float]]:
    """`nox -s tests` cold, warm, and warm without coverage: wall and CPU seconds of each."""
    envdir = Path(tempfile.mkdtemp(prefix="mlp-bench-nox-"))
    runs = {
        "cold": ["-s", "tests", "--envdir", str(envdir)],
        "warm": ["-s", "tests", "--envdir", str(envdir), "-R"],
        "warm_no_coverage": ["-s", "tests", "--envdir", str(envdir), "-R", *WITHOUT_COVERAGE],
    }
    figures: dict[str, list[float]] = {}
    try:
        for name, args in runs.items():
            wall, cpu = _nox_with_cpu(*args)
            figures[name], figures[f"{name}_cpu"] = [wall], [cpu]
            progress(f"nox -s tests, {name.replace('_', ' ')}: {wall:.0f} s, {cpu:.0f} s of CPU")
    finally:
        shutil.rmtree(envdir, ignore_errors=True)
    return figures
