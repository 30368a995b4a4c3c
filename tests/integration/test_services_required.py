"""Integration tests never skip silently: an unreachable service fails them with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_an_unreachable_given_postgresql_fails_with_the_url_and_what_to_do(tmp_path: Path) -> None:
    # Not measured: the pytest it starts covers nothing the suite's own processes do not.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    env["DATABASE_URL"] = (
        "postgresql://postgres:hunter2@127.0.0.1:1/test"  # pragma: allowlist secret
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--no-cov",
            "-q",
            "tests/integration/test_service.py::"
            "test_replayed_migrations_and_a_fresh_schema_are_the_models_schema",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    assert "1 passed, 1 error" in result.stdout  # SQLite passes; PostgreSQL errors, not skips
    assert (
        "PostgreSQL at postgresql://postgres:***@127.0.0.1:1/test is unreachable" in result.stdout
    )
    assert "unset it to get a throwaway one" in result.stdout
    assert "hunter2" not in result.stdout
    assert "skipped" not in result.stdout
