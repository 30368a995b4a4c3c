"""Engines and sessions: SQLite in WAL mode with one writer at a time, or PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Insert,
    Row,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    cast,
    column,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import TextClause

from ml_platform.store.models import stored_utc

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import sqlite3  # imported where SQLite is used: a worker on PostgreSQL has no use for it

    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
#: PostgreSQL advisory lock key under which one process at a time changes the schema.
SCHEMA_LOCK = 0x6D6C705F736368  # "mlp_sch"
#: A pooled PostgreSQL connection idle this long (seconds) is pinged before it is used.
PING_IDLE_SECONDS = 1.0
#: PostgreSQL's SQLSTATE for a transaction it rolled back to break a deadlock, and how many
#: times Database.retrying_deadlocks does such a transaction again.
DEADLOCK_DETECTED = "40P01"
DEADLOCK_RETRIES = 3
T = TypeVar("T")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or opened; the message names the URL (without password)."""


#: After how many executions psycopg prepares a statement on a PostgreSQL connection.
PREPARE_THRESHOLD = 0
#: What a PostgreSQL connection is called, before the pid of the process that opened it.
APPLICATION_NAME = "ml-platform"
#: libpq's connection settings where the URL gives none. A server that takes no connection
#: (a host gone, the old address of a failed-over primary) fails a connect after
#: connect_timeout seconds, not psycopg's 130; a connection whose server is gone is found by
#: TCP keepalives (idle) and tcp_user_timeout (sent data unacknowledged, ms) in about half a
#: minute, not the kernel's 15 minutes of retransmissions, so the statement fails and the
#: caller's retry gets a fresh connection.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
#: How long a new SQLite connection keeps trying to switch the database to WAL.
WAL_SWITCH_SECONDS = 30.0


def _to_wal(cursor: sqlite3.Cursor) -> None:
    """Put the database in WAL mode. SQLite answers "database is locked" at once, without
    waiting out the busy timeout, when another connection holds a lock while this one
    changes the journal mode (processes opening a new database together): try again."""
    import sqlite3

    deadline = time.monotonic() + WAL_SWITCH_SECONDS
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def make_engine(url: str, ping_after: Callable[[], float] = lambda: PING_IDLE_SECONDS) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and serialized write transactions.

    A pooled PostgreSQL connection idle ``ping_after()`` seconds or more is tried before use."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            _to_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Take the write lock at the start: a read-then-write transaction can then never
            # fail halfway with "database is locked"; SQLite has a single writer anyway.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # Every statement is prepared on its first use (psycopg's default: its sixth), so that a
    # fresh worker's first claims and steps skip parsing their long statements too: a 10-step
    # chain right after a fan-out on workers just started, 26.7 / 28.5 → 22.2 / 23.4 ms
    # (medians of 6, docs/benchmarks-analysis.md). psycopg keeps its 100 most recent.
    engine = create_engine(
        url, pool_size=5, max_overflow=5, connect_args={"prepare_threshold": PREPARE_THRESHOLD}
    )

    @event.listens_for(engine, "do_connect")
    def _name_the_process(
        _dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]
    ) -> None:
        # pg_stat_activity then says which process holds each connection (a lock, a long
        # statement, a backend still running for a process that died); taken at each connect,
        # so a forked process's connections carry its own pid. A URL's own name wins, and its
        # own timeouts (CONNECTION_DEFAULTS).
        cparams.setdefault("application_name", f"{APPLICATION_NAME} pid {os.getpid()}")
        for name, value in CONNECTION_DEFAULTS.items():
            cparams.setdefault(name, value)

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_from"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        # A connection that sat idle may have been closed by a restart or a network device:
        # try it first (the pool then opens a fresh one). One used a moment ago is not tried:
        # a ping before every transaction was a round trip more per task; if the server went
        # away since, the statement fails, the pool drops every older connection, and the
        # caller's retry gets a fresh one.
        idle_from = record.info.get("idle_from")
        if idle_from is not None and time.monotonic() - idle_from >= ping_after():
            try:
                engine.dialect.do_ping(dbapi_conn)
            except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
                raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc

    return engine


def insert_rows(
    connection: Connection,
    model: type[Any],
    rows: Sequence[Mapping[str, Any]],
    returning: tuple[str, ...] = (),
) -> list[Row[Any]]:
    """Insert many rows (each with the same keys) in one statement; the ``returning`` columns
    of each, in no promised order (return a key to match them by).

    On PostgreSQL, ``INSERT … SELECT … FROM json_to_recordset(:rows)``: the rows travel as one
    JSON document in a statement of fixed text. (SQLAlchemy's many-VALUES statement for a
    thousand rows is ≈ 100 KB of text that psycopg re-parses on every run, and arrays of
    values are dumped element by element in Python.) Elsewhere (SQLite), SQLAlchemy's own
    executemany.
    """
    if not rows:
        return []
    table: Table = model.__table__
    names = tuple(rows[0])
    if connection.dialect.name == "postgresql":
        statement = _recordset_insert(table, names, returning)
        nested = _json_columns(table, names)
        if nested:  # each JSON value travels as a string of JSON (see _recordset_insert)
            rows = [
                {
                    name: json.dumps(value) if name in nested and value is not None else value
                    for name, value in row.items()
                }
                for row in rows
            ]
        result = connection.execute(statement, {"rows": json.dumps(rows, default=_naive_utc)})
    else:
        statement = insert(table)
        if returning:
            statement = statement.returning(*(table.c[name] for name in returning))
        result = connection.execute(statement, list(rows))
    return list(result) if returning else []


def _naive_utc(value: object) -> str:
    """A datetime as the timestamp columns hold it (UTC, no zone), for the rows' JSON."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None).isoformat()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _json_columns(table: Table, names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(n for n in names if isinstance(_stored_as(table.c[n].type), JSON))


@lru_cache(maxsize=64)
def _recordset_insert(table: Table, names: tuple[str, ...], returning: tuple[str, ...]) -> Insert:
    """``INSERT INTO table (names) SELECT names FROM json_to_recordset(:rows) AS u(name type,
    …)``, each column read as its own type -- but a JSON column as text, cast to JSON: the
    recordset's parser turns every escape of the document into a character, and ``\u0000``,
    which a JSON column keeps, has no character in PostgreSQL's text (a task's inputs may
    hold one); inside a string of JSON it is a plain backslash sequence."""
    nested = _json_columns(table, names)
    kinds = {name: Text() if name in nested else _stored_as(table.c[name].type) for name in names}
    rows = (
        func.json_to_recordset(cast(bindparam("rows", type_=Text()), JSON))
        .table_valued(*(column(name, kinds[name]) for name in names))
        .render_derived(name="u", with_types=True)
    )
    values = [cast(rows.c[n], JSON) if n in nested else rows.c[n] for n in names]
    statement = insert(table).from_select(list(names), select(*values))
    return statement.returning(*(table.c[name] for name in returning)) if returning else statement


def _stored_as(kind: Any) -> Any:
    """The type PostgreSQL stores a column as (a decorated type's own implementation)."""
    return kind.impl if isinstance(kind, TypeDecorator) else kind


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def alembic_config(url: str) -> Config:
    from alembic.config import Config  # Alembic only when migrating (0.3 s to import)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _one_at_a_time(connection: Connection) -> None:
    """Serialize schema changes between processes, for this transaction: on PostgreSQL an
    advisory lock; on SQLite the transaction already holds the one write lock (BEGIN
    IMMEDIATE). A process that waited then sees what the first one made."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})


#: How long a migration's statement waits for a lock on a table it changes before it gives
#: way (PostgreSQL). Waiting, it would queue every later statement on that table behind it:
#: one transaction left open elsewhere (a long read, a session idle in transaction) would stop
#: every worker and request until it ended. Given way, the migration is rolled back whole and
#: tried again after a pause in which the platform goes on, MIGRATION_TRIES times in all.
MIGRATION_LOCK_TIMEOUT_SECONDS = 5.0
MIGRATION_TRIES = 6
#: The pause after the first try that gave way; doubled after each.
MIGRATION_PAUSE_SECONDS = 2.0
LOCK_NOT_AVAILABLE = "55P03"


class MigrationBlocked(DatabaseUnavailable):
    """A migration gave way, each time it was tried, to transactions holding its tables."""


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` on the engine's database, in one transaction;
    on PostgreSQL giving way to other transactions' locks (MIGRATION_LOCK_TIMEOUT_SECONDS),
    and tried again, or MigrationBlocked saying who held them."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    pause = MIGRATION_PAUSE_SECONDS
    for tried in range(1, MIGRATION_TRIES + 1):
        try:
            with engine.begin() as connection:
                _one_at_a_time(connection)  # other migrators: waited for, without a limit
                if connection.dialect.name == "postgresql":  # SET LOCAL, with a parameter
                    connection.execute(
                        text("SELECT set_config('lock_timeout', :limit, true)"),
                        {"limit": f"{int(MIGRATION_LOCK_TIMEOUT_SECONDS * 1000)}ms"},
                    )
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
            return
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            holders = _lock_holders(engine)
            if tried == MIGRATION_TRIES:
                raise MigrationBlocked(
                    f"the migration gave way {tried} times to transactions holding a table it "
                    f"changes (it waits {MIGRATION_LOCK_TIMEOUT_SECONDS:g} s for a lock, then "
                    "lets the platform go on): end them or wait for them, then run "
                    "`mlp db upgrade` again. Holding its tables, open longest: "
                    f"{holders or 'none now'}"
                ) from None
            log.warning(
                "migration: a table is locked (%s); trying again in %g s (try %d of %d)",
                holders or "by a transaction since ended",
                pause,
                tried + 1,
                MIGRATION_TRIES,
            )
            time.sleep(pause)
            pause *= 2


#: The transactions holding a lock on a table (or index) of the platform's schema, oldest
#: first: a migration waits for exactly these. A transaction merely open elsewhere in the
#: database (one that read nothing of ours) holds nothing a migration needs.
_LOCK_HOLDERS = text("""
    SELECT a.pid, a.application_name, a.state, now() - a.xact_start AS open_for
    FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.xact_start IS NOT NULL
        AND a.pid <> pg_backend_pid()
        AND EXISTS (
            SELECT FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
            WHERE l.pid = a.pid AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND c.relnamespace = current_schema()::regnamespace
        )
    ORDER BY a.xact_start LIMIT 3
    """)


def _lock_holders(engine: Engine) -> str:
    """The transactions holding the platform's tables, open longest first, as a line."""
    try:
        with reading(engine) as connection:
            rows = connection.execute(_LOCK_HOLDERS).all()
    except SQLAlchemyError:
        return ""
    return "; ".join(
        f"pid {pid} ({name or 'unnamed'}, {state}, open {open_for.total_seconds():.0f} s)"
        for pid, name, state, open_for in rows
    )


def create_schema(engine: Engine) -> bool:
    """Give an empty database the latest schema in one go: the models' tables, the default
    project and Alembic's stamp of the newest migration, in one transaction. It is what
    replaying every migration makes (tests/integration/test_service.py compares the two), in
    a tenth of the time (≈ 9 ms against ≈ 85 ms on SQLite) and without importing Alembic.
    False when another process made the schema first (nothing is changed then)."""
    from ml_platform.store.models import DEFAULT_PROJECT, Base, Project

    head = head_from_files()
    if head is None:
        return False  # the files do not name one newest migration: let Alembic decide
    with engine.begin() as connection:
        _one_at_a_time(connection)
        if inspect(connection).has_table("alembic_version"):
            return False
        Base.metadata.create_all(connection)
        connection.execute(
            text(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            )
        )
        connection.execute(text("INSERT INTO alembic_version VALUES (:head)"), {"head": head})
        connection.execute(insert(Project).values(name=DEFAULT_PROJECT))
    return True


def reading(engine: Engine) -> Connection:
    """A pooled connection for reads that need no transaction of their own, in a ``with``
    block. On PostgreSQL in autocommit: no BEGIN, and no ROLLBACK at the end -- after which
    psycopg forgets every statement it prepared on the connection (a rolled-back transaction
    may have changed the schema), so that the hot path's were parsed and planned again, five
    times each before PostgreSQL settles on a generic plan. On SQLite as any connection: its
    reads take its lock as its writes do (see make_engine)."""
    connection = engine.connect()
    if engine.dialect.name == "postgresql":
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
    return connection


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None before the first migration)."""
    with reading(engine) as connection:
        try:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:  # no such table: an empty database
            return None


def head_revision() -> str | None:
    """The newest migration, as Alembic sees it."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


_REVISION = re.compile(r'^revision: str = "([^"]+)"', re.M)
_DOWN = re.compile(r'^down_revision: [^=]+= "([^"]+)"', re.M)


def head_from_files() -> str | None:
    """The newest migration, read from the files without importing Alembic (start-up cost)."""
    revisions, parents = _revisions_in_files()
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def newer_than_files(revision: str | None) -> bool:
    """Whether a database at ``revision`` was migrated by a newer release than this one: a
    revision none of this release's migrations names. (After a deploy whose migration ran,
    the release before still runs -- the rolling update's old pods, or a rollback -- on the
    newer schema: migrations only add to what a release before uses.)"""
    return revision is not None and revision not in _revisions_in_files()[0]


def _revisions_in_files() -> tuple[set[str], set[str]]:
    """The migrations' revisions and the revisions they follow, read from their files."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        source = path.read_text()
        if found := _REVISION.search(source):
            revisions.add(found.group(1))
        if down := _DOWN.search(source):
            parents.add(down.group(1))
    return revisions, parents


def on_driver(conn: Connection, statement: TextClause, params: Mapping[str, Any]) -> list[Any]:
    """The rows of ``statement`` (PostgreSQL), executed straight on psycopg: for the hot
    path's few statements (a claim, a chain's step, a submission), where SQLAlchemy's
    execution -- its bind and result processing, its result objects -- was 0.15-0.25 ms of
    each here. The SQL is the one SQLAlchemy sends, prepared as its own are
    (PREPARE_THRESHOLD); the rows are named tuples (attributes, as SQLAlchemy's rows have);
    aware datetimes are bound as naive UTC, as UTCDateTime stores them. What stays
    SQLAlchemy's: the connection (its pool; its transaction, begun here as its execute
    begins one, or autocommit), the listeners of ``before_cursor_execute``, and the errors: a
    DBAPIError, the connection invalidated when the error says it is gone."""
    from psycopg.rows import namedtuple_row  # PostgreSQL only

    sql = _driver_sql(statement, conn.dialect)
    bound = {k: stored_utc(v) if isinstance(v, datetime) else v for k, v in params.items()}
    if not conn.in_transaction():
        conn.begin()  # as SQLAlchemy's execute begins: its commit or rollback ends this
    driver: Any = conn.connection.driver_connection
    cursor = driver.cursor(row_factory=namedtuple_row)
    if conn._has_events or conn.engine._has_events:
        for listener in conn.dispatch.before_cursor_execute:
            listener(conn, cursor, sql, bound, None, False)
    try:
        cursor.execute(sql, bound)
        rows: list[Any] = cursor.fetchall()
        return rows
    except conn.dialect.loaded_dbapi.Error as exc:
        gone = conn.dialect.is_disconnect(exc, driver, cursor)
        if gone:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            sql,
            bound,
            exc,
            conn.dialect.loaded_dbapi.Error,
            dialect=conn.dialect,
            connection_invalidated=gone,
        ) from exc
    finally:
        cursor.close()


@lru_cache(maxsize=32)
def _driver_sql(statement: TextClause, dialect: Dialect) -> str:
    return str(statement.compile(dialect=dialect))


#: Database.refresh_statistics: a table is analyzed after a change of more rows than
#: ANALYZE_BASE_ROWS plus ANALYZE_SCALE of its rows at its last ANALYZE (autovacuum's defaults).
ANALYZE_BASE_ROWS = 50
ANALYZE_SCALE = 0.1
#: The tables the hot path changes in bulk, and the statement that analyzes each (one that
#: another is analyzing is skipped: its statistics are on their way).
_ANALYZE = {
    "task_runs": text("ANALYZE (SKIP_LOCKED) task_runs"),
    "attempts": text("ANALYZE (SKIP_LOCKED) attempts"),
}
_RELTUPLES = text(
    "SELECT relname, reltuples FROM pg_class WHERE oid = ANY(CAST(:names AS regclass[]))"
)


class Database:
    """An engine and its session factory, migrated on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: A pooled PostgreSQL connection idle this long is tried before use (0: always).
        self.ping_after = PING_IDLE_SECONDS
        self.engine = make_engine(url, lambda: self.ping_after)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def ensure_schema(self) -> None:
        """Bring the schema to head, or raise DatabaseUnavailable with a clear reason."""
        try:
            current = current_revision(self.engine)
            if current is None and create_schema(self.engine):
                return
            current = current or current_revision(self.engine)
            if newer_than_files(current):
                log.warning(
                    "the database is at migration %s, newer than this release knows (%s): a "
                    "newer release migrated it; this one runs on it as it is",
                    current,
                    head_from_files(),
                )
                return
            # Alembic is imported only when the database is behind (or the files are unclear).
            if current is None or current != head_from_files():
                if current != head_revision():
                    upgrade(self.engine)
        except Exception as exc:  # the driver's errors differ; all mean the same to the user
            if isinstance(exc, DatabaseUnavailable):
                raise
            raise DatabaseUnavailable(
                f"cannot open the database at {safe_url(self.url)}: {exc}"
            ) from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A short transaction: committed on success, rolled back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    def retrying_deadlocks(self, transaction: Callable[[], T]) -> T:
        """``transaction()``, done again (up to DEADLOCK_RETRIES times) when PostgreSQL
        chose it to break a deadlock: it was rolled back whole, and the others went on. For
        a transaction that locks a run before its task runs while a worker may hold one of
        them and wait for the run (see Execution.finish_and_claim), as cancel() does."""
        retries = DEADLOCK_RETRIES
        while True:
            try:
                return transaction()
            except DBAPIError as exc:
                if retries == 0 or getattr(exc.orig, "sqlstate", None) != DEADLOCK_DETECTED:
                    raise
                retries -= 1

    def autocommit(self) -> Connection:
        """A pooled connection on which each statement is its own transaction, committed as
        it ends: one round trip for a statement that must be all or nothing on its own (no
        BEGIN, no COMMIT). Use it in a ``with`` block."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def refresh_statistics(self, changed: Mapping[str, int]) -> list[str]:
        """After a bulk change -- ``changed``: table name -> rows just inserted or updated --
        ANALYZE the tables it made larger than their statistics say by autovacuum's rule
        (ANALYZE_BASE_ROWS + ANALYZE_SCALE of the rows at the last ANALYZE), at once: the
        planner's choices for the hot statements follow, and the plans kept for them are
        made again. Without statistics (a new database; autovacuum's first look comes up to a
        minute later, or never when it is off) PostgreSQL took a 1,000-task run's task runs
        for one row and read all of them for each task's upstream results. PostgreSQL only;
        returns the tables analyzed. Never raises: a failure is logged, the caller goes on."""
        if self.engine.dialect.name != "postgresql":
            return []
        bulky = {t: n for t, n in changed.items() if n > ANALYZE_BASE_ROWS and t in _ANALYZE}
        if not bulky:
            return []
        try:
            with reading(self.engine) as conn:
                known: dict[str, float] = dict(
                    conn.execute(_RELTUPLES, {"names": list(bulky)}).all()
                )
                stale = [
                    table
                    for table, rows in bulky.items()
                    if rows > ANALYZE_BASE_ROWS + ANALYZE_SCALE * max(known.get(table, 0.0), 0.0)
                ]
                for table in stale:
                    conn.execute(_ANALYZE[table])
            return stale
        except SQLAlchemyError as exc:
            log.warning("could not refresh the statistics of %s: %s", ", ".join(bulky), exc)
            return []

    def dispose(self) -> None:
        self.engine.dispose()
