"""PostgreSQL or Redis restarted during a run, on a throwaway server of the test's own."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from ml_platform.accounts import Accounts
from ml_platform.api import create_app
from ml_platform.client import ApiClientError, Client
from ml_platform.config import Settings
from ml_platform.service import Platform
from ml_platform.store import db
from ml_platform.store.db import DatabaseUnavailable
from ml_platform.worker import make_dispatcher
from tests import workflows
from tests.conftest import RedisTarget
from tests.forked import ZYGOTE
from tests.helpers import wait_for
from tests.services import ThrowawayPostgres, ThrowawayRedis

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL server of this test's own, to stop and start (see tests/services.py)."""
    server = ThrowawayPostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def _settings_and_env(
    server: ThrowawayPostgres, redis_target: RedisTarget, tmp_path: Path, lease: float
) -> tuple[Settings, dict[str, str]]:
    """This test's platform settings, and the same as a worker process's environment."""
    settings = Settings(
        home=tmp_path / "home",
        database_url_override=server.url,
        redis_url=redis_target.url,
        redis_prefix=redis_target.prefix,
        lease_seconds=lease,
        poll_seconds=0.2,
        secret_key="k3y-for-tests-only-7f0c4e2a9b1d8e6f5a4c3b2a1908f7e6",
    )
    env = dict(
        os.environ,
        DATABASE_URL=server.url,
        REDIS_URL=redis_target.url,
        MLP_REDIS_PREFIX=redis_target.prefix,
        MLP_LEASE_SECONDS=str(lease),
        MLP_POLL_SECONDS="0.2",
        ML_PLATFORM_HOME=str(tmp_path / "home"),
    )
    return settings, env


def test_postgresql_restarted_during_a_run(
    throwaway_postgres: ThrowawayPostgres,
    redis_target: RedisTarget,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    settings, env = _settings_and_env(throwaway_postgres, redis_target, tmp_path, lease=5.0)
    platform = Platform(settings).start()
    worker = ZYGOTE.spawn(["worker", "--concurrency", "1"], env)  # tests/forked.py
    marker = tmp_path / "marker"
    try:
        with TestClient(create_app(settings, platform=platform)) as api:
            assert api.get("/readyz").status_code == 200
            submitted = platform.submit(
                workflows.long_pipeline, {"marker": str(marker), "seconds": 3.0}
            )
            wait_for(marker.exists)
            throwaway_postgres.stop()
            down = api.get("/readyz")
            assert down.status_code == 503
            assert down.json()["checks"]["database"].startswith("unreachable")
            # A request that needs the database meanwhile: 503 and when to ask again, not a
            # 500 that says the server failed.
            for _ in range(2):  # the connection the server dropped, then a refused one
                scraped = api.get("/metrics")
                assert scraped.status_code == 503, scraped.text
                assert scraped.json()["error"]["code"] == "database_unavailable"
                assert scraped.headers["retry-after"] == "1"
            time.sleep(1.0)  # the worker's heartbeats fail meanwhile; it must keep going
            throwaway_postgres.start()
            wait_for(lambda: api.get("/readyz").status_code == 200)
            wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
        states = {t.node_id: t.state for t in platform.task_runs(submitted.run_id)}
        assert states == {"long_step": "succeeded", "echo": "succeeded"}
        assert worker.poll() is None, "the worker must survive the outage"
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
        platform.close()
    assert "database or Redis unavailable, retrying" in output


PASSWORD = "correct horse battery"  # pragma: allowlist secret


@pytest.fixture
def platform_with_a_run(
    throwaway_postgres: ThrowawayPostgres, tmp_path: Path
) -> Iterator[tuple[Platform, str]]:
    """A platform on the throwaway PostgreSQL, an admin alice, and a run of two tasks."""
    settings = Settings(
        home=tmp_path / "home",
        database_url_override=throwaway_postgres.url,
        secret_key="k3y-for-tests-only-7f0c4e2a9b1d8e6f5a4c3b2a1908f7e6",
    )
    platform = Platform(settings).start()
    try:
        Accounts(platform.db, timedelta(days=1)).create_user("alice", PASSWORD, is_admin=True)
        yield platform, platform.submit(workflows.arithmetic, {"n": 2}).run_id
    finally:
        platform.close()


def test_a_client_read_waits_out_a_postgresql_restart(
    throwaway_postgres: ThrowawayPostgres, platform_with_a_run: tuple[Platform, str]
) -> None:
    """`mlp --server` watching a run while the server's database restarts: the server
    answers 503 with Retry-After; a read asks again when told, until it is answered, instead
    of failing the command. A write is not repeated: it fails, and says why."""
    platform, run_id = platform_with_a_run
    with TestClient(create_app(platform.settings, platform=platform)) as http:
        waits: list[str] = []
        client = Client(str(http.base_url), on_wait=waits.append)
        client._http = http  # the real application, in this process
        client.login("alice", PASSWORD)
        throwaway_postgres.stop()
        with pytest.raises(ApiClientError) as refused:
            client.cancel(run_id)
        assert refused.value.status == 503 and refused.value.code == "database_unavailable"
        restart = threading.Timer(1.0, throwaway_postgres.start)
        restart.start()
        try:
            began = time.monotonic()
            assert client.run(run_id)["id"] == run_id
            assert time.monotonic() - began >= 1.0  # it waited for the restart
            assert waits and "(database_unavailable): asking again in 1 s" in waits[0]
        finally:
            restart.join()
        assert platform.run(run_id)[0].cancel_requested is False  # the write was not done


def test_the_first_write_after_a_postgresql_restart_succeeds(
    throwaway_postgres: ThrowawayPostgres,
    platform_with_a_run: tuple[Platform, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However recently the API used a pooled connection (a worker's is tried only after a
    second idle), a request tries it first: the first request after a restart or a failover
    gets a fresh connection, not a 503 from one the server dropped."""
    monkeypatch.setattr("ml_platform.store.db.PING_IDLE_SECONDS", 3600.0)  # "just used"
    platform, run_id = platform_with_a_run
    with TestClient(create_app(platform.settings, platform=platform)) as api:
        token = api.post(
            "/api/v1/auth/token", json={"username": "alice", "password": PASSWORD}
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        assert api.get(f"/api/v1/projects/default/runs/{run_id}", headers=headers).is_success
        throwaway_postgres.stop()
        throwaway_postgres.start()
        cancelled = api.post(f"/api/v1/projects/default/runs/{run_id}/cancel", headers=headers)
        assert cancelled.status_code == 200, cancelled.text


def _restarted_under_a_busy_worker(
    platform: Platform, env: dict[str, str], tmp_path: Path, restart: Callable[[], None]
) -> None:
    """A worker commits 400 tasks of 5 ms back to back on one slot (at least 2 s of work,
    however fast the machine; its pooled connections never idle, so never pinged before use);
    ``restart`` happens under it once 50 have ended. The worker retries and goes on: the run
    succeeds, every task committed once, the worker still running."""
    # This process reads the run after the restart as the API does: a checkout is pinged first
    # (else a connection last used under a second before the restart fails its first read).
    platform.db.ping_after = 0.0
    output = tmp_path / "worker.out"
    with output.open("w") as out:  # a line per task: a file, not a pipe that could fill
        worker = ZYGOTE.spawn(["worker", "--concurrency", "1"], env, output=out)
    try:
        submitted = platform.submit(workflows.naps, {"n": 400, "seconds": 0.005})
        make_dispatcher(platform, "submitter").publish(submitted.queued)
        wait_for(lambda: output.read_text().count("succeeded nap") >= 50, timeout=30)
        assert output.read_text().count("succeeded nap") < 400  # restarted under load
        restart()
        wait_for(lambda: platform.run(submitted.run_id)[0].state in ("succeeded", "failed"))
        assert platform.run(submitted.run_id)[0].state == "succeeded"
        assert worker.poll() is None, "the worker must survive the restart"
        tasks = platform.task_runs(submitted.run_id)
        attempts = platform.attempts(submitted.run_id)
        assert sum(a.state == "succeeded" for a in attempts) == len(tasks)  # each once
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert "database or Redis unavailable, retrying" in output.read_text()


def test_postgresql_restarted_under_a_busy_worker(
    throwaway_postgres: ThrowawayPostgres, redis_target: RedisTarget, tmp_path: Path
) -> None:
    """The first statement on an old connection fails, the pool drops them all, and the
    worker goes on with fresh ones."""
    settings, env = _settings_and_env(throwaway_postgres, redis_target, tmp_path, lease=2.0)
    platform = Platform(settings).start()
    try:

        def restart() -> None:
            throwaway_postgres.stop()
            throwaway_postgres.start()

        _restarted_under_a_busy_worker(platform, env, tmp_path, restart)
    finally:
        platform.close()


def test_redis_restarted_under_a_busy_worker(postgres_clean: str, tmp_path: Path) -> None:
    """Redis (no persistence) restarts: its connections drop, and the server that comes back
    holds no stream, group or publication marker. The consumer group is made again and the
    scheduler publishes what is queued again."""
    server = ThrowawayRedis()
    server.start()
    settings = Settings(
        home=tmp_path / "home",
        database_url_override=postgres_clean,
        redis_url=server.url,
        redis_prefix="restart",
        lease_seconds=2.0,
        poll_seconds=0.2,
    )
    env = dict(
        os.environ,
        DATABASE_URL=postgres_clean,
        REDIS_URL=server.url,
        MLP_REDIS_PREFIX="restart",
        MLP_LEASE_SECONDS="2",
        MLP_POLL_SECONDS="0.2",
        ML_PLATFORM_HOME=str(tmp_path / "home"),
    )
    platform = Platform(settings).start()
    try:

        def restart() -> None:
            server.stop()
            time.sleep(0.5)  # the worker finds it gone
            server.start()

        _restarted_under_a_busy_worker(platform, env, tmp_path, restart)
    finally:
        platform.close()
        server.remove()


def test_a_database_address_that_takes_no_connection_fails_the_start_in_seconds(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address where PostgreSQL takes no connection (a host gone, the old address of a
    failed-over primary): here a listener whose queue is full, so that the kernel drops the
    connection's SYNs. The start fails after the connect timeout, naming the database, and
    the caller (a worker's or server's start, a CLI command) can say so and retry; before,
    psycopg waited 130 s (its own default) on every connect."""
    monkeypatch.setitem(db.CONNECTION_DEFAULTS, "connect_timeout", 2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = [socket.socket() for _ in range(4)]
        try:
            for waiting in queued:  # the queue fills; later connections get no answer
                waiting.setblocking(False)
                waiting.connect_ex(("127.0.0.1", port))
            time.sleep(0.2)
            url = f"postgresql://postgres@127.0.0.1:{port}/test"
            began = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match=f"127.0.0.1:{port}/test.*timeout"):
                Platform(Settings(home=home, database_url_override=url)).start()
            assert time.monotonic() - began < 20
        finally:
            for waiting in queued:
                waiting.close()


def test_connections_ask_for_keepalives_and_a_timeout_on_unacknowledged_data(
    postgres_clean: str, home: Path
) -> None:
    """A connection whose server is gone mid-statement (a partition, a host powered off) is
    found by TCP keepalives and tcp_user_timeout in about half a minute, not after the
    kernel's 15 minutes of retransmissions: libpq is given them on every connection, and a
    URL's own value wins."""
    platform = Platform(Settings(home=home, database_url_override=postgres_clean)).start()
    try:
        with platform.db.engine.connect() as connection:
            driver: Any = connection.connection.driver_connection
            given = driver.info.get_parameters()
    finally:
        platform.close()
    assert {name: given.get(name) for name in db.CONNECTION_DEFAULTS} == {
        name: str(value) for name, value in db.CONNECTION_DEFAULTS.items()
    }
    own = db.make_engine(f"{postgres_clean}?keepalives_idle=5")
    try:
        with own.connect() as connection:
            own_driver: Any = connection.connection.driver_connection
            params = own_driver.info.get_parameters()
        assert params["keepalives_idle"] == "5" and params["tcp_user_timeout"] == "30000"
    finally:
        own.dispose()
