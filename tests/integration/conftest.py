"""The platform on each real database: embedded SQLite and the session's PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_platform.config import Settings
from ml_platform.service import Platform


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
