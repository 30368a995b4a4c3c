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
    parser.addoption(
        "--smoke-user",
        default=os.environ.get("MLP_SMOKE_USER"),
        help="a user for the authenticated checks (or MLP_SMOKE_USER)",
    )
    parser.addoption(
        "--smoke-password",
        default=os.environ.get("MLP_SMOKE_PASSWORD"),
        help="its password (or MLP_SMOKE_PASSWORD)",
    )


@pytest.fixture(scope="session")
def credentials(request: pytest.FixtureRequest) -> tuple[str, str]:
    user = request.config.getoption("--smoke-user")
    password = request.config.getoption("--smoke-password")
    if not (user and password):
        pytest.skip("authenticated checks need --smoke-user and --smoke-password (MLP_SMOKE_*)")
    return str(user), str(password)


@pytest.fixture(scope="session")
def client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    base = request.config.getoption("--base-url")
    if not base:
        raise pytest.UsageError("smoke tests need --base-url URL (or MLP_SMOKE_URL)")
    with httpx.Client(base_url=str(base).rstrip("/"), timeout=10) as http:
        yield http
