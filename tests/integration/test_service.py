"""The service's guarantees on real databases: fencing, leases, retries, cancel, limits, cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg import sql as psql
from psycopg.pq import TransactionStatus
from sqlalchemy import (
    PrimaryKeyConstraint,
    UniqueConstraint,
    bindparam,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from ml_platform.accounts import Accounts
from ml_platform.artifacts import decode_value
from ml_platform.config import Settings
from ml_platform.dispatch import Dispatch, queue_of
from ml_platform.engine.dag import run_outcome
from ml_platform.engine.states import TASK_TERMINAL, AttemptState, RunState, TaskState
from ml_platform.security import AuthError
from ml_platform.service import (
    FencedOut,
    LogPiece,
    NotFound,
    Outcome,
    Platform,
    RetryError,
    Submitted,
    Tick,
    execution,
    hot_path,
    planning,
    retention,
    runs,
)
from ml_platform.store import db
from ml_platform.store.db import (
    Database,
    create_schema,
    current_revision,
    head_from_files,
    head_revision,
    insert_rows,
    make_engine,
    reading,
    upgrade,
)
from ml_platform.store.models import (
    RUN_ID_DISTINCT,
    RUN_ID_TABLES,
    Attempt,
    Base,
    LogPart,
    RefreshToken,
    Run,
    TaskRun,
    UTCDateTime,
    utcnow,
)
from tests import workflows
from tests.conftest import throwaway_database
from tests.helpers import execute, run_inline
from tests.services import libpq_url

pytestmark = pytest.mark.integration


@contextmanager
def statements_sent(platform: Platform) -> Iterator[list[str]]:
    """The SQL statements the platform sends to its database inside the block."""
    sent: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(platform.db.engine, "before_cursor_execute", seen)
    try:
        yield sent
    finally:
        event.remove(platform.db.engine, "before_cursor_execute", seen)


def _states(platform: Platform, run_id: str) -> dict[str, str]:
    return {t.node_id: t.state for t in platform.task_runs(run_id)}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """Two empty databases of one kind."""
    if request.param == "sqlite":
        yield [f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'two.db'}"]
        return
    request.getfixturevalue("postgres_url")  # the server is reachable, or a clear failure
    with throwaway_database() as one, throwaway_database() as two:
        yield [one, two]


def _schema_and_contents(url: str) -> tuple[list[Any], str | None, list[Any]]:
    """What the models' metadata does not compare, as differences: PostgreSQL's column
    options (RUN_ID_DISTINCT) after the metadata's own."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            if connection.dialect.name == "postgresql":
                options = connection.execute(
                    text(
                        "SELECT attrelid::regclass::text, attname, attoptions FROM pg_attribute"
                        " WHERE attoptions IS NOT NULL AND attrelid::regclass::text = ANY(:t)"
                    ),
                    {"t": [table.name for table in Base.metadata.sorted_tables]},
                ).all()
                expected = {(t, "run_id", f"n_distinct={RUN_ID_DISTINCT}") for t in RUN_ID_TABLES}
                found = {
                    (table, column, option)
                    for table, column, given in options
                    for option in given
                    if option.startswith("n_distinct=")
                }
                diff += [("column options", sorted(found ^ expected))] if found != expected else []
                # A serial column's sequence as wide as the column: an integer sequence stops
                # a bigint column at 2**31 - 1 all the same.
                narrower = connection.execute(
                    text(
                        "SELECT c.relname, a.attname, format_type(a.atttypid, NULL),"
                        " s.data_type::text FROM pg_depend d"
                        " JOIN pg_sequences s"
                        "  ON d.objid = (s.schemaname || '.' || s.sequencename)::regclass"
                        " JOIN pg_class c ON c.oid = d.refobjid"
                        " JOIN pg_attribute a"
                        "  ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
                        " WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'a'"
                        "  AND format_type(a.atttypid, NULL) <> s.data_type::text"
                    )
                ).all()
                diff += [("sequences narrower", sorted(map(tuple, narrower)))] if narrower else []
            projects = connection.execute(text("SELECT id, name FROM projects")).all()
        return diff, current_revision(engine), [tuple(row) for row in projects]
    finally:
        engine.dispose()


def test_no_index_is_the_leading_part_of_another() -> None:
    """Every index earns its writes: none indexes what another index (or a unique
    constraint, or the primary key) of its table already leads with."""
    for table in Base.metadata.sorted_tables:
        keys = [tuple(c.name for c in index.columns) for index in table.indexes]
        keys += [
            tuple(c.name for c in constraint.columns)
            for constraint in table.constraints
            if isinstance(constraint, (UniqueConstraint, PrimaryKeyConstraint))
        ]
        for index in table.indexes:
            columns = tuple(c.name for c in index.columns)
            wider = [
                key for key in keys if len(key) > len(columns) and key[: len(columns)] == columns
            ]
            assert not wider, f"{table.name}: {index.name} {columns} leads {wider}"


def test_replayed_migrations_and_a_fresh_schema_are_the_models_schema(
    empty_databases: list[str],
) -> None:
    """A new database is made in one go (create_schema); an old one is migrated. Both end
    exactly as the models say, at the same revision, with the default project."""
    replayed, fresh = empty_databases
    upgrade(make_engine(replayed))
    assert create_schema(make_engine(fresh)) is True
    expected: tuple[list[Any], str | None, list[Any]] = ([], head_revision(), [(1, "default")])
    assert _schema_and_contents(replayed) == expected
    assert _schema_and_contents(fresh) == expected
    assert head_from_files() == head_revision() is not None  # the check that skips Alembic
    assert create_schema(make_engine(fresh)) is False  # made already: nothing changes
    upgrade(make_engine(fresh))  # Alembic takes the stamp for what it is: nothing to do
    assert _schema_and_contents(fresh) == expected


def test_a_migration_gives_way_to_a_transaction_holding_its_table_and_says_whose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A migration that rewrites a table waited for a transaction left open on it, and every
    statement after it on that table waited behind it: one forgotten session stopped the
    platform for as long as it stayed open. The migration now gives way after a moment, tries
    again, and at last says which transactions held it; the platform goes on meanwhile, and
    the next try after they end migrates."""
    monkeypatch.setattr(db, "MIGRATION_LOCK_TIMEOUT_SECONDS", 0.2)
    monkeypatch.setattr(db, "MIGRATION_TRIES", 3)
    monkeypatch.setattr(db, "MIGRATION_PAUSE_SECONDS", 0.2)
    with throwaway_database() as url:
        engine = make_engine(url)
        try:
            upgrade(engine, "0014")
            with (
                psycopg.connect(libpq_url(url), application_name="bystander") as bystander,
                psycopg.connect(libpq_url(url), application_name="forgotten session") as holder,
            ):
                # Open longer, but on none of the platform's tables: not what holds the migration.
                bystander.execute("SELECT now()")
                time.sleep(0.05)
                holder.execute("SELECT count(*) FROM attempts")  # its transaction stays open
                outcome: list[BaseException | None] = []

                def migrate() -> None:
                    try:
                        upgrade(engine)  # 0015 rewrites attempts
                        outcome.append(None)
                    except BaseException as exc:  # noqa: BLE001 - what it raised is the check
                        outcome.append(exc)

                migrator = threading.Thread(target=migrate)
                migrator.start()
                # The platform's statements on that table still answer, within the moments
                # the migration waits: none waits for the forgotten session to end.
                with psycopg.connect(libpq_url(url), autocommit=True) as platform_side:
                    platform_side.execute("SET statement_timeout = '3s'")
                    for _ in range(5):
                        platform_side.execute("SELECT count(*) FROM attempts")
                        time.sleep(0.1)
                migrator.join(30)
                [raised] = outcome
                assert isinstance(raised, db.MigrationBlocked), raised
                assert "gave way 3 times" in str(raised) and "forgotten session" in str(raised)
                assert "bystander" not in str(raised), raised
                assert current_revision(engine) == "0014"  # rolled back whole
            upgrade(engine)  # the session ended: nothing holds the tables
            assert current_revision(engine) == head_from_files()
        finally:
            engine.dispose()


KILLED_WHILE_CREATING = """
import sys, time
from pathlib import Path
from sqlalchemy import event
from ml_platform.store import db

engine = db.make_engine(sys.argv[1])

@event.listens_for(engine, "after_cursor_execute")
def _stall(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("CREATE TABLE"):
        Path(sys.argv[2]).touch()  # one table made, the rest to come: kill me here
        time.sleep(60)

db.create_schema(engine)
"""


def _killed_once_there(script: str, *args: str) -> None:
    """Run ``script`` in a process of its own and kill it (SIGKILL) once it has touched its
    last argument, a marker file: the moment it chose to stall at."""
    ready = Path(args[-1])
    process = subprocess.Popen([sys.executable, "-c", script, *args])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "it never got there"
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()


def test_a_process_killed_while_it_makes_the_schema_leaves_nothing_half_made(
    empty_databases: list[str], tmp_path: Path
) -> None:
    """kill -9 between the first CREATE TABLE and the commit: the database is as empty as
    before (no table, no stamp, no lock held), and the next start makes the whole schema."""
    url, ready = empty_databases[0], tmp_path / "ready"
    _killed_once_there(KILLED_WHILE_CREATING, url, str(ready))
    engine = make_engine(url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    database = Database(url)
    try:
        database.ensure_schema()  # would wait for ever on a lock the dead process held
    finally:
        database.dispose()
    assert _schema_and_contents(url) == ([], head_revision(), [(1, "default")])


def test_processes_starting_together_on_an_empty_database_all_start(
    empty_databases: list[str],
) -> None:
    """A server and its workers started at once on a new database: one makes the schema,
    the others wait for it and use it; none fails, and there is one default project."""
    url = empty_databases[0]
    together = threading.Barrier(4)
    errors: list[BaseException] = []

    def start() -> None:
        database = Database(url)
        try:
            together.wait()
            database.ensure_schema()
        except BaseException as exc:  # noqa: B036 - reported by the assertion below
            errors.append(exc)
        finally:
            database.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert _schema_and_contents(url) == ([], head_revision(), [(1, "default")])


def test_a_new_sqlite_database_written_by_another_process_is_waited_for(tmp_path: Path) -> None:
    """SQLite refuses the switch to WAL at once ("database is locked", its busy timeout not
    applied) while another connection is writing a database still in its first journal mode:
    the case of processes opening a new database together. Opening waits for the writer."""
    import sqlite3

    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE busy (x INTEGER)")
    done = threading.Timer(0.3, writer.execute, ("ROLLBACK",))
    done.start()
    database = Database(f"sqlite:///{path}")
    try:
        database.ensure_schema()
    finally:
        done.join()
        database.dispose()
        writer.close()
    assert _schema_and_contents(f"sqlite:///{path}") == ([], head_revision(), [(1, "default")])


def test_fan_out_fan_in_run_succeeds_with_results_and_metrics(platform: Platform) -> None:
    submitted = platform.submit(workflows.arithmetic, {"n": 4})
    assert len(submitted.queued) == 4  # the four doubles, nothing else yet
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["total"].result == {"value": 12}
    assert [(n, m.name, m.value) for n, m in platform.metrics(submitted.run_id)] == [
        ("total", "count", 4.0)
    ]
    run, wf = platform.run(submitted.run_id)
    assert run.started_at is not None and run.finished_at is not None
    assert wf.name == "tests.workflows:arithmetic" and wf.version == 1


def test_registering_the_same_code_twice_keeps_one_version(platform: Platform) -> None:
    first = platform.register(workflows.arithmetic)
    assert platform.register(workflows.arithmetic).id == first.id


def test_a_failure_stops_only_its_downstream(platform: Platform) -> None:
    submitted = platform.submit(workflows.failing_pipeline, {})
    assert run_inline(platform, submitted.run_id) is RunState.FAILED
    states = _states(platform, submitted.run_id)
    assert states == {
        "explode": "failed",
        "echo": "upstream_failed",
        "double": "succeeded",
    }
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["explode"].error == "RuntimeError: boom"
    assert tasks["echo"].error == "not run: its upstream explode failed"  # says why


def test_retries_until_success_and_only_for_listed_errors(
    platform: Platform, tmp_path: Path
) -> None:
    counter = tmp_path / "calls"
    submitted = platform.submit(workflows.flaky_pipeline, {"counter": str(counter)})
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    attempts = platform.attempts(submitted.run_id)
    assert [a.state for a in attempts] == ["failed", "failed", "succeeded"]
    assert attempts[0].error == "ConnectionError: transient failure 1"
    assert attempts[1].not_before > attempts[0].created_at  # backoff delay applied

    picky = platform.submit(workflows.picky_pipeline, {})
    assert run_inline(platform, picky.run_id) is RunState.FAILED
    assert [a.state for a in platform.attempts(picky.run_id)] == ["failed"]


@pytest.mark.parametrize("run_started", [False, True], ids=["first claim", "run running"])
def test_a_claim_takes_the_task_run_and_the_attempt_together_or_neither(
    platform: Platform, run_started: bool
) -> None:
    """The claim's two guarded UPDATEs (with its read, one statement on PostgreSQL once the
    run is running): an attempt not yet due leaves its task run queued (the task run's change
    is undone), a task run that moved on leaves the attempt queued, a cancel requested leaves
    both, and a claimable one gets both."""
    submitted = platform.submit(workflows.relay, {"n": 2})
    [queued] = submitted.queued
    run = update(Run).where(Run.id == submitted.run_id)
    with platform.db.session() as session:
        session.execute(
            update(Attempt)
            .where(Attempt.id == queued.attempt_id)
            .values(not_before=utcnow() + timedelta(hours=1))
        )
        if run_started:
            session.execute(run.values(state=RunState.RUNNING, started_at=utcnow()))
    assert platform.claim(queued.attempt_id, "w") is None  # not due yet
    [task] = [t for t in platform.task_runs(submitted.run_id) if t.state != "pending"]
    [attempt] = platform.attempts(submitted.run_id)
    assert (task.state, attempt.state, attempt.worker_id) == ("queued", "queued", None)
    with platform.db.session() as session:
        session.execute(
            update(Attempt).where(Attempt.id == queued.attempt_id).values(not_before=utcnow())
        )
        session.execute(update(TaskRun).where(TaskRun.id == task.id).values(current_attempt=2))
    assert platform.claim(queued.attempt_id, "w") is None  # fenced: another attempt is current
    with platform.db.session() as session:
        session.execute(update(TaskRun).where(TaskRun.id == task.id).values(current_attempt=1))
        session.execute(run.values(cancel_requested=True))
    assert platform.claim(queued.attempt_id, "w") is None  # the run is being cancelled
    [attempt] = platform.attempts(submitted.run_id)
    assert attempt.state == "queued" and attempt.worker_id is None
    with platform.db.session() as session:
        session.execute(run.values(cancel_requested=False))
    with statements_sent(platform) as statements:
        claimed = platform.claim(queued.attempt_id, "w")
    assert claimed is not None and claimed.node_id == task.node_id
    if run_started and platform.db.engine.dialect.name == "postgresql":
        assert len(statements) == 1, statements  # read and both UPDATEs: one round trip
    [task] = [t for t in platform.task_runs(submitted.run_id) if t.state != "pending"]
    [attempt] = platform.attempts(submitted.run_id)
    assert (task.state, attempt.state, attempt.worker_id) == ("running", "running", "w")
    assert platform.claim(queued.attempt_id, "w2") is None  # once only
    assert platform.run(submitted.run_id)[0].state == RunState.RUNNING


def test_a_claim_brings_its_upstreams_results_in_the_same_round_trip(
    platform: Platform,
) -> None:
    """A chain's second step: its claim resolves the first step's result into its inputs,
    and on PostgreSQL the claim, the updates and that result are one statement."""
    submitted = platform.submit(workflows.relay, {"n": 3})
    [first] = submitted.queued
    claimed = platform.claim(first.attempt_id, "w")
    assert claimed is not None
    [second] = platform.finish(claimed, "w", execute(platform, claimed))
    with statements_sent(platform) as statements:
        step = platform.claim(second.attempt_id, "w")
    assert step is not None
    assert step.inputs["args"] == [{"__mlp_ref__": "double[0]", "stored": {"value": 2}}]
    if platform.db.engine.dialect.name == "postgresql":
        assert len(statements) == 1, statements
    [third] = platform.finish(step, "w", execute(platform, step))
    last = platform.claim(third.attempt_id, "w")
    assert last is not None
    assert last.inputs["args"] == [{"__mlp_ref__": "double[1]", "stored": {"value": 4}}]


def test_skip_ends_the_task_and_its_downstream_as_skipped(platform: Platform) -> None:
    submitted = platform.submit(workflows.skip_pipeline, {"value": 0.5, "threshold": 0.8})
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    assert _states(platform, submitted.run_id) == {"maybe_skip": "skipped", "double": "skipped"}
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["maybe_skip"].error == "skipped: 0.5 is below 0.8"
    assert tasks["double"].error == (
        "not run: its upstream maybe_skip was skipped: 0.5 is below 0.8"
    )


def test_large_results_become_artifacts_and_flow_downstream(platform: Platform) -> None:
    submitted = platform.submit(workflows.big_pipeline, {"n": 50_000})
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["big"].result is not None and "__mlp_artifact__" in tasks["big"].result
    assert tasks["length"].result == {"value": 50_000}
    [(node_id, artifact)] = platform.artifacts_of(submitted.run_id)
    assert node_id == "big" and artifact.name == "numbers"
    assert platform.artifacts.get_object(artifact.sha256) == list(range(10))


def test_only_one_worker_can_claim_an_attempt(platform: Platform) -> None:
    submitted = platform.submit(workflows.arithmetic, {"n": 1})
    [(attempt_id, _)] = submitted.queued
    assert platform.claim(attempt_id, "worker-a") is not None
    assert platform.claim(attempt_id, "worker-b") is None


def _lose(platform: Platform, attempt_id: int, worker_id: str = "worker-a") -> None:
    """Claim an attempt, then let the reaper find its lease expired (the worker died)."""
    lease, platform.settings.lease_seconds = platform.settings.lease_seconds, 0.05
    claimed = platform.claim(attempt_id, worker_id)
    platform.settings.lease_seconds = lease
    assert claimed is not None
    time.sleep(0.06)
    assert platform.reap() == 1


def _queued(platform: Platform, run_id: str) -> int:
    [attempt] = [a for a in platform.attempts(run_id) if a.state == "queued"]
    return attempt.id


def test_an_expired_lease_makes_the_attempt_lost_and_fences_out_its_worker(
    platform: Platform, tmp_path: Path
) -> None:
    params = {"counter": str(tmp_path / "c"), "fail_times": 2}
    submitted = platform.submit(workflows.flaky_pipeline, params)
    platform.settings.lease_seconds = 1.0
    claimed = platform.claim(submitted.queued[0].attempt_id, "worker-a")
    assert claimed is not None
    assert platform.heartbeat([claimed.attempt_id], "worker-a").lost == set()
    platform.ship_logs({claimed.attempt_id: LogPiece(5, "what it ", kept_from=5)}, "worker-a")
    platform.ship_logs({claimed.attempt_id: LogPiece(13, "printed\n", kept_from=5)}, "worker-a")
    assert platform.reap() == 0
    # The worker stops heartbeating; the reaper runs after the lease has expired.
    time.sleep(1.1)
    assert platform.reap() == 1
    lost = platform.log(submitted.run_id, "flaky", 1)
    assert (lost.state, lost.log, lost.log_start) == ("lost", "what it printed\n", 5)
    assert platform.heartbeat([claimed.attempt_id], "worker-a").lost == {claimed.attempt_id}
    with pytest.raises(FencedOut):
        platform.finish(claimed, "worker-a", Outcome(AttemptState.SUCCEEDED, result={"value": 1}))
    attempts = platform.attempts(submitted.run_id)
    assert [(a.number, a.state) for a in attempts] == [(1, "lost"), (2, "queued")]
    assert "lease expired" in (attempts[0].error or "")
    # The loss is not the task's fault: its two retries are all left for its own failures.
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    states = [a.state for a in platform.attempts(submitted.run_id)]
    assert states == ["lost", "failed", "failed", "succeeded"]
    [task_run] = platform.task_runs(submitted.run_id)
    assert task_run.lost_attempts == 1


def test_a_running_attempts_log_is_shipped_in_pieces_each_written_once(
    platform: Platform,
) -> None:
    """Each ship stores only what was printed since the last one (the attempt's row is not
    written: once a log was 1 MiB, every ship rewrote the whole MiB); the pieces before what
    the worker keeps are let go; once the attempt has ended, its log is in attempts.log and
    the pieces are swept."""
    submitted = platform.submit(workflows.chatty_pipeline, {"seconds": 1.0})
    claimed = platform.claim(submitted.queued[0].attempt_id, "worker-a")
    assert claimed is not None
    attempt_id = claimed.attempt_id
    big = "x" * 99 + "\n"
    platform.ship_logs({attempt_id: LogPiece(0, big * 10_000)}, "worker-a")  # 1,000,000
    for i in range(20):
        kept_from = 0 if i < 10 else 1_000_000
        piece = LogPiece(1_000_000 + 10 * i, f"step {i:04d}\n", kept_from)
        platform.ship_logs({attempt_id: piece}, "worker-a")

    def stored() -> tuple[str | None, list[tuple[int, int]]]:
        with platform.db.session() as session:
            log = session.scalar(select(Attempt.log).where(Attempt.id == attempt_id))
            pieces = session.execute(
                select(LogPart.start, func.length(LogPart.text))
                .where(LogPart.attempt_id == attempt_id)
                .order_by(LogPart.start)
            ).all()
        return log, [tuple(row) for row in pieces]

    # The answer to a ship's commit lost: the worker sends the piece again, with what was
    # printed since; it replaces the one stored from the same start.
    platform.ship_logs({attempt_id: LogPiece(1_000_200, "late")}, "worker-a")
    platform.ship_logs({attempt_id: LogPiece(1_000_200, "later\n", 1_000_000)}, "worker-a")
    log, pieces = stored()
    assert log is None  # the attempt's row: not written by a ship
    assert pieces == [*((1_000_000 + 10 * i, 10) for i in range(20)), (1_000_200, 6)]
    part = platform.log_part(submitted.run_id, "chatty", offset=1_000_190)
    assert (part.text, part.kept_from, part.next_offset) == (
        "step 0019\nlater\n",
        1_000_000,
        1_000_206,
    )
    whole = "".join(f"step {i:04d}\n" for i in range(20))
    platform.finish(
        claimed,
        "worker-a",
        Outcome(AttemptState.SUCCEEDED, result={"value": 1}, log=whole, log_start=1_000_000),
    )
    assert platform.log_part(submitted.run_id, "chatty", offset=1_000_190).text == "step 0019\n"
    # (the finish's whole log is the worker's: its pieces only served while it ran)
    platform.schedule()  # a full pass sweeps the pieces of ended attempts
    assert stored() == (whole, [])


def test_an_artifact_past_2_gib_is_recorded(platform: Platform) -> None:
    """A model checkpoint of 3 GiB: its size once overflowed a 32-bit column on PostgreSQL."""
    submitted = platform.submit(workflows.chatty_pipeline, {"seconds": 1.0})
    claimed = platform.claim(submitted.queued[0].attempt_id, "worker-a")
    assert claimed is not None
    saved = {"name": "model", "sha256": "ab" * 32, "size": 3 * 2**30, "kind": "file"}
    platform.finish(
        claimed, "worker-a", Outcome(AttemptState.SUCCEEDED, result={"v": 1}, artifacts=[saved])
    )
    [(node_id, artifact)] = platform.artifacts_of(submitted.run_id)
    assert (node_id, artifact.name, artifact.size) == ("chatty", "model", 3 * 2**30)


def test_a_metric_series_sums_up_every_attempts_points_and_a_cache_hit_copies_it(
    platform: Platform, tmp_path: Path
) -> None:
    """The summaries the faces show are kept by the finishes (metric_series): they equal
    what the points themselves say, across a failed attempt and its retry, and on a run
    that reuses the task from the cache."""
    params = {"counter": str(tmp_path / "calls")}
    first = platform.submit(workflows.curve_retried, params)
    assert run_inline(platform, first.run_id) is RunState.SUCCEEDED
    again = platform.submit(workflows.curve_retried, params)
    assert run_inline(platform, again.run_id) is RunState.SUCCEEDED
    summaries = platform.metric_summaries([first.run_id, again.run_id])
    for run_id in (first.run_id, again.run_id):
        values = [m.value for _, m in platform.metrics(run_id)]
        assert values == [10, 11, 12, 20, 21, 22]  # both attempts' points, in order
        [series] = summaries[run_id]
        assert (series.task, series.name, series.points) == ("curve_then_retry", "loss", 6)
        assert (series.low, series.high, series.last) == (10, 22, 22)
    [task_run] = platform.task_runs(again.run_id)
    assert task_run.state == "cached"


def test_metric_ids_go_past_2_to_the_31(postgres_platform: Platform) -> None:
    """A busy platform's per-step metrics reach 2**31 ids: the next ones are stored."""
    platform = postgres_platform
    with platform.db.session() as session:
        session.execute(text("ALTER SEQUENCE metrics_id_seq RESTART WITH 2147483646"))
    submitted = platform.submit(workflows.chatty_pipeline, {"seconds": 1.0})
    claimed = platform.claim(submitted.queued[0].attempt_id, "worker-a")
    assert claimed is not None
    points = [{"name": "loss", "value": 1 / (i + 1), "step": i} for i in range(3)]
    platform.finish(
        claimed, "worker-a", Outcome(AttemptState.SUCCEEDED, result={"v": 1}, metrics=points)
    )
    stored = [(m.id, m.step) for _, m in platform.metrics(submitted.run_id)]
    assert stored == [(2**31 - 2, 0), (2**31 - 1, 1), (2**31, 2)]


def test_an_outcome_the_database_refuses_fails_its_attempt_saying_why(
    postgres_platform: Platform,
) -> None:
    """A metric name too long for its column (a task that bypassed the SDK's check): the
    commit of that outcome is refused, so the attempt fails with the database's reason and
    its log, not retried; the outcome committed beside it in the worker's batch is kept.
    Before, the refusal went back to the worker as "database unavailable" at every pass: the
    run never ended."""
    platform = postgres_platform
    submitted = platform.submit(workflows.short_and_long, {"short": 0.1, "long": 0.1})
    first, second = (platform.claim(q.attempt_id, "worker-a") for q in submitted.queued)
    assert first is not None and second is not None
    bad = Outcome(
        AttemptState.SUCCEEDED,
        result={"value": 1},
        metrics=[{"name": "m" * 201, "value": 1.0, "step": None}],
        log="printed\n",
        log_start=7,
    )
    good = Outcome(AttemptState.SUCCEEDED, result={"value": 2})
    queued, claims = platform.finish_and_claim([(first, bad), (second, good)], [], "worker-a")
    assert queued == [[], []] and claims == []
    ended = {a.id: a for a in platform.attempts(submitted.run_id)}
    refused, kept = ended[first.attempt_id], ended[second.attempt_id]
    assert refused.state == "failed" and (refused.log, refused.log_start) == ("printed\n", 7)
    assert refused.error == (
        "the task's outcome could not be stored: value too long for type character varying(200)"
    )
    assert kept.state == "succeeded"
    run, _ = platform.run(submitted.run_id)
    assert run.state == RunState.FAILED  # not retried: the same outcome would be refused


def test_lost_attempts_have_a_budget_of_their_own(platform: Platform) -> None:
    """A plain task (retries=0) survives MLP_MAX_LOST losses and fails, saying so, after more."""
    platform.settings.max_lost = 2
    platform.settings.lost_backoff_seconds = 0.0
    survives = platform.submit(workflows.arithmetic, {"n": 1})
    for _ in range(2):
        _lose(platform, _queued(platform, survives.run_id))
    assert run_inline(platform, survives.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(survives.run_id)}
    assert tasks["double"].lost_attempts == 2
    assert [a.state for a in platform.attempts(survives.run_id)][:3] == [
        "lost",
        "lost",
        "succeeded",
    ]

    fails = platform.submit(workflows.arithmetic, {"n": 1})
    for _ in range(3):
        _lose(platform, _queued(platform, fails.run_id))
    assert RunState(platform.run(fails.run_id)[0].state) is RunState.FAILED
    tasks = {t.node_id: t for t in platform.task_runs(fails.run_id)}
    assert tasks["double"].state == "failed"
    assert "lost 3 attempts" in (tasks["double"].error or "")
    assert "MLP_MAX_LOST=2" in (tasks["double"].error or "")
    assert tasks["total"].state == "upstream_failed"


def test_lost_retries_back_off(platform: Platform) -> None:
    platform.settings.lost_backoff_seconds = 5.0
    submitted = platform.submit(workflows.arithmetic, {"n": 1})
    _lose(platform, submitted.queued[0].attempt_id)
    lost, retry = platform.attempts(submitted.run_id)[:2]
    assert lost.finished_at is not None
    assert (retry.not_before - lost.finished_at).total_seconds() >= 5.0
    assert platform.schedule(submitted.run_id) == []  # not due before its backoff


def test_a_hand_back_charges_no_budget_at_all(platform: Platform) -> None:
    platform.settings.max_lost = 0
    submitted = platform.submit(workflows.arithmetic, {"n": 1})
    for _ in range(3):
        claimed = platform.claim(_queued(platform, submitted.run_id), "worker-a")
        assert claimed is not None
        handed = Outcome(AttemptState.LOST, error="handed back: worker shut down", handed_back=True)
        assert len(platform.finish(claimed, "worker-a", handed)) == 1  # due again at once
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["double"].lost_attempts == 0
    assert [a.state for a in platform.attempts(submitted.run_id)][:4] == ["lost"] * 3 + [
        "succeeded"
    ]


def test_a_dead_lettered_dispatch_is_lost_and_retried(platform: Platform) -> None:
    platform.settings.lost_backoff_seconds = 0.0
    submitted = platform.submit(workflows.arithmetic, {"n": 1})
    platform.dead_letter(submitted.queued[0].attempt_id, "undeliverable: delivered 5 times")
    first, second = platform.attempts(submitted.run_id)[:2]
    assert (first.state, second.state) == ("lost", "queued")
    assert "undeliverable" in (first.error or "")
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED


def test_the_reaper_fails_attempts_past_their_timeout(platform: Platform) -> None:
    submitted = platform.submit(workflows.overrun_pipeline, {"seconds": 0.0})
    platform.settings.lease_seconds = 60  # the lease stays valid: only the timeout is late
    claimed = platform.claim(submitted.queued[0].attempt_id, "worker-a")
    assert claimed is not None
    later = utcnow() + timedelta(seconds=1.5)  # past the 1 s timeout, lease still valid
    platform.settings.timeout_grace_seconds = 0.1
    assert platform.reap(later) == 1
    [first, retry] = platform.attempts(submitted.run_id)
    assert first.state == "failed" and "TimeoutError" in (first.error or "")
    assert retry.state == "queued"


def test_the_reaper_reads_only_the_attempts_it_may_end(postgres_platform: Platform) -> None:
    """Every worker's pass (twice a second) reaps: it reads the running attempts whose lease
    has expired or whose timeout has passed, not every running attempt of the cluster."""
    platform = postgres_platform
    platform.settings.lease_seconds = 60
    naps = platform.submit(workflows.naps, {"n": 100, "seconds": 1.0})
    for attempt_id, _ in naps.queued:
        assert platform.claim(attempt_id, "worker-a") is not None
    overrun = platform.submit(workflows.overrun_pipeline, {"seconds": 0.0})
    assert platform.claim(overrun.queued[0].attempt_id, "worker-b") is not None  # 1 s timeout
    lost = platform.submit(workflows.arithmetic, {"n": 1})
    platform.settings.lease_seconds = 0.05  # then its worker dies
    assert platform.claim(lost.queued[0].attempt_id, "worker-c") is not None
    time.sleep(0.06)
    read: list[int] = []

    def rows(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "attempts.lease_expires_at" in statement and "task_runs.options" in statement:
            read.append(cursor.rowcount)

    event.listen(platform.db.engine, "after_cursor_execute", rows)
    try:
        assert platform.reap() == 1  # the expired lease; the overrun is within its timeout
        platform.settings.timeout_grace_seconds = 0.1
        assert platform.reap(utcnow() + timedelta(seconds=1.5)) == 1  # now past it
    finally:
        event.remove(platform.db.engine, "after_cursor_execute", rows)
    assert read == [1, 1], read  # of 102 running attempts
    states = {a.state for a in platform.attempts(overrun.run_id)}
    assert states == {"failed", "queued"}  # timed out, and its retry queued
    assert {a.state for a in platform.attempts(lost.run_id)} >= {"lost"}


def test_cancel_stops_pending_work_and_signals_running_attempts(platform: Platform) -> None:
    submitted = platform.submit(workflows.arithmetic, {"n": 2})
    other = platform.submit(workflows.arithmetic, {"n": 1})
    running = platform.claim(submitted.queued[0].attempt_id, "worker-a")
    assert running is not None
    ids = [running.attempt_id, other.queued[0].attempt_id, 10**9]
    assert platform.cancelled_among(ids) == set()
    assert platform.cancel(submitted.run_id) is RunState.RUNNING  # one attempt still runs
    beat = platform.heartbeat([running.attempt_id], "worker-a")
    assert beat.cancelled == {running.attempt_id}
    assert platform.cancelled_among(ids) == {running.attempt_id}  # a worker's quicker look
    assert platform.claim(submitted.queued[1].attempt_id, "worker-b") is None
    platform.finish(running, "worker-a", Outcome(AttemptState.CANCELLED, error="run cancelled"))
    assert platform.run(submitted.run_id)[0].state == RunState.CANCELLED
    assert set(_states(platform, submitted.run_id).values()) == {"cancelled"}
    assert platform.cancel(submitted.run_id) is RunState.CANCELLED  # idempotent


def _lock_run_row(conn: Any, run_id: str) -> None:
    """Lock a run's row in ``conn``'s transaction, as every decision about a run does."""
    conn.execute(text("SELECT 1 FROM runs WHERE id = :id FOR UPDATE"), {"id": run_id})


def _second_root(platform: Platform, *, start_run: bool) -> tuple[Submitted, Dispatch, int]:
    """PostgreSQL's row locks only: a run of two roots (the first claimed if ``start_run``,
    which starts the run), the second root's dispatch and its task run's id."""
    if platform.db.engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's (SQLite has one writer)")
    submitted = platform.submit(workflows.arithmetic, {"n": 2})
    first, second = submitted.queued[:2]
    if start_run:
        assert platform.claim(first.attempt_id, "worker-a") is not None
    with platform.db.engine.connect() as reader:
        task_run_id = reader.execute(
            text("SELECT task_run_id FROM attempts WHERE id = :id"), {"id": second.attempt_id}
        ).scalar_one()
    return submitted, second, task_run_id


def test_a_cancel_leaves_running_a_task_a_worker_claimed_while_it_waited(
    platform: Platform,
) -> None:
    """cancel() reads the queued task runs, then turns them cancelled; a claim committed in
    between (it waited for that claim's lock) started one of them. That task is running: it
    stays so until its worker sees the cancel, instead of being shown cancelled while it runs."""
    submitted, second, task_run_id = _second_root(platform, start_run=True)
    claim = platform.db.engine.connect()  # worker-b's claim of the second root, not committed
    outcomes: list[Any] = []
    canceller = threading.Thread(target=lambda: outcomes.append(platform.cancel(submitted.run_id)))
    try:
        claim.execute(
            text("UPDATE task_runs SET state = 'running' WHERE id = :id"), {"id": task_run_id}
        )
        claim.execute(
            text(
                "UPDATE attempts SET state = 'running', worker_id = 'worker-b', "
                "started_at = now(), lease_expires_at = now() + interval '1 minute' "
                "WHERE id = :id"
            ),
            {"id": second.attempt_id},
        )
        canceller.start()
        _blocked_on_a_lock(platform, canceller, holder=claim)
        claim.commit()
    finally:
        claim.rollback()
        claim.close()
        if canceller.is_alive():
            canceller.join(timeout=30)
    assert outcomes == [RunState.RUNNING]
    states = _states(platform, submitted.run_id)
    assert sorted(states.values()) == ["cancelled", "running", "running"], states
    beat = platform.heartbeat([second.attempt_id], "worker-b")
    assert beat.cancelled == {second.attempt_id}  # its worker stops it when it next looks


def test_per_run_concurrency_limit(platform: Platform) -> None:
    submitted = platform.submit(workflows.arithmetic, {"n": 5}, max_concurrency=2)
    assert len(submitted.queued) == 2
    claimed = platform.claim(submitted.queued[0].attempt_id, "w")
    assert claimed is not None
    queued = platform.finish(claimed, "w", execute(platform, claimed))
    assert len(queued) == 1  # a slot freed, one more task queued
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED


def test_pool_slots_limit_attempts_across_runs(platform: Platform) -> None:
    platform.set_pool("tests-pool", 3)
    platform.set_pool("tests-pool", 1)  # resizing an existing pool
    with pytest.raises(ValueError, match="at least 1 slot"):
        platform.set_pool("tests-pool", 0)
    first = platform.submit(workflows.pooled_pipeline, {})
    second = platform.submit(workflows.pooled_pipeline, {})
    assert len(first.queued) == 1 and second.queued == []
    assert run_inline(platform, first.run_id) is RunState.SUCCEEDED
    assert run_inline(platform, second.run_id) is RunState.SUCCEEDED
    # A pool made larger, or without a limit, admits its waiting tasks at once.
    third, fourth, fifth = (platform.submit(workflows.pooled_pipeline, {}) for _ in range(3))
    assert [len(r.queued) for r in (third, fourth, fifth)] == [1, 0, 0]
    assert [d.attempt_id for d in platform.set_pool("tests-pool", 2)] == [
        a.id for a in platform.attempts(fourth.run_id)
    ]
    assert [d.attempt_id for d in platform.remove_pool("tests-pool")] == [
        a.id for a in platform.attempts(fifth.run_id)
    ]


def test_two_runs_made_ready_at_once_never_take_more_than_a_pools_slots(
    postgres_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers finish the upstreams of two runs' pooled tasks at the same moment: each
    counted the pool's attempts before the other committed, saw a free slot, and queued its
    task -- two attempts in a pool of one. Admissions to a pool are now taken one at a time;
    one that finds another under way leaves its task waiting for the scheduler's full pass."""
    platform = postgres_platform
    platform.set_pool("tests-pool", 1)
    runs = [platform.submit(workflows.pooled_after_a_step, {"x": x}) for x in (1, 2)]
    claimed = [platform.claim(r.queued[0].attempt_id, f"w{i}") for i, r in enumerate(runs)]
    both_counted = threading.Barrier(2, timeout=2)
    has_slot = planning.Planning._pool_has_slot

    def counted_together(self: Any, session: Any, pool: str) -> bool:
        free = has_slot(self, session, pool)
        try:
            both_counted.wait()  # the other transaction counts before this one commits
        except threading.BrokenBarrierError:
            pass  # it could not count meanwhile: it waited for this one
        return free

    monkeypatch.setattr(planning.Planning, "_pool_has_slot", counted_together)

    def finish(i: int) -> None:
        attempt = claimed[i]
        assert attempt is not None
        platform.finish(attempt, f"w{i}", execute(platform, attempt))

    threads = [threading.Thread(target=finish, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    with platform.db.session() as session:
        admitted = list(
            session.scalars(
                select(Attempt.run_id).where(
                    Attempt.pool == "tests-pool", Attempt.state == AttemptState.QUEUED
                )
            )
        )
    assert len(admitted) == 1, f"{len(admitted)} attempts admitted to a pool of 1 slot"
    monkeypatch.undo()
    waiting = [r.run_id for r in runs if r.run_id not in admitted]
    for run_id in (*admitted, *waiting):  # the one left waiting runs once the slot is free
        assert run_inline(platform, run_id) is RunState.SUCCEEDED


def _aged(platform: Platform, days: int, *run_ids: str) -> datetime:
    """Make these runs (and every blob stored so far) look ``days`` old."""
    then = utcnow() - timedelta(days=days)
    with platform.db.session() as session:
        session.execute(
            update(Run).where(Run.id.in_(run_ids)).values(created_at=then, finished_at=then)
        )
    for blob in platform.artifacts.root.rglob("*"):
        if blob.is_file():
            os.utime(blob, (then.timestamp(), then.timestamp()))
    return then


def _counts(platform: Platform) -> dict[str, int]:
    tables = ("runs", "task_runs", "attempts", "metrics", "params", "artifacts")
    with platform.db.session() as session:
        return {t: int(session.scalar(text(f"SELECT count(*) FROM {t}"))) for t in tables}


def test_prune_removes_old_ended_runs_whole_and_only_the_blobs_nothing_names(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention: the database and the artifact store grew without end. Runs that ended
    before the cut-off go with all they alone hold; what newer runs reuse from them (a cache
    hit, a retry's reused result) stays, and so does a blob a running task just saved."""
    old_big = platform.submit(workflows.big_pipeline, {"n": 50_000}).run_id
    old_cached = platform.submit(workflows.cached_big, {}).run_id
    for run_id in (old_big, old_cached):
        assert run_inline(platform, run_id) is RunState.SUCCEEDED
    old_queued = platform.submit(workflows.arithmetic, {"n": 2}).run_id  # never ended
    _aged(platform, 100, old_big, old_cached, old_queued)
    hit = platform.submit(workflows.cached_big, {}).run_id  # a cache hit of old_cached's task
    assert run_inline(platform, hit) is RunState.SUCCEEDED
    retried = platform.retry(old_big, from_task="length").run_id  # reuses big's result blob
    assert run_inline(platform, retried) is RunState.SUCCEEDED
    store = platform.artifacts
    forgotten = store.put_bytes(b"a blob no row names")
    os.utime(store.path(forgotten), (0, 0))
    just_saved = store.put_bytes(b"a running task's artifact, its outcome not committed yet")
    kept_runs = {run.id for run, _ in platform.runs(limit=100)} - {old_big, old_cached}
    accounts = Accounts(platform.db, timedelta(days=14))
    ann = accounts.create_user("ann", "correct horse battery")  # pragma: allowlist secret
    stale, fresh = accounts.issue_refresh(ann), accounts.issue_refresh(ann)
    with platform.db.session() as session:
        session.execute(
            update(RefreshToken)
            .where(RefreshToken.family == stale.family)
            .values(expires_at=utcnow() - timedelta(days=95))
        )

    monkeypatch.setattr(retention, "MARK_BATCH", 2)  # the names read in several transactions
    cut_off = utcnow() - timedelta(days=90)
    before = _counts(platform)
    counted = platform.prune(cut_off, dry_run=True)
    assert _counts(platform) == before and store.path(forgotten).exists()
    done = platform.prune(cut_off)
    assert (
        (done.runs, done.rows, done.blobs)
        == (2, counted.rows, 1)
        == (counted.runs, done.rows, counted.blobs)
    )
    after = _counts(platform)
    assert before["runs"] - after["runs"] == 2
    assert done.rows["task_runs"] == before["task_runs"] - after["task_runs"] == 3
    assert {run.id for run, _ in platform.runs(limit=100)} == kept_runs
    for gone in (old_big, old_cached):
        with pytest.raises(NotFound):
            platform.run(gone)
    assert not store.path(forgotten).exists() and store.path(just_saved).exists()
    # What newer runs reuse is whole: the retry lost only its link.
    assert platform.run(retried)[0].retry_of is None
    [big] = [t for t in platform.task_runs(retried) if t.node_id == "big"]
    assert big.result is not None and len(decode_value(big.result, store)) == 50_000
    [(_, artifact)] = platform.artifacts_of(hit)
    assert store.get_object(artifact.sha256) == list(range(10))
    assert platform.run(old_queued)[0].state == RunState.QUEUED  # not ended: kept
    assert done.rows["refresh_tokens"] == 1  # the one that expired before the cut-off
    with pytest.raises(AuthError, match="unknown refresh token"):
        accounts.rotate(stale.refresh_token)
    accounts.rotate(fresh.refresh_token)


def test_a_prune_lowers_no_counter_a_running_server_exposes(platform: Platform) -> None:
    """/metrics counted lost attempts afresh at each scrape: a prune removing old runs
    lowered mlp_lease_expiries_total, and Prometheus takes a counter that falls for a restart
    (a rate over it jumps by its whole value; an alert on lost attempts fires). What is final
    is now counted once and kept, as the duration histogram was."""
    submitted = platform.submit(workflows.echo_pipeline, {})
    [(attempt_id, _)] = platform.schedule(submitted.run_id)
    assert platform.claim(attempt_id, "worker-a") is not None
    with platform.db.session() as session:  # its worker died: the lease ran out
        session.execute(update(Attempt).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert platform.reap() == 1
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    with platform.db.session() as session:  # settled: made long before this scrape
        session.execute(update(Attempt).values(created_at=utcnow() - timedelta(hours=1)))
    before = platform.stats()
    assert before.lost_attempts == 1 and before.duration_count == 1
    _aged(platform, 100, submitted.run_id)
    assert platform.prune(utcnow() - timedelta(days=90)).runs == 1
    after = platform.stats()
    assert (after.lost_attempts, after.duration_count, after.duration_buckets) == (
        1,
        1,
        before.duration_buckets,
    )
    assert (after.runs_by_state.get("succeeded", 0), after.due) == (0, 0)  # gauges: as they are


def test_a_retry_racing_the_delete_of_its_original_is_a_not_found_not_a_broken_key(
    postgres_platform: Platform,
) -> None:
    """A retry read its original while a delete of it was under way: it then inserted a run
    whose `retry_of` named a row the delete removed, and failed on the foreign key (a 500).
    The retry now holds its original for share: it waits for the delete, and finds it gone."""
    platform = postgres_platform
    original = platform.submit(workflows.arithmetic, {"n": 2}).run_id
    assert run_inline(platform, original) is RunState.SUCCEEDED
    deleting = platform.db._sessions()
    try:
        deleting.begin()
        deleting.execute(select(Run.id).where(Run.id == original).with_for_update())
        platform._remove(deleting, [original], retention.Pruned())  # not committed yet
        outcome: list[BaseException | str] = []

        def retry() -> None:
            try:
                outcome.append(platform.retry(original).run_id)
            except BaseException as exc:  # noqa: BLE001 - what it raised is the check
                outcome.append(exc)

        racer = threading.Thread(target=retry)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), f"the retry did not wait for the delete: {outcome}"
        deleting.commit()
        racer.join(30)
    finally:
        deleting.close()
    [raised] = outcome
    assert isinstance(raised, NotFound), raised


def test_a_prune_passes_over_a_run_being_retried_and_takes_it_next_time(
    postgres_platform: Platform,
) -> None:
    """A retry holds its original for share while it copies what it reuses: a prune leaves
    that run for its next pass instead of waiting for the retry -- and then, its unlinking of
    retries done before the retry committed, failing on the foreign key."""
    platform = postgres_platform
    runs = [platform.submit(workflows.arithmetic, {"n": 2}).run_id for _ in range(2)]
    for run_id in runs:
        assert run_inline(platform, run_id) is RunState.SUCCEEDED
    _aged(platform, 10, *runs)
    retrying = platform.db._sessions()
    try:
        retrying.begin()
        retrying.execute(select(Run.id).where(Run.id == runs[0]).with_for_update(read=True))
        done: list[Any] = []
        pruner = threading.Thread(
            target=lambda: done.append(platform.prune(utcnow() - timedelta(days=1)))
        )
        pruner.start()
        pruner.join(10)
        assert not pruner.is_alive(), "the prune waited for a retry of a run it removes"
        assert done[0].runs == 1 and platform.run(runs[0])[0].state == "succeeded"
    finally:
        retrying.rollback()
        retrying.close()
    pruner.join(30)
    assert platform.prune(utcnow() - timedelta(days=1)).runs == 1
    with pytest.raises(NotFound):
        platform.run(runs[0])


KILLED_WHILE_PRUNING = """
import sys, time
from datetime import timedelta
from pathlib import Path
from sqlalchemy import event
from ml_platform.config import Settings
from ml_platform.service import Platform, retention
from ml_platform.store.models import utcnow

retention.BATCH = 1  # a run to a transaction
home, url, ready = sys.argv[1:]
platform = Platform(Settings(home=Path(home), database_url_override=url or None)).start()
removed = []

@event.listens_for(platform.db.engine, "after_cursor_execute")
def _stall(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("DELETE FROM RUNS"):
        removed.append(statement)
        if len(removed) == 2:  # the second batch deleted, not committed: kill me here
            Path(ready).touch()
            time.sleep(60)

platform.prune(utcnow() - timedelta(days=1))
"""


def test_a_prune_killed_between_batches_leaves_whole_runs(
    platform: Platform, tmp_path: Path
) -> None:
    """`mlp prune` killed with SIGKILL in its second batch, its deletes sent and not
    committed: the first batch's run is gone whole, the second's is whole, and the next
    prune removes it."""
    runs = [platform.submit(workflows.arithmetic, {"n": 3}).run_id for _ in range(2)]
    for run_id in runs:
        assert run_inline(platform, run_id) is RunState.SUCCEEDED
    _aged(platform, 10, *runs)
    url = platform.settings.database_url if platform.db.engine.dialect.name != "sqlite" else ""
    ready = tmp_path / "ready"
    _killed_once_there(KILLED_WHILE_PRUNING, str(platform.settings.home), url, str(ready))
    left = []
    for run_id in runs:
        try:
            platform.run(run_id)
            left.append(run_id)
        except NotFound:
            pass
    [second] = left  # the first batch's run went whole, with its commit
    assert len(platform.task_runs(second)) == 4 and platform.run(second)[0].state == "succeeded"
    assert len(platform.attempts(second)) == 4
    assert platform.prune(utcnow() - timedelta(days=1)).runs == 1


def test_cached_tasks_are_reused_across_runs(platform: Platform, tmp_path: Path) -> None:
    counter = tmp_path / "squares"
    params = {"counter": str(counter), "n": 2}
    first = platform.submit(workflows.cached_squares, params)
    assert run_inline(platform, first.run_id) is RunState.SUCCEEDED
    second = platform.submit(workflows.cached_squares, params)
    assert run_inline(platform, second.run_id) is RunState.SUCCEEDED
    assert counter.read_text().count("ran") == 2  # not 4: the second run reused both
    states = _states(platform, second.run_id)
    assert states == {"square[0]": "cached", "square[1]": "cached", "total": "succeeded"}
    assert [(n, m.name) for n, m in platform.metrics(second.run_id)] == [("total", "count")]
    big_first = platform.submit(workflows.cached_big, {})
    assert run_inline(platform, big_first.run_id) is RunState.SUCCEEDED
    big_again = platform.submit(workflows.cached_big, {})
    assert run_inline(platform, big_again.run_id) is RunState.SUCCEEDED
    # The cached task carries the original's metrics, params and artifacts.
    [(_, artifact)] = platform.artifacts_of(big_again.run_id)
    assert artifact.name == "numbers"
    assert [m.name for _, m in platform.metrics(big_again.run_id)] == ["items"]
    third = platform.submit(workflows.cached_squares, {"counter": str(counter), "n": 3})
    assert run_inline(platform, third.run_id) is RunState.SUCCEEDED
    assert counter.read_text().count("ran") == 3  # only the new input ran


def test_unknown_runs_and_tasks(platform: Platform) -> None:
    with pytest.raises(NotFound, match="no run with id"):
        platform.resolve_run_id("ffffffff")
    with pytest.raises(NotFound, match="at least 4 characters"):
        platform.resolve_run_id("ab")
    submitted = platform.submit(workflows.arithmetic, {"n": 1})
    assert platform.resolve_run_id(submitted.run_id[:8]) == submitted.run_id
    with pytest.raises(NotFound, match="has no task 'nope'"):
        platform.log(submitted.run_id, "nope")


def test_concurrent_workers_run_every_task_exactly_once(platform: Platform) -> None:
    """Four threads compete for a fan-out: no deadlock, no task twice, the run succeeds."""
    submitted = platform.submit(workflows.arithmetic, {"n": 24})
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            for _ in range(400):
                if platform.run(submitted.run_id)[0].state == RunState.SUCCEEDED:
                    return
                for attempt_id, _ in platform.schedule(submitted.run_id):
                    claimed = platform.claim(attempt_id, name)
                    if claimed is not None:
                        platform.finish(claimed, name, execute(platform, claimed))
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert platform.run(submitted.run_id)[0].state == RunState.SUCCEEDED
    attempts = platform.attempts(submitted.run_id)
    assert len(attempts) == 25 and {a.state for a in attempts} == {"succeeded"}
    assert {t.state for t in platform.task_runs(submitted.run_id)} == {TaskState.SUCCEEDED}


def test_a_cancel_that_meets_a_worker_claiming_and_finishing_in_one_transaction_succeeds(
    platform: Platform,
) -> None:
    """A worker's merged transaction (service.Execution.finish_and_claim) claims first -- a
    running run's task runs, without the run's lock -- and then locks the run to finish.
    cancel() locks the run and then cancels its queued task runs, so it can wait for a task
    run that transaction holds while the transaction waits for the run. PostgreSQL breaks
    that deadlock by failing one of them; the worker's side falls back on its own, and a
    cancel it fails is done again: the user's cancel does not fail."""
    submitted, second, task_run_id = _second_root(platform, start_run=True)
    worker = platform.db.engine.connect()
    outcomes: list[Any] = []

    def cancel() -> None:
        try:
            outcomes.append(platform.cancel(submitted.run_id))
        except BaseException as exc:  # surfaced below, in the test's thread
            outcomes.append(exc)

    canceller = threading.Thread(target=cancel)
    try:
        # The worker's claim of the second root, in its transaction (the run is running: no
        # lock on it), then its finish's lock of the run, once the cancel waits for it.
        worker.execute(
            text("UPDATE task_runs SET state = 'running' WHERE id = :id"), {"id": task_run_id}
        )
        canceller.start()
        _blocked_on_a_lock(platform, canceller, holder=worker)
        # PostgreSQL fails the one whose deadlock_timeout ends first: the cancel, waiting
        # longer. (Were it the worker's, the worker's side would fall back, as
        # Execution.finish_and_claim does, and the cancel would go on.)
        time.sleep(0.2)
        try:
            _lock_run_row(worker, submitted.run_id)
            worker.commit()
        except DBAPIError as exc:
            assert getattr(exc.orig, "sqlstate", None) == db.DEADLOCK_DETECTED
            worker.rollback()
    finally:
        worker.rollback()
        worker.close()
        if canceller.is_alive():
            canceller.join(timeout=30)
    assert outcomes == [RunState.RUNNING]  # its running tasks end when their workers look
    run, _ = platform.run(submitted.run_id)
    assert run.cancel_requested
    assert _states(platform, submitted.run_id)["total"] == "cancelled"


def test_a_claim_that_waited_for_its_run_to_start_holds_no_lock_a_finish_waits_for(
    platform: Platform,
) -> None:
    """A claim that finds its run queued locks the run before any task run. If another
    claim starts the run meanwhile, the claim's view of the run's tasks is older than the
    locks others now hold on them: a finish holding a task run, waiting for the run's row
    (as every success locks its run last), would wait for this claim while it waits for the
    task run -- a deadlock (PostgreSQL broke it after a second, failing one of them: seen in
    the four-worker test above). The claim gives the run's lock up and tries again."""
    submitted, second, task_run_id = _second_root(platform, start_run=False)
    starter = platform.db.engine.connect()  # another worker's claim, starting the run
    finisher = platform.db.engine.connect()  # a transaction holding the task run, then the run
    claims: list[Any] = []
    errors: list[BaseException] = []

    def claim() -> None:
        try:
            claims.append(platform.claim(second.attempt_id, "b"))
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    claimer = threading.Thread(target=claim)
    try:
        _lock_run_row(starter, submitted.run_id)
        claimer.start()
        _blocked_on_a_lock(platform, claimer, holder=starter)  # its snapshot saw the run queued
        finisher.execute(
            text("UPDATE task_runs SET state = state WHERE id = :id"), {"id": task_run_id}
        )
        starter.execute(
            text("UPDATE runs SET state = 'running', started_at = now() WHERE id = :id"),
            {"id": submitted.run_id},
        )
        starter.commit()
        _blocked_on_a_lock(platform, claimer, holder=finisher)  # the claim reached the task run
        _lock_run_row(finisher, submitted.run_id)
        finisher.commit()
    finally:
        starter.rollback()
        finisher.rollback()
        if claimer.is_alive():
            claimer.join(timeout=30)
        starter.close()
        finisher.close()
    assert errors == []
    [claimed] = claims
    assert claimed is not None and claimed.attempt_id == second.attempt_id
    assert _states(platform, submitted.run_id)[claimed.node_id] == "running"


def test_concurrent_submissions_and_cancellations_neither_deadlock_nor_lose_updates(
    platform: Platform,
) -> None:
    """Six clients submit and cancel while two workers run tasks, all at once."""
    submitted: list[str] = []
    cancelled: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def client(index: int) -> None:
        try:
            for round_ in range(4):
                run_id = platform.submit(workflows.arithmetic, {"n": 3}).run_id
                with lock:
                    submitted.append(run_id)
                if (index + round_) % 2 and platform.cancel(run_id) is not RunState.SUCCEEDED:
                    with lock:  # the cancel came before the run ended: it must win
                        cancelled.append(run_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def worker(name: str) -> None:
        try:
            while not done.is_set():
                for attempt_id, _ in platform.schedule():
                    claimed = platform.claim(attempt_id, name)
                    if claimed is not None:
                        platform.finish(claimed, name, execute(platform, claimed))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(2)]
    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in workers + clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [platform.run(run_id)[0].state for run_id in submitted]
        if all(state in ("succeeded", "cancelled") for state in states):
            break
        time.sleep(0.1)
    done.set()
    for thread in workers:
        thread.join(timeout=30)
    assert errors == []
    assert len(submitted) == 24
    final = {run_id: platform.run(run_id)[0].state for run_id in submitted}
    assert all(final[run_id] == "cancelled" for run_id in cancelled)
    assert all(final[r] == "succeeded" for r in submitted if r not in cancelled)
    for run_id in submitted:  # every task reached an end consistent with its run
        tasks = {t.state for t in platform.task_runs(run_id)}
        assert tasks <= (
            {"succeeded"} if final[run_id] == "succeeded" else {"succeeded", "cancelled"}
        )


def test_outcomes_and_claims_share_a_transaction_and_a_lost_race_refuses_only_itself(
    platform: Platform, tmp_path: Path
) -> None:
    """finish_and_claim commits outcomes and claims together; a fenced-out outcome in the batch
    is refused on its own (FencedOut semantics) while the rest commits."""
    first = platform.submit(workflows.arithmetic, {"n": 1})
    second = platform.submit(workflows.arithmetic, {"n": 2})
    held = platform.claim(first.queued[0].attempt_id, "worker-a")
    assert held is not None
    done = Outcome(AttemptState.SUCCEEDED, result={"value": 2})
    platform.settings.lease_seconds = 0.5  # for the claim made in the batch below
    platform.settings.lost_backoff_seconds = 0.0  # its retry is due at once
    queued, claims = platform.finish_and_claim(
        [(held, done)], [second.queued[0].attempt_id], "worker-a"
    )
    assert queued[0] is not None and claims[0] is not None  # both committed
    assert [a.state for a in platform.attempts(first.run_id)][0] == "succeeded"
    # Its lease expires and the reaper takes the attempt away; the retry is queued.
    stale = claims[0]
    time.sleep(0.6)
    assert platform.reap() == 1
    [retry] = [
        a.id
        for a in platform.attempts(second.run_id)
        if a.state == "queued" and a.task_run_id == stale.task_run_id
    ]
    platform.settings.lease_seconds = 30
    queued, claims = platform.finish_and_claim([(stale, done)], [retry], "worker-a")
    assert queued == [None]  # fenced out: not committed
    assert claims[0] is not None and claims[0].attempt_id == retry  # the claim still holds
    states = [
        a.state for a in platform.attempts(second.run_id) if a.task_run_id == stale.task_run_id
    ]
    assert states == ["lost", "running"]


def test_a_pooled_connection_is_pinged_only_after_sitting_idle(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a connection used a moment ago goes straight to work (a ping before every
    transaction was one round trip more per task); one idle for PING_IDLE_SECONDS is pinged
    first, and one the server closed meanwhile is replaced unseen by the caller."""
    engine = make_engine(postgres_url)
    pings: list[object] = []
    do_ping = engine.dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        pings.append(dbapi_conn)
        return do_ping(dbapi_conn)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == first
        assert pings == []  # back to back: never pinged
        monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.0)  # as if each sat idle
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == first
        assert len(pings) == 1
        with psycopg.connect(libpq_url(postgres_url), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        with engine.connect() as conn:  # the dead one fails its ping; a fresh one serves
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != first
    finally:
        engine.dispose()


def test_each_connection_names_the_process_that_opened_it(postgres_url: str) -> None:
    """pg_stat_activity says which process holds a connection: its name carries the pid of
    the process that opened it — a process forked after the engine was made names itself,
    not its parent — and a name the URL gives is kept."""
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            name = conn.execute(text("SHOW application_name")).scalar_one()
        assert name == f"ml-platform pid {os.getpid()}"
        engine.dispose()
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            try:
                with engine.connect() as conn:
                    os.write(
                        write, conn.execute(text("SHOW application_name")).scalar_one().encode()
                    )
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        with os.fdopen(read) as answer:
            assert answer.read() == f"ml-platform pid {child}"
    finally:
        engine.dispose()
    given = make_url(postgres_url).update_query_dict({"application_name": "nightly-etl"})
    named = make_engine(given.render_as_string(hide_password=False))
    try:
        with named.connect() as conn:
            assert conn.execute(text("SHOW application_name")).scalar_one() == "nightly-etl"
    finally:
        named.dispose()


def test_reads_end_no_transaction_so_the_statements_prepared_stay_prepared(
    postgres_platform: Platform,
) -> None:
    """psycopg forgets every statement it prepared on a connection when a transaction there
    rolls back. A worker's frequent look for cancelled runs and a readiness probe's look at
    the schema end none (store.db.reading): what was prepared before them still is after."""
    platform = postgres_platform
    ids = [item.attempt_id for item in platform.submit(workflows.arithmetic, {"n": 2}).queued]
    rollbacks: list[object] = []

    def rolled_back(conn: Connection) -> None:  # one that sends ROLLBACK (not in autocommit)
        driver: Any = conn.connection.driver_connection
        if driver.info.transaction_status != TransactionStatus.IDLE:
            rollbacks.append(conn)

    event.listen(platform.db.engine, "rollback", rolled_back)
    assert platform.cancelled_among(ids) == set()
    assert platform.schema_behind() is None
    assert rollbacks == []
    engine = make_engine(platform.db.url)  # one connection: each checkout gets it back

    def prepared() -> tuple[int, set[str]]:
        with reading(engine) as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            statements = conn.scalars(text("SELECT statement FROM pg_prepared_statements"))
            return pid, set(statements)

    try:
        pid, before = prepared()
        assert current_revision(engine) == head_revision()
        again, after = prepared()
        assert again == pid and before < after
        assert any("alembic_version" in statement for statement in after)
        with engine.connect() as conn:  # a read that rolls back, as these did before
            conn.execute(text("SELECT 1"))
        again, dropped = prepared()
        assert again == pid and not any("alembic_version" in statement for statement in dropped)
    finally:
        engine.dispose()


class _GenericPlans:
    """A worker's hot statements as the worker runs them -- prepared, on the generic plan
    PostgreSQL settles on after five runs, made when first run -- on a connection of their
    own; each run in a transaction rolled back."""

    def __init__(self, url: str, mode: str = "force_generic_plan") -> None:
        self.conn = psycopg.connect(libpq_url(url))
        self.conn.execute(psql.SQL("SET plan_cache_mode = {}").format(psql.Identifier(mode)))
        self.conn.commit()
        self.names: dict[str, list[str]] = {}

    def _run(self, name: str, params: dict[str, Any], explain: str = "") -> Any:
        values = psql.SQL(", ").join(psql.Literal(params[p]) for p in self.names[name])
        query = psql.SQL(explain + "EXECUTE {} ({})").format(psql.Identifier(name), values)
        try:
            return self.conn.execute(query).fetchone()
        finally:
            self.conn.rollback()

    def prepare(self, name: str, sql: str, params: dict[str, Any]) -> None:
        """Prepare ``sql`` (psycopg's) and run it once: its plan is made on the tables now."""
        order: list[str] = []

        def numbered(match: re.Match[str]) -> str:  # psycopg's %(name)s as PREPARE's $n
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        prepared = re.sub(r"%\((\w+)\)s", numbered, sql).replace("%%", "%")
        query = psql.SQL("PREPARE {} AS {}").format(psql.Identifier(name), psql.SQL(prepared))
        self.conn.execute(query)
        self.conn.commit()
        self.names[name] = order
        self._run(name, params)

    def plans_made(self, name: str, params: dict[str, Any], runs: int) -> tuple[int, int]:
        """Run ``name`` ``runs`` times more: how many runs PostgreSQL planned once (on its
        generic plan), and how many it planned anew (custom plans)."""
        for _ in range(runs):
            self._run(name, params)
        made = self.conn.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = %s",
            [name],
        ).fetchone()
        self.conn.rollback()
        assert made is not None
        return made[0], made[1]

    def widest(self, name: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """How many rows the plan node that went through the most went through, and it."""
        plan = self._run(name, params, "EXPLAIN (ANALYZE, FORMAT JSON) ")
        nodes = [plan[0][0]["Plan"]]
        for node in nodes:
            nodes += node.get("Plans", [])

        def read(node: dict[str, Any]) -> int:
            rows: int = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            rows += node.get("Rows Removed by Join Filter", 0)
            return rows * int(node["Actual Loops"])

        widest = max(nodes, key=read)
        return read(widest), widest


def test_a_claim_and_a_chains_step_read_their_own_rows_not_the_tables(home: Path) -> None:
    """In a database just made (no statistics yet: a new deployment, a bench), plans made
    on a first small run serve a thousand-task run: a claim and a chain's step read only the
    rows they change. They once looked the attempt up by state (every queued attempt read:
    2.3 ms a claim instead of 0.7), read every task run of a run for the upstream results of
    a task that has none, and joined a scan of every task run to end one (1.7 ms a chain's
    step instead of 0.4). And with no statistics PostgreSQL took the run's task runs for one
    row, and read them all through the (run_id, state) index for a task's upstream results
    (0.34 ms a task of a 1,000-wide fan-out, against 0.01 by the (run_id, node_id) key):
    a wide submission now has the tables analyzed (Database.refresh_statistics)."""
    statements = {"claim": "locked_run", "step": "ended_attempt"}
    with throwaway_database() as url:
        platform = Platform(Settings(home=home, database_url_override=url)).start()
        plans = _GenericPlans(url)
        reads: dict[str, tuple[int, dict[str, Any]]] = {}
        phase = ["prepare"]

        def seen(*args: Any) -> None:  # before the statement runs: on what it will see
            for name, words in statements.items():
                if words not in args[2]:
                    continue
                if phase[0] == "prepare" and name not in plans.names:
                    plans.prepare(name, args[2], dict(args[3]))
                elif phase[0] == "measure" and name not in reads:
                    reads[name] = plans.widest(name, dict(args[3]))

        def chain_step() -> None:
            step = platform.claim(
                platform.submit(workflows.relay, {"n": 3}).queued[0].attempt_id, "w"
            )
            assert step is not None
            _, continued = platform.finish_and_claim(
                [(step, execute(platform, step))], [], "w", take=1
            )
            assert len(continued) == 1

        try:
            event.listen(platform.db.engine, "before_cursor_execute", seen)
            chain_step()  # the plans made: on tables of a few rows
            phase[0] = "grow"
            queued = platform.submit(workflows.arithmetic, {"n": 1000}).queued
            assert platform.claim(queued[0].attempt_id, "w") is not None  # reads the run's shape
            relay = platform.submit(workflows.relay, {"n": 1000}).queued
            first = platform.claim(relay[0].attempt_id, "w")
            assert first is not None
            [made], _ = platform.finish_and_claim(
                [(first, execute(platform, first))], [], "w", take=0
            )
            assert made is not None and len(made) == 1
            second = made[0]
            phase[0] = "measure"
            # One upstream's result, in a run of 1,000 task runs, among 1,000 queued attempts.
            claimed = platform.claim(second.attempt_id, "w")
            assert claimed is not None
            chain_step()
        finally:
            plans.conn.close()
            platform.close()
    assert reads.keys() == statements.keys()
    for rows, widest in reads.values():  # at most the chain's own three task runs
        assert rows <= 3, str({k: v for k, v in widest.items() if k != "Plans"})


def test_a_bulk_change_has_the_tables_it_outgrew_analyzed_at_once(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL plans by its statistics, which autovacuum refreshes up to a minute after a
    change (never, where it is off). A change larger than autovacuum's rule (50 rows and a
    tenth of the table) has the tables it grew analyzed as it commits: a wide submission
    here. A small run changes nothing; one within a tenth of the table neither. And what
    ANALYZE counts of a young database's runs -- a few, one of them large -- is not what the
    planner takes a run for."""
    with throwaway_database() as url:
        platform = Platform(Settings(home=home, database_url_override=url)).start()

        def rows() -> dict[str, float]:
            with reading(platform.db.engine) as conn:
                known = conn.execute(
                    text("SELECT relname, reltuples FROM pg_class WHERE relname = ANY(:names)"),
                    {"names": ["task_runs", "attempts"]},
                )
                return {name: count for name, count in known}

        try:
            platform.submit(workflows.relay, {"n": 3})
            assert rows() == {"task_runs": -1, "attempts": -1}  # never analyzed
            platform.submit(workflows.arithmetic, {"n": 1000})
            assert rows() == {"task_runs": 3 + 1001, "attempts": 1 + 1000}
            platform.submit(workflows.arithmetic, {"n": 90})  # 91 > 50, within 50 + 100.4
            assert rows() == {"task_runs": 1004, "attempts": 1001}
            assert platform.db.refresh_statistics({"task_runs": 151, "runs": 1}) == ["task_runs"]
            assert rows() == {"task_runs": 1095, "attempts": 1001}
            # Three runs counted, one of a thousand tasks: a run's rows are still read by an
            # index (RUN_ID_DISTINCT), not by a scan of a table taken for a third of it.
            with reading(platform.db.engine) as conn:
                conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
                conn.exec_driver_sql(
                    "PREPARE of_a_run(text) AS SELECT node_id FROM task_runs WHERE run_id = $1"
                )
                [[plan]] = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) EXECUTE of_a_run('r')").all()
            assert plan[0]["Plan"]["Node Type"] != "Seq Scan", plan
            assert plan[0]["Plan"]["Plan Rows"] <= 1095 * 0.05 + 1, plan
        finally:
            platform.close()
    missing = make_url(url).set(database="mlp_no_such_database")
    unreachable = Database(missing.render_as_string(hide_password=False))
    try:  # a failure is told, and the caller goes on
        assert unreachable.refresh_statistics({"task_runs": 1000}) == []
    finally:
        unreachable.dispose()
    assert "could not refresh the statistics of task_runs" in caplog.text
    embedded = Database(f"sqlite:///{home / 'embedded.db'}")
    assert embedded.refresh_statistics({"task_runs": 1000}) == []  # SQLite plans otherwise
    embedded.dispose()


def test_whether_a_run_has_an_open_task_is_read_from_the_index_not_past_its_ended_tasks(
    home: Path,
) -> None:
    """A sink's finish asks whether its run has an open task left. The statistics taken at
    the run's submission say every task of it is open, so PostgreSQL took ``LIMIT 1`` of a
    scan for free -- and the scan went through the pages of every ended task first, more at
    each finish (0.3 ms of each finish of 1,000 tasks of 10 ms). Running tasks are few:
    asked first, the index answers."""
    with throwaway_database() as url:
        platform = Platform(Settings(home=home, database_url_override=url)).start()
        try:
            submitted = platform.submit(workflows.arithmetic, {"n": 600})  # analyzed
            queued = submitted.queued
            for dispatch in queued[:550]:
                claimed = platform.claim(dispatch.attempt_id, "w")
                assert claimed is not None
                platform.finish(claimed, "w", execute(platform, claimed))
            assert platform.claim(queued[550].attempt_id, "w") is not None  # one running
            question = execution._ANY_OPEN.params(run_id=submitted.run_id).compile(
                platform.db.engine, compile_kwargs={"literal_binds": True}
            )
            with reading(platform.db.engine) as conn:
                [[plan]] = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {question}").all()
        finally:
            platform.close()
    assert plan[0]["Plan"]["Actual Rows"] == 1
    nodes = [plan[0]["Plan"]]
    for node in nodes:
        nodes += node.get("Plans", [])
    ran = [node for node in nodes if node["Actual Loops"] > 0]
    # Asked as one: a Seq Scan (29 pages read here, against 7 through the index alone; with
    # other transactions open the index's entries of ended tasks cost pages too, till vacuum).
    assert not [node for node in ran if node["Node Type"] == "Seq Scan"], plan
    assert any(node.get("Index Name") == "ix_task_runs_run_state" for node in ran), plan


def test_a_chains_step_is_planned_once_not_at_every_step(home: Path) -> None:
    """PostgreSQL plans a prepared statement once (a generic plan) when that plan looks no
    costlier than one made for each run's values, else it plans every run. With statistics
    gathered, a chain's step (one next task) was planned at every step -- its next tasks an
    array, of ten values to PostgreSQL's guess: ≈ 0.7 ms of a 1.1 ms step here."""
    with throwaway_database() as url:
        platform = Platform(Settings(home=home, database_url_override=url)).start()
        plans = _GenericPlans(url, "auto")
        made: list[tuple[int, int]] = []

        def seen(*args: Any) -> None:  # a step's statement: run as a worker runs it
            if "ended_attempt" in args[2] and not made:
                plans.prepare("step", args[2], dict(args[3]))
                made.append(plans.plans_made("step", dict(args[3]), 9))

        try:
            platform.submit(workflows.arithmetic, {"n": 1000})
            with psycopg.connect(libpq_url(url), autocommit=True) as conn:
                conn.execute("ANALYZE")
            step = platform.claim(
                platform.submit(workflows.relay, {"n": 3}).queued[0].attempt_id, "w"
            )
            assert step is not None
            event.listen(platform.db.engine, "before_cursor_execute", seen)
            platform.finish_and_claim([(step, execute(platform, step))], [], "w", take=1)
        finally:
            plans.conn.close()
            platform.close()
    generic, custom = made[0]
    assert (generic, custom) == (5, 5)  # five custom plans to compare, then the generic one


def test_a_statement_on_the_driver_behaves_as_through_sqlalchemy(postgres_url: str) -> None:
    """store.db.on_driver, the hot path's way to psycopg: the SQL SQLAlchemy would send, with
    its listeners told; rows with attributes; aware datetimes stored as naive UTC (naive ones
    refused); errors as SQLAlchemy's DBAPIError, a server-side one leaving the connection in
    use, a lost connection invalidated so that the pool serves a fresh one next."""
    engine = make_engine(postgres_url, lambda: float("inf"))  # never pinged before use
    statement = text(
        "SELECT CAST(:n AS integer) + 1 AS next, :at AS at, pg_backend_pid() AS pid"
    ).bindparams(bindparam("at", type_=UTCDateTime))
    at = datetime(2026, 12, 6, 1, 30, tzinfo=timezone(timedelta(hours=1)))
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    try:
        with engine.connect() as conn:
            [row] = db.on_driver(conn, statement, {"n": 41, "at": at})
            assert (row.next, row.at) == (42, datetime(2026, 12, 6, 0, 30))
            assert sent == [str(statement.compile(dialect=conn.dialect))]
            with pytest.raises(ValueError, match="naive datetimes are ambiguous"):
                db.on_driver(conn, statement, {"n": 1, "at": datetime(2026, 12, 6)})
            with pytest.raises(DBAPIError) as refused:
                db.on_driver(conn, statement, {"n": "forty-one", "at": at})
            assert getattr(refused.value.orig, "sqlstate", None) == "22P02"
            assert not refused.value.connection_invalidated
            conn.rollback()
            assert db.on_driver(conn, statement, {"n": 1, "at": at})[0].pid == row.pid
        with psycopg.connect(libpq_url(postgres_url), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (row.pid,))
        with engine.connect() as conn:
            with pytest.raises(DBAPIError) as gone:
                db.on_driver(conn, statement, {"n": 1, "at": at})
            assert gone.value.connection_invalidated
        with engine.connect() as conn:
            assert db.on_driver(conn, statement, {"n": 1, "at": at})[0].pid != row.pid
    finally:
        engine.dispose()


def test_a_batch_of_siblings_is_claimed_and_ended_together_and_asks_its_fan_in_once(
    platform: Platform,
) -> None:
    """A worker's batch: its claims are one statement on PostgreSQL, its successes one
    statement, its run's lock taken once and its fan-in asked once for the whole batch (on
    both databases); each task keeps its own result; a sibling still running keeps the fan-in
    waiting, and its own finish queues it. One outcome of a batch that lost its attempt is
    refused alone."""
    submitted = platform.submit(workflows.arithmetic, {"n": 7})
    first, *rest = [d.attempt_id for d in submitted.queued]
    held = platform.claim(first, "w")  # starts the run
    assert held is not None
    with statements_sent(platform) as statements:
        _, claims = platform.finish_and_claim([], [*rest, rest[0]], "w")
    assert claims[-1] is None  # delivered twice in one batch: claimed once
    claims = claims[:-1]
    assert all(claims) and len(claims) == 6
    postgresql = platform.db.engine.dialect.name == "postgresql"
    if postgresql:
        assert len(statements) == 1, statements
    batch = [c for c in claims if c is not None]
    done = [execute(platform, claimed) for claimed in batch]
    with statements_sent(platform) as statements:
        queued, _ = platform.finish_and_claim(list(zip(batch[:5], done, strict=False)), [], "w")
    assert queued == [[]] * 5  # the fan-in waits for two more
    asked = [s for s in statements if s.lstrip().startswith("SELECT task_runs.id")]
    assert len(asked) == 1, statements  # the fan-in's question, once for five
    shape = "SELECT task_runs.node_id, task_runs.upstream"  # the run's shape, read once
    if postgresql:  # one statement ends all and locks the run, then the question
        assert len([s for s in statements if not s.lstrip().startswith(shape)]) == 2, statements
    results = {t.node_id: t.result for t in platform.task_runs(submitted.run_id)}
    assert [results[c.node_id] for c in batch[:5]] == [{"value": 2.0 * (i + 1)} for i in range(5)]
    # A batch of two whose second attempt was taken over meanwhile: only it is refused.
    with platform.db.session() as session:
        session.execute(
            update(Attempt).where(Attempt.id == batch[5].attempt_id).values(worker_id="other")
        )
    queued, _ = platform.finish_and_claim(
        [(held, execute(platform, held)), (batch[5], done[5])], [], "w"
    )
    assert queued[0] == [] and queued[1] is None
    states = {a.id: a.state for a in platform.attempts(submitted.run_id)}
    assert (states[held.attempt_id], states[batch[5].attempt_id]) == ("succeeded", "running")
    with platform.db.session() as session:
        session.execute(
            update(Attempt).where(Attempt.id == batch[5].attempt_id).values(worker_id="w")
        )
    [(join, _)] = platform.finish(batch[5], "w", done[5])
    assert {a.id: a.state for a in platform.attempts(submitted.run_id)}[join] == "queued"


def test_a_pass_since_a_moment_returns_only_what_became_due_after_it(platform: Platform) -> None:
    """The scheduler's frequent passes read only attempts that became due since the last one
    (a wide fan-out's thousands were read and re-published at every pass); a full pass,
    once per lease, still returns every due attempt (the safety net)."""
    first = platform.submit(workflows.arithmetic, {"n": 2})
    time.sleep(0.01)
    mark = utcnow()
    time.sleep(0.01)
    second = platform.submit(workflows.arithmetic, {"n": 1})
    recent = platform.schedule(advance=False, due_since=mark)
    assert [d.attempt_id for d in recent] == [d.attempt_id for d in second.queued]
    everything = {d.attempt_id for d in platform.schedule(advance=False)}
    assert everything == {d.attempt_id for d in [*first.queued, *second.queued]}


def test_a_full_pass_leaves_alone_a_run_whose_work_is_in_flight(platform: Platform) -> None:
    """The scheduler's full pass advances only the runs nothing in flight will advance: one
    with no queued or running attempt (the safety net), and one with a task waiting for a
    pool slot another run may have freed. It neither reads nor locks a run whose attempts
    are out (a wide fan-out's 10,000 task runs were loaded every few seconds, under the
    run's lock, by every worker); their finishes advance it."""
    if platform.db.engine.dialect.name != "postgresql":
        pytest.skip("the run's row lock is PostgreSQL's")
    busy = platform.submit(workflows.arithmetic, {"n": 2})
    stuck = platform.submit(workflows.arithmetic, {"n": 1})
    # A stuck run, as if the advance after its last finish had never happened: its root
    # succeeded, its downstream was never queued.
    root = next(t for t in platform.task_runs(stuck.run_id) if t.node_id != "total")
    with platform.db.engine.begin() as connection:
        connection.execute(
            text("UPDATE attempts SET state = 'succeeded' WHERE task_run_id = :id"),
            {"id": root.id},
        )
        connection.execute(
            text(
                "UPDATE task_runs SET state = 'succeeded', result = CAST(:r AS json) WHERE id = :id"
            ),
            {"id": root.id, "r": '{"value": 1}'},
        )
    holder = platform.db.engine.connect()
    try:
        # Another transaction holds the busy run's row (as a long finish would).
        _lock_run_row(holder, busy.run_id)
        passed: list[list[Any]] = []
        scheduler = threading.Thread(target=lambda: passed.append(platform.schedule()))
        scheduler.start()
        scheduler.join(timeout=5)
        assert passed, "the full pass waited for the lock of a run whose work is in flight"
    finally:
        holder.rollback()
        holder.close()
        scheduler.join()
    assert _states(platform, stuck.run_id)["total"] == "queued"  # the safety net held
    assert sorted(_states(platform, busy.run_id).values()) == ["pending", "queued", "queued"]


def test_a_chain_step_queues_the_next_from_that_task_run_alone(platform: Platform) -> None:
    """A finish whose task is the only upstream of the next queues that one without a pass
    over the run (which read every task run of the run at every step of a chain); the chain
    still ends as the engine's plan would end it."""
    submitted = platform.submit(workflows.relay, {"n": 6})
    [step] = submitted.queued
    for _ in range(2):  # the third step's finish: its DAG is known to this process by now
        claimed = platform.claim(step.attempt_id, "w")
        assert claimed is not None
        [step] = platform.finish(claimed, "w", execute(platform, claimed))
    claimed = platform.claim(step.attempt_id, "w")
    assert claimed is not None
    outcome = execute(platform, claimed)
    with statements_sent(platform) as statements:
        platform.finish(claimed, "w", outcome)
    assert statements and not any("ORDER BY task_runs.position" in s for s in statements)
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    results = {t.node_id: t.result for t in platform.task_runs(submitted.run_id)}
    assert results["double[5]"] == {"value": 64.0}


def test_a_fan_out_is_queued_from_its_task_runs_alone_when_its_one_upstream_ends(
    platform: Platform,
) -> None:
    """However many tasks read only the one that just succeeded, they are queued without a
    pass over the run (which read every task run, with its JSON, for a fan-out's first step),
    in one INSERT for their attempts; the run then ends as the engine's plan would end it."""
    submitted = platform.submit(workflows.spread, {"n": 30})
    [first] = submitted.queued
    claimed = platform.claim(first.attempt_id, "w")
    assert claimed is not None
    outcome = execute(platform, claimed)
    with statements_sent(platform) as statements:
        queued = platform.finish(claimed, "w", outcome)
    assert len(queued) == 30
    assert not any("ORDER BY task_runs.position" in s for s in statements), statements
    assert len([s for s in statements if "INSERT INTO attempts" in s]) == 1, statements
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    total = next(t for t in platform.task_runs(submitted.run_id) if t.node_id == "total")
    assert total.result == {"value": 120.0}


@pytest.mark.parametrize("width", [5, 40])  # upstreams asked by name; a wide fan-in's others
def test_a_join_whose_last_upstream_ends_is_queued_without_a_pass_over_the_run(
    platform: Platform, width: int
) -> None:
    """The last upstream of a join to succeed queues it from the join's task run alone, as a
    chain's step does, and the join, the run's last task, ends the run from its task states:
    the pass over the run each took read every task run of a fan-out (a thousand, with
    their JSON) for one decision. Earlier upstreams leave the join waiting."""
    submitted = platform.submit(workflows.arithmetic, {"n": width})
    *early, last = submitted.queued
    for dispatch in early:
        claimed = platform.claim(dispatch.attempt_id, "w")
        assert claimed is not None
        assert platform.finish(claimed, "w", execute(platform, claimed)) == []
    claimed = platform.claim(last.attempt_id, "w")
    assert claimed is not None
    outcome = execute(platform, claimed)
    with statements_sent(platform) as statements:
        [join] = platform.finish(claimed, "w", outcome)
    assert not any("ORDER BY task_runs.position" in s for s in statements), statements
    assert _states(platform, submitted.run_id)["total"] == "queued"
    assert platform.attempts(submitted.run_id)[-1].id == join.attempt_id
    claimed = platform.claim(join.attempt_id, "w")
    assert claimed is not None
    outcome = execute(platform, claimed)
    with statements_sent(platform) as statements:  # the sink: the run ends, as a pass ends it
        assert platform.finish(claimed, "w", outcome) == []
    assert not any("ORDER BY task_runs.position" in s for s in statements), statements
    run, _ = platform.run(submitted.run_id)
    assert run.state == RunState.SUCCEEDED and run.finished_at is not None
    total = next(t for t in platform.task_runs(submitted.run_id) if t.node_id == "total")
    assert total.result == {"value": float(width * (width - 1))}


def test_a_sink_that_succeeds_last_ends_its_run_failed_if_a_branch_failed(
    platform: Platform,
) -> None:
    """The run's outcome without a pass over it is the engine's: a failed branch fails it."""
    submitted = platform.submit(workflows.failing_pipeline, {})
    claims = {c.node_id: c for d in submitted.queued if (c := platform.claim(d.attempt_id, "w"))}
    assert sorted(claims) == ["double", "explode"]
    platform.finish(claims["explode"], "w", execute(platform, claims["explode"]))
    assert _states(platform, submitted.run_id)["echo"] == "upstream_failed"
    outcome = execute(platform, claims["double"])
    with statements_sent(platform) as statements:
        platform.finish(claims["double"], "w", outcome)
    assert not any("ORDER BY task_runs.position" in s for s in statements), statements
    assert platform.run(submitted.run_id)[0].state == RunState.FAILED


def test_the_shapes_kept_in_memory_are_bounded_by_tasks_and_dropped_when_a_run_ends(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker keeps each run's DAG shape for its finishes; a run that ended needs it no
    more, and the shapes kept are bounded by their tasks, not by a count of runs (a worker
    kept 256 fan-outs of 1,000, ≈ 1 MiB each). A shape let go is read again when needed."""
    monkeypatch.setattr(execution, "DAG_CACHE_TASKS", 12)
    first, second = (platform.submit(workflows.arithmetic, {"n": 5}) for _ in range(2))
    for submitted in (first, second):  # a finish reads its run's shape: 6 tasks each
        claimed = platform.claim(submitted.queued[0].attempt_id, "w")
        assert claimed is not None
        platform.finish(claimed, "w", execute(platform, claimed))
    assert list(platform._dags) == [first.run_id, second.run_id]
    third = platform.submit(workflows.arithmetic, {"n": 5})
    claimed = platform.claim(third.queued[0].attempt_id, "w")
    assert claimed is not None
    platform.finish(claimed, "w", execute(platform, claimed))
    assert list(platform._dags) == [second.run_id, third.run_id]  # the oldest went
    for submitted in (first, second, third):
        assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
        assert submitted.run_id not in platform._dags


def test_a_postgresql_statement_is_prepared_on_its_first_use(postgres_platform: Platform) -> None:
    """A fresh worker's first claims and steps skip parsing their statements (db.make_engine):
    psycopg's default prepares a statement on its sixth execution on a connection."""
    with postgres_platform.db.autocommit() as conn:
        conn.execute(text("SELECT count(*) FROM runs WHERE state = :s"), {"s": "first use"})
        prepared = conn.execute(text("SELECT statement FROM pg_prepared_statements")).scalars()
        assert any("FROM runs WHERE state" in statement for statement in prepared)


def _stored(platform: Platform, run_id: str) -> dict[str, Any]:
    """What a submission stored of a run, without what differs from one run to the next (ids,
    times)."""
    run, version = platform.run(run_id)
    tasks = platform.task_runs(run_id)
    node = {t.id: t.node_id for t in tasks}
    skip = {"id", "run_id", "task_run_id", "created_at", "not_before"}

    def columns(row: Any) -> dict[str, Any]:
        return {c.key: getattr(row, c.key) for c in inspect(row).mapper.column_attrs} | {"id": None}

    return {
        "run": {k: v for k, v in columns(run).items() if k not in skip},
        "version": version.version,
        "tasks": {t.node_id: {k: v for k, v in columns(t).items() if k not in skip} for t in tasks},
        "attempts": {
            node[a.task_run_id]: {k: v for k, v in columns(a).items() if k not in skip}
            for a in platform.attempts(run_id)
        },
    }


def test_a_submission_on_postgresql_is_one_statement_storing_what_the_transaction_path_does(
    postgres_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of a stored version is stored in one statement (hot_path.SUBMIT) as the
    transaction path stores it: the run, every task run (roots queued on their first attempt,
    the others pending; a NUL in an input, a pool downstream) and the roots' attempts (one
    with its timeout); the dispatches name those attempts. A new version's first run goes the
    transaction path, after a statement that stored nothing."""
    platform = postgres_platform
    params = {"note": "tab\there, nul\u0000 there"}
    with statements_sent(platform) as first_sent:
        first = platform.submit(workflows.every_column, params)
    tried = [s for s in first_sent if "WITH version AS" in s]
    assert len(tried) == 1 and first_sent[-1] != tried[0], first_sent
    with statements_sent(platform) as sent:
        fast = platform.submit(workflows.every_column, params)
    assert len(sent) == 1 and "WITH version AS" in sent[0], sent
    monkeypatch.setattr(type(platform), "_submit_in_one_statement", lambda *_: None)
    with statements_sent(platform) as sent:
        slow = platform.submit(workflows.every_column, params)
    assert len(sent) > 1 and not [s for s in sent if "WITH version AS" in s], sent

    stored = _stored(platform, fast.run_id)
    assert stored == _stored(platform, slow.run_id) == _stored(platform, first.run_id)
    assert fast.workflow_version == slow.workflow_version == stored["version"]
    assert stored["run"]["state"] == RunState.QUEUED and stored["run"]["params"] == params
    tasks = stored["tasks"]
    assert {n: (t["state"], t["current_attempt"]) for n, t in tasks.items()} == {
        "echo": (TaskState.QUEUED, 1),
        "overrun": (TaskState.QUEUED, 1),
        "double": (TaskState.QUEUED, 1),
        "big": (TaskState.QUEUED, 1),
        "length": (TaskState.PENDING, 0),
        "pooled": (TaskState.PENDING, 0),
        "total": (TaskState.PENDING, 0),
    }, tasks
    assert tasks["echo"]["inputs"] == {"args": [params["note"]], "kwargs": {}}
    assert tasks["pooled"]["pool"] == "tests-pool" and tasks["total"]["upstream"] == [
        "double",
        "pooled",
    ]
    assert stored["attempts"]["overrun"]["timeout_seconds"] == 1.0
    assert sorted(stored["attempts"]) == ["big", "double", "echo", "overrun"]
    for submitted in (fast, slow):
        attempts = {a.id for a in platform.attempts(submitted.run_id)}
        assert {d.attempt_id for d in submitted.queued} == attempts
        assert {d.queue for d in submitted.queued} == {queue_of(None)}


@pytest.mark.parametrize(
    ("wf", "params", "cap"),
    [
        (workflows.arithmetic, {"n": 2}, 1),  # a concurrency cap
        (workflows.pooled_pipeline, {}, None),  # a root in a pool
        (workflows.cached_squares, {"counter": "unused"}, None),  # a root that may be cached
    ],
    ids=["capped", "pooled root", "cached root"],
)
def test_a_run_the_plan_would_not_start_as_it_is_takes_the_transaction_path(
    postgres_platform: Platform, wf: Any, params: dict[str, Any], cap: int | None
) -> None:
    platform = postgres_platform
    platform.submit(wf, params, max_concurrency=cap)  # the version stored
    with statements_sent(platform) as sent:
        submitted = platform.submit(wf, params, max_concurrency=cap)
    assert len(sent) > 1 and not [s for s in sent if "WITH version AS" in s], sent
    assert _stored(platform, submitted.run_id)["run"]["max_concurrency"] == cap


def test_a_second_run_for_a_schedules_tick_is_refused_and_stores_nothing(
    postgres_platform: Platform,
) -> None:
    """A tick's run takes the transaction path, which checks the schedule under a share lock
    (not the one statement, even for a stored version); the database keeps one run per
    (schedule, tick): the second is refused (IntegrityError, as fire_schedules expects) and
    leaves no task run or attempt."""
    platform = postgres_platform
    project = platform.default_project_id()
    made = platform.create_schedule(
        project, "hourly", "tests.workflows:arithmetic", "0 * * * *", {}
    )
    tick = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    platform.submit(workflows.arithmetic, {})  # the version stored
    with statements_sent(platform) as sent:
        platform.submit(workflows.arithmetic, {}, schedule=Tick(made.id, tick, made.next_fire_at))
    assert not [s for s in sent if "WITH version AS" in s], sent
    assert [s for s in sent if "FROM schedules" in s and "FOR SHARE" in s], sent
    counts = ", ".join(f"(SELECT count(*) FROM {t})" for t in ("runs", "task_runs", "attempts"))
    counts = f"SELECT {counts}"
    with platform.db.session() as session:
        before = tuple(session.execute(text(counts)).one())
    with pytest.raises(IntegrityError):
        platform.submit(workflows.arithmetic, {}, schedule=Tick(made.id, tick, made.next_fire_at))
    with platform.db.session() as session:
        assert tuple(session.execute(text(counts)).one()) == before
    next_hour = Tick(made.id, tick + timedelta(hours=1), made.next_fire_at)
    later = platform.submit(workflows.arithmetic, {}, schedule=next_hour)
    assert _stored(platform, later.run_id)["run"]["scheduled_for"] == tick + timedelta(hours=1)


def _runs_of_schedules(platform: Platform) -> int:
    with platform.db.session() as session:
        return int(
            session.scalar(text("SELECT count(*) FROM runs WHERE scheduled_for IS NOT NULL"))
        )


@pytest.mark.parametrize("change", ["pause", "delete", "new cron"])
def test_a_schedule_changed_while_a_scheduler_fires_it_makes_no_run_after(
    platform: Platform, change: str
) -> None:
    """A scheduler has read a due schedule and is tracing its workflow when an editor pauses,
    deletes or re-times it: once that has returned, the tick makes no run (it made one
    after the pause, and a deleted schedule's run failed on its foreign key)."""
    project = platform.default_project_id()
    made = platform.create_schedule(
        project, "hourly", "tests.workflows:arithmetic", "0 * * * *", {}
    )
    read, go = threading.Event(), threading.Event()
    trace = platform.trace

    def slow_trace(reference: str, params: Any = None) -> Any:
        read.set()
        assert go.wait(10)
        return trace(reference, params)

    platform.trace = slow_trace  # type: ignore[method-assign]
    fired: list[Any] = []
    scheduler = threading.Thread(
        target=lambda: fired.extend(
            platform.fire_schedules(made.next_fire_at + timedelta(minutes=1))
        )
    )
    scheduler.start()
    assert read.wait(10)
    if change == "pause":
        platform.change_schedule(project, "hourly", enabled=False)
    elif change == "delete":
        platform.delete_schedule(project, "hourly")
    else:
        platform.change_schedule(project, "hourly", cron="30 * * * *")
    go.set()
    scheduler.join(10)
    assert fired == [] and _runs_of_schedules(platform) == 0
    if change == "pause":
        assert not platform.find_schedule(project, "hourly").enabled
    elif change == "new cron":
        assert platform.find_schedule(project, "hourly").next_fire_at.minute == 30


def test_a_pause_waits_for_the_run_of_a_tick_being_stored(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: a tick's run is being stored (its check made, not committed) when an
    editor pauses: the pause waits for that commit, so that the run it returns after is
    there, and none comes later."""
    project = platform.default_project_id()
    made = platform.create_schedule(
        project, "hourly", "tests.workflows:arithmetic", "0 * * * *", {}
    )
    checked, go = threading.Event(), threading.Event()

    def held(session: Any, tick: Tick) -> None:
        runs.schedule_unchanged.__wrapped__(session, tick)  # type: ignore[attr-defined]
        checked.set()
        assert go.wait(10)

    held.__wrapped__ = runs.schedule_unchanged  # type: ignore[attr-defined]
    monkeypatch.setattr(runs, "schedule_unchanged", held)
    scheduler = threading.Thread(
        target=platform.fire_schedules, args=(made.next_fire_at + timedelta(minutes=1),)
    )
    scheduler.start()
    assert checked.wait(10)
    paused = threading.Thread(
        target=platform.change_schedule, args=(project, "hourly"), kwargs={"enabled": False}
    )
    paused.start()
    paused.join(0.5)
    assert paused.is_alive(), "the pause returned while a tick's run was being stored"
    go.set()
    scheduler.join(10)
    paused.join(10)
    assert not paused.is_alive() and _runs_of_schedules(platform) == 1
    assert not platform.find_schedule(project, "hourly").enabled


def test_a_wide_run_is_stored_in_one_insert_per_table_that_does_not_grow_with_it(
    platform: Platform,
) -> None:
    """A run of 500 tasks: its task runs go in in one INSERT and its first attempts in
    another, and nothing of it is read back. On PostgreSQL the whole submission of a stored
    version is one statement of fixed text (the rows travel as one JSON value), not a VALUES
    list the driver must re-parse for every row; a new version's, through the transaction
    path, queues the task runs in the attempts' INSERT. What is stored is what was traced."""
    postgresql = platform.db.engine.dialect.name == "postgresql"
    if postgresql:  # the version stored by a first run
        with statements_sent(platform) as first:
            platform.submit(workflows.arithmetic, {"n": 2})
        # (after the one statement, which stored nothing: the version was new)
        [queuing] = [s for s in first if "INSERT INTO attempts " in s and "version AS" not in s]
        assert "UPDATE task_runs" in queuing, first  # queued and given attempts: one round trip
        assert not [s for s in first if s.startswith("UPDATE task_runs")], first
    before = utcnow()
    with statements_sent(platform) as statements:
        submitted = platform.submit(workflows.arithmetic, {"n": 500})
    inserts = {
        table: [s for s in statements if f"INSERT INTO {table} " in s]
        for table in ("task_runs", "attempts")
    }
    assert [len(found) for found in inserts.values()] == [1, 1], inserts
    # Its first steps are queued from what was stored: its task runs are not read back.
    assert not [s for s in statements if "FROM task_runs" in s.split("INSERT")[0]], statements
    if postgresql:  # one statement, and it does not grow with the run
        # (then, the tables it outgrew analyzed: test_a_bulk_change_has_the_tables_...)
        stored = [s for s in statements if "pg_class" not in s and not s.startswith("ANALYZE")]
        assert len(stored) == 1 and len(stored[0]) < 3_000, statements
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert len(tasks) == 501 and tasks["total"].state == TaskState.PENDING
    assert sorted(tasks["total"].upstream) == sorted(f"double[{i}]" for i in range(500))
    assert tasks["double[7]"].inputs == {"args": [7], "kwargs": {}}
    assert tasks["double[7]"].result is None and tasks["double[7]"].cached_from is None
    attempts = {a.id: a for a in platform.attempts(submitted.run_id)}
    assert sorted(attempts) == sorted(d.attempt_id for d in submitted.queued)
    by_task = {a.task_run_id: a for a in attempts.values()}
    for task in tasks.values():
        if task.node_id != "total":
            attempt = by_task[task.id]
            assert (attempt.number, attempt.state, task.current_attempt) == (1, "queued", 1)
            assert before <= attempt.created_at <= utcnow()
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    total = next(t for t in platform.task_runs(submitted.run_id) if t.node_id == "total")
    assert total.result == {"value": 2 * sum(range(500))}


def test_a_queued_attempt_carries_its_tasks_timeout_pool_and_number(platform: Platform) -> None:
    """Queuing a task run makes its next attempt from the task run as the queuing left it
    (on PostgreSQL in the same statement): the task's timeout and pool, the next number,
    queued and due."""
    timed = platform.submit(workflows.overrun_pipeline, {"seconds": 0.1})
    [attempt] = platform.attempts(timed.run_id)
    [task] = platform.task_runs(timed.run_id)
    assert (attempt.number, attempt.state, attempt.timeout_seconds) == (1, "queued", 1.0)
    assert (task.state, task.current_attempt) == ("queued", 1)
    assert attempt.not_before <= utcnow()
    pooled = platform.submit(workflows.pooled_pipeline, {})
    assert {a.pool for a in platform.attempts(pooled.run_id)} == {"tests-pool"}
    claimed = platform.claim(attempt.id, "w")
    assert claimed is not None
    platform.finish(claimed, "w", Outcome(AttemptState.FAILED, error="boom"))
    second = [a for a in platform.attempts(timed.run_id) if a.number == 2]
    assert [(a.state, a.timeout_seconds) for a in second] == [("queued", 1.0)]
    [task] = platform.task_runs(timed.run_id)
    assert (task.state, task.current_attempt) == ("queued", 2)


def test_rows_inserted_together_keep_every_value_as_given(platform: Platform) -> None:
    """What one insert of many rows stores is what the ORM would have stored: JSON with
    quotes, backslashes, braces, non-ASCII text and NUL characters (a JSON column keeps them,
    escaped), NULLs, and times in any zone (kept in UTC)."""
    run_id = platform.submit(workflows.relay, {"n": 2}).run_id
    tricky = {"args": ['say "hi" \\ {x} — ünï ✓ \x00', None, [1.5, {"k\x00": []}]], "kwargs": {}}
    paris = timezone(timedelta(hours=1))
    when = datetime(2026, 12, 4, 22, 30, 15, 123456, tzinfo=paris)
    rows: list[dict[str, Any]] = [
        {
            "task_run_id": task.id,
            "run_id": run_id,
            "number": 9,
            "state": "queued",
            "pool": None if i else "gpu",
            "not_before": when,
            "timeout_seconds": 2.5 if i else None,
            "created_at": when,
        }
        for i, task in enumerate(platform.task_runs(run_id))
    ]
    with platform.db.session() as session:
        stored = insert_rows(session.connection(), Attempt, rows, returning=("id", "task_run_id"))
        session.execute(update(TaskRun).where(TaskRun.run_id == run_id).values(inputs=tricky))
    assert sorted(row.task_run_id for row in stored) == sorted(r["task_run_id"] for r in rows)
    attempts = {a.id: a for a in platform.attempts(run_id) if a.number == 9}
    assert sorted(attempts) == sorted(row.id for row in stored)
    for row in stored:
        attempt = attempts[row.id]
        assert attempt.not_before == when and attempt.not_before.utcoffset() == timedelta(0)
        first = attempt.task_run_id == rows[0]["task_run_id"]
        assert (attempt.pool, attempt.timeout_seconds) == (("gpu", None) if first else (None, 2.5))
    with platform.db.session() as session:
        task_run_rows: list[dict[str, Any]] = [
            {
                "run_id": run_id,
                "node_id": f"copy{i}",
                "position": 9,
                "task_ref": "m:t",
                "code_version": "v",
                "upstream": [],
                "inputs": tricky,
                "options": {"pool": None},
                "pool": None,
                "state": "pending",
                "current_attempt": 0,
                "lost_attempts": 0,
            }
            for i in range(3)
        ]
        insert_rows(session.connection(), TaskRun, task_run_rows)
    copies = [t for t in platform.task_runs(run_id) if t.node_id.startswith("copy")]
    assert len(copies) == 3 and all(t.inputs == tricky and t.result is None for t in copies)


def test_nul_characters_in_params_results_and_logs_are_stored(platform: Platform) -> None:
    """A NUL character is valid in JSON and may be printed by any task, but PostgreSQL's text
    has none: params and results keep it (JSON columns keep it escaped), and a log or an error
    gets U+FFFD in its place. A batch of such successes still commits in one statement."""
    submitted = platform.submit(workflows.echo_pipeline, {"value": "a\x00b"})
    other = platform.submit(workflows.echo_pipeline, {"value": "c"})
    first = platform.claim(submitted.queued[0].attempt_id, "w")
    second = platform.claim(other.queued[0].attempt_id, "w")
    assert first is not None and second is not None
    assert first.inputs["args"] == ["a\x00b"]
    done = [
        Outcome(AttemptState.SUCCEEDED, result={"value": "a\x00b"}, log="print\x00ed"),
        Outcome(AttemptState.SUCCEEDED, result={"value": "c"}, error="x\x00", skipped=True),
    ]
    with statements_sent(platform) as statements:
        queued, _ = platform.finish_and_claim(list(zip([first, second], done)), [], "w")
    assert queued == [[], []]  # both held: neither was refused and done again alone
    if platform.db.engine.dialect.name == "postgresql":
        ending = [s for s in statements if "json_to_recordset" in s]
        assert len(ending) == 1, statements
    [task] = platform.task_runs(submitted.run_id)
    [attempt] = platform.attempts(submitted.run_id)
    assert (task.state, task.result, attempt.log) == (
        "succeeded",
        {"value": "a\x00b"},
        "print\ufffded",
    )
    [skipped] = platform.task_runs(other.run_id)
    assert (skipped.state, skipped.error) == ("skipped", "x\ufffd")


def test_many_ready_tasks_are_queued_in_chunks_of_bound_ids(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement that queues ready task runs binds at most _IDS_PER_STATEMENT ids (the
    databases cap bound parameters; a fan-out may be wider): every chunk is queued."""
    monkeypatch.setattr(planning, "_IDS_PER_STATEMENT", 2)
    submitted = platform.submit(workflows.arithmetic, {"n": 5})  # 5 roots: chunks 2, 2, 1
    assert len(submitted.queued) == 5
    roots = [t for t in platform.task_runs(submitted.run_id) if t.node_id != "total"]
    assert {(t.state, t.current_attempt) for t in roots} == {("queued", 1)}
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED


def test_a_finish_continues_with_what_it_made_ready_in_the_same_transaction(
    platform: Platform,
) -> None:
    """Finish and continue: a free slot takes the downstream task its finish made ready, in
    the same commit, never published; other workers' queues are left to them."""
    chain = platform.submit(workflows.arithmetic, {"n": 1})  # double(0) -> total
    first = platform.claim(chain.queued[0].attempt_id, "worker-a")
    assert first is not None
    done = Outcome(AttemptState.SUCCEEDED, result={"value": 0.0})
    queued, claims = platform.finish_and_claim([(first, done)], [], "worker-a", take=1)
    assert queued == [[]]  # nothing to publish: the worker took it
    [continued] = claims
    assert continued is not None and continued.node_id == "total"
    # It reads the result committed with it.
    assert continued.inputs["args"] == [[{"__mlp_ref__": "double", "stored": {"value": 0.0}}]]
    double_, total_ = platform.attempts(chain.run_id)
    assert (total_.state, total_.worker_id) == ("running", "worker-a")
    assert total_.started_at == double_.finished_at  # one transaction for both
    assert total_.lease_expires_at is not None and total_.started_at is not None
    assert total_.lease_expires_at > total_.started_at

    # A chain's step on PostgreSQL: the success, the run's lock, the next task run's start
    # (made running, claimed and given its input) in one statement, committed on its own.
    # The first step's too: the claim that started the run brought the run's shape with it.
    relay = platform.submit(workflows.relay, {"n": 3})
    step = platform.claim(relay.queued[0].attempt_id, "worker-a")
    assert step is not None
    with statements_sent(platform) as statements:
        _, [second] = platform.finish_and_claim(
            [(step, execute(platform, step))], [], "worker-a", take=1
        )
    assert second is not None
    if platform.db.engine.dialect.name == "postgresql":
        assert len(statements) == 1, statements
    with statements_sent(platform) as statements:
        _, [third] = platform.finish_and_claim(
            [(second, execute(platform, second))], [], "worker-a", take=1
        )
    assert third is not None and third.inputs["args"][0]["stored"] == {"value": 4}
    if platform.db.engine.dialect.name == "postgresql":
        assert len(statements) == 1, statements

    # A finish that makes more ready than the worker may take: it takes what it may, the
    # rest is queued for others.
    wide = platform.submit(workflows.spread, {"n": 5})
    root = platform.claim(wide.queued[0].attempt_id, "worker-a")
    assert root is not None
    queued, claims = platform.finish_and_claim(
        [(root, execute(platform, root))], [], "worker-a", take=2
    )
    assert len(claims) == 2 and all(c is not None for c in claims)
    assert len(queued[0] or []) == 3
    states = sorted(a.state for a in platform.attempts(wide.run_id))
    assert states == ["queued"] * 3 + ["running"] * 2 + ["succeeded"]

    # Without a free slot, or for a queue this worker does not serve, it is published.
    for take, serves in ((0, lambda _q: True), (1, lambda q: q != "tests-pool")):
        run = platform.submit(workflows.into_a_pool)
        held = platform.claim(run.queued[0].attempt_id, "worker-a")
        assert held is not None
        done = Outcome(AttemptState.SUCCEEDED, result={"value": 2.0})
        queued, claims = platform.finish_and_claim(
            [(held, done)], [], "worker-a", take=take, serves=serves
        )
        assert claims == [] and queued[0] is not None
        assert [d.queue for d in queued[0]] == ["tests-pool"]
        assert platform.attempts(run.run_id)[-1].state == "queued"


def _second_step_held(platform: Platform, worker: str = "w") -> tuple[Any, Outcome, str]:
    """A chain's second step claimed by ``worker`` (its run's shape known to this process, as
    a worker's is after the first finish), with its outcome, and the run's id."""
    relay = platform.submit(workflows.relay, {"n": 3})
    first = platform.claim(relay.queued[0].attempt_id, worker)
    assert first is not None
    _, [second] = platform.finish_and_claim([(first, execute(platform, first))], [], worker, take=1)
    assert second is not None
    return second, execute(platform, second), relay.run_id


def _rows(platform: Platform, run_id: str) -> list[tuple[Any, ...]]:
    with platform.db.engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT t.node_id, t.state, t.current_attempt, t.result::text, a.number, "
                    "a.state, a.worker_id, a.finished_at FROM task_runs t "
                    "LEFT JOIN attempts a ON a.task_run_id = t.id WHERE t.run_id = :id "
                    "ORDER BY t.position, a.number"
                ),
                {"id": run_id},
            )
        ]


_DECLINED = {
    "its run is being cancelled": "UPDATE runs SET cancel_requested = true WHERE id = :run",
    "its run has a concurrency cap": "UPDATE runs SET max_concurrency = 1 WHERE id = :run",
    "the next task is cached": "UPDATE task_runs SET options = CAST('{\"cache\": true}' AS json) "
    "WHERE run_id = :run AND state = 'pending'",
    "the next task is in a pool": "UPDATE task_runs SET pool = 'p' "
    "WHERE run_id = :run AND state = 'pending'",
    "its lease has expired": "UPDATE attempts SET lease_expires_at = '2000-01-01' "
    "WHERE run_id = :run AND state = 'running'",
    "it is not its task's current attempt": "UPDATE task_runs SET current_attempt = 2 "
    "WHERE run_id = :run AND state = 'running'",
}


@pytest.mark.parametrize("case", list(_DECLINED))
def test_a_chain_step_in_one_statement_keeps_nothing_when_anything_else_bears_on_it(
    postgres_platform: Platform, case: str
) -> None:
    """The one-statement step (service.hot_path) is all or nothing: where a cancel, a cap, a
    cache, a pool, a lost lease or a newer attempt bears on it, it changes nothing (the
    transaction path then decides, as before). The last case is the statement's own guard:
    its attempt would end while its task run did not."""
    platform = postgres_platform
    second, outcome, run_id = _second_step_held(platform)
    with platform.db.engine.begin() as connection:
        connection.execute(text(_DECLINED[case]), {"run": run_id})
    before = _rows(platform, run_id)
    assert platform._continue_at_once(second, outcome, "w", 1, lambda _q: True) is None
    assert _rows(platform, run_id) == before


def test_a_chain_step_in_one_statement_commits_the_success_with_the_next_start(
    postgres_platform: Platform,
) -> None:
    """What the one statement keeps: the attempt and its task run ended with the result, the
    next task run started, its attempt made running for this worker with a lease, and the
    claim's input resolved from that result; visible to any other connection at once."""
    platform = postgres_platform
    second, outcome, run_id = _second_step_held(platform)
    claims = platform._continue_at_once(second, outcome, "w", 1, lambda _q: True)
    assert claims is not None
    [third] = claims
    assert third.inputs["args"][0]["stored"] == outcome.result == {"value": 4}
    rows = {node: rest for node, *rest in _rows(platform, run_id)}
    # task run state, its attempt number, result; the attempt's number, state, holder, end
    assert rows["double[1]"][:6] == ["succeeded", 1, '{"value": 4}', 1, "succeeded", "w"]
    assert rows["double[1]"][6] is not None
    assert rows["double[2]"] == ["running", 1, None, 1, "running", "w", None]
    held = platform.attempts(run_id)[-1]
    assert held.id == third.attempt_id and held.lease_expires_at is not None
    # A worker that does not hold the next one (another worker's claim) cannot end it.
    with pytest.raises(FencedOut):
        platform.finish(third, "another-worker", execute(platform, third))


def test_a_cancel_committed_while_a_chain_step_waits_for_its_run_stops_the_chain(
    postgres_platform: Platform,
) -> None:
    """A cancel that takes the run's lock first, while the one-statement step waits for it:
    the step sees the cancel when it gets the lock (its snapshot is older) and starts
    nothing; its success is kept by the transaction path and the run ends cancelled, with
    no attempt left running."""
    platform = postgres_platform
    second, outcome, run_id = _second_step_held(platform)
    holder = platform.db.engine.connect()
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda: results.setdefault("cancel", platform.cancel(run_id))),
        threading.Thread(
            target=lambda: results.setdefault(
                "finish",
                platform.finish_and_claim([(second, outcome)], [], "w", take=1),
            )
        ),
    ]

    failed: list[str] = []
    event.listen(
        platform.db.engine,
        "handle_error",
        lambda context: failed.append(str(context.original_exception)),
    )
    try:
        # Another transaction holds the run's row (as a finish deciding about it would).
        _lock_run_row(holder, run_id)
        for waiting, thread in enumerate(threads, start=1):
            thread.start()  # the cancel queues for the lock first, then the step
            _blocked_on_a_lock(platform, thread, waiting)
    finally:
        holder.rollback()
        holder.close()
        for thread in threads:
            thread.join(timeout=30)
    # The step took the run's lock before anything else (not the key-share lock its new
    # attempt's foreign key takes, after its task run's update, which deadlocked with the
    # cancel's update of that task run: PostgreSQL broke it after a second).
    assert failed == []
    queued, claims = results["finish"]
    assert claims == [] and queued == [[]]
    assert results["cancel"] in (RunState.RUNNING, RunState.CANCELLED)
    states = {node: (rest[0], rest[4]) for node, *rest in _rows(platform, run_id)}
    assert states["double[1]"] == ("succeeded", "succeeded")  # the success was kept
    assert states["double[2]"] == ("cancelled", None)  # never started
    assert platform.run(run_id)[0].state == RunState.CANCELLED


def test_a_retry_reruns_the_failed_step_and_what_follows_and_reuses_the_rest(
    platform: Platform, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "fail").write_text("3")
    failed = platform.submit(workflows.five_steps, {"folder": str(marks)})
    assert run_inline(platform, failed.run_id) is RunState.FAILED

    def ran(index: int) -> int:
        return len(list(marks.glob(f"step{index}-*")))

    assert [ran(i) for i in range(1, 6)] == [1, 1, 1, 0, 0]
    (marks / "fail").unlink()  # the bug is fixed
    retried = platform.retry(failed.run_id)
    assert run_inline(platform, retried.run_id) is RunState.SUCCEEDED
    assert [ran(i) for i in range(1, 6)] == [1, 1, 2, 1, 1]  # 1–2 reused, 3–5 ran
    run, _ = platform.run(retried.run_id)
    assert run.retry_of == failed.run_id
    states = {t.node_id: t.state for t in platform.task_runs(retried.run_id)}
    assert [states[n] for n in sorted(states)] == [
        "reused",
        "reused",
        "succeeded",
        "succeeded",
        "succeeded",
    ]
    results = {t.node_id: t.result for t in platform.task_runs(retried.run_id)}
    assert results[max(results)] == {"value": 15}  # 1+2+3+4+5, through the reused values
    # From a given task: it and everything after it run again, the rest is reused.
    again = platform.retry(retried.run_id, from_task=sorted(states)[3])
    assert run_inline(platform, again.run_id) is RunState.SUCCEEDED
    assert [ran(i) for i in range(1, 6)] == [1, 1, 2, 2, 2]
    with pytest.raises(RetryError, match="has no task 'nope'"):
        platform.retry(again.run_id, from_task="nope")
    pending = platform.submit(workflows.arithmetic, {"n": 1})
    with pytest.raises(RetryError, match="retry it once it ended"):
        platform.retry(pending.run_id)


LATEST_MODULE = """
from pathlib import Path

from ml_platform.sdk import task, workflow


def _mark(folder: str, name: str) -> None:
    (Path(folder) / f"{name}-{len(list(Path(folder).glob(name + '-*')))}").touch()


@task
def first(folder: str) -> int:
    _mark(folder, "first")
    return 1


@task
def second(value: int, folder: str) -> int:
    _mark(folder, "second")
    return value + 1


@task
def third(value: int, folder: str) -> int:
    _mark(folder, "third")
    return BODY


@task
def side(value: int, folder: str) -> int:
    _mark(folder, "side")
    return value


@workflow
def chain(folder: str) -> None:
    start = first(folder)
    third(second(start, folder), folder)
    side(start, folder)
"""


def test_retry_latest_reruns_the_tasks_whose_code_changed_and_what_follows(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys
    import uuid

    name = f"latest_{uuid.uuid4().hex[:8]}"
    source = tmp_path / "code" / f"{name}.py"
    source.parent.mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.chdir(source.parent)  # the project's own modules: the tracer loads them
    monkeypatch.syspath_prepend(str(source.parent))

    def write(body: str) -> None:
        source.write_text(LATEST_MODULE.replace("BODY", body))
        sys.modules.pop(name, None)
        importlib.invalidate_caches()

    def ran(task: str) -> int:
        return len(list(marks.glob(f"{task}-*")))

    write("1 // 0  # a bug")
    traced = platform.trace(f"{name}:chain", {"folder": str(marks)})
    failed = platform.submit(traced)
    assert run_inline(platform, failed.run_id) is RunState.FAILED
    assert [ran(t) for t in ("first", "second", "third", "side")] == [1, 1, 1, 1]

    write("value * 100  # the fix")
    plain = platform.retry(failed.run_id)  # the same version, whose code is gone now
    assert run_inline(platform, plain.run_id) is RunState.FAILED
    [stale] = [t for t in platform.task_runs(plain.run_id) if t.node_id == "third"]
    assert "CodeChanged" in (stale.error or "") and "submit the run again" in (stale.error or "")
    fixed = platform.retry(failed.run_id, latest=True)
    assert fixed.workflow_version == 2
    assert run_inline(platform, fixed.run_id) is RunState.SUCCEEDED
    assert [ran(t) for t in ("first", "second", "third", "side")] == [1, 1, 2, 1]
    states = _states(platform, fixed.run_id)
    assert states == {"first": "reused", "second": "reused", "third": "succeeded", "side": "reused"}
    tasks = {t.node_id: t for t in platform.task_runs(fixed.run_id)}
    assert tasks["third"].result == {"value": 200}

    # A change upstream reruns it and what depends on it; the rest is still reused.
    source.write_text(source.read_text().replace("return value + 1", "return value + 2  # changed"))
    sys.modules.pop(name, None)
    again = platform.retry(fixed.run_id, latest=True)
    assert run_inline(platform, again.run_id) is RunState.SUCCEEDED
    assert _states(platform, again.run_id) == {
        "first": "reused",
        "second": "succeeded",
        "third": "succeeded",
        "side": "reused",
    }
    assert [ran(t) for t in ("first", "second", "third", "side")] == [1, 2, 3, 1]
    tasks = {t.node_id: t for t in platform.task_runs(again.run_id)}
    assert tasks["third"].result == {"value": 300}


def _blocked_on_a_lock(
    platform: Platform, thread: threading.Thread, waiting: int = 1, holder: Any = None
) -> None:
    """Wait until ``waiting`` statements on the platform's database wait for a lock (one that
    the connection ``holder`` holds, if given), the last of them ``thread``'s (or until the
    thread has ended)."""
    blocked_by = "wait_event_type = 'Lock'"
    params: dict[str, Any] = {}
    if holder is not None:
        blocked_by = ":pid = ANY(pg_blocking_pids(pid))"
        params["pid"] = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
    deadline = time.monotonic() + 10
    while thread.is_alive():
        with platform.db.engine.connect() as connection:
            found = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    f"WHERE datname = current_database() AND {blocked_by}"  # nosec B608
                ),
                params,
            ).scalar_one()
        if found >= waiting:
            return
        assert time.monotonic() < deadline, "never waited for the lock"
        time.sleep(0.01)


def _claim_behind(platform: Platform, attempt_id: int, change: str, row: object) -> Any:
    """``platform.claim(attempt_id)`` while another transaction holds ``change`` (a statement
    on ``row``, bound as :id) uncommitted: the claim waits for its lock, then the change
    commits. What the claim returned."""
    holder = platform.db.engine.connect()
    claims: list[Any] = []
    claimer = threading.Thread(target=lambda: claims.append(platform.claim(attempt_id, "w")))
    try:
        holder.execute(text(change), {"id": row})
        claimer.start()
        _blocked_on_a_lock(platform, claimer)
        holder.commit()
    finally:
        holder.close()
        claimer.join(timeout=30)
    [claimed] = claims
    return claimed


def test_a_first_claim_waiting_for_another_start_of_its_run_claims_once_it_is_started(
    postgres_platform: Platform,
) -> None:
    """Two workers take a new run's first two tasks at once: the first claim starts the run;
    the second, whose snapshot still saw the run queued, waits for the run's row and reads it
    as it is then (started): it claims too, instead of dropping its delivery."""
    platform = postgres_platform
    submitted = platform.submit(workflows.arithmetic, {"n": 2})  # two roots
    first, second = submitted.queued
    # The other worker's claim, in flight: the run started, not yet committed.
    started = "UPDATE runs SET state = 'running', started_at = now() WHERE id = :id"
    claimed = _claim_behind(platform, second.attempt_id, started, submitted.run_id)
    assert claimed is not None and claimed.attempt_id == second.attempt_id
    assert platform.claim(first.attempt_id, "a") is not None
    assert {a.state for a in platform.attempts(submitted.run_id)} == {"running"}


def test_a_claim_whose_attempt_changes_under_it_keeps_nothing(
    postgres_platform: Platform,
) -> None:
    """A claim in one statement, committed on its own: when its attempt changes after the
    statement read it (here dead-lettered by another transaction), the task run it had
    already claimed in the same statement is not kept either -- no task run left running
    without a running attempt."""
    platform = postgres_platform
    submitted = platform.submit(workflows.arithmetic, {"n": 2})
    first, target = submitted.queued
    assert platform.claim(first.attempt_id, "x") is not None  # the run is started
    lost = "UPDATE attempts SET state = 'lost', error = 'dead-lettered' WHERE id = :id"
    assert _claim_behind(platform, target.attempt_id, lost, target.attempt_id) is None
    [attempt] = [a for a in platform.attempts(submitted.run_id) if a.id == target.attempt_id]
    [task_run] = [t for t in platform.task_runs(submitted.run_id) if t.id == attempt.task_run_id]
    assert (attempt.state, task_run.state) == ("lost", "queued")  # not left running alone


def test_a_run_s_last_task_ends_it_in_one_statement_with_the_engine_s_outcome(
    postgres_platform: Platform,
) -> None:
    """The success of a run's last open task, its task run and the run's end are one
    statement, committed on its own; the run's outcome is the engine's (a failed branch
    fails it)."""
    platform = postgres_platform
    submitted = platform.submit(workflows.failing_pipeline, {})
    claims = {c.node_id: c for d in submitted.queued if (c := platform.claim(d.attempt_id, "w"))}
    platform.finish(claims["explode"], "w", execute(platform, claims["explode"]))
    outcome = execute(platform, claims["double"])
    with statements_sent(platform) as statements:
        queued, continued = platform.finish_and_claim(
            [(claims["double"], outcome)], [], "w", take=1
        )
    assert (queued, continued) == ([[]], [])
    assert len(statements) == 1, statements
    assert platform.run(submitted.run_id)[0].state == RunState.FAILED
    assert submitted.run_id not in platform._dags  # let go with its run

    relay = platform.submit(workflows.relay, {"n": 2})
    first = platform.claim(relay.queued[0].attempt_id, "w")
    assert first is not None
    _, [last] = platform.finish_and_claim([(first, execute(platform, first))], [], "w", take=1)
    assert last is not None
    with statements_sent(platform) as statements:
        platform.finish_and_claim([(last, execute(platform, last))], [], "w", take=1)
    assert len(statements) == 1, statements
    run, _ = platform.run(relay.run_id)
    assert run.state == RunState.SUCCEEDED and run.finished_at is not None


def test_a_last_task_ends_its_run_only_when_no_other_task_is_open(
    postgres_platform: Platform,
) -> None:
    """A sink whose run still has another task open changes nothing in one statement (the
    transaction decides, after the run's lock); two last tasks ending together, each on its
    own thread, end their run once, succeeded."""
    platform = postgres_platform
    submitted = platform.submit(workflows.short_and_long, {"short": 0.0, "long": 0.0})
    one, two = (platform.claim(d.attempt_id, "w") for d in submitted.queued)
    assert one is not None and two is not None
    before = _rows(platform, submitted.run_id)
    outcome = Outcome(AttemptState.SUCCEEDED, result={"value": 0})
    assert platform._continue_at_once(one, outcome, "w", 1, lambda _q: True) is None
    assert _rows(platform, submitted.run_id) == before
    for _ in range(5):
        run = platform.submit(workflows.short_and_long, {"short": 0.0, "long": 0.0})
        claimed = [platform.claim(d.attempt_id, "w") for d in run.queued]
        threads = [
            threading.Thread(
                target=platform.finish_and_claim, args=([(c, outcome)], [], "w"), kwargs={"take": 1}
            )
            for c in claimed
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert platform.run(run.run_id)[0].state == RunState.SUCCEEDED
        assert set(_states(platform, run.run_id).values()) == {"succeeded"}


def test_the_one_statement_outcome_of_a_run_is_the_engine_s(postgres_platform: Platform) -> None:
    """hot_path.RUN_OUTCOME, in SQL, decides as engine.dag.run_outcome does, for every set of
    terminal task states."""
    states = sorted(TASK_TERMINAL)
    outcome = text(
        "SELECT "
        + hot_path.RUN_OUTCOME.format(states="(SELECT unnest(CAST(:states AS varchar[])) AS state)")
    )
    with postgres_platform.db.engine.connect() as connection:
        for size in range(len(states) + 1):
            for chosen in combinations(states, size):
                decided = connection.execute(
                    outcome, {"states": [s.value for s in chosen], **hot_path.STATES}
                ).scalar_one()
                assert decided == run_outcome(chosen, cancel_requested=False).value, chosen
