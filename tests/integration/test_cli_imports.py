"""The CLI answers at once: importing it loads none of the heavy libraries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
HEAVY = ["sqlalchemy", "alembic", "redis", "fastapi", "sklearn", "httpx", "pydantic"]


def test_importing_the_cli_imports_no_heavy_library() -> None:
    probe = (
        "import sys, ml_platform.cli; " f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_help_loads_no_heavy_library_either() -> None:
    """`mlp --help` runs main(): what it imports to catch errors must be light too."""
    probe = (
        "import sys\n"
        "from ml_platform.cli import main\n"
        "sys.argv = ['mlp', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "LOADED []", result.stdout[-500:]


def test_version_answers_without_a_database() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ml_platform", "--version"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "ML_PLATFORM_HOME": "/nonexistent/never-created"},
    )
    assert done.returncode == 0 and done.stdout.startswith("mlp (ml-platform) ")


def test_the_worker_and_its_settings_load_no_pydantic() -> None:
    """Every process reads the settings, and a worker run from Python (an embedded runtime)
    needs nothing of pydantic."""
    probe = (
        "import sys, ml_platform.worker, ml_platform.cli; "
        "from ml_platform.config import load_settings; load_settings(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('pydantic')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_worker_imports_neither_cron_nor_sqlite_until_it_needs_them() -> None:
    """croniter (with dateutil) and sqlite3 are ≈ 3 MiB of a worker that serves PostgreSQL
    and no schedule: they are imported where a schedule's tick or SQLite is used."""
    probe = (
        "import sys, ml_platform.worker; "
        "print(sorted(m for m in ('croniter', 'dateutil', 'sqlite3') if m in sys.modules))"
    )
    # Not measured: coverage itself keeps its data with sqlite3.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_mlp_worker_runs_without_typer_rich_or_pydantic(tmp_path: Path) -> None:
    """A worker lives for days: `mlp worker` parses its own options (typer parses with
    pydantic since typer 0.2x; with rich, ≈ 12 MiB of every worker's memory)."""
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('LOADED', sorted({m.split('.')[0] for m in sys.modules}"
        " & {'typer', 'click', 'rich', 'pydantic', 'pydantic_core'}), flush=True))\n"
        "sys.argv = ['mlp', 'worker', '--concurrency', '1']\n"
        "from ml_platform.__main__ import main\n"
        "main()\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", probe],
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], "ML_PLATFORM_HOME": str(tmp_path)},
    )
    assert worker.stdout is not None
    try:
        ready = worker.stdout.readline()
        assert " ready, concurrency 1" in ready, ready
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert worker.returncode == 0, output
    assert "stopped: drained" in output and output.strip().splitlines()[-1] == "LOADED []"


def test_mlp_worker_refuses_bad_options_and_settings_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "ML_PLATFORM_HOME": str(tmp_path)}
    for argv, extra, says in [
        (["-c", "0"], {}, "--concurrency: 0 is not at least 1"),
        (["--concurrency", "two"], {}, "--concurrency: 'two' is not a whole number"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        ([], {"MLP_LEASE_SECONDS": "soon"}, "MLP_LEASE_SECONDS"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "ml_platform", "worker", *argv],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=30,
        )
        assert done.returncode == 2 and says in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr
