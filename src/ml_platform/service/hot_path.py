"""A chain's step in one round trip (PostgreSQL): one statement, committed on its own.

A short task's success whose downstream tasks wait for it alone (a chain's next step, a small
fan-out) is, through the transaction path of ``Execution.finish_and_claim``, five round trips
to PostgreSQL (BEGIN, the success with its run's lock, the next steps' read, their start and
claim, COMMIT): on this machine ≈ 0.7 ms of the server's time in ≈ 1.9 ms of the worker's, the
rest waiting for replies. Here the same changes are one statement, executed in autocommit:
the server runs it as its own transaction, so the worker waits for one reply.

One statement is all or nothing, which a transaction made of several needed to roll back:

- ``gate`` locks the run (the lock every decision about a run takes, here first: see
  ml_platform.service's lock order) and yields it only if nothing else bears on the decision:
  the run is running, not being cancelled, has no concurrency cap; the finished task has no
  pool; every next task is still pending and would be queued as it is (no map, no cache, no
  pool). Otherwise the statement changes nothing, and the transaction path decides.
- the attempt's and its task run's guarded UPDATEs (held by this worker, within its lease;
  still the current attempt), as in a finish;
- the next tasks started, and their attempts made running, held by this worker (as
  execution._START_NEXT does), only if the task run ended.

The statement's snapshot is taken before it waits for the run's lock: what changed meanwhile
is seen by the guarded UPDATEs, which PostgreSQL checks again against the newest row version
(a next task queued or cancelled meanwhile is not started; an attempt reaped meanwhile is not
ended, and then nothing else happens). An attempt that ended while its task run did not (not
its current attempt: cannot happen while the attempt is held, checked all the same) fails the
statement, so that nothing of it is kept.

The next tasks' inputs are resolved from the outcome in hand: their only upstream is the task
that just ended, whose result is the one committed here.
"""

from __future__ import annotations

from sqlalchemy import String, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError

from ml_platform.engine.states import AttemptState, RunState, TaskState
from ml_platform.store.models import UTCDateTime

#: The states the statement compares and sets, bound like any value.
STATES = {
    "run_running": RunState.RUNNING,
    "task_pending": TaskState.PENDING,
    "task_running": TaskState.RUNNING,
    "task_succeeded": TaskState.SUCCEEDED,
    "attempt_running": AttemptState.RUNNING,
    "attempt_succeeded": AttemptState.SUCCEEDED,
}

FINISH_AND_CONTINUE = text("""
    WITH gate AS MATERIALIZED (
        SELECT r.id FROM runs r
        WHERE r.id = :run_id AND r.state = :run_running AND NOT r.cancel_requested
            AND r.max_concurrency IS NULL
            AND EXISTS (SELECT 1 FROM task_runs f WHERE f.id = :task_run_id AND f.pool IS NULL)
            AND (SELECT count(*) FROM task_runs n
                WHERE n.run_id = :run_id AND n.node_id = ANY(:next_nodes)
                    AND n.state = :task_pending AND n.pool IS NULL
                    AND n.inputs -> 'map' IS NULL
                    AND coalesce(CAST(n.options -> 'cache' AS JSONB), 'null') IN ('null', 'false')
                    AND coalesce(CAST(n.options -> 'map_of' AS JSONB), 'null') = 'null'
            ) = cardinality(:next_nodes)
        FOR UPDATE
    ), ended_attempt AS (
        UPDATE attempts
        SET state = :attempt_succeeded, finished_at = :now, error = :error, log = :log
        FROM gate
        WHERE attempts.id = :attempt_id AND attempts.state = :attempt_running
            AND attempts.worker_id = :holder AND attempts.lease_expires_at >= :now
        RETURNING attempts.task_run_id
    ), ended_task_run AS (
        UPDATE task_runs
        SET state = :task_succeeded, result = CAST(:result AS JSON), error = NULL,
            finished_at = :now
        FROM ended_attempt
        WHERE task_runs.id = ended_attempt.task_run_id AND task_runs.current_attempt = :number
        RETURNING task_runs.id
    ), started AS (
        UPDATE task_runs
        SET state = :task_running, current_attempt = current_attempt + 1,
            started_at = coalesce(started_at, :now)
        FROM ended_task_run
        WHERE task_runs.run_id = :run_id AND task_runs.node_id = ANY(:next_nodes)
            AND task_runs.state = :task_pending
        RETURNING task_runs.id, task_runs.run_id, task_runs.current_attempt, task_runs.pool,
            task_runs.options, task_runs.node_id, task_runs.task_ref, task_runs.inputs,
            task_runs.code_version
    ), made AS (
        INSERT INTO attempts (task_run_id, run_id, number, state, pool, not_before,
            timeout_seconds, created_at, worker_id, started_at, lease_expires_at)
        SELECT id, run_id, current_attempt, :attempt_running, pool, :now,
            CAST(options ->> 'timeout' AS DOUBLE PRECISION), :now, :holder, :now, :lease
        FROM started
        RETURNING id, task_run_id
    ), counted AS (
        SELECT (SELECT count(*) FROM ended_attempt) AS attempts,
            (SELECT count(*) FROM ended_task_run) AS task_runs
    )
    SELECT
        CASE WHEN counted.attempts = counted.task_runs THEN counted.task_runs
            -- of the rows, not of the parameters (the planner folds constants): raised
            -- only when reached, failing the whole statement
            ELSE CAST('an attempt ended without its task run: ' || counted.attempts || ' != '
                || counted.task_runs AS integer)
        END AS ended,
        made.id AS attempt_id, started.run_id, started.id AS task_run_id,
        started.current_attempt AS number, started.node_id, started.task_ref, started.inputs,
        started.options, started.code_version
    FROM counted LEFT JOIN (made JOIN started ON started.id = made.task_run_id) ON true
    """).bindparams(
    bindparam("next_nodes", type_=ARRAY(String)),
    bindparam("now", type_=UTCDateTime),
    bindparam("lease", type_=UTCDateTime),
)


def guard_failed(error: DBAPIError) -> bool:
    """Whether a statement failed on its own guard (execution._CLAIM_IN_ONE_STATEMENT's, or
    FINISH_AND_CONTINUE's): a change made after its snapshot; nothing of it was kept."""
    return getattr(error.orig, "sqlstate", None) == _GUARD_SQLSTATE and any(
        words in str(error.orig) for words in _GUARD_WORDS
    )


#: invalid_text_representation: what the guards' CAST of their words to integer raises.
_GUARD_SQLSTATE = "22P02"
_GUARD_WORDS = ("a task run claimed without its attempt", "an attempt ended without its task run")
