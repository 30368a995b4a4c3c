"""The read models the faces use: runs, their tasks, attempts, metrics, artifacts and logs, and
the platform's figures for /metrics (counted in SQL)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, case, func, select, text
from sqlalchemy.orm import Session

from ml_platform.config import Settings
from ml_platform.engine.states import AttemptState, RunState, TaskState
from ml_platform.service.core import NotFound, _Core
from ml_platform.store.db import current_revision, head_from_files, newer_than_files, reading
from ml_platform.store.models import (
    Artifact,
    Attempt,
    Metric,
    MetricSeries,
    Param,
    Run,
    Schedule,
    TaskRun,
)
from ml_platform.store.models import Workflow as WorkflowRow
from ml_platform.store.models import utcnow


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
class LogPart:
    """What an attempt printed from ``offset`` on (see Platform.log_part). Offsets count
    characters from the start of the attempt's whole output; the log keeps its last part,
    from ``kept_from``. An offset outside what is kept (cut away since, or past the end)
    answers from ``kept_from``: ``offset`` says where ``text`` begins."""

    attempt: int
    state: str
    text: str
    offset: int
    next_offset: int
    kept_from: int
    running: bool


@dataclass(frozen=True)
class MetricSummary:
    """A task's metric of one name (see Platform.metric_summaries)."""

    task: str
    name: str
    #: The value logged last, how many were logged, and the least and greatest of them.
    last: float
    points: int
    low: float
    high: float


#: An attempt and, while it runs, the pieces of its log its worker shipped from the one that
#: holds ``offset`` on, with where the pieces begin and end (one statement: one snapshot,
#: whether the attempt ends meanwhile or not; the pieces looked up by the key (attempt_id,
#: start), and by the attempt as a parameter, not a correlation (which PostgreSQL evaluated
#: again for each piece): a follower at the end reads one piece, not all ten thousand).
_LOG_NOW = text("""
    SELECT a.number, a.state, a.log, a.log_start,
        (SELECT min(f.start) FROM log_parts f WHERE f.attempt_id = :attempt_id) AS first_start,
        (SELECT l.start + length(l.text) FROM log_parts l WHERE l.attempt_id = :attempt_id
            ORDER BY l.start DESC LIMIT 1) AS end_at,
        p.start, p.text
    FROM attempts a
    LEFT JOIN log_parts p ON p.attempt_id = a.id AND a.state = :running
        AND p.start >= COALESCE((SELECT max(b.start) FROM log_parts b
            WHERE b.attempt_id = :attempt_id AND b.start <= :offset), -1)
    WHERE a.id = :attempt_id
    ORDER BY p.start
""")

#: The upper bounds (seconds) of the attempt-duration histogram's buckets.
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
#: Attempts created longer ago than this are committed, if they ever will be (see _Counted).
SETTLED = timedelta(minutes=1)


@dataclass(frozen=True)
class Stats:
    """The platform's figures at one moment (see Platform.stats), for /metrics."""

    runs_by_state: dict[str, int]
    lost_attempts: int
    #: Succeeded attempts at most each DURATION_BUCKETS bound long; their count and sum.
    duration_buckets: list[float]
    duration_count: float
    duration_sum: float
    due: int
    delayed: int


class _Counted:
    """What /metrics counts of attempts -- the histogram of succeeded attempts' durations and
    the lost attempts -- counted in SQL and kept incrementally.

    Attempts only ever become final, and a final attempt never changes: everything below the
    oldest attempt still queued or running is counted once and kept; each scrape adds what
    became final since and counts the few newer rows afresh. A scrape costs what changed, not
    the history (a full count of a million attempts took 5–7 s in Python before); and a
    counter does not fall when a prune removes the rows it counted (Prometheus takes a counter
    that falls for a restart of its process, and a rate over it then jumps by its whole value).
    """

    def __init__(self) -> None:
        self.final_upto = 0  # every attempt with an id up to this one is final, and counted
        self.final = [0.0] * (len(DURATION_BUCKETS) + 3)  # buckets…, count, sum, lost

    def counts(self, session: Session) -> list[float]:
        """The histogram's buckets, its count and sum, and the lost attempts (_counted)."""
        pending = session.scalar(
            select(func.min(Attempt.id)).where(
                Attempt.state.in_([AttemptState.QUEUED, AttemptState.RUNNING])
            )
        )
        # Ids come from a sequence before their rows commit: a row a transaction still holds
        # may sit below a committed one. Only rows older than a minute count as settled.
        settled = session.scalar(
            select(func.max(Attempt.id)).where(Attempt.created_at < utcnow() - SETTLED)
        )
        upto = min(settled or 0, pending - 1 if pending is not None else settled or 0)
        if upto > self.final_upto:
            added = _counted(session, Attempt.id > self.final_upto, Attempt.id <= upto)
            self.final = [a + b for a, b in zip(self.final, added, strict=True)]
            self.final_upto = upto
        live = _counted(session, Attempt.id > self.final_upto)
        return [a + b for a, b in zip(self.final, live, strict=True)]


def _counted(session: Session, *where: ColumnElement[bool]) -> list[float]:
    """Per bucket, the succeeded attempts at most that long; their count and sum; then the
    lost attempts."""
    if session.get_bind().dialect.name == "postgresql":
        seconds: ColumnElement[Any] = func.extract(
            "epoch", Attempt.finished_at - Attempt.started_at
        )
    else:  # SQLite keeps timestamps as text
        seconds = (func.julianday(Attempt.finished_at) - func.julianday(Attempt.started_at)) * 86400
    timed = and_(
        Attempt.state == AttemptState.SUCCEEDED,
        Attempt.started_at.is_not(None),
        Attempt.finished_at.is_not(None),
    )
    row = session.execute(
        select(
            *(
                func.coalesce(func.sum(case((and_(timed, seconds <= bound), 1), else_=0)), 0)
                for bound in DURATION_BUCKETS
            ),
            func.coalesce(func.sum(case((timed, 1), else_=0)), 0),
            func.coalesce(func.sum(case((timed, seconds), else_=0)), 0),
            func.coalesce(func.sum(case((Attempt.state == AttemptState.LOST, 1), else_=0)), 0),
        ).where(Attempt.state.in_([AttemptState.SUCCEEDED, AttemptState.LOST]), *where)
    ).one()
    return [float(value) for value in row]


class Queries(_Core):
    """What the CLI, the API, the UI and the metrics read."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._counted = _Counted()

    def stats(self) -> Stats:
        """Runs by state, lost attempts, the duration histogram and the queue, in one
        transaction; each counted in SQL (a scrape must not read the history row by row)."""
        with self.db.session() as session:
            if session.get_bind().dialect.name == "postgresql":
                # The driver prepares statements it runs often, and PostgreSQL then may pick
                # one generic plan: for `id > $1` that is a scan of every attempt (0.3 s at a
                # million rows) where the value itself says "the last few".
                session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
            by_state = session.execute(select(Run.state, func.count()).group_by(Run.state)).all()
            *buckets, count, total, lost = self._counted.counts(session)
            due = session.scalar(select(func.count()).where(Attempt.state == AttemptState.QUEUED))
            delayed = session.scalar(
                select(func.sum(case((Attempt.not_before > utcnow(), 1), else_=0))).where(
                    Attempt.state == AttemptState.QUEUED
                )
            )
        return Stats(
            runs_by_state={state: n for state, n in by_state},
            lost_attempts=int(lost),
            duration_buckets=buckets,
            duration_count=count,
            duration_sum=total,
            due=(due or 0) - (delayed or 0),
            delayed=delayed or 0,
        )

    def schema_behind(self) -> str | None:
        """None when the database answers and its schema is at this release's newest
        migration or past it (a newer release migrated it: a rolling update's old pods and a
        rollback run on it), else where it is; the driver's error when it does not answer
        (for readiness checks)."""
        with reading(self.db.engine) as connection:
            connection.execute(text("SELECT 1"))
        at = current_revision(self.db.engine)
        if at == head_from_files() or newer_than_files(at):
            return None
        return f"at {at}, not head"

    def schema_ahead(self) -> str | None:
        """Where the database is when a newer release migrated it past this one, else None."""
        at = current_revision(self.db.engine)
        if not newer_than_files(at):
            return None
        return f"at migration {at}, newer than this release's {head_from_files()}"

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
        schedule: str | None = None,
    ) -> list[tuple[Run, WorkflowRow]]:
        """Runs, newest first, filtered by state, project, workflow name, creation time and
        the schedule (by name; NotFound if the project has none so named) that made them."""
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
            if schedule is not None:
                named = select(Schedule.id).where(Schedule.name == schedule)
                if project_id is not None:
                    named = named.where(Schedule.project_id == project_id)
                if not session.scalars(named).first():
                    raise NotFound(f"no schedule named {schedule!r}")
                query = query.where(Run.schedule_id.in_(named))
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

    def attempt_end(self, attempt_id: int) -> tuple[str, str | None] | None:
        """An attempt's state and the worker that holds or held it (None: no such attempt)."""
        with self.db.session() as session:
            row = session.execute(
                select(Attempt.state, Attempt.worker_id).where(Attempt.id == attempt_id)
            ).one_or_none()
        return None if row is None else (row.state, row.worker_id)

    def attempts(self, run_id: str) -> list[Attempt]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Attempt)
                    .where(Attempt.run_id == run_id)
                    .order_by(Attempt.task_run_id, Attempt.number)
                )
            )

    def metric_summaries(self, run_ids: Iterable[str]) -> dict[str, list[MetricSummary]]:
        """Each task's metrics, one line per name (the last value logged, how many points,
        their range), by run: kept by the finishes that store the points (metric_series),
        so that a task that logged a point per training step costs its faces a row."""
        ids = list(run_ids)
        found: dict[str, list[MetricSummary]] = {run_id: [] for run_id in ids}
        if not ids:
            return found
        series = MetricSeries.__table__.c
        with self.db.session() as session:
            rows = session.execute(
                select(
                    series.run_id,
                    TaskRun.node_id,
                    series.name,
                    series.last,
                    series.points,
                    series.low,
                    series.high,
                )
                .join(TaskRun, TaskRun.id == series.task_run_id)
                .where(series.run_id.in_(ids))
                .order_by(TaskRun.position, series.logged_order, series.name)
            ).all()
        for run_id, *summary in rows:
            found[run_id].append(MetricSummary(*summary))
        return found

    def metrics(
        self,
        run_id: str,
        *,
        task: str | None = None,
        name: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[tuple[str, Metric]]:
        """The points a run's tasks logged (of one task or name, if given), task by task in
        the order they were logged; ``limit`` of them from ``offset``."""
        query = (
            select(TaskRun.node_id, Metric)
            .join(Metric, Metric.task_run_id == TaskRun.id)
            .where(Metric.run_id == run_id)
        )
        if task is not None:
            query = query.where(TaskRun.node_id == task)
        if name is not None:
            query = query.where(Metric.name == name)
        query = query.order_by(TaskRun.position, Metric.id).offset(offset).limit(limit)
        with self.db.session() as session:
            return [(node_id, metric) for node_id, metric in session.execute(query)]

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

    def log_part(
        self, run_id: str, node_id: str, number: int | None = None, offset: int = 0
    ) -> LogPart:
        """What the attempt (latest by default) of a task printed from ``offset`` on: every
        face's way to show a log and to follow it while the attempt runs."""
        attempt_id = self.log(run_id, node_id, number).id
        given = {"attempt_id": attempt_id, "offset": offset, "running": AttemptState.RUNNING}
        with self.db.session() as session:
            rows = session.execute(_LOG_NOW, given).all()
            row = rows[0]
            live = row.state == AttemptState.RUNNING and row.first_start is not None
            if live and not row.first_start <= offset <= row.end_at:
                # cut away since, or past the end: what is kept, from its start
                rows = session.execute(_LOG_NOW, given | {"offset": -1}).all()
                row = rows[0]
                live = row.state == AttemptState.RUNNING and row.first_start is not None
        if not live:  # ended (its whole log is in attempts.log), or nothing shipped yet
            text, kept_from = row.log or "", row.log_start
            end = kept_from + len(text)
            start = offset if kept_from <= offset <= end else kept_from
            text = text[start - kept_from :]
        else:  # running: the pieces its worker shipped
            kept_from, end = row.first_start, row.end_at
            start = offset if kept_from <= offset <= end else kept_from
            pieces = [r for r in rows if r.start is not None]
            text = "".join(r.text for r in pieces)[start - pieces[0].start :] if pieces else ""
        return LogPart(
            attempt=row.number,
            state=row.state,
            text=text,
            offset=start,
            next_offset=end,
            kept_from=kept_from,
            running=row.state in (AttemptState.QUEUED, AttemptState.RUNNING),
        )

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
