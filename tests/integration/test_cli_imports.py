"""The CLI answers at once: importing it loads none of the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

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
    needs nothing of pydantic. (`mlp worker` still loads it: typer parses its options with
    pydantic since typer 0.2x.)"""
    probe = (
        "import sys, ml_platform.worker, ml_platform.cli; "
        "from ml_platform.config import load_settings; load_settings(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('pydantic')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
