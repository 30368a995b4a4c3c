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
