"""Use cases: register workflows, submit and cancel runs, schedule, claim and finish attempts.

Every state change is a short transaction whose UPDATE is guarded by the state it expects,
so that concurrent schedulers and workers cannot both win. Locks are taken run, then task run,
then attempt -- with two exceptions made for throughput, both on rows no other transaction
locks in the other order: a claim does not lock the run (its guarded UPDATEs decide), and a
successful finish locks the run last, for the decision about what follows.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, cast

from croniter import CroniterBadDateError, croniter
from sqlalchemy import (
    Connection,
    CursorResult,
    Result,
    Row,
    Update,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ml_platform.artifacts import ARTIFACT_KEY, ELEMENTS_KEY, ArtifactStore, length_of
from ml_platform.config import Settings
from ml_platform.dispatch import Dispatch, queue_of
from ml_platform.engine.cache import cache_key
from ml_platform.engine.dag import group_outcome, plan, topological_order
from ml_platform.engine.retry import RetryPolicy
from ml_platform.engine.states import (
    RUN_TERMINAL,
    TASK_DONE_OK,
    TASK_TERMINAL,
    AttemptState,
    RunState,
    TaskState,
)
from ml_platform.inputs import REF_KEY, references, resolve_inputs
from ml_platform.sdk import NodeSpec, TracedWorkflow, Workflow, WorkflowError
from ml_platform.store.db import Database
from ml_platform.store.models import (
    DEFAULT_PROJECT,
    Artifact,
    Attempt,
    Metric,
    Param,
    Pool,
    Project,
    Run,
    Schedule,
    TaskRun,
)
from ml_platform.store.models import Workflow as WorkflowRow
from ml_platform.store.models import utcnow
from ml_platform.tracer import check_allowed, trace_in_subprocess

TIMEOUT_ERROR = "builtins:TimeoutError"
#: A run's DAG as Platform._dag keeps it: upstream, downstream, capped mapped elements.
_Shape = tuple[dict[str, list[str]], dict[str, list[str]], set[str]]
#: Runs whose DAG shape a Platform keeps in memory (see Platform._dag).
DAG_CACHE_SIZE = 256
#: Session.info key: the attempts a transaction queued -> their task runs (see _continue).
_MADE = "made"
log = logging.getLogger(__name__)


class NotFound(LookupError):
    """No run (or task) matches the given id."""


@dataclass(frozen=True)
class Submitted:
    run_id: str
    workflow_version: int
    queued: list[Dispatch]


@dataclass(frozen=True)
class ClaimedAttempt:
    """Everything a worker needs to run one attempt."""

    attempt_id: int
    run_id: str
    task_run_id: int
    node_id: str
    number: int
    task_ref: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    code_version: str = ""


class _Claimable(NamedTuple):
    """What a claim reads of an attempt and its task run (see _CLAIM_READ)."""

    run_id: str
    task_run_id: int
    number: int
    node_id: str
    task_ref: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    code_version: str


@dataclass
class Outcome:
    """How an attempt ended, as the worker reports it."""

    state: AttemptState
    result: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = True
    skipped: bool = False
    #: A lost attempt that its worker handed back on shutdown: retried at once, charging
    #: neither the task's retries nor its lost budget.
    handed_back: bool = False
    log: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Heartbeat:
    """Which of a worker's attempts must stop: lease lost, or run cancelled."""

    lost: set[int] = field(default_factory=set)
    cancelled: set[int] = field(default_factory=set)


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched: how a guarded transition knows whether it won."""
    return cast(CursorResult[Any], result).rowcount


def timeout_outcome(options: Mapping[str, Any], *, reaped: bool = False) -> Outcome:
    """A failed attempt for a task that ran past its timeout."""
    retry_on = options.get("retry_on")
    by = " (stopped by the lease reaper)" if reaped else ""
    return Outcome(
        AttemptState.FAILED,
        error=f"TimeoutError: task exceeded its {options['timeout']:g} s timeout{by}",
        retryable=retry_on is None or TIMEOUT_ERROR in retry_on,
    )


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


# -- the hot path's statements, built once ---------------------------------------------------

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
# Ending an attempt: guarded by the state it expects and by who may end it (see _Guard).
_END_ATTEMPT = (
    update(Attempt)
    .where(Attempt.id == bindparam("attempt_id"), Attempt.state == bindparam("from_state"))
    .values(
        state=bindparam("state"),
        finished_at=bindparam("now"),
        error=bindparam("error"),
        log=bindparam("log"),
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


#: Ids bound in one statement: below SQLite's and PostgreSQL's limits on bound parameters.
_IDS_PER_STATEMENT = 5_000
_NEW_ATTEMPTS = insert(Attempt).returning(Attempt.id, sort_by_parameter_order=True)
_QUEUE_TASK_RUNS = (
    update(TaskRun)
    .where(TaskRun.id.in_(bindparam("ids", expanding=True)))
    .values(state=TaskState.QUEUED, current_attempt=TaskRun.current_attempt + 1)
)
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
_END_TASK_RUN = (
    update(TaskRun)
    .where(TaskRun.id == bindparam("task_run_id"), TaskRun.current_attempt == bindparam("number"))
    .values(
        state=bindparam("state"),
        result=bindparam("result"),
        error=bindparam("error"),
        finished_at=bindparam("now"),
    )
    .returning(TaskRun.node_id, TaskRun.pool)
)
_OPEN_STATES = [state.value for state in TaskState if state not in TASK_TERMINAL]
_ANY_OPEN = (
    select(TaskRun.id)
    .where(TaskRun.run_id == bindparam("run_id"), TaskRun.state.in_(_OPEN_STATES))
    .limit(1)
)
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
_RESULTS_OF = select(TaskRun.node_id, TaskRun.result).where(
    TaskRun.run_id == bindparam("run_id"),
    TaskRun.node_id.in_(bindparam("node_ids", expanding=True)),
)


class Platform:
    """The platform's use cases over one database and one artifact store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.artifacts = ArtifactStore(settings.artifacts_dir)
        self._default_project_id: int | None = None
        self._dags: dict[str, _Shape] = {}

    def start(self) -> Platform:
        self.db.ensure_schema()
        return self

    def close(self) -> None:
        self.db.dispose()

    # -- workflows and runs ---------------------------------------------------------------

    def default_project_id(self) -> int:
        """The project of runs made without one (the CLI in embedded mode)."""
        if self._default_project_id is None:
            try:
                with self.db.session() as session:
                    project_id = session.scalar(
                        select(Project.id).where(Project.name == DEFAULT_PROJECT)
                    )
                    if project_id is None:  # the first migration made it; someone removed it
                        project = Project(name=DEFAULT_PROJECT)
                        session.add(project)
                        session.flush()
                        project_id = project.id
            except IntegrityError:  # made at the same moment by another process
                return self.default_project_id()
            self._default_project_id = project_id
        return self._default_project_id

    def trace(self, reference: str, params: Mapping[str, Any] | None = None) -> TracedWorkflow:
        """Load and trace ``reference`` in a fresh process: always the code on disk now.

        Only a reference the server may load (``tracer.check_allowed``) gets that far.

        What long-lived processes (the API, the scheduler) use: they never import user code
        themselves, so a changed module is a new version and its new body is what runs.
        """
        check_allowed(reference, self.settings.workflow_module_prefixes, Path.cwd())
        return trace_in_subprocess(reference, params, timeout=self.settings.trace_timeout_seconds)

    def register(self, wf: Workflow | TracedWorkflow, project_id: int | None = None) -> WorkflowRow:
        """Record the workflow's current code as a version (a new one when the code changed)."""
        traced = wf.trace() if isinstance(wf, Workflow) else wf
        code_hash = traced.code_hash
        project = project_id or self.default_project_id()
        for _ in range(3):
            try:
                with self.db.session() as session:
                    existing = session.scalar(
                        select(WorkflowRow).where(
                            WorkflowRow.project_id == project,
                            WorkflowRow.name == traced.name,
                            WorkflowRow.code_hash == code_hash,
                        )
                    )
                    if existing is not None:
                        return existing
                    latest = session.scalar(
                        select(func.max(WorkflowRow.version)).where(
                            WorkflowRow.project_id == project, WorkflowRow.name == traced.name
                        )
                    )
                    row = WorkflowRow(
                        project_id=project,
                        name=traced.name,
                        version=(latest or 0) + 1,
                        code_hash=code_hash,
                        params_schema=traced.params_schema,
                        description=traced.description,
                    )
                    session.add(row)
                    session.flush()
                    return row
            except IntegrityError:  # another process registered the same version: read it
                continue
        raise RuntimeError(f"could not register workflow {traced.name}: concurrent registrations")

    def submit(
        self,
        wf: Workflow | TracedWorkflow,
        params: Mapping[str, Any] | None = None,
        *,
        max_concurrency: int | None = None,
        project_id: int | None = None,
        schedule: tuple[int, datetime] | None = None,
    ) -> Submitted:
        """Validate the params, trace the DAG and store a queued run with its first tasks.

        ``wf`` is a workflow imported here (traced now with ``params``) or one already traced
        with its params (``Platform.trace``). ``schedule`` (schedule id, tick) marks a run
        made by a cron schedule; the database refuses a second run for the same tick
        (IntegrityError).
        """
        traced = wf if isinstance(wf, TracedWorkflow) else wf.trace(params or {})
        if traced.params is None:
            raise WorkflowError(f"workflow {traced.name} was traced without params")
        values, specs = traced.params, traced.specs
        order = topological_order({spec.node_id: spec.upstream for spec in specs})
        position = {node_id: index for index, node_id in enumerate(order)}
        version = self.register(traced, project_id)
        run_id = uuid.uuid4().hex
        with self.db.session() as session:
            session.add(
                Run(
                    id=run_id,
                    workflow_id=version.id,
                    state=RunState.QUEUED,
                    params=values,
                    max_concurrency=max_concurrency or traced.max_concurrency,
                    schedule_id=schedule[0] if schedule else None,
                    scheduled_for=schedule[1] if schedule else None,
                )
            )
            session.flush()
            session.add_all(
                _task_run_of(spec, run_id, position[spec.node_id], TaskState.PENDING)
                for spec in specs
            )
            session.flush()
            queued = self._advance(session, run_id, utcnow())
        return Submitted(run_id, version.version, queued)

    def retry(
        self,
        run_id: str,
        *,
        from_task: str | None = None,
        project_id: int | None = None,
        latest: bool = False,
    ) -> Submitted:
        """A new run of an ended run's workflow version and params (`retry_of` links them):
        the tasks that succeeded there (or were cached or reused) are reused — result,
        metrics, params and artifacts — and the others run. ``from_task`` also reruns that
        task and everything downstream of it.

        ``latest`` (``mlp retry --latest``): the workflow's code as it is now, traced with the
        run's params (its name is its ``module:function`` reference; WorkflowError if that
        cannot be loaded or the params no longer fit). The new run is of that version; a task
        is reused only if the original run has a task of the same name, task, code version,
        inputs and upstreams, and every upstream of it is reused too -- a task whose code
        changed runs, and so does everything that follows it.
        """
        now = utcnow()
        new_id = uuid.uuid4().hex
        original, version = self.run(run_id, project_id)  # NotFound across projects
        if original.state not in RUN_TERMINAL:
            raise RetryError(f"run {run_id[:8]} is {original.state}: retry it once it ended")
        traced = None
        if latest:
            traced = self.trace(version.name, original.params)
            version = self.register(traced, project_id)
        with self.db.session() as session:
            tasks = list(
                session.scalars(
                    select(TaskRun).where(TaskRun.run_id == run_id).order_by(TaskRun.position)
                )
            )
            rows = _retry_rows(tasks, traced)
            specs = [row.spec for row in rows]
            if from_task is not None and from_task not in {spec.node_id for spec in specs}:
                raise RetryError(f"run {run_id[:8]} has no task {from_task!r}")
            rerun = _downstream_of(from_task, _with_elements(specs))
            # Rerunning a mapped task reruns its elements.
            rerun |= {spec.node_id for spec in specs if spec.options.get("map_of") in rerun}
            session.add(
                Run(
                    id=new_id,
                    workflow_id=version.id,
                    state=RunState.QUEUED,
                    params=original.params,
                    max_concurrency=original.max_concurrency,
                    retry_of=run_id,
                )
            )
            session.flush()
            copies = []
            reused: set[str] = set()
            parents = {spec.node_id: spec for spec in specs if "map" in spec.inputs}
            for row in rows:  # upstreams first: a task is reused only after its upstreams
                spec, old = row.spec, row.old
                parent = parents.get(spec.options.get("map_of", ""))
                if parent is not None and not set(parent.upstream) <= reused:
                    continue  # the items may differ now: the expansion makes new elements
                reuse = (
                    old is not None
                    and old.state in TASK_DONE_OK
                    and spec.node_id not in rerun
                    and set(spec.upstream) <= reused
                )
                state = TaskState.REUSED if reuse else TaskState.PENDING
                # The elements of a reused mapped task keep how they ended (a skipped one too).
                if parent is not None and parent.node_id in reused and not reuse and old:
                    state = TaskState(old.state)
                if reuse:
                    reused.add(spec.node_id)
                copy = _task_run_of(
                    spec,
                    new_id,
                    row.position,
                    state,
                    error=old.error if old is not None and state == TaskState.SKIPPED else None,
                    result=old.result if reuse and old is not None else None,
                    cached_from=(old.cached_from or old.id) if reuse and old is not None else None,
                    cache_key=old.cache_key if reuse and old is not None else None,
                    started_at=now if reuse else None,
                    finished_at=now if state in TASK_TERMINAL else None,
                )
                copies.append((old, copy, reuse))
                session.add(copy)
            session.flush()
            for old, copy, reuse in copies:
                if reuse and old is not None:
                    self._copy_outputs(session, old, copy)
            queued = self._advance(session, new_id, now)
        return Submitted(new_id, version.version, queued)

    def cancel(self, run_id: str) -> RunState:
        """Cancel a run: pending and queued tasks stop now, running ones when their worker next
        looks (``cancelled_among``: each second)."""
        now = utcnow()
        with self.db.session() as session:
            run = self._lock_run(session, run_id)
            if run.state in RUN_TERMINAL:
                return RunState(run.state)
            run.cancel_requested = True
            task_ids = select(TaskRun.id).where(
                TaskRun.run_id == run_id,
                TaskRun.state.in_([TaskState.PENDING, TaskState.QUEUED]),
            )
            queued_ids = list(session.scalars(task_ids))
            if queued_ids:
                session.execute(
                    update(TaskRun)
                    .where(TaskRun.id.in_(queued_ids))
                    .values(state=TaskState.CANCELLED, finished_at=now, error="run cancelled")
                )
                session.execute(
                    update(Attempt)
                    .where(
                        Attempt.task_run_id.in_(queued_ids), Attempt.state == AttemptState.QUEUED
                    )
                    .values(state=AttemptState.CANCELLED, finished_at=now, error="run cancelled")
                )
            self._advance(session, run_id, now)
            return RunState(run.state)

    def _lock_run(self, session: Session, run_id: str) -> Run:
        run = session.scalar(select(Run).where(Run.id == run_id).with_for_update())
        if run is None:
            raise NotFound(f"no run with id {run_id}")
        return run

    # -- scheduling -----------------------------------------------------------------------

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
        session.add_all(
            TaskRun(
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
        """A cached task shows the metrics, params and artifacts of the run it reuses."""
        for metric in session.scalars(select(Metric).where(Metric.task_run_id == source.id)):
            session.add(
                Metric(
                    run_id=target.run_id,
                    task_run_id=target.id,
                    attempt=0,
                    name=metric.name,
                    value=metric.value,
                    step=metric.step,
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
        slots = session.scalar(select(Pool.slots).where(Pool.name == pool))
        if slots is None:
            return True
        busy = session.scalar(
            select(func.count())
            .select_from(Attempt)
            .where(
                Attempt.pool == pool,
                Attempt.state.in_([AttemptState.QUEUED, AttemptState.RUNNING]),
            )
        )
        return (busy or 0) < slots

    def _new_attempts(
        self, session: Session, task_runs: list[TaskRun], now: datetime, delay: float
    ) -> list[Dispatch]:
        """Queue the next attempt of each task run: two set-based statements for all of them
        (a fan-out's thousand), the session's objects kept in step without a flush."""
        if not task_runs:
            return []
        session.flush()  # what the session changed comes first
        conn = session.connection()
        not_before = now + timedelta(seconds=delay)
        ids = conn.execute(
            _NEW_ATTEMPTS,
            [
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
            ],
        ).scalars()
        task_run_ids = [task_run.id for task_run in task_runs]
        for start in range(0, len(task_run_ids), _IDS_PER_STATEMENT):
            chunk = task_run_ids[start : start + _IDS_PER_STATEMENT]
            conn.execute(_QUEUE_TASK_RUNS, {"ids": chunk})
        made = session.info.setdefault(_MADE, {})  # for finish and continue (_continue)
        queued = []
        for attempt_id, task_run in zip(ids, task_runs, strict=True):
            set_committed_value(task_run, "current_attempt", task_run.current_attempt + 1)
            set_committed_value(task_run, "state", TaskState.QUEUED)
            made[attempt_id] = task_run
            queued.append(Dispatch(attempt_id, queue_of(task_run.pool)))
        return queued

    def set_pool(self, name: str, slots: int) -> None:
        """Create or resize a pool; at most ``slots`` of its attempts run at once."""
        if slots < 1:
            raise ValueError(f"a pool needs at least 1 slot, got {slots}")
        with self.db.session() as session:
            pool = session.get(Pool, name)
            if pool is None:
                session.add(Pool(name=name, slots=slots))
            else:
                pool.slots = slots

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
        waits_for_a_pool = (
            select(TaskRun.id)
            .where(
                TaskRun.run_id == Run.id,
                TaskRun.state == TaskState.PENDING,
                TaskRun.pool.is_not(None),
            )
            .exists()
        )
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
                .where(Attempt.state == AttemptState.RUNNING)
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
            if self._end_attempt(run_id, attempt_id, number, outcome, now, guard) is not None:
                reaped += 1
        return reaped

    # -- workers --------------------------------------------------------------------------

    def claim(self, attempt_id: int, worker_id: str) -> ClaimedAttempt | None:
        """Start an attempt for this worker, or None if it is not (or no longer) claimable."""
        try:
            return self._claim(attempt_id, worker_id)
        except _Abort:
            return None

    def _claim(self, attempt_id: int, worker_id: str) -> ClaimedAttempt | None:
        with self.db.session() as session:
            return self._claim_in(session, attempt_id, worker_id, utcnow())

    def _claim_in(
        self, session: Session, attempt_id: int, worker_id: str, now: datetime
    ) -> ClaimedAttempt | None:
        # Core statements built once (module level): a fan-out claims a thousand times.
        conn = session.connection()
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

    def _take(
        self, conn: Connection, attempt_id: int, row: Any, worker_id: str, now: datetime
    ) -> ClaimedAttempt | None:
        """The claim's guarded UPDATEs, for an attempt whose run may start it (``row`` has
        the fields of _CLAIM_READ's task run columns)."""
        lease = now + timedelta(seconds=self.settings.lease_seconds)
        taken = conn.execute(
            _CLAIM_TASK_RUN,
            {"task_run_id": row.task_run_id, "number": row.number, "now": now},
        )
        if _rowcount(taken) != 1:
            return None
        started = conn.execute(
            _CLAIM_ATTEMPT,
            {"attempt_id": attempt_id, "now": now, "worker_id": worker_id, "lease": lease},
        )
        if _rowcount(started) != 1:
            raise _Abort  # undo the task run's change too
        deps = references(row.inputs)
        results: dict[str, dict[str, Any]] = {}
        if deps:
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

    def ship_logs(self, logs: Mapping[int, str], worker_id: str) -> None:
        """Store what running attempts printed so far (each attempt's log as a whole: the
        tail its worker keeps), only while the attempt is still this worker's and running."""
        with self.db.session() as session:
            session.connection().execute(
                update(Attempt)
                .where(
                    Attempt.id == bindparam("attempt_id"),
                    Attempt.worker_id == worker_id,
                    Attempt.state == AttemptState.RUNNING,
                )
                .values(log=bindparam("text")),
                [{"attempt_id": key, "text": text} for key, text in logs.items()],
            )

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
        with self.db.session() as session:
            return set(
                session.scalars(
                    select(Attempt.id)
                    .join(Run, Run.id == Attempt.run_id)
                    .where(Attempt.id.in_(ids), Run.cancel_requested.is_(True))
                )
            )

    def finish(self, claimed: ClaimedAttempt, worker_id: str, outcome: Outcome) -> list[Dispatch]:
        """Commit an attempt's outcome if this worker still holds it (fencing).

        Returns the attempts that became queued as a consequence (retries, downstream tasks),
        or raises FencedOut when the attempt was no longer this worker's to finish.
        """
        now = utcnow()
        guard = _held_by(worker_id)
        queued = self._end_attempt(
            claimed.run_id, claimed.attempt_id, claimed.number, outcome, now, guard
        )
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
        now = utcnow()
        guard = _held_by(worker_id)
        try:
            with self.db.session() as session:
                # Claims first: a finish takes its run's lock, which is then held to the
                # commit; whatever comes after it in the transaction makes others wait.
                claims = [self._claim_in(session, a, worker_id, now) for a in attempt_ids]
                queued: list[list[Dispatch] | None] = [
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
                claims += self._continue(session, queued, take, serves, worker_id, now)
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
                # Made by this transaction (every queued list comes from _new_attempts, which
                # kept its task run), under its run's lock: the claim's read is not needed.
                task = made_here[dispatch.attempt_id]
                claimable = _Claimable(
                    run_id=task.run_id,
                    task_run_id=task.id,
                    number=task.current_attempt,
                    node_id=task.node_id,
                    task_ref=task.task_ref,
                    inputs=task.inputs,
                    options=task.options,
                    code_version=task.code_version,
                )
                claimed = self._take(
                    session.connection(), dispatch.attempt_id, claimable, worker_id, now
                )
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
        ended = conn.execute(
            statement,
            {
                "attempt_id": attempt_id,
                "from_state": from_state,
                "state": outcome.state,
                "now": now,
                "error": outcome.error,
                "log": outcome.log,
                **guarded_by,
            },
        ).first()
        if ended is None:
            raise _Abort
        task_run_id = ended.task_run_id
        queued: list[Dispatch] = []
        if outcome.state == AttemptState.SUCCEEDED:
            end = {
                "state": TaskState.SKIPPED if outcome.skipped else TaskState.SUCCEEDED,
                "result": None if outcome.skipped else outcome.result,
                "error": outcome.error if outcome.skipped else None,
            }
            task = conn.execute(
                _END_TASK_RUN, {"task_run_id": task_run_id, "number": number, "now": now, **end}
            ).first()
            if task is None:  # a newer attempt is current: this outcome is stale
                raise _Abort
            self._record_outputs(session, run_id, task_run_id, number, outcome)
            run = self._lock_run_row(conn, run_id)
        else:
            assert run is not None  # nosec B101 - locked above for every other outcome
            task = conn.execute(_TASK_RUN_OF, {"task_run_id": task_run_id}).one()
            if task.current_attempt != number:
                raise _Abort
            self._record_outputs(session, run_id, task_run_id, number, outcome)
            if run.cancel_requested or outcome.state == AttemptState.CANCELLED:
                end = {"state": TaskState.CANCELLED, "error": outcome.error or "run cancelled"}
            else:
                retry = self._retry_after(conn, run_id, task, outcome)
                if isinstance(retry, str):
                    end = {"state": TaskState.FAILED, "error": retry}
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
        if self._may_decide(session, run_id, run.max_concurrency, task.node_id, task.pool):
            queued += self._advance(session, run_id, now)
        return queued

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
    ) -> bool:
        """Whether task ``node_id`` ending may let the engine decide anything in its run.

        A full pass over a run reads every task run, which made a fan-out of n tasks cost n
        passes of n rows. Usually nothing is decidable yet -- a join still waits for other
        upstreams -- and a few indexed counts show it. When in doubt, say yes.
        """
        if max_concurrency is not None or pool:
            return True  # a freed slot may admit a waiting task
        upstream, downstream, limited = self._dag(session, run_id, node_id)
        if node_id in limited:
            return True  # an element of a mapped task with max_concurrency: a freed slot
        waiting = downstream.get(node_id, [])
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

    def _dag(self, session: Session, run_id: str, node_id: str) -> _Shape:
        """A run's upstream and downstream maps, and its elements under a concurrency cap.

        Cached per run; a mapped task adds its elements when it expands, so a node the cache
        does not know (expanded by another process) reloads it. An element counts as an
        upstream of its mapped task: that task ends when its elements have.
        """
        known = self._dags.get(run_id)
        if known is not None and node_id in known[0]:
            return known
        upstream: dict[str, list[str]] = {}
        downstream: dict[str, list[str]] = {}
        limited: set[str] = set()
        for node, deps, options in session.execute(
            select(TaskRun.node_id, TaskRun.upstream, TaskRun.options).where(
                TaskRun.run_id == run_id
            )
        ):
            upstream.setdefault(node, []).extend(deps)
            for dep in deps:
                downstream.setdefault(dep, []).append(node)
            parent = options.get("map_of")
            if parent is not None:
                upstream.setdefault(parent, []).append(node)
                downstream.setdefault(node, []).append(parent)
                if options.get("map_concurrency"):
                    limited.add(node)
        self._dags.pop(run_id, None)
        if len(self._dags) >= DAG_CACHE_SIZE:
            self._dags.pop(next(iter(self._dags)))
        self._dags[run_id] = (upstream, downstream, limited)
        return self._dags[run_id]

    @staticmethod
    def _record_outputs(
        session: Session, run_id: str, task_run_id: int, number: int, outcome: Outcome
    ) -> None:
        for metric in outcome.metrics:
            session.add(
                Metric(
                    run_id=run_id,
                    task_run_id=task_run_id,
                    attempt=number,
                    name=metric["name"],
                    value=metric["value"],
                    step=metric.get("step"),
                )
            )
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

    # -- cron schedules -------------------------------------------------------------------

    def create_schedule(
        self, project_id: int, name: str, reference: str, cron: str, params: Mapping[str, Any]
    ) -> Schedule:
        """A schedule that submits ``reference`` with ``params`` at every cron tick (UTC)."""
        if not croniter.is_valid(cron):
            raise ScheduleError(f"{cron!r} is not a valid five-field cron expression")
        try:
            next_tick(cron, utcnow())
        except (CroniterBadDateError, ValueError):
            raise ScheduleError(f"{cron!r} never fires (no such date)") from None
        values = self.trace(reference, params).params
        now = utcnow()
        try:
            with self.db.session() as session:
                schedule = Schedule(
                    project_id=project_id,
                    name=name,
                    workflow_ref=reference,
                    cron=cron,
                    params=values,
                    next_fire_at=next_tick(cron, now),
                )
                session.add(schedule)
                session.flush()
                return schedule
        except IntegrityError:
            raise ScheduleError(f"a schedule named {name!r} already exists") from None

    def schedules(self, project_id: int) -> list[Schedule]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Schedule)
                    .where(Schedule.project_id == project_id)
                    .order_by(Schedule.name)
                )
            )

    def fire_schedules(self, now: datetime | None = None) -> list[Submitted]:
        """Submit one run per due schedule, for its latest due tick; missed ticks are skipped.

        Safe with any number of schedulers: the unique (schedule, tick) pair lets exactly one
        of them create the run, and the guarded update moves the schedule on once.
        """
        now = now or utcnow()
        with self.db.session() as session:
            due = list(
                session.scalars(
                    select(Schedule).where(Schedule.enabled.is_(True), Schedule.next_fire_at <= now)
                )
            )
        submitted: list[Submitted] = []
        for schedule in due:
            tick = latest_tick(schedule.cron, schedule.next_fire_at, now)
            try:
                traced = self.trace(schedule.workflow_ref, schedule.params)
                submitted.append(
                    self.submit(
                        traced,
                        project_id=schedule.project_id,
                        schedule=(schedule.id, tick),
                    )
                )
            except IntegrityError:
                pass  # another scheduler made this tick's run
            except (WorkflowError, ValueError) as exc:
                log.error(
                    "schedule %s cannot submit %s: %s", schedule.name, schedule.workflow_ref, exc
                )
            with self.db.session() as session:
                session.execute(
                    update(Schedule)
                    .where(
                        Schedule.id == schedule.id, Schedule.next_fire_at == schedule.next_fire_at
                    )
                    .values(next_fire_at=next_tick(schedule.cron, now))
                )
        return submitted

    # -- queries --------------------------------------------------------------------------

    def resolve_run_id(self, prefix: str, project_id: int | None = None) -> str:
        """The full id of the one run whose id starts with ``prefix``."""
        if len(prefix) < 4:
            raise NotFound("give at least 4 characters of the run id")
        query = select(Run.id).where(Run.id.startswith(prefix, autoescape=True))
        if project_id is not None:
            query = query.join(WorkflowRow, WorkflowRow.id == Run.workflow_id).where(
                WorkflowRow.project_id == project_id
            )
        with self.db.session() as session:
            ids = list(session.scalars(query))
        if not ids:
            raise NotFound(f"no run with id {prefix}")
        if len(ids) > 1:
            raise NotFound(f"{prefix} matches {len(ids)} runs; give more characters")
        return ids[0]

    def run(self, run_id: str, project_id: int | None = None) -> tuple[Run, WorkflowRow]:
        """A run and its workflow version; NotFound also when it is another project's."""
        query = (
            select(Run, WorkflowRow)
            .join(WorkflowRow, WorkflowRow.id == Run.workflow_id)
            .where(Run.id == run_id)
        )
        if project_id is not None:
            query = query.where(WorkflowRow.project_id == project_id)
        with self.db.session() as session:
            row = session.execute(query).first()
            if row is None:
                raise NotFound(f"no run with id {run_id}")
            return row[0], row[1]

    def runs(
        self,
        limit: int = 20,
        state: str | None = None,
        *,
        project_id: int | None = None,
        workflow: str | None = None,
        offset: int = 0,
        created_from: datetime | None = None,
        created_before: datetime | None = None,
    ) -> list[tuple[Run, WorkflowRow]]:
        """Runs, newest first, filtered by state, project, workflow name and creation time."""
        query = (
            select(Run, WorkflowRow)
            .join(WorkflowRow, WorkflowRow.id == Run.workflow_id)
            .order_by(Run.created_at.desc(), Run.id)
            .limit(limit)
            .offset(offset)
        )
        if state:
            query = query.where(Run.state == state)
        if project_id is not None:
            query = query.where(WorkflowRow.project_id == project_id)
        if workflow:
            query = query.where(WorkflowRow.name == workflow)
        if created_from is not None:
            query = query.where(Run.created_at >= created_from)
        if created_before is not None:
            query = query.where(Run.created_at < created_before)
        with self.db.session() as session:
            return [(r, w) for r, w in session.execute(query)]

    def workflows(self, project_id: int) -> list[WorkflowRow]:
        """Every version of every workflow of a project, newest version first per name."""
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(WorkflowRow)
                    .where(WorkflowRow.project_id == project_id)
                    .order_by(WorkflowRow.name, WorkflowRow.version.desc())
                )
            )

    def progress(self, run_id: str, show: int = 10) -> RunProgress:
        """A run's task counts by state (one aggregate query) and up to ``show`` of its
        running and of its failed tasks: what a live view of a large run needs, at a cost
        that does not grow with what it shows."""
        with self.db.session() as session:
            counts = {
                state: count
                for state, count in session.execute(
                    select(TaskRun.state, func.count())
                    .where(TaskRun.run_id == run_id)
                    .group_by(TaskRun.state)
                )
            }
            picked = {}
            for state in (TaskState.RUNNING, TaskState.FAILED):
                picked[state] = [
                    (node_id, started, finished)
                    for node_id, started, finished in session.execute(
                        select(TaskRun.node_id, TaskRun.started_at, TaskRun.finished_at)
                        .where(TaskRun.run_id == run_id, TaskRun.state == state)
                        .order_by(TaskRun.position, TaskRun.id)
                        .limit(show)
                    )
                ]
        return RunProgress(counts, picked[TaskState.RUNNING], picked[TaskState.FAILED])

    def task_rows(self, run_id: str) -> list[Row[Any]]:
        """A run's task runs without their inputs and results (what a page of a large run
        reads): id, node_id, position, upstream, options, state, error, started_at,
        finished_at."""
        with self.db.session() as session:
            return list(
                session.execute(
                    select(
                        TaskRun.id,
                        TaskRun.node_id,
                        TaskRun.position,
                        TaskRun.upstream,
                        TaskRun.options,
                        TaskRun.state,
                        TaskRun.error,
                        TaskRun.started_at,
                        TaskRun.finished_at,
                    )
                    .where(TaskRun.run_id == run_id)
                    .order_by(TaskRun.position)
                )
            )

    def task_runs(self, run_id: str) -> list[TaskRun]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(TaskRun).where(TaskRun.run_id == run_id).order_by(TaskRun.position)
                )
            )

    def attempts(self, run_id: str) -> list[Attempt]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Attempt)
                    .where(Attempt.run_id == run_id)
                    .order_by(Attempt.task_run_id, Attempt.number)
                )
            )

    def metrics(self, run_id: str) -> list[tuple[str, Metric]]:
        with self.db.session() as session:
            return [
                (node_id, metric)
                for node_id, metric in session.execute(
                    select(TaskRun.node_id, Metric)
                    .join(Metric, Metric.task_run_id == TaskRun.id)
                    .where(Metric.run_id == run_id)
                    .order_by(TaskRun.position, Metric.id)
                )
            ]

    def task_params(self, run_ids: Iterable[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """The params tasks logged, by (run id, task)."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        ids = list(run_ids)
        if not ids:
            return found
        with self.db.session() as session:
            for run_id, node_id, name, value in session.execute(
                select(Param.run_id, TaskRun.node_id, Param.name, Param.value)
                .join(TaskRun, TaskRun.id == Param.task_run_id)
                .where(Param.run_id.in_(ids))
                .order_by(Param.id)
            ):
                found.setdefault((run_id, node_id), {})[name] = value
        return found

    def latest_workflow_with_metrics(self, project_id: int) -> str | None:
        """The workflow of the project's newest succeeded run that logged a metric."""
        with self.db.session() as session:
            name: str | None = session.scalar(
                select(WorkflowRow.name)
                .join(Run, Run.workflow_id == WorkflowRow.id)
                .where(
                    WorkflowRow.project_id == project_id,
                    Run.state == RunState.SUCCEEDED,
                    select(Metric.id).where(Metric.run_id == Run.id).exists(),
                )
                .order_by(Run.created_at.desc())
                .limit(1)
            )
            return name

    def artifacts_of(self, run_id: str) -> list[tuple[str, Artifact]]:
        with self.db.session() as session:
            return [
                (node_id, artifact)
                for node_id, artifact in session.execute(
                    select(TaskRun.node_id, Artifact)
                    .join(Artifact, Artifact.task_run_id == TaskRun.id)
                    .where(Artifact.run_id == run_id)
                    .order_by(Artifact.id)
                )
            ]

    def log(self, run_id: str, node_id: str, number: int | None = None) -> Attempt:
        """The attempt (latest by default) of a task whose log is asked for."""
        with self.db.session() as session:
            task_run = session.scalar(
                select(TaskRun).where(TaskRun.run_id == run_id, TaskRun.node_id == node_id)
            )
            if task_run is None:
                raise NotFound(f"run {run_id[:8]} has no task {node_id!r}")
            query = select(Attempt).where(Attempt.task_run_id == task_run.id)
            if number is not None:
                query = query.where(Attempt.number == number)
            attempt = session.scalar(query.order_by(Attempt.number.desc()).limit(1))
            if attempt is None:
                raise NotFound(f"task {node_id!r} has no attempt {number or ''}".rstrip())
            return attempt


def next_tick(cron: str, after: datetime) -> datetime:
    """The first tick of ``cron`` strictly after ``after`` (UTC)."""
    tick: datetime = croniter(cron, after).get_next(datetime)
    return tick.astimezone(UTC)


def latest_tick(cron: str, first_due: datetime, now: datetime) -> datetime:
    """The latest tick in ``[first_due, now]`` (``first_due`` is itself a tick)."""
    tick = first_due
    while (following := next_tick(cron, tick)) <= now:
        tick = following
    return tick


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


class RetryError(ValueError):
    """The run cannot be retried (yet); the message says why."""


@dataclass(frozen=True)
class RunProgress:
    """See Platform.progress: counts by state, and some running and failed tasks as
    (task, started at, finished at)."""

    counts: dict[str, int]
    running: list[tuple[str, datetime | None, datetime | None]]
    failed: list[tuple[str, datetime | None, datetime | None]]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class _RetryRow:
    """One task of a retry: what it is (the original run's task, or the latest trace's node),
    where it sits, and the original run's task it may reuse (None: none, or it differs)."""

    spec: NodeSpec
    position: int
    old: TaskRun | None


def _task_run_of(
    spec: NodeSpec, run_id: str, position: int, state: TaskState, **fields: Any
) -> TaskRun:
    """A new task run of ``run_id`` for a traced node (``fields``: what a retry carries over)."""
    return TaskRun(
        run_id=run_id,
        node_id=spec.node_id,
        position=position,
        task_ref=spec.task_ref,
        code_version=spec.code_version,
        upstream=list(spec.upstream),
        inputs=spec.inputs,
        options=spec.options,
        pool=spec.options.get("pool"),
        state=state,
        **fields,
    )


def _row_of(task: TaskRun, position: int | None = None) -> _RetryRow:
    spec = NodeSpec(
        task.node_id,
        task.task_ref,
        task.code_version,
        tuple(task.upstream),
        task.inputs,
        task.options,
    )
    return _RetryRow(spec, task.position if position is None else position, task)


def _retry_rows(tasks: list[TaskRun], latest: TracedWorkflow | None) -> list[_RetryRow]:
    """The tasks of a retry, upstreams first: the original's, or the latest trace's matched
    to the original's by name, task, code version, inputs and upstreams (with the elements
    of a matched mapped task)."""
    if latest is None:  # elements after their mapped task (they share its position)
        ordered = sorted(tasks, key=lambda t: (t.position, "map_of" in t.options))
        return [_row_of(t) for t in ordered]
    by_node = {t.node_id: t for t in tasks}
    order = topological_order({spec.node_id: spec.upstream for spec in latest.specs})
    specs = {spec.node_id: spec for spec in latest.specs}
    rows = []
    for position, node_id in enumerate(order):
        spec = specs[node_id]
        old = by_node.get(node_id)
        same = (
            old is not None
            and old.options.get("map_of") is None
            and (old.task_ref, old.code_version, old.inputs, sorted(old.upstream))
            == (spec.task_ref, spec.code_version, spec.inputs, sorted(spec.upstream))
        )
        rows.append(_RetryRow(spec, position, old if same else None))
        if same and "map" in spec.inputs:
            rows += [_row_of(t, position) for t in tasks if t.options.get("map_of") == node_id]
    return rows


def _with_elements(tasks: Iterable[TaskRun | NodeSpec]) -> dict[str, list[str]]:
    """Upstream maps where a mapped task also depends on its elements."""
    upstream = {t.node_id: list(t.upstream) for t in tasks}
    for t in tasks:
        parent = t.options.get("map_of")
        if parent is not None and parent in upstream:
            upstream[parent].append(t.node_id)
    return upstream


def _downstream_of(node_id: str | None, upstream: Mapping[str, Iterable[str]]) -> set[str]:
    """``node_id`` and every task that depends on it, directly or not (empty for None)."""
    if node_id is None:
        return set()
    found = {node_id}
    changed = True
    while changed:
        changed = False
        for node, deps in upstream.items():
            if node not in found and found.intersection(deps):
                found.add(node)
                changed = True
    return found


class ScheduleError(ValueError):
    """A schedule's cron, name, workflow or params are not acceptable."""


class _Abort(Exception):
    """Roll the current transaction back: a guarded update found the state changed."""


class FencedOut(RuntimeError):
    """A worker tried to commit an attempt that is no longer current or no longer its own."""
