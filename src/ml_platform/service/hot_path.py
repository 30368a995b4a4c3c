"""A short task's success and what it decides, in one statement committed on its own
(PostgreSQL): a chain's next step started and claimed for the same worker, or the run ended
by its last task. And a run's submission, also one statement (SUBMIT, at the end).

Through the transaction path of ``Execution.finish_and_claim``, a chain's step was five
round trips to PostgreSQL (BEGIN, the success with its run's lock, the next steps' read,
their start and claim, COMMIT; a run's last task: six): on this machine ≈ 0.7 ms of the
server's time in ≈ 1.9 ms of the worker's, the rest waiting for replies. Here the same
changes are one statement, executed in autocommit: the server runs it as its own
transaction, so the worker waits for one reply (≈ 0.9 ms a step).

One statement is all or nothing, which a transaction made of several needed to roll back:

- ``gate`` locks the run (the lock every decision about a run takes, here first: see
  ml_platform.service's lock order) and yields it only if nothing else bears on the decision:
  the run is running, not being cancelled, has no concurrency cap; the finished task has no
  pool; and, for FINISH_AND_CONTINUE, every next task is still pending and would be queued as
  it is (no map, no cache, no pool); for FINISH_AND_END, no other task of the run is open.
  Otherwise the statement changes nothing, and the transaction path decides.
- the attempt's and its task run's guarded UPDATEs (held by this worker, within its lease;
  still the current attempt), as in a finish;
- then the next tasks started, and their attempts made running, held by this worker (as
  execution._START_NEXT does); or the run ended with the engine's outcome.

The statement's snapshot is taken before it waits for the run's lock: what changed meanwhile
is seen by the guarded UPDATEs, which PostgreSQL checks again against the newest row version
(a next task queued or cancelled meanwhile is not started; an attempt reaped meanwhile is not
ended, and then nothing else happens), and by the run's row, read as it is once locked. The
other tasks' states are read as they were then: enough, because an ended task stays ended
(where one was open then, FINISH_AND_END declines). An attempt that ended while its task run
did not (not its current attempt: cannot happen while the attempt is held, checked all the
same) fails the statement, so that nothing of it is kept; the claim statement
(execution._CLAIM_IN_ONE_STATEMENT) guards itself the same way (``guard_failed``).

The next tasks' inputs are resolved from the outcome in hand: their only upstream is the task
that just ended, whose result is the one committed here.
"""

from __future__ import annotations

from sqlalchemy import String, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError

from ml_platform.engine.dag import run_outcome
from ml_platform.engine.states import TASK_TERMINAL, AttemptState, RunState, TaskState
from ml_platform.store.models import UTCDateTime

#: The states the statements compare and set, bound like any value; and what decides a
#: run's outcome (engine.dag.run_outcome: a cancelled task cancels it, else a failed one
#: fails it), as lists of the task states that do.
STATES = {
    "run_queued": RunState.QUEUED,
    "run_running": RunState.RUNNING,
    "run_cancelled": RunState.CANCELLED,
    "run_failed": RunState.FAILED,
    "run_succeeded": RunState.SUCCEEDED,
    "task_pending": TaskState.PENDING,
    "task_queued": TaskState.QUEUED,
    "task_running": TaskState.RUNNING,
    "task_succeeded": TaskState.SUCCEEDED,
    "attempt_queued": AttemptState.QUEUED,
    "attempt_running": AttemptState.RUNNING,
    "attempt_succeeded": AttemptState.SUCCEEDED,
    "open_states": [state.value for state in TaskState if state not in TASK_TERMINAL],
    "cancelling": [
        s.value
        for s in TASK_TERMINAL
        if run_outcome([s], cancel_requested=False) is RunState.CANCELLED
    ],
    "failing": [
        s.value
        for s in TASK_TERMINAL
        if run_outcome([s], cancel_requested=False) is RunState.FAILED
    ],
}

#: The run locked, if it is running and nothing else bears on the decision (continued by
#: each statement's own conditions, then FOR UPDATE).
_GATE = """
    gate AS MATERIALIZED (
        SELECT r.id FROM runs r
        -- IS TRUE: the run looked up by its key; without statistics the plan went by the
        -- (state, created_at) index, reading every running run at each step
        WHERE r.id = :run_id AND (r.state = :run_running AND NOT r.cancel_requested
            AND r.max_concurrency IS NULL) IS TRUE
            AND EXISTS (SELECT 1 FROM task_runs f WHERE f.id = :task_run_id AND f.pool IS NULL)
"""

#: The success: the attempt's guarded UPDATE (held by this worker, within its lease), then its
#: task run's (still its current attempt), only past the gate; and how many of each.
_SUCCESS = """
    ended_attempt AS (
        UPDATE attempts
        SET state = :attempt_succeeded, finished_at = :now, error = :error, log = :log,
            log_start = :log_start
        FROM gate
        WHERE attempts.id = :attempt_id
            -- IS TRUE: looked up by key, not by state (see execution._CLAIMS)
            AND (attempts.state = :attempt_running AND attempts.worker_id = :holder
                AND attempts.lease_expires_at >= :now) IS TRUE
        RETURNING attempts.task_run_id
    ), ended_task_run AS (
        UPDATE task_runs
        SET state = :task_succeeded, result = CAST(:result AS JSON), error = NULL,
            finished_at = :now
        FROM ended_attempt
        -- the key said, not only joined: with a new table's statistics the plan joined a
        -- scan of every task run of the table instead
        WHERE task_runs.id = :task_run_id AND task_runs.id = ended_attempt.task_run_id
            AND task_runs.current_attempt = :number
        RETURNING task_runs.id
    ), counted AS (
        SELECT (SELECT count(*) FROM ended_attempt) AS attempts,
            (SELECT count(*) FROM ended_task_run) AS task_runs
    )
"""

#: Whether the success was kept (0: declined, nothing changed), failing the whole statement
#: if the attempt ended without its task run.
_ENDED = """
        CASE WHEN counted.attempts = counted.task_runs THEN counted.task_runs
            -- of the rows, not of the parameters (the planner folds constants): raised
            -- only when reached, failing the whole statement
            ELSE CAST('an attempt ended without its task run: ' || counted.attempts || ' != '
                || counted.task_runs AS integer)
        END AS ended
"""

#: A run's outcome from the states of its task runs (``states``: a subquery with a ``state``
#: column), as engine.dag.run_outcome decides it for a run not being cancelled.
RUN_OUTCOME = """
    CASE WHEN EXISTS (SELECT 1 FROM {states} AS s WHERE s.state = ANY(:cancelling))
            THEN :run_cancelled
        WHEN EXISTS (SELECT 1 FROM {states} AS s WHERE s.state = ANY(:failing)) THEN :run_failed
        ELSE :run_succeeded
    END
"""

#: The attempts of the task runs just started (``started``: their columns), made running and
#: held by :worker_id under a lease: as a claim leaves them (execution._START_NEXT too).
MADE_RUNNING = """
    made AS (
        INSERT INTO attempts (task_run_id, run_id, number, state, pool, not_before,
            timeout_seconds, created_at, worker_id, started_at, lease_expires_at)
        SELECT id, run_id, current_attempt, :attempt_running, pool, :now,
            CAST(options ->> 'timeout' AS DOUBLE PRECISION), :now, :worker_id, :now, :lease
        FROM started
        RETURNING id, task_run_id
    )
"""

_BINDS = (bindparam("now", type_=UTCDateTime),)

#: A success whose downstream tasks wait for it alone: they start, claimed by this worker.
#: ``{next}`` names them: see FINISH_AND_CONTINUE.
_FINISH_AND_CONTINUE = """
    WITH {gate}
            AND (SELECT count(*) FROM task_runs n
                WHERE n.run_id = :run_id AND n.node_id {next}
                    AND n.state = :task_pending AND n.pool IS NULL
                    AND n.inputs -> 'map' IS NULL
                    AND coalesce(CAST(n.options -> 'cache' AS JSONB), 'null') IN ('null', 'false')
                    AND coalesce(CAST(n.options -> 'map_of' AS JSONB), 'null') = 'null'
            ) = {count}
        FOR UPDATE
    ), {success}, started AS (
        UPDATE task_runs
        SET state = :task_running, current_attempt = current_attempt + 1,
            started_at = coalesce(started_at, :now)
        FROM ended_task_run
        WHERE task_runs.run_id = :run_id AND task_runs.node_id {next}
            AND task_runs.state = :task_pending
        RETURNING task_runs.id, task_runs.run_id, task_runs.current_attempt, task_runs.pool,
            task_runs.options, task_runs.node_id, task_runs.task_ref, task_runs.inputs,
            task_runs.code_version
    ), {made_running}
    SELECT {ended},
        made.id AS attempt_id, started.run_id, started.id AS task_run_id,
        started.current_attempt AS number, started.node_id, started.task_ref, started.inputs,
        started.options, started.code_version
    FROM counted LEFT JOIN (made JOIN started ON started.id = made.task_run_id) ON true
    """

#: FINISH_AND_CONTINUE's two forms: one next task (a chain's step: ``:next_node``), or
#: several (``:next_nodes``). PostgreSQL plans a prepared statement once (a generic plan)
#: when that plan looks no costlier than planning each run for its values: with an array it
#: guesses ten values, and planned every step anew (≈ 0.7 ms of a step's 1.1 here).
FINISH_AND_CONTINUE = {
    many: text(
        _FINISH_AND_CONTINUE.format(
            gate=_GATE,
            success=_SUCCESS,
            made_running=MADE_RUNNING,
            ended=_ENDED,
            next="= ANY(:next_nodes)" if many else "= :next_node",
            count="cardinality(:next_nodes)" if many else "1",
        )
    ).bindparams(
        *([bindparam("next_nodes", type_=ARRAY(String))] if many else []),
        bindparam("lease", type_=UTCDateTime),
        *_BINDS,
    )
    for many in (False, True)
}

_STATES_OF_RUN = "(SELECT state FROM task_runs WHERE run_id = :run_id)"

#: A success of the run's last open task (a sink): the run ends with it. Every other task
#: must have ended in the statement's snapshot (taken before it waits for the run's lock): an
#: ended task stays ended, so they have ended now too, and their states are final; where one
#: was open then, the statement declines and the transaction path, whose reads follow the
#: lock, decides (the two last tasks of a run may end together: one of them ends the run).
FINISH_AND_END = text(f"""
    WITH {_GATE}
            AND NOT EXISTS (SELECT 1 FROM task_runs o
                WHERE o.run_id = :run_id AND o.id <> :task_run_id
                    AND o.state = ANY(:open_states))
        FOR UPDATE
    ), {_SUCCESS}, ended_run AS (
        UPDATE runs
        SET state = {RUN_OUTCOME.format(states=_STATES_OF_RUN)},
            finished_at = :now, started_at = coalesce(started_at, :now)
        FROM ended_task_run
        WHERE runs.id = :run_id
        RETURNING runs.state
    )
    SELECT {_ENDED}, (SELECT state FROM ended_run) AS run_state
    FROM counted
    """).bindparams(
    *(bindparam(name, type_=ARRAY(String)) for name in ("open_states", "cancelling", "failing")),
    *_BINDS,
)


#: A new run of a stored workflow version, its task runs and its first attempts: what the
#: transaction path (runs.Runs._store_run) stores, in one statement, one round trip, where it
#: made six (BEGIN, the version's look-up, the run, its task runs, their first attempts,
#: COMMIT): ≈ 1 ms instead of ≈ 2.5 for a 10-step chain. Only for a run the plan would start
#: as it is — no concurrency cap, and every root queued as it is (planning.queued_as_it_is):
#: the roots go in queued, on their first attempt, and get it in the same statement; the
#: other tasks go in pending. No row when the version is not stored (nothing is then
#: inserted: the caller registers it, then takes the transaction path); else one row per
#: attempt made, each with the version's number.
#:
#: Rows inserted by one part of a statement are invisible to its other parts' reads, so
#: nothing here reads what it made except through RETURNING. The task runs' JSON columns
#: travel as strings of JSON inside the recordset's document (see store.db._recordset_insert:
#: a ``\u0000`` in a task's inputs survives).
SUBMIT = text("""
    WITH version AS (
        SELECT id, version FROM workflows
        WHERE project_id = :project_id AND name = :name AND code_hash = :code_hash
    ), run AS (
        INSERT INTO runs (id, workflow_id, state, params, cancel_requested, created_at)
        SELECT :run_id, version.id, :run_queued, CAST(:params AS JSON), false, :now
        FROM version
        RETURNING id
    ), stored AS (
        INSERT INTO task_runs (run_id, node_id, position, task_ref, code_version, upstream,
            inputs, options, pool, state, current_attempt, lost_attempts)
        SELECT run.id, u.node_id, u.position, u.task_ref, u.code_version,
            CAST(u.upstream AS JSON), CAST(u.inputs AS JSON), CAST(u.options AS JSON), u.pool,
            u.state, u.current_attempt, 0
        FROM run, json_to_recordset(CAST(:task_runs AS JSON)) AS u(node_id text,
            position integer, task_ref text, code_version text, upstream text, inputs text,
            options text, pool text, state text, current_attempt integer)
        RETURNING id, run_id, state, current_attempt, options
    ), queued AS (
        INSERT INTO attempts (task_run_id, run_id, number, state, not_before,
            timeout_seconds, created_at)
        SELECT id, run_id, current_attempt, :attempt_queued, :now,
            CAST(options ->> 'timeout' AS DOUBLE PRECISION), :now
        FROM stored
        WHERE state = :task_queued
        RETURNING id
    )
    SELECT version.version, queued.id AS attempt_id
    FROM version LEFT JOIN queued ON true
    """).bindparams(*_BINDS)


def guard_failed(error: DBAPIError) -> bool:
    """Whether a statement failed on its own guard (execution._CLAIM_IN_ONE_STATEMENT's, or
    FINISH_AND_CONTINUE's): a change made after its snapshot; nothing of it was kept."""
    return getattr(error.orig, "sqlstate", None) == _GUARD_SQLSTATE and any(
        words in str(error.orig) for words in _GUARD_WORDS
    )


#: invalid_text_representation: what the guards' CAST of their words to integer raises.
_GUARD_SQLSTATE = "22P02"
_GUARD_WORDS = ("a task run claimed without its attempt", "an attempt ended without its task run")
