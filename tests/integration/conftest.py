"""The platform on each real database: embedded SQLite and the session's PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from ml_platform.config import Settings
from ml_platform.service import Platform
from tests.conftest import RedisTarget


def _started(home: Path, url: str | None) -> Iterator[Platform]:
    settings = Settings(home=home, database_url_override=url, lease_seconds=2.0, poll_seconds=0.1)
    platform = Platform(settings).start()
    yield platform
    platform.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def platform(request: pytest.FixtureRequest, home: Path) -> Iterator[Platform]:
    """A started platform on SQLite or PostgreSQL, with short leases for fault tests."""
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_clean")
    yield from _started(home, url)


@pytest.fixture
def postgres_platform(postgres_clean: str, home: Path) -> Iterator[Platform]:
    """The same on PostgreSQL only: for what only PostgreSQL does (row locks, one-statement
    steps)."""
    yield from _started(home, postgres_clean)


@pytest.fixture
def distributed_env(
    postgres_clean: str, redis_target: RedisTarget, redis_client: redis.Redis, tmp_path: Path
) -> dict[str, str]:
    """The environment of `mlp` processes in distributed mode: the session's PostgreSQL
    (emptied after the test) and Redis (its keys under the test's prefix), short leases."""
    return dict(
        os.environ,
        DATABASE_URL=postgres_clean,
        REDIS_URL=redis_target.url,
        MLP_REDIS_PREFIX=redis_target.prefix,
        MLP_LEASE_SECONDS="1.5",
        MLP_POLL_SECONDS="0.1",
        ML_PLATFORM_HOME=str(tmp_path / "home"),
    )


@contextmanager
def platform_on(env: dict[str, str]) -> Iterator[Platform]:
    """This process's platform on the database and Redis of ``env`` (it submits and looks)."""
    settings = Settings(
        home=Path(env["ML_PLATFORM_HOME"]),
        database_url_override=env["DATABASE_URL"],
        redis_url=env["REDIS_URL"],
        redis_prefix=env["MLP_REDIS_PREFIX"],
    )
    platform = Platform(settings).start()
    try:
        yield platform
    finally:
        platform.close()


@pytest.fixture
def distributed_platform(distributed_env: dict[str, str]) -> Iterator[Platform]:
    """This process's platform beside the `mlp` processes of ``distributed_env``."""
    with platform_on(distributed_env) as platform:
        yield platform
