"""Workflows and runs: trace and register a workflow, submit, retry and cancel a run."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ml_platform.dispatch import Dispatch, queue_of
from ml_platform.engine.dag import topological_order
from ml_platform.engine.states import (
    RUN_TERMINAL,
    TASK_DONE_OK,
    TASK_TERMINAL,
    AttemptState,
    RunState,
    TaskState,
)
from ml_platform.sdk import NodeSpec, TracedWorkflow, Workflow, WorkflowError
from ml_platform.service import hot_path
from ml_platform.service.core import NotFound, Submitted
from ml_platform.service.planning import NewTaskRun, Planning, _task_run_row, queued_as_it_is
from ml_platform.store.db import insert_rows, on_driver
from ml_platform.store.models import DEFAULT_PROJECT, Attempt, Project, Run, Schedule, TaskRun
from ml_platform.store.models import Workflow as WorkflowRow
from ml_platform.store.models import utcnow
from ml_platform.tracer import check_allowed, trace_in_subprocess


class RetryError(ValueError):
    """The run cannot be retried (yet); the message says why."""


class ScheduleChanged(RuntimeError):
    """The schedule was paused, changed or deleted after the scheduler read it: its tick
    makes no run now (the next pass decides on the schedule as it is)."""


class Tick(NamedTuple):
    """A cron schedule's tick that a run is made for."""

    schedule_id: int
    at: datetime
    #: The schedule's ``next_fire_at`` as the scheduler read it: the run is stored only while
    #: the schedule is still so, and enabled (schedule_unchanged).
    due: datetime


def schedule_unchanged(session: Session, tick: Tick) -> None:
    """In a tick's run transaction, before the run is stored: the schedule still exists,
    enabled, due as the scheduler read it -- locked for share until the commit, so that a
    pause, a change or a delete waits for the run or finds it made; else ScheduleChanged."""
    still = session.execute(
        select(Schedule.id)
        .where(
            Schedule.id == tick.schedule_id,
            Schedule.enabled.is_(True),
            Schedule.next_fire_at == tick.due,
        )
        .with_for_update(read=True)
    ).first()
    if still is None:
        raise ScheduleChanged(f"schedule {tick.schedule_id} changed before its tick's run")


@dataclass(frozen=True)
class _RetryRow:
    """One task of a retry: what it is (the original run's task, or the latest trace's node),
    where it sits, and the original run's task it may reuse (None: none, or it differs)."""

    spec: NodeSpec
    position: int
    old: TaskRun | None


def _columns_of(spec: NodeSpec, run_id: str, position: int, state: TaskState) -> dict[str, Any]:
    """The columns of a new task run of ``run_id`` for a traced node."""
    return {
        "run_id": run_id,
        "node_id": spec.node_id,
        "position": position,
        "task_ref": spec.task_ref,
        "code_version": spec.code_version,
        "upstream": list(spec.upstream),
        "inputs": spec.inputs,
        "options": spec.options,
        "pool": spec.options.get("pool"),
        "state": state,
    }


def _positions(specs: Iterable[NodeSpec]) -> dict[str, int]:
    """Each traced node's position in the run's topological order."""
    order = topological_order({spec.node_id: spec.upstream for spec in specs})
    return {node_id: index for index, node_id in enumerate(order)}


def _task_run_of(
    spec: NodeSpec, run_id: str, position: int, state: TaskState, **fields: Any
) -> TaskRun:
    """A new task run of ``run_id`` for a traced node (``fields``: what a retry carries over)."""
    return TaskRun(**_columns_of(spec, run_id, position, state), **fields)


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


def _version_of(project: int, traced: TracedWorkflow) -> ColumnElement[bool]:
    """The stored version of ``traced``'s code in ``project`` (at most one row)."""
    return and_(
        WorkflowRow.project_id == project,
        WorkflowRow.name == traced.name,
        WorkflowRow.code_hash == traced.code_hash,
    )


class Runs(Planning):
    """Register workflows; submit, retry and cancel runs."""

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
        project = project_id or self.default_project_id()
        for _ in range(3):
            try:
                with self.db.session() as session:
                    existing = session.scalar(
                        select(WorkflowRow).where(_version_of(project, traced))
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
                        code_hash=traced.code_hash,
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
        schedule: Tick | None = None,
    ) -> Submitted:
        """Validate the params, trace the DAG and store a queued run with its first tasks.

        ``wf`` is a workflow imported here (traced now with ``params``) or one already traced
        with its params (``Platform.trace``). ``schedule`` marks a run made by a cron
        schedule's tick: the database refuses a second run for the same tick
        (IntegrityError), and none at all once the schedule changed (ScheduleChanged).
        """
        traced = wf if isinstance(wf, TracedWorkflow) else wf.trace(params or {})
        submitted = self._submit(traced, max_concurrency, project_id, schedule)
        # A wide run: the planner is told how large the tables have grown (Database docs).
        self.db.refresh_statistics(
            {"task_runs": len(traced.specs), "attempts": len(submitted.queued)}
        )
        return submitted

    def _submit(
        self,
        traced: TracedWorkflow,
        max_concurrency: int | None,
        project_id: int | None,
        schedule: Tick | None,
    ) -> Submitted:
        values = traced.params
        if values is None:
            raise WorkflowError(f"workflow {traced.name} was traced without params")
        project = project_id or self.default_project_id()
        if self.db.engine.dialect.name == "postgresql" and schedule is None:
            made = self._submit_in_one_statement(traced, values, project, max_concurrency)
            if made is not None:
                return made
        store = functools.partial(
            self._store_run,
            traced=traced,
            values=values,
            max_concurrency=max_concurrency,
            schedule=schedule,
        )
        # Most runs are of a version stored already: found in the run's own transaction (a
        # transaction less); a new one is registered first, in its own.
        with self.db.session() as session:
            known = session.execute(
                select(WorkflowRow.id, WorkflowRow.version).where(_version_of(project, traced))
            ).first()
            if known is not None:
                return store(session, version=(known.id, known.version))
        registered = self.register(traced, project)
        with self.db.session() as session:
            return store(session, version=(registered.id, registered.version))

    def _submit_in_one_statement(
        self,
        traced: TracedWorkflow,
        values: dict[str, Any],
        project: int,
        max_concurrency: int | None,
    ) -> Submitted | None:
        """The run stored and its first tasks queued in one statement (hot_path.SUBMIT), if
        the plan would start it as it is and its version is stored; None (nothing stored) if
        not: the transaction path then decides."""
        specs = traced.specs
        roots = [spec for spec in specs if not spec.upstream]
        if (
            max_concurrency
            or traced.max_concurrency
            or not roots
            or not all(queued_as_it_is(s.inputs, s.options, s.options.get("pool")) for s in roots)
        ):
            return None
        position = _positions(specs)
        run_id = uuid.uuid4().hex
        rows = []
        for spec in specs:
            state = TaskState.PENDING if spec.upstream else TaskState.QUEUED
            row = _columns_of(spec, run_id, position[spec.node_id], state)
            for name in ("upstream", "inputs", "options"):  # see hot_path.SUBMIT
                row[name] = json.dumps(row[name])
            rows.append(row | {"current_attempt": 0 if spec.upstream else 1})
        params = {
            "project_id": project,
            "name": traced.name,
            "code_hash": traced.code_hash,
            "run_id": run_id,
            "params": json.dumps(values),
            "now": utcnow(),
            "task_runs": json.dumps(rows),
            **hot_path.STATES,
        }
        with self.db.autocommit() as conn:
            made = on_driver(conn, hot_path.SUBMIT, params)
        if not made:
            return None  # a version not stored yet
        queued = [Dispatch(row.attempt_id, queue_of(None)) for row in made]
        return Submitted(run_id, made[0].version, queued)

    def _store_run(
        self,
        session: Session,
        *,
        traced: TracedWorkflow,
        values: dict[str, Any],
        version: tuple[int, int],
        max_concurrency: int | None,
        schedule: Tick | None,
    ) -> Submitted:
        """Store a queued run of ``traced`` with its params ``values``, of the workflow
        ``version`` (its row's id and number), and queue its first tasks."""
        workflow_id, workflow_version = version
        if schedule is not None:
            schedule_unchanged(session, schedule)
        specs = traced.specs
        position = _positions(specs)
        run_id = uuid.uuid4().hex
        run_limit = max_concurrency or traced.max_concurrency
        session.add(
            Run(
                id=run_id,
                workflow_id=workflow_id,
                state=RunState.QUEUED,
                params=values,
                max_concurrency=run_limit,
                schedule_id=schedule.schedule_id if schedule else None,
                scheduled_for=schedule.at if schedule else None,
            )
        )
        session.flush()
        # One statement for all of them, past the ORM: a run of a thousand tasks is
        # stored in ≈ 30 ms instead of ≈ 150; nothing of it is read back to queue its roots.
        stored = insert_rows(
            session.connection(),
            TaskRun,
            [
                _task_run_row(
                    **_columns_of(spec, run_id, position[spec.node_id], TaskState.PENDING)
                )
                for spec in specs
            ],
            returning=("id", "node_id"),
        )
        ids = {row.node_id: row.id for row in stored}
        roots = [
            NewTaskRun(
                id=ids[spec.node_id],
                run_id=run_id,
                node_id=spec.node_id,
                task_ref=spec.task_ref,
                code_version=spec.code_version,
                inputs=spec.inputs,
                options=spec.options,
                pool=spec.options.get("pool"),
            )
            for spec in specs
            if not spec.upstream
        ]
        queued = self._start_new_run(session, run_id, roots, run_limit is not None, utcnow())
        return Submitted(run_id, workflow_version, queued)

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
            # Held to the commit: a delete or a prune of the original waits for this retry
            # (and then unlinks it), or has removed it and this is a NotFound, not a failed
            # foreign key.
            if (
                session.scalar(select(Run.id).where(Run.id == run_id).with_for_update(read=True))
                is None
            ):
                raise NotFound(f"no run with id {run_id}")
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
        # It locks the run, then its queued task runs: a worker's transaction may hold one of
        # those and wait for the run (Execution.finish_and_claim).
        return self.db.retrying_deadlocks(lambda: self._cancel(run_id))

    def _cancel(self, run_id: str) -> RunState:
        now = utcnow()
        with self.db.session() as session:
            run = self._lock_run(session, run_id)
            if run.state in RUN_TERMINAL:
                return RunState(run.state)
            run.cancel_requested = True
            not_started = TaskRun.state.in_([TaskState.PENDING, TaskState.QUEUED])
            task_ids = select(TaskRun.id).where(TaskRun.run_id == run_id, not_started)
            queued_ids = list(session.scalars(task_ids))
            if queued_ids:
                # Guarded again: a claim committed since the read (the update waited for
                # it) started its task, which then runs until its worker sees the cancel.
                session.execute(
                    update(TaskRun)
                    .where(TaskRun.id.in_(queued_ids), not_started)
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
