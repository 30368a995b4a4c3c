"""Smoke tests run against a deployed URL: ``pytest tests/smoke --base-url URL``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--base-url",
        default=os.environ.get("MLP_SMOKE_URL"),
        help="URL of the deployment under test (or MLP_SMOKE_URL)",
    )


@pytest.fixture(scope="session")
def client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    base = request.config.getoption("--base-url")
    if not base:
        raise pytest.UsageError("smoke tests need --base-url URL (or MLP_SMOKE_URL)")
    with httpx.Client(base_url=str(base).rstrip("/"), timeout=10) as http:
        yield http
