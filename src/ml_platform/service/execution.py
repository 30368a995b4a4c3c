"""The hot path: claim, heartbeat, finish (and continue), reap; the scheduler's pass.

Every transition is an UPDATE guarded by the state it expects (and, for a finish, by the
worker holding the attempt's lease), built once at import: a fan-out runs them thousands of
times.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache, partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Row,
    String,
    Text,
    Update,
    any_,
    bindparam,
    func,
    literal_column,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.orm import Session

from ml_platform.dispatch import Dispatch, queue_of
from ml_platform.engine.dag import run_outcome
from ml_platform.engine.retry import RetryPolicy
from ml_platform.engine.states import (
    RUN_TERMINAL,
    TASK_DONE_OK,
    TASK_TERMINAL,
    AttemptState,
    RunState,
    TaskState,
)
from ml_platform.inputs import references, resolve_inputs
from ml_platform.service import hot_path
from ml_platform.service.core import (
    _MADE,
    ClaimedAttempt,
    FencedOut,
    Heartbeat,
    LogPiece,
    NotFound,
    Outcome,
    _Abort,
    _rowcount,
    _Shape,
    storable_text,
)
from ml_platform.service.planning import Planning, queued_as_it_is
from ml_platform.store.db import insert_rows, on_driver, reading
from ml_platform.store.models import (
    Artifact,
    Attempt,
    Metric,
    Param,
    Run,
    TaskRun,
    UTCDateTime,
    utcnow,
)

TIMEOUT_ERROR = "builtins:TimeoutError"
#: Tasks whose DAG shapes a Platform keeps in memory, over all its runs (see _dag): a fan-out
#: of 10,000 fits; the shapes read longest ago go first, and a run's goes when it ends. (A
#: count of runs let a worker keep 256 fan-outs of 1,000, ≈ 1 MiB each.)
DAG_CACHE_TASKS = 20_000
#: Tasks a finish queues by name, without a pass over the run (see _next_steps): a wider
#: fan-out takes the pass (SQLite binds 32,766 values to a statement at most).
MAX_NEXT_STEPS = 10_000


def timeout_outcome(
    options: Mapping[str, Any], *, reaped: bool = False, log: str | None = None, log_start: int = 0
) -> Outcome:
    """A failed attempt for a task that ran past its timeout (with what it printed)."""
    retry_on = options.get("retry_on")
    by = " (stopped by the lease reaper)" if reaped else ""
    return Outcome(
        AttemptState.FAILED,
        error=f"TimeoutError: task exceeded its {options['timeout']:g} s timeout{by}",
        retryable=retry_on is None or TIMEOUT_ERROR in retry_on,
        log=log,
        log_start=log_start,
    )


#: Each name's points added to its series (store.models.MetricSeries); SQLite's two-argument
#: min() and max() are PostgreSQL's LEAST and GREATEST.
_SUM_UP = """
    INSERT INTO metric_series
        (task_run_id, name, run_id, points, low, high, last, logged_order)
    VALUES (:task_run_id, :name, :run_id, :points, :low, :high, :last, :logged_order)
    ON CONFLICT (task_run_id, name) DO UPDATE SET
        points = metric_series.points + excluded.points,
        low = {least}(metric_series.low, excluded.low),
        high = {greatest}(metric_series.high, excluded.high),
        last = excluded.last
"""
_SUM_UP_BY_DIALECT = {
    "postgresql": text(_SUM_UP.format(least="LEAST", greatest="GREATEST")),
    "sqlite": text(_SUM_UP.format(least="min", greatest="max")),
}


def _sum_up(conn: Connection, run_id: str, task_run_id: int, metrics: list[dict[str, Any]]) -> None:
    """Add an outcome's points to their series: one row per name, in one statement."""
    series: dict[str, dict[str, Any]] = {}
    for metric in metrics:  # in the order they were logged: the last one is the last
        value = metric["value"]
        found = series.get(metric["name"])
        if found is None:
            found = series[metric["name"]] = {
                "task_run_id": task_run_id,
                "run_id": run_id,
                "name": metric["name"],
                "points": 0,
                "low": value,
                "high": value,
                "logged_order": len(series),
            }
        found["points"] += 1
        found["low"], found["high"] = min(found["low"], value), max(found["high"], value)
        found["last"] = value
    conn.execute(_SUM_UP_BY_DIALECT[conn.dialect.name], list(series.values()))


def unstorable(outcome: Outcome, exc: DataError) -> Outcome:
    """The failure that stands for an outcome the database refused (keeping its log)."""
    reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else repr(exc)
    return Outcome(
        AttemptState.FAILED,
        error=f"the task's outcome could not be stored: {reason}",
        retryable=False,
        log=outcome.log,
        log_start=outcome.log_start,
    )


def _reapable(overdue_before: datetime, now: datetime, dialect: str) -> ColumnElement[bool]:
    """Which running attempts the reaper reads (the loop in ``reap`` decides): lease expired,
    or, with a timeout, started before ``overdue_before`` minus the timeout (PostgreSQL; on
    SQLite every running attempt with a timeout). Every running attempt of the cluster,
    read by every worker at every pass (0.5 s), made a pass cost ≈ 7 ms with 1,100 attempts
    running and ≈ 40 ms with 6,100 (2026-12-06, here), where the attempts to end are few."""
    lease_expired = Attempt.lease_expires_at < now
    if dialect != "postgresql":
        return or_(lease_expired, Attempt.timeout_seconds.is_not(None))
    cutoff = bindparam("overdue_before", overdue_before, type_=UTCDateTime)
    timeout: ColumnElement[Any] = literal_column("interval '1 second'") * Attempt.timeout_seconds
    return or_(lease_expired, Attempt.started_at < cutoff - timeout)


def _lost_policy(base_delay: float) -> RetryPolicy:
    """The backoff between retries of lost attempts: doubling from ``base_delay``, up to 30 s."""
    return RetryPolicy(base_delay=base_delay, max_delay=max(base_delay, 30.0))


def _policy(options: Mapping[str, Any]) -> RetryPolicy:
    return RetryPolicy(
        retries=options["retries"],
        base_delay=options["base_delay"],
        factor=options["factor"],
        max_delay=options["max_delay"],
        jitter=options["jitter"],
    )


_CLAIM_READ = (
    select(
        Attempt.run_id,
        Attempt.task_run_id,
        Attempt.number,
        Run.state.label("run_state"),
        Run.cancel_requested,
        TaskRun.node_id,
        TaskRun.task_ref,
        TaskRun.inputs,
        TaskRun.options,
        TaskRun.code_version,
    )
    .join(Run, Run.id == Attempt.run_id)
    .join(TaskRun, TaskRun.id == Attempt.task_run_id)
    .where(Attempt.id == bindparam("attempt_id"))
)
_START_RUN = (
    update(Run)
    .where(Run.id == bindparam("run_id"), Run.state == RunState.QUEUED)
    .values(state=RunState.RUNNING, started_at=bindparam("now"))
)
_CLAIM_TASK_RUN = (
    update(TaskRun)
    .where(
        TaskRun.id == bindparam("task_run_id"),
        TaskRun.state == TaskState.QUEUED,
        TaskRun.current_attempt == bindparam("number"),
    )
    .values(
        state=TaskState.RUNNING,
        started_at=func.coalesce(TaskRun.started_at, bindparam("now")),
    )
)
_CLAIM_ATTEMPT = (
    update(Attempt)
    .where(
        Attempt.id == bindparam("attempt_id"),
        Attempt.state == AttemptState.QUEUED,
        Attempt.not_before <= bindparam("now"),
    )
    .values(
        state=AttemptState.RUNNING,
        worker_id=bindparam("worker_id"),
        started_at=bindparam("now"),
        lease_expires_at=bindparam("lease"),
    )
)

#: The states the claim statements below compare and set, bound like any value.
_CLAIM_STATES = {
    "task_queued": TaskState.QUEUED,
    "task_running": TaskState.RUNNING,
    "attempt_queued": AttemptState.QUEUED,
    "attempt_running": AttemptState.RUNNING,
    "run_queued": RunState.QUEUED,
    "run_running": RunState.RUNNING,
}

#: The results of a task's upstreams, by node: one probe of the (run_id, node_id) key per
#: upstream, nothing read for a task without any. As ``node_id = ANY(...)`` over the run's
#: task runs the planner was free to go through the (run_id, state) index instead, reading
#: every task run of the run for each task claimed: 0.34 ms a task of a 1,000-wide fan-out,
#: 80 % of its claims' time in PostgreSQL. As ``IN (SELECT ...)`` it was once a hash join
#: over every task run of the table.
_UPSTREAM_RESULTS = """(SELECT json_object_agg(up.node_id, (SELECT u.result FROM task_runs u
            WHERE u.run_id = {row}.run_id AND u.node_id = up.node_id))
        FROM json_array_elements_text({row}.upstream) AS up(node_id)) AS upstream_results"""

#: Whole claims in one statement (PostgreSQL), of any number of attempts: the read of
#: _CLAIM_READ; for those whose run is running (or queued: the first claims start it) and not
#: being cancelled, and whose attempt is claimable, _CLAIM_TASK_RUN's UPDATE and then
#: _CLAIM_ATTEMPT's, the latter only where the former matched; and the results of each
#: task's upstreams (committed before it was queued). A row comes back for every attempt
#: found, with what each UPDATE matched: (true, true) claimed; (false, false) not claimable,
#: nothing changed. A task run claimed without its attempt (the attempt changed after the
#: statement's snapshot) fails the whole statement (``guard``), so that it can run on its own
#: as its own transaction (autocommit: one round trip).
#:
#: A queued run's row is locked first (``locked_run``: before any task run, as every
#: decision about a run locks it, and in one order), and read as it is now. If another
#: worker's claim started it since the snapshot (``stale``: the lock waited for that claim),
#: the statement changes nothing and says so: others may hold its task runs by now -- a
#: finish holds its task run and then waits for the run's row, which this statement would
#: hold while waiting for the task run (a deadlock) -- and the claim is made again by a new
#: statement, which sees the run running. A running run's row is not locked: a fan-out's
#: claims would queue behind each other on it; the guarded UPDATEs decide, and cancel()
#: turns queued task runs cancelled under the run's lock.
_CLAIMS = """
    WITH locked_run AS MATERIALIZED (
        SELECT r.id, r.state, r.cancel_requested FROM runs r
        WHERE r.id IN (
            SELECT q.run_id FROM attempts q JOIN runs s ON s.id = q.run_id
            WHERE q.id {ids} AND s.state = :run_queued
        )
        ORDER BY r.id FOR UPDATE
    ), stale AS (
        SELECT FROM locked_run WHERE locked_run.state <> :run_queued
    ), started_run AS (
        UPDATE runs SET state = :run_running, started_at = :now
        FROM locked_run
        WHERE runs.id = locked_run.id AND NOT locked_run.cancel_requested
            AND NOT EXISTS (SELECT FROM stale)
        RETURNING runs.id
    ), target AS (
        SELECT a.id AS attempt_id, a.run_id, a.task_run_id, a.number,
            a.state = :attempt_queued AND a.not_before <= :now AS attempt_claimable,
            NOT EXISTS (SELECT FROM stale) AND CASE WHEN l.id IS NULL
                THEN r.state = :run_running AND NOT r.cancel_requested
                ELSE NOT l.cancel_requested  -- and queued (not stale)
            END AS run_open,
            t.node_id, t.task_ref, t.inputs, t.options, t.code_version, t.upstream
        FROM attempts a JOIN runs r ON r.id = a.run_id JOIN task_runs t ON t.id = a.task_run_id
            LEFT JOIN locked_run l ON l.id = a.run_id
        WHERE a.id {ids}
    ), claimed_task_run AS (
        UPDATE task_runs
        SET state = :task_running, started_at = coalesce(task_runs.started_at, :now)
        FROM target
        WHERE task_runs.id = target.task_run_id AND task_runs.state = :task_queued
            AND task_runs.current_attempt = target.number
            AND target.run_open AND target.attempt_claimable
        RETURNING task_runs.id
    ), claimed_attempt AS (
        UPDATE attempts
        SET state = :attempt_running, worker_id = :worker_id, started_at = :now,
            lease_expires_at = :lease
        FROM target
        WHERE attempts.id {ids} AND attempts.id = target.attempt_id
            -- IS TRUE: a condition no index serves, so that the attempts are looked up by
            -- their key; with a new table's statistics the plan went by their state instead,
            -- reading every queued attempt on each claim
            AND (attempts.state = :attempt_queued AND attempts.not_before <= :now) IS TRUE
            AND target.task_run_id IN (SELECT id FROM claimed_task_run)
        RETURNING attempts.id
    ), claims AS (
        SELECT target.*,
            target.task_run_id IN (SELECT id FROM claimed_task_run) AS task_run_claimed,
            target.attempt_id IN (SELECT id FROM claimed_attempt) AS attempt_claimed
        FROM target
    )
    SELECT claims.*, EXISTS (SELECT FROM stale) AS stale,
        CASE WHEN claims.task_run_claimed AND NOT claims.attempt_claimed
            -- of the rows, not of the parameters (the planner folds constants): raised
            -- only when reached, failing the whole statement
            THEN CAST('a task run claimed without its attempt ' || claims.attempt_id AS integer)
        END AS guard,
        {upstream_results},
        -- The run's shape (Execution._dag), for the claim that starts it: the worker would
        -- read it at this task's end otherwise, a round trip on a chain's first step.
        CASE WHEN claims.run_id IN (SELECT id FROM started_run) THEN
            (SELECT json_agg(json_build_array(s.node_id, s.upstream, s.options -> 'map_of',
                    s.options -> 'map_concurrency'))
                FROM task_runs s WHERE s.run_id = claims.run_id)
        END AS shape
    FROM claims
    """


class _RunStarted(_Abort):
    """A claim statement found a run it had seen queued started by another (_CLAIMS): it
    changed nothing; a new statement sees the run as it is."""


_CLAIM_TIMES = (bindparam("now", type_=UTCDateTime), bindparam("lease", type_=UTCDateTime))


def _claims(ids: str) -> str:
    """_CLAIMS for ``ids``, the attempts' condition."""
    return _CLAIMS.format(ids=ids, upstream_results=_UPSTREAM_RESULTS.format(row="claims"))


_CLAIM_IN_ONE_STATEMENT = text(_claims("= ANY(:attempt_ids)")).bindparams(
    bindparam("attempt_ids", type_=ARRAY(BigInteger)), *_CLAIM_TIMES
)
#: The same for one attempt: its id a scalar, PostgreSQL plans it once for all claims (a
#: generic plan); with an array of ids it plans every claim anew (≈ 0.7 ms of 1.7 here).
_CLAIM_ONE = text(_claims("= :attempt_id")).bindparams(
    bindparam("attempt_id", type_=BigInteger), *_CLAIM_TIMES
)


# A running attempt's output, in the pieces its worker ships (store.models.LogPart).
_SHIP_PIECE = text("""
    INSERT INTO log_parts (attempt_id, start, text)
    SELECT :attempt_id, :start, :text
    WHERE EXISTS (SELECT 1 FROM attempts WHERE id = :attempt_id AND worker_id = :worker_id
        AND state = :running)
    ON CONFLICT (attempt_id, start) DO UPDATE SET text = excluded.text
""")
#: (``start <`` first: a range of the key, the few pieces before the kept part, not all.)
_LET_GO = text("""
    DELETE FROM log_parts
    WHERE attempt_id = :attempt_id AND start < :kept_from
        AND start + length(text) <= :kept_from
""")
_SHIPPED = text("SELECT start, text FROM log_parts WHERE attempt_id = :attempt_id ORDER BY start")
_SWEEP_LOG_PARTS = text("""
    DELETE FROM log_parts WHERE attempt_id IN (
        SELECT p.attempt_id FROM log_parts p JOIN attempts a ON a.id = p.attempt_id
        WHERE a.state <> :running)
""")

# Ending an attempt: guarded by the state it expects and by who may end it (see _Guard).
# An outcome without a log (the reaper's, say) keeps what the worker shipped while it ran.
_END_ATTEMPT = (
    update(Attempt)
    .where(Attempt.id == bindparam("attempt_id"), Attempt.state == bindparam("from_state"))
    .values(
        state=bindparam("state"),
        finished_at=bindparam("now"),
        error=bindparam("error"),
        log=func.coalesce(bindparam("log", type_=Text), Attempt.log),
        log_start=func.coalesce(bindparam("log_start", type_=BigInteger), Attempt.log_start),
    )
    .returning(Attempt.task_run_id)
)
#: Only by the worker that holds it, within its lease (a finish).
_END_HELD_ATTEMPT = _END_ATTEMPT.where(
    Attempt.worker_id == bindparam("holder"), Attempt.lease_expires_at >= bindparam("now")
)
#: Only once its lease has expired (the reaper's "lost").
_END_EXPIRED_ATTEMPT = _END_ATTEMPT.where(Attempt.lease_expires_at < bindparam("now"))
#: Which statement ends an attempt, and its parameters beyond the outcome's.
_Guard = tuple[Update, dict[str, Any]]
_UNGUARDED: _Guard = (_END_ATTEMPT, {})
_EXPIRED: _Guard = (_END_EXPIRED_ATTEMPT, {})


def _held_by(worker_id: str) -> _Guard:
    return _END_HELD_ATTEMPT, {"holder": worker_id}


_LOCK_RUN = (
    select(Run.state, Run.cancel_requested, Run.max_concurrency)
    .where(Run.id == bindparam("run_id"))
    .with_for_update()
)
_TASK_RUN_OF = select(
    TaskRun.id,
    TaskRun.node_id,
    TaskRun.current_attempt,
    TaskRun.options,
    TaskRun.pool,
    TaskRun.lost_attempts,
).where(TaskRun.id == bindparam("task_run_id"))
_FAILURES_OF = (
    select(func.count())
    .select_from(Attempt)
    .where(Attempt.task_run_id == bindparam("task_run_id"), Attempt.state == AttemptState.FAILED)
)
#: What ending a task run sets, and what it returns (also in _end_with_success).
_TASK_RUN_END: dict[str, Any] = {
    "state": bindparam("task_state"),
    "result": bindparam("result"),
    "error": bindparam("task_error"),
    "finished_at": bindparam("now"),
}
_TASK_RUN_ENDED = (TaskRun.id, TaskRun.node_id, TaskRun.pool)
_END_TASK_RUN = (
    update(TaskRun)
    .where(TaskRun.id == bindparam("task_run_id"), TaskRun.current_attempt == bindparam("number"))
    .values(_TASK_RUN_END)
    .returning(*_TASK_RUN_ENDED)
)


def _ending(
    attempt_id: int,
    from_state: AttemptState,
    outcome: Outcome,
    now: datetime,
    guarded_by: dict[str, Any],
) -> dict[str, Any]:
    """The parameters of an attempt's guarded ending (see _Guard)."""
    return {
        "attempt_id": attempt_id,
        "from_state": from_state,
        "state": outcome.state,
        "now": now,
        "error": outcome.error,
        "log": outcome.log,
        "log_start": None if outcome.log is None else outcome.log_start,
        **guarded_by,
    }


def _success_end(outcome: Outcome) -> dict[str, Any]:
    """What a success sets on its task run (a skip ends it skipped, with its reason)."""
    return {
        "task_state": TaskState.SKIPPED if outcome.skipped else TaskState.SUCCEEDED,
        "result": None if outcome.skipped else outcome.result,
        "task_error": outcome.error if outcome.skipped else None,
    }


@lru_cache(maxsize=8)
def _end_with_success(ending: Update) -> Update:
    """A success's two guarded UPDATEs in one statement (PostgreSQL): the attempt's (``ending``,
    one of the guards above) in a CTE, then its task run's if the attempt's matched and the
    attempt is still the current one. No row back: either lost its race."""
    ended = ending.cte("ended_attempt")
    return (
        update(TaskRun)
        .where(
            TaskRun.id == select(ended.c.task_run_id).scalar_subquery(),
            # not "number": a key named after a column of the attempts would be SET there
            TaskRun.current_attempt == bindparam("current_number"),
        )
        .values(_TASK_RUN_END)
        .returning(*_TASK_RUN_ENDED)
    )


#: Many successes of one worker in one statement (PostgreSQL): each attempt's guarded UPDATE
#: (held by :holder, within its lease) in a CTE, then the task runs of those that matched and
#: are still current; the outcomes travel as one JSON document (each result as a string of
#: JSON: see store.db._recordset_insert). Their runs' locks, in one order, are taken in the same
#: round trip (a success locks its run last, only to decide what follows: later statements
#: see what committed before the lock). A row back per success that held, with its run's row;
#: one missing lost its race.
_END_SUCCESSES = text("""
    WITH given AS (
        SELECT * FROM json_to_recordset(CAST(:outcomes AS JSON)) AS g(
            attempt_id bigint, number integer, task_state varchar, result text,
            task_error text, error text, log text, log_start bigint)
    ), ended_attempt AS (
        UPDATE attempts
        SET state = :attempt_succeeded, finished_at = :now, error = given.error,
            log = given.log, log_start = given.log_start
        FROM given
        WHERE attempts.id = given.attempt_id
            -- IS TRUE: looked up by key, not by state (see _CLAIMS)
            AND (attempts.state = :attempt_running AND attempts.worker_id = :holder
                AND attempts.lease_expires_at >= :now) IS TRUE
        RETURNING attempts.id AS attempt_id, attempts.task_run_id
    ), ended_task_run AS (
        UPDATE task_runs
        SET state = given.task_state, result = CAST(given.result AS JSON),
            error = given.task_error, finished_at = :now
        FROM ended_attempt JOIN given ON given.attempt_id = ended_attempt.attempt_id
        WHERE task_runs.id = ended_attempt.task_run_id
            AND task_runs.current_attempt = given.number
        RETURNING ended_attempt.attempt_id, task_runs.id, task_runs.node_id, task_runs.pool,
            task_runs.run_id
    ), locked_run AS MATERIALIZED (
        SELECT id, state, cancel_requested, max_concurrency FROM runs
        WHERE id = ANY(:run_ids) ORDER BY id FOR UPDATE
    )
    SELECT ended_task_run.*, locked_run.state AS run_state, locked_run.cancel_requested,
        locked_run.max_concurrency
    FROM ended_task_run JOIN locked_run ON locked_run.id = ended_task_run.run_id
    """).bindparams(bindparam("now", type_=UTCDateTime), bindparam("run_ids", type_=ARRAY(String)))
_SUCCESS_STATES = {
    "attempt_succeeded": AttemptState.SUCCEEDED,
    "attempt_running": AttemptState.RUNNING,
}

#: Which of some attempts belong to runs asked to cancel (the ids as one array on PostgreSQL).
_CANCELLED = (
    select(Attempt.id).join(Run, Run.id == Attempt.run_id).where(Run.cancel_requested.is_(True))
)
_CANCELLED_AMONG = _CANCELLED.where(Attempt.id.in_(bindparam("ids", expanding=True)))
_CANCELLED_IN_ARRAY = _CANCELLED.where(
    Attempt.id == any_(bindparam("ids", type_=ARRAY(BigInteger)))
)

#: A chain's next steps made and claimed at once, for the worker that finished the step before
#: (PostgreSQL; see Execution._next_steps): their task runs start, their attempts are made
#: running, held by :worker_id, and each comes back with what a claim returns.
_START_NEXT = text(f"""
    WITH started AS (
        UPDATE task_runs
        SET state = :task_running, current_attempt = current_attempt + 1,
            started_at = coalesce(started_at, :now)
        WHERE id = ANY(:ids)
        RETURNING id, run_id, current_attempt, pool, options, node_id, task_ref, inputs,
            code_version, upstream
    ), {hot_path.MADE_RUNNING}
    SELECT made.id AS attempt_id, started.run_id, started.id AS task_run_id,
        started.current_attempt AS number, started.node_id, started.task_ref, started.inputs,
        started.options, started.code_version,
        {_UPSTREAM_RESULTS.format(row="started")}
    FROM made JOIN started ON started.id = made.task_run_id
    """).bindparams(
    bindparam("ids", type_=ARRAY(BigInteger)),
    bindparam("now", type_=UTCDateTime),
    bindparam("lease", type_=UTCDateTime),
)


@dataclass
class _Starts:
    """A finish that may continue on its worker (session.info[_STARTS]): who, how many more
    attempts it may start, which queues it serves, and the claims made so far."""

    worker_id: str
    left: int
    serves: Callable[[str], bool]
    started: list[ClaimedAttempt]


_STARTS = "starts"

#: What the next steps of a chain are read for: whether they are plain, and what queuing them
#: and claiming them needs.
_NEXT_STEPS = select(
    TaskRun.id,
    TaskRun.run_id,
    TaskRun.node_id,
    TaskRun.state,
    TaskRun.inputs,
    TaskRun.options,
    TaskRun.pool,
    TaskRun.current_attempt,
    TaskRun.task_ref,
    TaskRun.code_version,
).where(
    TaskRun.run_id == bindparam("run_id"),
    TaskRun.node_id.in_(bindparam("node_ids", expanding=True)),
)

_OPEN_STATES = [state.value for state in TaskState if state not in TASK_TERMINAL]
#: Whether a run has an open task: a running one first, then a queued or pending one (the
#: second query runs only if the first found none). Asked as one, a run's statistics taken at
#: its submission -- every task open -- made a ``LIMIT 1`` look free by a scan of the table,
#: which passed the ended tasks first, more at every finish: 0.3 ms of each finish of a
#: 1,000-task run. Tasks running are few (the workers' slots), to any statistics: the
#: ``(run_id, state)`` index answers.
_ANY_OPEN = union_all(
    *(
        select(
            select(TaskRun.id)
            .where(TaskRun.run_id == bindparam("run_id"), state)
            .limit(1)
            .subquery()
        )
        for state in (
            TaskRun.state == TaskState.RUNNING,
            TaskRun.state.in_([s for s in _OPEN_STATES if s != TaskState.RUNNING]),
        )
    )
).limit(1)
_OPEN_AMONG = (
    select(TaskRun.id)
    .where(
        TaskRun.run_id == bindparam("run_id"),
        TaskRun.node_id.in_(bindparam("node_ids", expanding=True)),
        TaskRun.state.in_(_OPEN_STATES),
    )
    .limit(1)
)
_OPEN_TASKS = (
    select(TaskRun.node_id)
    .where(TaskRun.run_id == bindparam("run_id"), TaskRun.state.in_(_OPEN_STATES))
    .limit(bindparam("limit"))
)
_NOT_OK_STATES = [state.value for state in TaskState if state not in TASK_DONE_OK]
_NOT_OK_AMONG = select(TaskRun.node_id, TaskRun.state).where(
    TaskRun.run_id == bindparam("run_id"),
    TaskRun.node_id.in_(bindparam("node_ids", expanding=True)),
    TaskRun.state.in_(_NOT_OK_STATES),
)
_NOT_OK = (
    select(TaskRun.node_id, TaskRun.state)
    .where(TaskRun.run_id == bindparam("run_id"), TaskRun.state.in_(_NOT_OK_STATES))
    .limit(bindparam("limit"))
)
_TASK_STATES_OF_RUN = select(TaskRun.state).where(TaskRun.run_id == bindparam("run_id")).distinct()
_END_RUN = (
    update(Run)
    .where(Run.id == bindparam("run_id"), Run.state.not_in([s.value for s in RUN_TERMINAL]))
    .values(
        state=bindparam("outcome"),
        finished_at=bindparam("at"),
        started_at=func.coalesce(Run.started_at, bindparam("at")),
    )
)
#: A run's shape as _shape_of reads it: node, upstream nodes, and the options that bear on it
#: (_CLAIMS reads the same for the claim that starts a run).
_SHAPE_OF = select(
    TaskRun.node_id,
    TaskRun.upstream,
    TaskRun.options["map_of"],
    TaskRun.options["map_concurrency"],
).where(TaskRun.run_id == bindparam("run_id"))


def _shape_of(rows: Iterable[Sequence[Any]]) -> _Shape:
    """A run's upstream and downstream maps, and its elements under a concurrency cap, from
    its task runs' (node, upstream, map_of, map_concurrency). An element counts as an
    upstream of its mapped task: that task ends when its elements have."""
    upstream: dict[str, list[str]] = {}
    downstream: dict[str, list[str]] = {}
    limited: set[str] = set()
    for node, deps, parent, map_concurrency in rows:
        upstream.setdefault(node, []).extend(deps)
        for dep in deps:
            downstream.setdefault(dep, []).append(node)
        if parent is not None:
            upstream.setdefault(parent, []).append(node)
            downstream.setdefault(node, []).append(parent)
            if map_concurrency:
                limited.add(node)
    return upstream, downstream, limited


_RESULTS_OF = select(TaskRun.node_id, TaskRun.result).where(
    TaskRun.run_id == bindparam("run_id"),
    TaskRun.node_id.in_(bindparam("node_ids", expanding=True)),
)


class Execution(Planning):
    """What workers do with attempts, and the scheduler's pass."""

    def schedule(
        self,
        run_id: str | None = None,
        *,
        advance: bool = True,
        due_since: datetime | None = None,
    ) -> list[Dispatch]:
        """One scheduler pass: reap lost and overdue attempts, advance every active run.

        Returns the queued attempts that are due now (of ``run_id`` only, if given), for the
        dispatcher to (re)publish; with ``due_since``, only those that became due after it
        (a delayed retry's first publication: every other one was published when queued,
        and a wide fan-out's thousands need not be read again at every pass). Finishing an
        attempt already advances its run; the full pass (``advance``) is the safety net, and
        admits tasks waiting for a pool slot that another run freed.
        """
        now = utcnow()
        self.reap(now)
        if advance:
            self._advance_all(now)
            self.sweep_log_parts()
        due = select(Attempt.id, Attempt.pool).where(
            Attempt.state == AttemptState.QUEUED, Attempt.not_before <= now
        )
        if run_id is not None:
            due = due.where(Attempt.run_id == run_id)
        if due_since is not None:
            due = due.where(Attempt.not_before > due_since)
        with self.db.session() as session:
            rows = session.execute(due.order_by(Attempt.not_before, Attempt.id)).all()
        return [Dispatch(attempt_id, queue_of(pool)) for attempt_id, pool in rows]

    def reap(self, now: datetime | None = None) -> int:
        """Turn attempts whose lease expired into ``lost`` and overdue ones into timeouts."""
        now = now or utcnow()
        grace = timedelta(seconds=self.settings.timeout_grace_seconds)
        with self.db.session() as session:
            running = session.execute(
                select(
                    Attempt.id,
                    Attempt.run_id,
                    Attempt.number,
                    Attempt.lease_expires_at,
                    Attempt.started_at,
                    TaskRun.options,
                )
                .join(TaskRun, TaskRun.id == Attempt.task_run_id)
                .where(
                    Attempt.state == AttemptState.RUNNING,
                    _reapable(now - grace, now, self.db.engine.dialect.name),
                )
            ).all()
        reaped = 0
        for attempt_id, run_id, number, lease, started, options in running:
            timeout = options.get("timeout")
            guard: _Guard
            if lease is not None and lease < now:
                outcome = Outcome(
                    AttemptState.LOST, error="lease expired: the worker stopped heartbeating"
                )
                guard = _EXPIRED
            elif timeout is not None and started is not None:
                if started + timedelta(seconds=timeout) + grace >= now:
                    continue
                outcome = timeout_outcome(options, reaped=True)
                guard = _UNGUARDED
            else:
                continue
            # What its worker shipped while it ran becomes its log (its worker is away).
            with self.db.session() as session:
                pieces = session.execute(_SHIPPED, {"attempt_id": attempt_id}).all()
            if pieces:
                outcome.log = "".join(piece for _, piece in pieces)
                outcome.log_start = pieces[0].start
            if self._end_attempt(run_id, attempt_id, number, outcome, now, guard) is not None:
                reaped += 1
        return reaped

    def sweep_log_parts(self) -> None:
        """Remove the shipped pieces of attempts that have ended (their whole log is in
        ``attempts.log`` now): one statement, on a table of running attempts' pieces. At
        every full scheduler pass, and by a worker when an attempt that shipped has ended."""
        with self.db.session() as session:
            session.execute(_SWEEP_LOG_PARTS, {"running": AttemptState.RUNNING})

    def claim(self, attempt_id: int, worker_id: str) -> ClaimedAttempt | None:
        """Start an attempt for this worker, or None if it is not (or no longer) claimable."""
        try:
            return self._claim(attempt_id, worker_id)
        except _Abort:
            return None

    def _claim(self, attempt_id: int, worker_id: str) -> ClaimedAttempt | None:
        now = utcnow()
        if self.db.engine.dialect.name == "postgresql":
            try:
                return self._claim_on_its_own(attempt_id, worker_id, now)
            except _RunStarted:  # only a queued run's claim finds it: the second sees it running
                return self._claim_on_its_own(attempt_id, worker_id, now)
        with self.db.session() as session:
            return self._claim_in(session, attempt_id, worker_id, now)

    def _claim_on_its_own(
        self, attempt_id: int, worker_id: str, now: datetime
    ) -> ClaimedAttempt | None:
        """One statement, committed on its own: one round trip instead of three."""
        try:
            with self.db.autocommit() as conn:
                return self._claim_in_one_statement(conn, attempt_id, worker_id, now)
        except DBAPIError as exc:
            if hot_path.guard_failed(exc):
                return None  # the attempt changed meanwhile: nothing was kept
            raise

    def _claim_all_in(
        self, session: Session, attempt_ids: list[int], worker_id: str, now: datetime
    ) -> list[ClaimedAttempt | None]:
        """Claims of ``attempt_ids`` in the session's transaction: one statement on
        PostgreSQL, one after the other on SQLite."""
        if not attempt_ids:
            return []
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            return self._claim_many(conn, attempt_ids, worker_id, now)
        return [self._claim_in(session, a, worker_id, now) for a in attempt_ids]

    def _claim_in(
        self, session: Session, attempt_id: int, worker_id: str, now: datetime
    ) -> ClaimedAttempt | None:
        # Core statements built once (module level): a fan-out claims a thousand times.
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            return self._claim_in_one_statement(conn, attempt_id, worker_id, now)
        row = conn.execute(_CLAIM_READ, {"attempt_id": attempt_id}).first()
        if row is None:
            return None
        # No lock on the run: a fan-out's claims would queue behind each other on it. The
        # guarded UPDATEs below decide; cancel() turns queued task runs cancelled under
        # the run's lock, so a claim either finds its task queued or loses.
        if row.cancel_requested or row.run_state in RUN_TERMINAL:
            return None
        if row.run_state == RunState.QUEUED:
            # The first claim starts the run (the run row lock comes first, as everywhere).
            conn.execute(_START_RUN, {"run_id": row.run_id, "now": now})
        return self._take(conn, attempt_id, row, worker_id, now)

    def _claim_in_one_statement(
        self, conn: Connection, attempt_id: int, worker_id: str, now: datetime
    ) -> ClaimedAttempt | None:
        [claimed] = self._claim_many(conn, [attempt_id], worker_id, now)
        return claimed

    def _claim_many(
        self, conn: Connection, attempt_ids: list[int], worker_id: str, now: datetime
    ) -> list[ClaimedAttempt | None]:
        """Claims on PostgreSQL, one statement for all (_CLAIM_IN_ONE_STATEMENT, which starts
        the runs of first claims). A claim for each id, None where it is not claimable."""
        lease = now + timedelta(seconds=self.settings.lease_seconds)
        params = {"now": now, "worker_id": worker_id, "lease": lease, **_CLAIM_STATES}
        if len(attempt_ids) == 1:
            result = on_driver(conn, _CLAIM_ONE, {"attempt_id": attempt_ids[0], **params})
        else:
            # Prepared as the others. A plan PostgreSQL kept from while the tables were small
            # took 50 ms a batch in a 10,000-task fan-out, so it was planned at each batch
            # (1.2 ms); the fan-out that queued the batch now has the tables analyzed, and
            # the plan kept is made again on them (Database.refresh_statistics).
            result = on_driver(
                conn, _CLAIM_IN_ONE_STATEMENT, {"attempt_ids": attempt_ids, **params}
            )
        rows = {row.attempt_id: row for row in result}
        if any(row.stale for row in rows.values()):
            raise _RunStarted  # nothing was changed: see _CLAIMS
        for row in rows.values():
            if row.shape is not None and row.run_id not in self._dags:
                self._keep_shape(row.run_id, _shape_of(row.shape))
        claims: list[ClaimedAttempt | None] = []
        seen: set[int] = set()
        for attempt_id in attempt_ids:
            found = rows.get(attempt_id)
            if attempt_id in seen:  # delivered twice (published again): one claim only
                found = None
            seen.add(attempt_id)
            if found is None or not found.attempt_claimed:
                claims.append(None)
            else:
                claims.append(self._claimed(conn, attempt_id, found, found.upstream_results or {}))
        return claims

    def _take(
        self, conn: Connection, attempt_id: int, row: Any, worker_id: str, now: datetime
    ) -> ClaimedAttempt | None:
        """The claim's guarded UPDATEs on SQLite, for an attempt whose run may start it
        (``row`` has the fields of _CLAIM_READ's task run columns)."""
        lease = now + timedelta(seconds=self.settings.lease_seconds)
        task_run = {"task_run_id": row.task_run_id, "number": row.number, "now": now}
        if _rowcount(conn.execute(_CLAIM_TASK_RUN, task_run)) != 1:
            return None
        attempt = {"attempt_id": attempt_id, "now": now, "worker_id": worker_id, "lease": lease}
        if _rowcount(conn.execute(_CLAIM_ATTEMPT, attempt)) != 1:
            raise _Abort  # undo the task run's change too
        return self._claimed(conn, attempt_id, row)

    @staticmethod
    def _claimed(
        conn: Connection,
        attempt_id: int,
        row: Any,
        upstream_results: Mapping[str, Any] | None = None,
    ) -> ClaimedAttempt:
        """A claimed attempt as its worker needs it: its upstreams' results read in (unless
        ``upstream_results`` holds them already)."""
        deps = references(row.inputs)
        results: dict[str, dict[str, Any]] = {}
        if deps and upstream_results is not None:
            results = {node_id: upstream_results.get(node_id) or {} for node_id in deps}
        elif deps:
            results = {
                node_id: result or {}
                for node_id, result in conn.execute(
                    _RESULTS_OF, {"run_id": row.run_id, "node_ids": sorted(deps)}
                )
            }
        return ClaimedAttempt(
            attempt_id=attempt_id,
            run_id=row.run_id,
            task_run_id=row.task_run_id,
            node_id=row.node_id,
            number=row.number,
            task_ref=row.task_ref,
            inputs=resolve_inputs(row.inputs, results),
            options=row.options,
            code_version=row.code_version,
        )

    def dead_letter(self, attempt_id: int, reason: str) -> None:
        """A queued attempt whose dispatch kept reaching dead workers is lost (lost budget).

        Its retry, if the budget allows one, is queued with the lost backoff and published by
        the next scheduler pass.
        """
        with self.db.session() as session:
            row = session.execute(
                select(Attempt.run_id, Attempt.number).where(Attempt.id == attempt_id)
            ).first()
        if row is None:
            return
        outcome = Outcome(AttemptState.LOST, error=reason)
        self._end_attempt(
            row.run_id, attempt_id, row.number, outcome, utcnow(), _UNGUARDED, AttemptState.QUEUED
        )

    def ship_logs(self, pieces: Mapping[int, LogPiece], worker_id: str) -> None:
        """Store what running attempts printed since the last time (a piece each, only while
        the attempt is still this worker's and running), and let go of the pieces wholly
        before what each worker keeps: one transaction for all of them. A piece sent again
        (the answer to its commit was lost, and the worker sends it with what was printed
        since) replaces the one stored from the same start."""
        if not pieces:
            return
        with self.db.session() as session:
            conn = session.connection()
            rows = [
                {
                    "attempt_id": attempt_id,
                    "start": piece.start,
                    "text": storable_text(piece.text),
                    "kept_from": piece.kept_from,
                    "worker_id": worker_id,
                    "running": AttemptState.RUNNING,
                }
                for attempt_id, piece in pieces.items()
            ]
            for statement, given in (
                (_SHIP_PIECE, [row for row in rows if row["text"]]),
                (_LET_GO, [row for row in rows if row["kept_from"]]),
            ):
                if given:
                    conn.execute(statement, given)

    def heartbeat(self, attempt_ids: Iterable[int], worker_id: str) -> Heartbeat:
        """Extend the leases of a worker's running attempts; say which must stop."""
        ids = list(attempt_ids)
        beat = Heartbeat()
        if not ids:
            return beat
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.lease_seconds)
        with self.db.session() as session:
            session.execute(
                update(Attempt)
                .where(
                    Attempt.id.in_(ids),
                    Attempt.worker_id == worker_id,
                    Attempt.state == AttemptState.RUNNING,
                    Attempt.lease_expires_at >= now,
                )
                .values(lease_expires_at=lease)
            )
            rows = session.execute(
                select(Attempt.id, Attempt.state, Attempt.lease_expires_at, Run.cancel_requested)
                .join(Run, Run.id == Attempt.run_id)
                .where(Attempt.id.in_(ids))
            ).all()
        alive = set()
        for attempt_id, state, expires, cancel_requested in rows:
            if state != AttemptState.RUNNING or expires is None or expires < now:
                continue
            alive.add(attempt_id)
            if cancel_requested:
                beat.cancelled.add(attempt_id)
        beat.lost = set(ids) - alive
        return beat

    def cancelled_among(self, attempt_ids: Iterable[int]) -> set[int]:
        """Which of these attempts belong to runs asked to cancel (one read): a worker asks
        as often as it ships logs, so a cancel stops a running task within a second or so,
        not at the next heartbeat (a third of the lease: 10 s by default)."""
        ids = list(attempt_ids)
        if not ids:
            return set()
        with reading(self.db.engine) as conn:
            if conn.dialect.name == "postgresql":
                return set(conn.scalars(_CANCELLED_IN_ARRAY, {"ids": ids}))
            return set(conn.scalars(_CANCELLED_AMONG, {"ids": ids}))

    def finish(self, claimed: ClaimedAttempt, worker_id: str, outcome: Outcome) -> list[Dispatch]:
        """Commit an attempt's outcome if this worker still holds it (fencing).

        Returns the attempts that became queued as a consequence (retries, downstream tasks),
        or raises FencedOut when the attempt was no longer this worker's to finish.
        """
        now = utcnow()
        guard = _held_by(worker_id)
        end = partial(self._end_attempt, claimed.run_id, claimed.attempt_id, claimed.number)
        try:
            queued = end(outcome, now, guard)
        except DataError as exc:
            # The database refused a value of the outcome (one its columns cannot hold, that
            # the task did not check): the attempt fails saying so, rather than its outcome
            # being refused again at every pass and its run never ending.
            queued = end(unstorable(outcome, exc), now, guard)
        if queued is None:
            raise FencedOut(
                f"attempt {claimed.number} of {claimed.node_id} is no longer held by {worker_id}"
            )
        return queued

    def finish_and_claim(
        self,
        finished: list[tuple[ClaimedAttempt, Outcome]],
        attempt_ids: list[int],
        worker_id: str,
        *,
        take: int = 0,
        serves: Callable[[str], bool] = lambda _queue: True,
    ) -> tuple[list[list[Dispatch] | None], list[ClaimedAttempt | None]]:
        """Commit a worker's collected outcomes and claim its next attempts in one transaction
        (one commit instead of one per outcome and one per claim).

        For each outcome, the attempts it queued (None: fenced out, as finish() says with
        FencedOut); for each attempt id, the claim (None: not claimable). When any of them
        loses a race inside the shared transaction (or the database refuses it), nothing of
        it is kept and each is done on its own instead, so that only the loser is refused.

        Finish and continue: up to ``take`` of the attempts these outcomes queued (in queues
        the worker ``serves``) are claimed for it in the same transaction, so that a chain
        step costs one transaction and no trip through the dispatcher. Their claims follow
        those of ``attempt_ids``; they are no longer among the attempts to publish.
        """
        if not attempt_ids and take > 0 and len(finished) == 1:
            continued = self._continue_at_once(*finished[0], worker_id, take, serves)
            if continued is not None:
                return [[]], list(continued)
        now = utcnow()
        guard = _held_by(worker_id)
        try:
            with self.db.session() as session:
                # Claims first: a finish takes its run's lock, which is then held to the
                # commit; whatever comes after it in the transaction makes others wait.
                claims = self._claim_all_in(session, attempt_ids, worker_id, now)
                queued: list[list[Dispatch] | None]
                started: list[ClaimedAttempt] = []
                if all(outcome.state == AttemptState.SUCCEEDED for _, outcome in finished):
                    if take > 0 and session.connection().dialect.name == "postgresql":
                        session.info[_STARTS] = _Starts(worker_id, take, serves, started)
                    queued = list(self._end_successes_in(session, finished, now, worker_id))
                else:
                    queued = [
                        self._end_attempt_in(
                            session,
                            claimed.run_id,
                            claimed.attempt_id,
                            claimed.number,
                            outcome,
                            now,
                            guard,
                            AttemptState.RUNNING,
                        )
                        for claimed, outcome in finished
                    ]
                claims += started
                claims += self._continue(
                    session, queued, take - len(started), serves, worker_id, now
                )
            return queued, claims
        except (_Abort, DBAPIError):
            pass
        one_by_one: list[list[Dispatch] | None] = []
        for claimed, outcome in finished:
            try:
                one_by_one.append(self.finish(claimed, worker_id, outcome))
            except FencedOut:
                one_by_one.append(None)
        return one_by_one, [self.claim(a, worker_id) for a in attempt_ids]

    def _continue_at_once(
        self,
        claimed: ClaimedAttempt,
        outcome: Outcome,
        worker_id: str,
        take: int,
        serves: Callable[[str], bool],
    ) -> list[ClaimedAttempt] | None:
        """A success whose next tasks wait for it alone, committed with their start and claim
        for this worker in one statement (service.hot_path): the claims, or None where that
        statement does not apply or declined (nothing was changed: the transaction decides)."""
        if (
            outcome.state != AttemptState.SUCCEEDED
            or outcome.skipped
            or outcome.metrics
            or outcome.params
            or outcome.artifacts
            or not serves(queue_of(None))
            or self.db.engine.dialect.name != "postgresql"
        ):
            return None
        try:
            with self.db.autocommit() as conn:
                rows, ends_run = self._continue_in(conn, claimed, outcome, worker_id, take)
                if not rows or not rows[0].ended:
                    return None
                if ends_run:  # the run's last task: it ended the run
                    self._dags.pop(claimed.run_id, None)
                    return []
                # Their one upstream's result is the one just committed: no read.
                results = {claimed.node_id: outcome.result}
                return [
                    self._claimed(conn, row.attempt_id, row, results)
                    for row in rows
                    if row.attempt_id is not None
                ]
        except DBAPIError:
            # One statement: PostgreSQL kept none of it -- or, if the connection broke after
            # its commit, the transaction path finds the attempt ended and is fenced out (the
            # next attempt, claimed for this worker unknown to it, is reaped with its lease).
            return None

    def _continue_in(
        self,
        conn: Connection,
        claimed: ClaimedAttempt,
        outcome: Outcome,
        worker_id: str,
        take: int,
    ) -> tuple[list[Row[Any]], bool]:
        """The one statement on ``conn`` (autocommit), if the run's shape (read first if this
        process does not know it yet: a run's first finish here) says it applies: its rows
        (none: it does not), and whether it was the one that ends the run."""
        node_id = claimed.node_id
        upstream, downstream, limited = self._dag(conn, claimed.run_id, node_id)
        waiting = downstream.get(node_id, [])
        if node_id in limited or len(waiting) > take:
            return [], False  # under a cap; a wider fan-out queues the rest
        if any(dep != node_id for node in waiting for dep in upstream[node]):
            return [], False  # a join: its other upstreams are asked about in the transaction
        now = utcnow()
        params = {
            "run_id": claimed.run_id,
            "task_run_id": claimed.task_run_id,
            "attempt_id": claimed.attempt_id,
            "number": claimed.number,
            "holder": worker_id,
            "worker_id": worker_id,
            "now": now,
            "lease": now + timedelta(seconds=self.settings.lease_seconds),
            "error": outcome.error,
            "log": outcome.log,
            "log_start": outcome.log_start,
            "result": None if outcome.result is None else json.dumps(outcome.result),
            **hot_path.STATES,
        }
        if not waiting:  # a sink: it ends the run if it is the last task open
            return on_driver(conn, hot_path.FINISH_AND_END, params), True
        many = len(waiting) > 1
        next_nodes = {"next_nodes": waiting} if many else {"next_node": waiting[0]}
        return on_driver(conn, hot_path.FINISH_AND_CONTINUE[many], params | next_nodes), False

    def _continue(
        self,
        session: Session,
        queued: list[list[Dispatch] | None],
        take: int,
        serves: Callable[[str], bool],
        worker_id: str,
        now: datetime,
    ) -> list[ClaimedAttempt]:
        """Claim up to ``take`` of the attempts just queued for this worker (see
        finish_and_claim), taking them out of the lists to publish."""
        taken: list[ClaimedAttempt] = []
        made_here = session.info.get(_MADE, {})
        for made in queued:
            for dispatch in list(made or []):
                if len(taken) >= take:
                    return taken
                if not serves(dispatch.queue):
                    continue
                conn = session.connection()
                if conn.dialect.name == "postgresql":
                    claimed = self._claim_in_one_statement(
                        conn, dispatch.attempt_id, worker_id, now
                    )
                else:
                    # Made by this transaction (every queued list comes from _new_attempts,
                    # which kept what a claim reads), under its run's lock: no read is needed.
                    claimable = made_here[dispatch.attempt_id]
                    claimed = self._take(conn, dispatch.attempt_id, claimable, worker_id, now)
                if claimed is not None:
                    assert made is not None  # nosec B101 - iterated from it
                    made.remove(dispatch)
                    taken.append(claimed)
        return taken

    def _end_attempt(
        self,
        run_id: str,
        attempt_id: int,
        number: int,
        outcome: Outcome,
        now: datetime,
        guard: _Guard,
        from_state: AttemptState = AttemptState.RUNNING,
    ) -> list[Dispatch] | None:
        try:
            return self._end_attempt_once(
                run_id, attempt_id, number, outcome, now, guard, from_state
            )
        except _Abort:
            return None

    def _end_attempt_once(
        self,
        run_id: str,
        attempt_id: int,
        number: int,
        outcome: Outcome,
        now: datetime,
        guard: _Guard,
        from_state: AttemptState,
    ) -> list[Dispatch]:
        with self.db.session() as session:
            return self._end_attempt_in(
                session, run_id, attempt_id, number, outcome, now, guard, from_state
            )

    def _end_attempt_in(
        self,
        session: Session,
        run_id: str,
        attempt_id: int,
        number: int,
        outcome: Outcome,
        now: datetime,
        guard: _Guard,
        from_state: AttemptState,
    ) -> list[Dispatch]:
        conn = session.connection()
        # A success needs the run's lock only to decide what follows: taken last, it is
        # held for the few statements of that decision, not for the whole commit of an
        # outcome (a fan-out's finishes queue on it). Other outcomes depend on a cancel
        # request and take it first. Nothing but a finish (or the reaper, through this
        # same path) changes a running task run, and the guarded UPDATE of the attempt
        # decides between those.
        run = None
        if outcome.state != AttemptState.SUCCEEDED:
            run = self._lock_run_row(conn, run_id)
        # The attempt's guarded UPDATE names its task run (RETURNING): one round trip.
        statement, guarded_by = guard
        ending = _ending(attempt_id, from_state, outcome, now, guarded_by)
        if outcome.state == AttemptState.SUCCEEDED:
            if conn.dialect.name == "postgresql":  # both UPDATEs in one round trip
                task = conn.execute(
                    _end_with_success(statement),
                    {**ending, "current_number": number, **_success_end(outcome)},
                ).first()
            else:
                task = self._end_success(conn, statement, ending, number, outcome, now)
            if task is None:  # lost to the lease or a newer attempt: this outcome is stale
                raise _Abort
            self._record_outputs(session, run_id, task.id, number, outcome)
            run = self._lock_run_row(conn, run_id)
        else:
            assert run is not None  # nosec B101 - locked above for every other outcome
            ended = conn.execute(statement, ending).first()
            if ended is None:
                raise _Abort
            task_run_id = ended.task_run_id
            task = conn.execute(_TASK_RUN_OF, {"task_run_id": task_run_id}).one()
            if task.current_attempt != number:
                raise _Abort
            self._record_outputs(session, run_id, task_run_id, number, outcome)
            if run.cancel_requested or outcome.state == AttemptState.CANCELLED:
                end = {
                    "task_state": TaskState.CANCELLED,
                    "task_error": outcome.error or "run cancelled",
                }
            else:
                retry = self._retry_after(conn, run_id, task, outcome)
                if isinstance(retry, str):
                    end = {"task_state": TaskState.FAILED, "task_error": retry}
                else:
                    delay, lost = retry
                    task_run = session.get_one(TaskRun, task_run_id)
                    task_run.error = outcome.error
                    task_run.lost_attempts = lost
                    made = self._new_attempts(session, [task_run], now, delay=delay)
                    return made if delay <= 0 else []  # a later pass publishes it when due
            conn.execute(
                _END_TASK_RUN,
                {
                    "task_run_id": task_run_id,
                    "number": number,
                    "now": now,
                    "result": None,
                    **end,
                },
            )
        return self._decide(session, run, run_id, task, outcome, now)

    @staticmethod
    def _end_success(
        conn: Connection,
        statement: Update,
        ending: dict[str, Any],
        number: int,
        outcome: Outcome,
        now: datetime,
    ) -> Any:
        """A success's two guarded UPDATEs one after the other (SQLite): its task run's row
        (id, node_id, pool), or None if either lost its race."""
        ended = conn.execute(statement, ending).first()
        if ended is None:
            return None
        return conn.execute(
            _END_TASK_RUN,
            {"task_run_id": ended.task_run_id, "number": number, "now": now}
            | _success_end(outcome),
        ).first()

    def _end_successes_in(
        self,
        session: Session,
        finished: list[tuple[ClaimedAttempt, Outcome]],
        now: datetime,
        worker_id: str,
    ) -> Iterator[list[Dispatch]]:
        """A worker's batch of successes: every attempt and task run ended first (one
        statement on PostgreSQL), then each run's lock once, in one order, and what follows
        decided once for the batch (see _decide); the attempts each success queued.

        Ending them all before any decision makes each decision see the whole batch: a
        fan-out's siblings finished together ask once whether their fan-in is ready."""
        if not finished:
            return iter(())
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            outcomes = [
                {
                    "attempt_id": claimed.attempt_id,
                    "number": claimed.number,
                    "error": outcome.error,
                    "log": outcome.log,
                    "log_start": outcome.log_start,
                    **_success_end(outcome),
                }
                for claimed, outcome in finished
            ]
            for row in outcomes:  # as a string of JSON: see store.db._recordset_insert
                row["result"] = None if row["result"] is None else json.dumps(row["result"])
            params = {
                "outcomes": json.dumps(outcomes),
                "now": now,
                "holder": worker_id,
                "run_ids": sorted({claimed.run_id for claimed, _ in finished}),
            }
            rows = list(conn.execute(_END_SUCCESSES, params | _SUCCESS_STATES))
            tasks = {row.attempt_id: row for row in rows}
            locked = {row.run_id: row for row in rows}
        else:
            locked = {}
            statement, guarded_by = _held_by(worker_id)
            tasks = {}
            for claimed, outcome in finished:
                ending = _ending(claimed.attempt_id, AttemptState.RUNNING, outcome, now, guarded_by)
                tasks[claimed.attempt_id] = self._end_success(
                    conn, statement, ending, claimed.number, outcome, now
                )
        if len(tasks) != len(finished) or None in tasks.values():
            raise _Abort  # one lost its race: each is done on its own instead
        for claimed, outcome in finished:
            task_run_id = tasks[claimed.attempt_id].id
            self._record_outputs(session, claimed.run_id, task_run_id, claimed.number, outcome)
        queued: dict[int, list[Dispatch]] = {}
        for run_id in sorted({claimed.run_id for claimed, _ in finished}):
            run = locked[run_id] if run_id in locked else self._lock_run_row(conn, run_id)
            asked: set[tuple[str, ...]] = set()
            for claimed, outcome in finished:
                if claimed.run_id == run_id:
                    task = tasks[claimed.attempt_id]
                    queued[claimed.attempt_id] = self._decide(
                        session, run, run_id, task, outcome, now, asked
                    )
        return (queued[claimed.attempt_id] for claimed, _ in finished)

    def _decide(
        self,
        session: Session,
        run: Any,
        run_id: str,
        task: Any,
        outcome: Outcome,
        now: datetime,
        asked: set[tuple[str, ...]] | None = None,
    ) -> list[Dispatch]:
        """What follows an ended task, under its run's lock: nothing yet (most often), its
        next steps (a chain), or a pass over the run. ``asked``: the downstream sets already
        decided in this transaction (see _may_decide)."""
        if not self._may_decide(
            session, run_id, run.max_concurrency, task.node_id, task.pool, asked
        ):
            return []
        if outcome.state == AttemptState.SUCCEEDED and not outcome.skipped and not task.pool:
            following = self._next_steps(session, run, run_id, task.node_id, now)
            if following is not None:
                return following
        return self._advance(session, run_id, now)

    def _next_steps(
        self, session: Session, run: Any, run_id: str, node_id: str, now: datetime
    ) -> list[Dispatch] | None:
        """The next steps after ``node_id`` succeeded, decided without a pass over the run: the
        tasks downstream of it whose upstreams have all succeeded (a chain's next step, a
        join whose last upstream this was) are queued, when nothing else bears on them (a
        cancel, a run or group limit, a cache, a map, a pool); a sink that was the run's last
        open task ends the run. None: the full advance decides. The engine's plan would say
        the same (a pending task whose upstreams all succeeded is ready, one still waiting for
        an upstream is left, a run whose tasks all ended has its outcome); this reads those
        task runs only, or the run's distinct task states, not every task run of the run --
        a fan-out of 1,000 read them all, JSON and all, at its join and again at its end."""
        if run.cancel_requested or run.max_concurrency is not None:
            return None
        upstream, downstream, _ = self._dag(session, run_id, node_id)
        waiting = downstream.get(node_id, [])
        conn = session.connection()
        if not waiting:  # a sink, and _may_decide found no task of its run open: the run ends
            states = conn.execute(_TASK_STATES_OF_RUN, {"run_id": run_id}).scalars()
            outcome = run_outcome(map(TaskState, states), cancel_requested=False)
            conn.execute(_END_RUN, {"run_id": run_id, "outcome": outcome.value, "at": now})
            self._dags.pop(run_id, None)
            return []
        ready = []
        asked = 0
        for node in waiting:
            deps = upstream[node]
            if all(dep == node_id for dep in deps):  # a chain's step, a fan-out's task
                ready.append(node)
                continue
            asked += 1
            if asked > 8:
                return None  # a question each: too many
            done = self._all_succeeded(conn, run_id, deps, len(upstream))
            if done is None:
                return None  # an upstream ended otherwise: failed, skipped, cancelled
            if done:
                ready.append(node)
        if not ready:
            return []
        if len(ready) > MAX_NEXT_STEPS:
            return None  # read by name in one statement: within what any driver binds
        # Core rows, not the ORM's objects: a chain reads one per step, and loading it was
        # a fifth of the step's transaction.
        tasks = list(conn.execute(_NEXT_STEPS, {"run_id": run_id, "node_ids": ready}))
        plain = all(
            task.state == TaskState.PENDING
            and queued_as_it_is(task.inputs, task.options, task.pool)
            for task in tasks
        )
        if len(tasks) != len(ready) or not plain:
            return None
        starts: _Starts | None = session.info.get(_STARTS)
        # (Set only for a batch of successes on PostgreSQL, whose run rows carry run_state.)
        if starts is None or run.run_state != RunState.RUNNING or not starts.serves(queue_of(None)):
            return self._new_attempts(session, tasks, now, delay=0.0)
        # Finish and continue, with nothing between: the first ones are made running, claimed
        # for the finishing worker in the statement that makes them; the rest are queued.
        mine, others = tasks[: starts.left], tasks[starts.left :]
        lease = now + timedelta(seconds=self.settings.lease_seconds)
        params = {"now": now, "lease": lease, "worker_id": starts.worker_id, **_CLAIM_STATES}
        for row in conn.execute(_START_NEXT, {"ids": [task.id for task in mine], **params}):
            claimed = self._claimed(conn, row.attempt_id, row, row.upstream_results or {})
            starts.started.append(claimed)
        starts.left -= len(mine)
        return self._new_attempts(session, others, now, delay=0.0)

    @staticmethod
    def _all_succeeded(conn: Connection, run_id: str, deps: list[str], nodes: int) -> bool | None:
        """Whether the tasks ``deps`` of a run of ``nodes`` tasks all succeeded (or were cached
        or reused): True; False while one is still open; None if one ended otherwise."""
        if len(deps) <= 32:
            rows = list(conn.execute(_NOT_OK_AMONG, {"run_id": run_id, "node_ids": deps}))
        else:
            # A wide fan-in: rather than a thousand ids, read the tasks that did not succeed,
            # up to one more than the tasks that are not its upstreams. Fewer means the list
            # is complete (pigeonhole); a join after a fan-out reads one row, itself.
            others = nodes - len(deps)
            rows = list(conn.execute(_NOT_OK, {"run_id": run_id, "limit": others + 1}))
            if len(rows) > others:
                return None  # not a complete list: a full pass decides
            wanted = set(deps)
            rows = [row for row in rows if row.node_id in wanted]
        if any(row.state not in _OPEN_STATES for row in rows):
            return None
        return not rows

    def _retry_after(
        self, conn: Connection, run_id: str, task: Any, outcome: Outcome
    ) -> tuple[float, int] | str:
        """Whether an attempt that did not succeed is tried again: (delay, lost count), or why not.

        The task's own failures (an exception, a non-zero exit, a timeout) consume its
        ``retries``; an attempt lost to the infrastructure consumes the separate lost budget
        (``MLP_MAX_LOST``) and a hand-back on shutdown consumes nothing.
        """
        seed = f"{run_id}:{task.node_id}"
        if outcome.state == AttemptState.LOST:
            if outcome.handed_back:
                return 0.0, task.lost_attempts
            lost = task.lost_attempts + 1
            budget = self.settings.max_lost
            if lost > budget:
                return (
                    f"lost {lost} attempts to the infrastructure, more than MLP_MAX_LOST={budget} "
                    f"allows; the last: {outcome.error}"
                )
            return _lost_policy(self.settings.lost_backoff_seconds).delay(lost, seed), lost
        policy = _policy(task.options)
        failures = conn.execute(_FAILURES_OF, {"task_run_id": task.id}).scalar_one()
        if outcome.retryable and policy.may_retry(failures):
            return policy.delay(failures, seed=seed), task.lost_attempts
        return outcome.error or "failed"

    @staticmethod
    def _lock_run_row(conn: Connection, run_id: str) -> Row[str, bool, int | None]:
        run = conn.execute(_LOCK_RUN, {"run_id": run_id}).first()
        if run is None:
            raise NotFound(f"no run with id {run_id}")
        return run

    def _may_decide(
        self,
        session: Session,
        run_id: str,
        max_concurrency: int | None,
        node_id: str,
        pool: str | None,
        asked: set[tuple[str, ...]] | None = None,
    ) -> bool:
        """Whether task ``node_id`` ending may let the engine decide anything in its run.

        A full pass over a run reads every task run, which made a fan-out of n tasks cost n
        passes of n rows. Usually nothing is decidable yet -- a join still waits for other
        upstreams -- and a few indexed counts show it. When in doubt, say yes.

        ``asked`` (tasks ended together, all before this question): the downstream sets whose
        question was answered already. The answer, and anything it led to, holds for every
        task with the same downstream tasks (which cannot be their only upstream), so the
        second sibling of a batch asks nothing.
        """
        if max_concurrency is not None or pool:
            return True  # a freed slot may admit a waiting task
        upstream, downstream, limited = self._dag(session, run_id, node_id)
        if node_id in limited:
            return True  # an element of a mapped task with max_concurrency: a freed slot
        waiting = downstream.get(node_id, [])
        if asked is not None:
            if tuple(waiting) in asked:
                return False
            asked.add(tuple(waiting))
        conn = session.connection()
        if not waiting:  # a sink: the run ends when no task is left open
            return conn.execute(_ANY_OPEN, {"run_id": run_id}).first() is None
        if len(waiting) > 8:
            return True
        for candidate in waiting:
            deps = upstream[candidate]
            if all(dep == node_id for dep in deps):
                return True  # its only upstream just ended (a chain's next step)
            if len(deps) <= 32:
                blocked = conn.execute(_OPEN_AMONG, {"run_id": run_id, "node_ids": deps}).first()
                if blocked is None:
                    return True
                continue
            # A wide fan-in: rather than a thousand ids, read open tasks up to one more than
            # the tasks that are not its upstreams. Fewer means the list is complete; that
            # many means at least one of them is an upstream (pigeonhole). A join after a
            # fan-out reads three rows.
            others = len(upstream) - len(deps)
            open_ = conn.execute(_OPEN_TASKS, {"run_id": run_id, "limit": others + 1}).scalars()
            found = list(open_)
            if len(found) <= others and set(found).isdisjoint(deps):
                return True
        return False

    def _dag(self, session: Session | Connection, run_id: str, node_id: str) -> _Shape:
        """A run's shape (see _shape_of), cached per run: from the claim that started the run
        here, else read now. A mapped task adds its elements when it expands, so a node the
        cache does not know (expanded by another process) reloads it."""
        known = self._dags.get(run_id)
        if known is not None and node_id in known[0]:
            return known
        rows = session.execute(_SHAPE_OF, {"run_id": run_id})
        return self._keep_shape(run_id, _shape_of(rows))

    def _keep_shape(self, run_id: str, shape: _Shape) -> _Shape:
        """Cache a run's shape, the newest last; the oldest go past DAG_CACHE_TASKS tasks."""
        self._dags.pop(run_id, None)
        self._dags[run_id] = shape
        # A copy to count on: an API thread may end a run, and drop its shape, meanwhile.
        kept_shapes = list(self._dags.items())
        kept = sum(len(known[0]) for _, known in kept_shapes)
        for oldest, known in kept_shapes[:-1]:
            if kept <= DAG_CACHE_TASKS:
                break
            self._dags.pop(oldest, None)
            kept -= len(known[0])
        return shape

    @staticmethod
    def _record_outputs(
        session: Session, run_id: str, task_run_id: int, number: int, outcome: Outcome
    ) -> None:
        # One statement for them all: a training loop logs a point per step (200,000 as ORM
        # objects were 11 s and 700 MB of a worker).
        now = utcnow()
        conn = session.connection()
        insert_rows(
            conn,
            Metric,
            [
                {
                    "run_id": run_id,
                    "task_run_id": task_run_id,
                    "attempt": number,
                    "name": metric["name"],
                    "value": metric["value"],
                    "step": metric.get("step"),
                    "created_at": now,
                }
                for metric in outcome.metrics
            ],
        )
        if outcome.metrics:
            _sum_up(conn, run_id, task_run_id, outcome.metrics)
        for name, value in outcome.params.items():
            existing = session.scalar(
                select(Param).where(Param.task_run_id == task_run_id, Param.name == name)
            )
            if existing is None:
                session.add(Param(run_id=run_id, task_run_id=task_run_id, name=name, value=value))
            else:
                existing.value = value
        for artifact in outcome.artifacts:
            session.add(
                Artifact(
                    run_id=run_id,
                    task_run_id=task_run_id,
                    name=artifact["name"],
                    sha256=artifact["sha256"],
                    size=artifact["size"],
                    kind=artifact["kind"],
                )
            )
