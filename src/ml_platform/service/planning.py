"""Planning a run: apply the engine's plan, expand mapped tasks, settle their groups, queue the
attempts that became ready (set-based), and the scheduler's full pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Exists,
    Row,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ml_platform.artifacts import ARTIFACT_KEY, ELEMENTS_KEY, length_of
from ml_platform.dispatch import Dispatch, queue_of
from ml_platform.engine.cache import cache_key
from ml_platform.engine.dag import group_outcome, plan
from ml_platform.engine.states import RUN_TERMINAL, TASK_DONE_OK, AttemptState, RunState, TaskState
from ml_platform.inputs import REF_KEY, resolve_inputs
from ml_platform.service.core import _MADE, NotFound, _Claimable
from ml_platform.service.queries import Queries
from ml_platform.store.db import insert_rows
from ml_platform.store.models import (
    Artifact,
    Attempt,
    Metric,
    MetricSeries,
    Param,
    Pool,
    Run,
    TaskRun,
    UTCDateTime,
    utcnow,
)

#: Ids bound in one statement: below SQLite's and PostgreSQL's limits on bound parameters.
_IDS_PER_STATEMENT = 5_000
_QUEUE_STATES = {"task_queued": TaskState.QUEUED, "attempt_queued": AttemptState.QUEUED}
_QUEUE_TASK_RUNS = (
    update(TaskRun)
    .where(TaskRun.id.in_(bindparam("ids", expanding=True)))
    .values(state=TaskState.QUEUED, current_attempt=TaskRun.current_attempt + 1)
)
#: The same on PostgreSQL, with the new attempts' INSERT in one statement: the ids as one array
#: (a statement of fixed text; the IN list above is one placeholder per id, re-parsed by the
#: driver each time), each queued task run's next attempt made from what its UPDATE returned.
_QUEUE_WITH_ATTEMPTS = text("""
    WITH queued AS (
        UPDATE task_runs SET state = :task_queued, current_attempt = current_attempt + 1
        WHERE id = ANY(:ids)
        RETURNING id, run_id, current_attempt, pool, options
    )
    INSERT INTO attempts (task_run_id, run_id, number, state, pool, not_before,
        timeout_seconds, created_at)
    SELECT id, run_id, current_attempt, :attempt_queued, pool, :not_before,
        CAST(options ->> 'timeout' AS DOUBLE PRECISION), :now
    FROM queued
    RETURNING id, task_run_id
    """).bindparams(
    bindparam("ids", type_=ARRAY(BigInteger)),
    bindparam("not_before", type_=UTCDateTime),
    bindparam("now", type_=UTCDateTime),
)


def _task_run_row(**columns: Any) -> dict[str, Any]:
    """A new task run as ``insert_rows`` takes it: ``columns`` and the model's defaults."""
    return {"current_attempt": 0, "lost_attempts": 0, **columns}


def _why_not_run(task_run: TaskRun, by_id: Mapping[str, TaskRun]) -> str:
    """The reason a task the engine decided not to run shows: the upstream it followed."""
    for state, verb in (
        (TaskState.FAILED, "failed"),
        (TaskState.UPSTREAM_FAILED, "did not run"),
        (TaskState.CANCELLED, "was cancelled"),
        (TaskState.SKIPPED, "was skipped"),
    ):
        for upstream in task_run.upstream:
            if by_id[upstream].state == state:
                reason = (by_id[upstream].error or "").removeprefix("skipped: ")
                because = f": {reason}" if reason and state == TaskState.SKIPPED else ""
                return f"not run: its upstream {upstream} {verb}{because}"[:1000]
    return "not run: an upstream task did not succeed"


def queued_as_it_is(
    inputs: Mapping[str, Any], options: Mapping[str, Any], pool: str | None
) -> bool:
    """Whether the engine's plan queues a ready task run as it is: no map to expand, no cache
    to look up, no pool slot or map group to wait for."""
    return (
        "map" not in inputs
        and not pool
        and not options.get("cache")
        and options.get("map_of") is None
    )


class NewTaskRun(NamedTuple):
    """A root of a run just stored, as _new_attempts reads a task run (see _start_new_run)."""

    id: int
    run_id: str
    node_id: str
    task_ref: str
    code_version: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    pool: str | None
    current_attempt: int = 0


#: The advisory locks of pool admissions: (POOL_LOCKS, hashtext(pool name)).
POOL_LOCKS = 0x6D6C70
#: How many runs waiting for a pool one finish looks at (the oldest); the full pass the rest.
ADMIT_RUNS_AT_ONCE = 10


def _waits_for_a_pool(which: ColumnElement[bool]) -> Exists:
    """Whether the run (``Run.id``) has a task pending in a pool ``which`` says."""
    return (
        select(TaskRun.id)
        .where(TaskRun.run_id == Run.id, TaskRun.state == TaskState.PENDING, which)
        .exists()
    )


def _pool_busy(session: Session, pool: str) -> int:
    """How many attempts of ``pool`` are queued or running."""
    busy = session.scalar(
        select(func.count())
        .select_from(Attempt)
        .where(
            Attempt.pool == pool,
            Attempt.state.in_([AttemptState.QUEUED, AttemptState.RUNNING]),
        )
    )
    return busy or 0


class Planning(Queries):
    """A run's next steps, decided under its lock."""

    def _advance(self, session: Session, run_id: str, now: datetime) -> list[Dispatch]:
        """Apply the engine's plan to one run until nothing changes; return new attempt ids."""
        run = self._lock_run(session, run_id)
        if run.state in RUN_TERMINAL:
            return []
        queued: list[Dispatch] = []
        ready: list[TaskRun] = []
        while True:
            tasks = list(
                session.scalars(
                    select(TaskRun).where(TaskRun.run_id == run_id).order_by(TaskRun.position)
                )
            )
            by_id = {t.node_id: t for t in tasks}
            settled = self._settle_groups(tasks, now)
            decision = plan(
                [t.node_id for t in tasks],
                {t.node_id: t.upstream for t in tasks},
                {t.node_id: TaskState(t.state) for t in tasks},
                cancel_requested=run.cancel_requested,
            )
            changed = settled
            for node_id, state in decision.changes().items():
                task_run = by_id[node_id]
                task_run.state = state
                task_run.finished_at = now
                if state in (TaskState.SKIPPED, TaskState.UPSTREAM_FAILED) and not task_run.error:
                    task_run.error = _why_not_run(task_run, by_id)
                changed = True
            active = 0
            group_active: dict[str, int] = {}
            for t in tasks:
                if t.state in (TaskState.QUEUED, TaskState.RUNNING) and "map" not in t.inputs:
                    active += 1
                    group = t.options.get("map_of")
                    if group is not None:
                        group_active[group] = group_active.get(group, 0) + 1
            for node_id in decision.ready:
                task_run = by_id[node_id]
                if "map" in task_run.inputs:
                    self._expand(session, task_run, by_id, now)
                    changed = True
                    continue
                group = task_run.options.get("map_of")
                group_limit = task_run.options.get("map_concurrency")
                if group is not None and group_limit and group_active.get(group, 0) >= group_limit:
                    continue
                if task_run.options.get("cache"):
                    results = {dep: by_id[dep].result or {} for dep in task_run.upstream}
                    key = cache_key(
                        task_run.task_ref,
                        task_run.code_version,
                        resolve_inputs(task_run.inputs, results),
                    )
                    task_run.cache_key = key
                    hit = session.scalar(
                        select(TaskRun)
                        .where(TaskRun.cache_key == key, TaskRun.state == TaskState.SUCCEEDED)
                        .order_by(TaskRun.finished_at.desc())
                        .limit(1)
                    )
                    if hit is not None and self._result_available(hit.result):
                        task_run.state = TaskState.CACHED
                        task_run.result = hit.result
                        task_run.cached_from = hit.id
                        task_run.started_at = task_run.finished_at = now
                        self._copy_outputs(session, hit, task_run)
                        changed = True
                        continue
                if run.max_concurrency is not None and active >= run.max_concurrency:
                    continue
                if task_run.pool and not self._pool_has_slot(session, task_run.pool):
                    continue
                if task_run.pool:  # the next pool check must count this attempt
                    queued += self._new_attempts(session, [task_run], now, delay=0.0)
                else:
                    ready.append(task_run)
                active += 1
                if group is not None:
                    group_active[group] = group_active.get(group, 0) + 1
                # Queuing a task decides nothing else (its downstream waits for it to end):
                # no second pass over every task run for it.
            # One INSERT for all the attempts that became ready (a fan-out's thousand).
            queued += self._new_attempts(session, ready, now, delay=0.0)
            ready.clear()
            if decision.outcome is not None:
                run.state = decision.outcome
                run.finished_at = now
                if run.started_at is None:
                    run.started_at = now
                self._dags.pop(run_id, None)  # nothing of it is decided any more
                return queued
            session.flush()
            if not changed:
                return queued

    def _expand(
        self, session: Session, parent: TaskRun, by_id: Mapping[str, TaskRun], now: datetime
    ) -> None:
        """Expand a mapped task whose inputs are known into one task run per element.

        The elements ``NAME[i]`` take the mapped task's upstreams, options and pool, and
        element i of the items for the parameter the map chose (a reference into the
        upstream's result, so that no element carries the whole list). The mapped task runs
        until they all end (see _settle_groups). Elements that exist already -- copied by
        ``retry`` -- are kept.
        """
        template = parent.inputs["map"]
        items: list[Any]
        if isinstance(template, dict) and REF_KEY in template:
            source = template[REF_KEY]
            length = length_of(by_id[source].result or {})
            if length is None:
                self._fail_group(parent, now, f"cannot map over the result of {source}: not a list")
                return
            items = [{REF_KEY: source, "item": index} for index in range(length)]
        else:
            items = list(template)
        limit = self.settings.max_map_size
        if len(items) > limit:
            self._fail_group(
                parent,
                now,
                f"{parent.node_id} would expand into {len(items):,} elements, more than "
                f"MLP_MAX_MAP_SIZE={limit:,}",
            )
            return
        parent.state = TaskState.RUNNING
        parent.started_at = now
        fixed = parent.inputs["kwargs"]
        session.flush()  # the parent's new state first
        insert_rows(
            session.connection(),
            TaskRun,
            [
                _task_run_row(
                    run_id=parent.run_id,
                    node_id=f"{parent.node_id}[{index}]",
                    position=parent.position,
                    task_ref=parent.task_ref,
                    code_version=parent.code_version,
                    upstream=list(parent.upstream),
                    inputs={"args": [], "kwargs": {**fixed, parent.inputs["map_to"]: item}},
                    options={**parent.options, "map_of": parent.node_id, "map_index": index},
                    pool=parent.pool,
                    state=TaskState.PENDING,
                )
                for index, item in enumerate(items)
                if f"{parent.node_id}[{index}]" not in by_id
            ],
        )
        self._dags.pop(parent.run_id, None)

    @staticmethod
    def _fail_group(parent: TaskRun, now: datetime, error: str) -> None:
        parent.state = TaskState.FAILED
        parent.error = error
        parent.started_at = parent.finished_at = now

    @staticmethod
    def _settle_groups(tasks: list[TaskRun], now: datetime) -> bool:
        """End each running mapped task whose elements have all ended; True if any did."""
        elements: dict[str, list[TaskRun]] = {}
        for task_run in tasks:
            parent = task_run.options.get("map_of")
            if parent is not None:
                elements.setdefault(parent, []).append(task_run)
        changed = False
        for task_run in tasks:
            if task_run.state != TaskState.RUNNING or "map" not in task_run.inputs:
                continue
            group = sorted(elements.get(task_run.node_id, []), key=lambda e: e.options["map_index"])
            outcome = group_outcome([TaskState(e.state) for e in group])
            if outcome is None:
                continue
            task_run.state = outcome
            task_run.finished_at = now
            changed = True
            if outcome == TaskState.SUCCEEDED:
                task_run.result = {
                    ELEMENTS_KEY: [
                        e.result if e.state in TASK_DONE_OK and e.result else {"value": None}
                        for e in group
                    ]
                }
                continue
            bad = [e.node_id for e in group if e.state not in TASK_DONE_OK | {TaskState.SKIPPED}]
            verb = "failed" if outcome == TaskState.FAILED else "did not finish"
            shown = ", ".join(bad[:5]) + (", …" if len(bad) > 5 else "")
            task_run.error = f"{len(bad)} of {len(group)} elements {verb}: {shown}"
        return changed

    @staticmethod
    def _copy_outputs(session: Session, source: TaskRun, target: TaskRun) -> None:
        """A cached task shows the metrics, params and artifacts of the run it reuses.

        The metrics in one statement, in the database: a task that logged a point per
        training step had its 200,000 points copied as ORM objects, under the run's lock (a
        cached `mlp run` of it took 15.8 s and 662 MB; now 1.8 s and 76 MB)."""
        session.execute(
            insert(Metric).from_select(
                ["run_id", "task_run_id", "attempt", "name", "value", "step", "created_at"],
                select(
                    literal(target.run_id),
                    literal(target.id),
                    literal(0),
                    Metric.name,
                    Metric.value,
                    Metric.step,
                    literal(utcnow(), Metric.__table__.c.created_at.type),
                )
                .where(Metric.task_run_id == source.id)
                .order_by(Metric.id),
            )
        )
        series = MetricSeries.__table__.c
        session.execute(
            insert(MetricSeries).from_select(
                ["task_run_id", "name", "run_id", "points", "low", "high", "last", "logged_order"],
                select(
                    literal(target.id),
                    series.name,
                    literal(target.run_id),
                    series.points,
                    series.low,
                    series.high,
                    series.last,
                    series.logged_order,
                ).where(series.task_run_id == source.id),
            )
        )
        for param in session.scalars(select(Param).where(Param.task_run_id == source.id)):
            session.add(
                Param(
                    run_id=target.run_id, task_run_id=target.id, name=param.name, value=param.value
                )
            )
        for artifact in session.scalars(select(Artifact).where(Artifact.task_run_id == source.id)):
            session.add(
                Artifact(
                    run_id=target.run_id,
                    task_run_id=target.id,
                    name=artifact.name,
                    sha256=artifact.sha256,
                    size=artifact.size,
                    kind=artifact.kind,
                )
            )

    def _result_available(self, result: dict[str, Any] | None) -> bool:
        if result is None:
            return False
        if ARTIFACT_KEY in result:
            return self.artifacts.path(result[ARTIFACT_KEY]).exists()
        return True

    def _pool_has_slot(self, session: Session, pool: str) -> bool:
        """Whether one more attempt of ``pool`` may be queued now, counting those queued or
        running -- this transaction's own among them.

        On PostgreSQL two runs' transactions could each count before the other committed and
        both take the last slot. An admission therefore holds the pool's advisory lock to its
        commit, and one that finds it held does not wait (it may hold other runs' locks,
        which the holder may want next): its task stays pending, and the scheduler's full
        pass admits it once a slot is free. SQLite has one writer at a time."""
        slots = session.scalar(select(Pool.slots).where(Pool.name == pool))
        if slots is None:
            return True
        if session.get_bind().dialect.name == "postgresql" and not session.scalar(
            text("SELECT pg_try_advisory_xact_lock(:space, hashtext(:pool))"),
            {"space": POOL_LOCKS, "pool": pool},
        ):
            return False
        return _pool_busy(session, pool) < slots

    def _start_new_run(
        self,
        session: Session,
        run_id: str,
        roots: Sequence[NewTaskRun],
        limited: bool,
        now: datetime,
    ) -> list[Dispatch]:
        """A run just stored: queue its first steps. When its roots are queued as they are
        (see queued_as_it_is) and the run has no limit, straight from what was stored,
        without reading the run back (a fan-out's thousand task runs through the ORM);
        otherwise through the plan."""
        if (
            roots
            and not limited
            and all(queued_as_it_is(r.inputs, r.options, r.pool) for r in roots)
        ):
            return self._new_attempts(session, roots, now, delay=0.0)
        return self._advance(session, run_id, now)

    def _new_attempts(
        self,
        session: Session,
        task_runs: Sequence[TaskRun | Row[Any] | NewTaskRun],
        now: datetime,
        delay: float,
    ) -> list[Dispatch]:
        """Queue the next attempt of each task run (the session's objects, kept in step
        without a flush, or rows of their columns): set-based statements for all of them (a
        fan-out's thousand)."""
        if not task_runs:
            return []
        session.flush()  # what the session changed comes first
        conn = session.connection()
        not_before = now + timedelta(seconds=delay)
        task_run_ids = [task_run.id for task_run in task_runs]
        chunks = [
            task_run_ids[start : start + _IDS_PER_STATEMENT]
            for start in range(0, len(task_run_ids), _IDS_PER_STATEMENT)
        ]
        made_for: dict[int, int] = {}
        if conn.dialect.name == "postgresql":  # one round trip a chunk
            params = {"not_before": not_before, "now": now, **_QUEUE_STATES}
            for chunk in chunks:
                for row in conn.execute(_QUEUE_WITH_ATTEMPTS, {"ids": chunk, **params}):
                    made_for[row.task_run_id] = row.id
        else:
            rows = [
                {
                    "task_run_id": task_run.id,
                    "run_id": task_run.run_id,
                    "number": task_run.current_attempt + 1,
                    "state": AttemptState.QUEUED,
                    "pool": task_run.pool,
                    "not_before": not_before,
                    "timeout_seconds": task_run.options.get("timeout"),
                    "created_at": now,
                }
                for task_run in task_runs
            ]
            for row in insert_rows(conn, Attempt, rows, returning=("id", "task_run_id")):
                made_for[row.task_run_id] = row.id
            for chunk in chunks:
                conn.execute(_QUEUE_TASK_RUNS, {"ids": chunk})
        # What finish and continue claims without reading it back (SQLite: see _continue;
        # PostgreSQL's claim reads it in its one statement).
        made = None if conn.dialect.name == "postgresql" else session.info.setdefault(_MADE, {})
        queued = []
        for task_run in task_runs:
            attempt_id = made_for[task_run.id]
            if made is not None:
                made[attempt_id] = _Claimable(
                    run_id=task_run.run_id,
                    task_run_id=task_run.id,
                    number=task_run.current_attempt + 1,
                    node_id=task_run.node_id,
                    task_ref=task_run.task_ref,
                    inputs=task_run.inputs,
                    options=task_run.options,
                    code_version=task_run.code_version,
                )
            if isinstance(task_run, TaskRun):  # keep the session's object in step
                set_committed_value(task_run, "current_attempt", task_run.current_attempt + 1)
                set_committed_value(task_run, "state", TaskState.QUEUED)
            queued.append(Dispatch(attempt_id, queue_of(task_run.pool)))
        return queued

    def set_pool(self, name: str, slots: int) -> list[Dispatch]:
        """Create or resize a pool; at most ``slots`` of its attempts run at once. Tasks
        waiting for a slot of a pool made larger are admitted at once; the attempts queued
        are returned for the caller to publish (if it does not, a scheduler's next pass does)."""
        if slots < 1:
            raise ValueError(f"a pool needs at least 1 slot, got {slots}")
        if not 1 <= len(name) <= 100:
            raise ValueError("a pool's name has 1 to 100 characters")
        for last in (False, True):  # a first insert may lose to another's: then it is an update
            try:
                with self.db.session() as session:
                    pool = session.get(Pool, name, with_for_update=True)
                    if pool is None:
                        session.add(Pool(name=name, slots=slots))
                    else:
                        pool.slots = slots
                break
            except IntegrityError:
                if last:
                    raise
        return self.admit_waiting(name)

    def remove_pool(self, name: str) -> list[Dispatch]:
        """Take a pool's limit away: its tasks run as its workers' slots allow, those waiting
        admitted at once (returned, as set_pool returns them)."""
        with self.db.session() as session:
            removed = session.execute(delete(Pool).where(Pool.name == name))
            if not getattr(removed, "rowcount", 0):
                raise NotFound(f"no pool named {name!r} has a limit")
        return self.admit_waiting(name)

    def pools(self) -> list[tuple[str, int | None, int]]:
        """Every pool with a limit, and every pool with attempts queued or running: its name,
        its slots (None: no limit) and how many of its attempts hold one now."""
        with self.db.session() as session:
            limits: dict[str, int] = {
                n: k for n, k in session.execute(select(Pool.name, Pool.slots))
            }
            busy: dict[str, int] = {
                n: k
                for n, k in session.execute(
                    select(Attempt.pool, func.count())
                    .where(Attempt.state.in_([AttemptState.QUEUED, AttemptState.RUNNING]))
                    .group_by(Attempt.pool)
                )
                if n is not None
            }
        return [
            (name, limits.get(name), int(busy.get(name, 0))) for name in sorted({*limits, *busy})
        ]

    def _advance_all(self, now: datetime) -> None:
        """Advance the active runs that nothing in flight will advance: those with no queued
        or running attempt (their last finish decided them, or should have: the safety net)
        and those with a task waiting for a pool slot (another run may have freed one). A run
        whose attempts are out is advanced by their finishes: this pass neither reads its
        task runs (a wide fan-out's thousands) nor waits for its lock."""
        in_flight = (
            select(Attempt.id)
            .where(
                Attempt.run_id == Run.id,
                Attempt.state.in_([AttemptState.QUEUED, AttemptState.RUNNING]),
            )
            .exists()
        )
        waits_for_a_pool = _waits_for_a_pool(TaskRun.pool.is_not(None))
        with self.db.session() as session:
            active = list(
                session.scalars(
                    select(Run.id).where(
                        Run.state.in_([RunState.QUEUED, RunState.RUNNING]),
                        or_(~in_flight, waits_for_a_pool),
                    )
                )
            )
        for active_id in active:
            with self.db.session() as session:
                self._advance(session, active_id, now)

    def admit_waiting(self, pool: str) -> list[Dispatch]:
        """Admit tasks of other runs waiting for a slot of ``pool`` now that a finish freed
        one, rather than at the scheduler's next full pass (up to 2 s later with the default
        poll, worker.ADVANCE_EVERY_POLLS: a GPU left idle that long between two runs' tasks).
        The active runs with a task of the pool pending are advanced oldest first, each in
        its own transaction (one run's lock at a time, as the full pass takes them), while
        the pool has a free slot; each admission takes it as any other does
        (_pool_has_slot). Returns the attempts queued, for the dispatcher."""
        waits = _waits_for_a_pool(TaskRun.pool == pool)
        with self.db.session() as session:
            slots = session.scalar(select(Pool.slots).where(Pool.name == pool))
            waiting = list(
                session.scalars(
                    select(Run.id)
                    .where(Run.state.in_([RunState.QUEUED, RunState.RUNNING]), waits)
                    .order_by(Run.created_at, Run.id)
                    .limit(ADMIT_RUNS_AT_ONCE)
                )
            )
        queued: list[Dispatch] = []
        now = utcnow()
        for run_id in waiting:
            if slots is not None and not self._pool_is_open(pool, slots):
                break
            with self.db.session() as session:
                queued += self._advance(session, run_id, now)
        return queued

    def _pool_is_open(self, pool: str, slots: int) -> bool:
        """Whether fewer than ``slots`` attempts of ``pool`` are queued or running (a look,
        not an admission: that is _pool_has_slot's, in the transaction that admits)."""
        with self.db.session() as session:
            return _pool_busy(session, pool) < slots
