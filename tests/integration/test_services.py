"""The test session's own services: given, found running, or started and removed."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import psycopg
import pytest
import redis

from ml_platform.config import Settings
from ml_platform.service import Platform
from ml_platform.task_runner import is_running
from tests import services, workflows
from tests.conftest import empty_database

pytestmark = pytest.mark.integration
NOWHERE_PG = "postgresql://postgres@127.0.0.1:1/test"
NOWHERE_REDIS = "redis://127.0.0.1:1/0"


def _owner(pid: int) -> str:
    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name


def test_with_nothing_running_throwaway_servers_are_started_and_leave_nothing() -> None:
    provisioned = services.provision({}, NOWHERE_PG, NOWHERE_REDIS)
    try:
        line = provisioned.describe()
        assert line.count("started for this session") == 2, line
        with psycopg.connect(services.libpq_url(provisioned.database_url)) as conn:
            [(version,)] = conn.execute("SHOW server_version_num").fetchall()
            assert int(version) >= 150000
            [(data_dir,)] = conn.execute("SHOW data_directory").fetchall()
        client = redis.Redis.from_url(provisioned.redis_url)
        assert client.xadd("probe", {"a": 1})  # Streams are there
        assert int(client.info()["redis_version"].split(".")[0]) >= 6
        client.close()
        postmaster = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs as an unprivileged user
            assert _owner(postmaster) == services.POSTGRES_RUN_AS
        folders = [Path(data_dir).parent]
    finally:
        provisioned.close()
    assert not is_running(postmaster)
    assert not any(folder.exists() for folder in folders)
    assert not services.postgres_answers(provisioned.database_url, timeout=1)
    assert not services.redis_answers(provisioned.redis_url, timeout=0.5)


def test_given_urls_are_used_as_they_are_and_nothing_is_started() -> None:
    given = {
        "DATABASE_URL": "postgresql://someone:secret@db.example:5432/x",  # pragma: allowlist secret
        "REDIS_URL": "redis://cache.example:6379/0",
    }
    provisioned = services.provision(given, NOWHERE_PG, NOWHERE_REDIS)
    assert provisioned.database_url == given["DATABASE_URL"]
    assert provisioned.redis_url == given["REDIS_URL"]
    assert provisioned.cleanups == []
    line = provisioned.describe()
    assert "given by DATABASE_URL" in line and "given by REDIS_URL" in line
    assert "secret" not in line


def test_running_servers_at_the_default_addresses_are_used() -> None:
    found = services.provision(
        {}, os.environ[services.DATABASE_ENV], os.environ[services.REDIS_ENV]
    )
    assert found.cleanups == [] and found.describe().count("running here") == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands PostgreSQL to another user")
def test_as_root_binaries_the_server_user_cannot_reach_are_copied_where_it_can(
    tmp_path: Path,
) -> None:
    found = services.postgres_binaries()
    assert found is not None
    private = tmp_path / "private"  # as a venv under a 0700 temporary directory would be
    private.mkdir(mode=0o700)
    site = private / "site"
    shutil.copytree(found.parent, site / found.parent.parent.name / found.parent.name)
    libs = found.parent.parent.parent / f"{found.parent.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name)
    server = services.ThrowawayPostgres(site / found.parent.parent.name / found.parent.name / "bin")
    try:
        server.start()
        assert services.postgres_answers(server.url)
        assert server.dir in server.bin.parents  # ran from its own copy
    finally:
        server.remove()


def test_the_test_database_is_emptied_as_new_and_a_session_holding_it_is_named(
    postgres_clean: str, tmp_path: Path
) -> None:
    """What `postgres_clean` leaves after a test: no rows but the seeded default project, ids
    from 1 again; and a row another session still holds fails the teardown with that
    session's name instead of hanging it."""
    platform = Platform(Settings(home=tmp_path, database_url_override=postgres_clean)).start()
    try:
        platform.submit(workflows.arithmetic, {"n": 2})
    finally:
        platform.close()
    url = services.libpq_url(postgres_clean)
    with psycopg.connect(url, autocommit=True) as conn:
        empty_database(conn)
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM task_runs").fetchone() == (0,)
        assert conn.execute("SELECT id, name FROM projects").fetchall() == [(1, "default")]
        with psycopg.connect(url, application_name="a leftover test process") as holder:
            holder.execute("SELECT * FROM projects FOR UPDATE")  # a transaction left open
            with pytest.raises(AssertionError, match="a leftover test process"):
                empty_database(conn, lock_timeout="200ms")
        # Once it is gone the database empties as before.
        empty_database(conn)
        assert conn.execute("SELECT id, name FROM projects").fetchall() == [(1, "default")]
