"""Shared fixtures: Hypothesis profiles, isolated platform homes, real PostgreSQL databases."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, settings
from psycopg import sql
from sqlalchemy.engine import make_url

from ml_platform.config import Settings
from ml_platform.service import Platform
from tests import coverage_scope, services

pytest_plugins = ["tests.balance"]

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
_default_profile = "ci" if os.environ.get("CI", "").lower() == "true" else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))

PG_HINT = "set DATABASE_URL to a reachable server, or unset it to get a throwaway one"
REDIS_HINT = "set REDIS_URL to a reachable server, or unset it to get a throwaway one"


def pytest_configure(config: pytest.Config) -> None:
    """Find or start PostgreSQL and Redis once, in the controller, before any xdist worker."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller provisioned, the environment says where
    try:
        provisioned = services.provision()
    except services.ProvisioningError as exc:
        raise pytest.UsageError(f"cannot provide the test services: {exc}") from None
    provisioned.export()
    config.stash[_PROVISIONED] = provisioned


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """Every xdist worker imports the same modules as it collects: all but the first import
    them without coverage's tracer (tests/coverage_scope.py), the first measures them."""
    untraced = os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" and sys.gettrace() is not None
    if untraced:
        coverage_scope.untraced_module_bodies()
    try:
        yield
    finally:
        if untraced:
            coverage_scope.traced_module_bodies()


def pytest_report_header(config: pytest.Config) -> str | None:
    provisioned = config.stash.get(_PROVISIONED, None)
    return f"services: {provisioned.describe()}" if provisioned else None


def pytest_unconfigure(config: pytest.Config) -> None:
    # This process's zygotes end now, not when an xdist worker is torn down without its exit
    # handlers: their coverage is then saved before the controller combines it.
    from ml_platform import tracer

    tracer._ZYGOTE.stop(5.0)
    forked = sys.modules.get("tests.forked")  # imported by the tests that fork mlp processes
    if forked is not None:
        forked.ZYGOTE.stop(5.0)
    provisioned = config.stash.get(_PROVISIONED, None)
    if provisioned is not None:
        provisioned.close()


_PROVISIONED = pytest.StashKey[services.Provisioned]()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (xdist worker), dropped at the end."""
    with throwaway_database() as url:
        yield url


@contextmanager
def throwaway_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database on the session's server, dropped after."""
    base = os.environ[services.DATABASE_ENV]
    name = f"mlp_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(services.libpq_url(base), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0]
        pytest.fail(
            f"PostgreSQL at {services.shown(base)} is unreachable ({reason}); {PG_HINT}",
            pytrace=False,
        )
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield make_url(base).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(autouse=True)
def _cheap_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, argon2 at its smallest cost: the production cost (≈ 0.1 s a hash or a
    check here) is a defence, not a behaviour. Servers the tests start as processes keep it,
    and tests/integration/test_security_defaults.py checks it."""
    from argon2 import PasswordHasher

    from ml_platform import security

    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr(security, "_hasher", cheap)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty platform home, also exported so that child processes use it."""
    monkeypatch.setenv("ML_PLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return tmp_path / "home"


@pytest.fixture
def sqlite_platform(home: Path) -> Iterator[Platform]:
    platform = Platform(Settings(home=home, lease_seconds=2.0, poll_seconds=0.1)).start()
    yield platform
    platform.close()


@pytest.fixture
def postgres_clean(postgres_url: str) -> Iterator[str]:
    """The session's PostgreSQL database, emptied after the test (schema kept)."""
    yield postgres_url
    with psycopg.connect(services.libpq_url(postgres_url), autocommit=True) as conn:
        empty_database(conn)


#: Above this many rows deleted from a table, it is vacuumed too: autovacuum may be off.
VACUUM_AFTER_ROWS = 2000


def empty_database(conn: psycopg.Connection[Any], lock_timeout: str = "30s") -> None:
    """Delete every row of the public tables but ``alembic_version``, start the sequences
    again and put back what the migrations seed, as a fresh database has it.

    DELETE, not TRUNCATE: a TRUNCATE of the schema's tables makes a new file for each table
    and index and waits for them at its commit (30-140 ms here, against 1-5 ms for deleting
    a test's few rows), after each of the ≈ 150 tests that use the database.

    A row some other session still holds (a process a test left running) is waited for up
    to ``lock_timeout``; then the teardown fails naming the database's other sessions (each
    of ours is ``ml-platform pid N``), instead of hanging until the test's timeout."""
    references = conn.execute(
        "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c"
        " JOIN pg_namespace n ON n.oid = c.connamespace"
        " WHERE c.contype = 'f' AND n.nspname = 'public' AND c.conrelid <> c.confrelid"
    ).fetchall()
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'alembic_version' ORDER BY tablename"
        )
    ]
    if not tables:
        return  # no schema made yet: nothing to empty, nothing to seed
    # Rows that refer to others go first: each table after every table that refers to it.
    referrers = {table: {a for a, b in references if b == table} for table in tables}
    ordered: list[str] = []
    while len(ordered) < len(tables):
        ready = [t for t in tables if t not in ordered and referrers[t] <= set(ordered)]
        assert ready, f"foreign keys in a cycle among {sorted(set(tables) - set(ordered))}"
        ordered += ready
    grown = []
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
            for table in ordered:
                deleted = conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
                if deleted.rowcount > VACUUM_AFTER_ROWS:
                    grown.append(table)
            for (sequence,) in conn.execute(
                "SELECT quote_ident(sequencename) FROM pg_sequences WHERE schemaname = 'public'"
            ).fetchall():
                conn.execute("SELECT setval(%s, 1, false)", (sequence,))
            conn.execute(
                "INSERT INTO projects (name, created_at)"
                " VALUES ('default', now() at time zone 'utc')"
            )
    except psycopg.errors.LockNotAvailable:
        others = conn.execute(
            "SELECT pid, application_name, state, left(query, 100) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        raise AssertionError(
            f"the test database could not be emptied within {lock_timeout}: another session"
            f" holds its rows; its sessions (pid, name, state, query): {others}"
        ) from None
    for table in grown:
        conn.execute(sql.SQL("VACUUM {}").format(sql.Identifier(table)))


@dataclass(frozen=True)
class RedisTarget:
    url: str
    prefix: str


@pytest.fixture(scope="session")
def redis_target() -> Iterator[RedisTarget]:
    """The Redis server with a key prefix of this test session's own, cleaned up at the end."""
    url = os.environ[services.REDIS_ENV]
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(
            f"Redis at {services.shown(url)} is unreachable ({exc}); {REDIS_HINT}", pytrace=False
        )
    prefix = f"mlp-test-{uuid.uuid4().hex[:12]}"
    try:
        yield RedisTarget(url, prefix)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def redis_client(redis_target: RedisTarget) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_target.url)
    yield client
    keys = list(client.scan_iter(match=f"{redis_target.prefix}:*", count=500))
    if keys:
        client.delete(*keys)
    client.close()
