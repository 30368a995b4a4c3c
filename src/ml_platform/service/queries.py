"""The read models the faces use: runs, their tasks, attempts, metrics, artifacts and logs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, select

from ml_platform.engine.states import RunState, TaskState
from ml_platform.service.core import NotFound, _Core
from ml_platform.store.models import Artifact, Attempt, Metric, Param, Run, TaskRun
from ml_platform.store.models import Workflow as WorkflowRow


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


class Queries(_Core):
    """What the CLI, the API, the UI and the metrics read."""

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
