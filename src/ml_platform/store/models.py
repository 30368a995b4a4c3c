"""The tables. The database is the source of truth for every run, task and attempt."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def stored_utc(value: datetime) -> datetime:
    """An aware datetime as stored: naive UTC (a naive one is refused: ambiguous)."""
    if value.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
    return value.astimezone(UTC).replace(tzinfo=None)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC and read back as aware UTC, on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else stored_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


#: A task run's, an attempt's, a param's or an artifact's id, and every column referring to
#: one: 64-bit on PostgreSQL (a busy platform takes 2**31 attempt ids within a year; migration
#: 0015). SQLite's INTEGER is 64-bit already, and a primary key must be INTEGER to be its rowid.
ID = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, Any: JSON}


DEFAULT_PROJECT = "default"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Project(Base):
    """Every workflow, run and schedule belongs to one project."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Membership(Base):
    """A user's role in a project: viewer, editor or admin."""

    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("user_id", "project_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Indexed as the first column of (user_id, project_id).
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))


class RefreshToken(Base):
    """A refresh token (only its hash is stored); rotation keeps one family per login."""

    __tablename__ = "refresh_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    family: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Workflow(Base):
    """One version of a workflow: a new version whenever its module's code changes."""

    __tablename__ = "workflows"
    __table_args__ = (
        UniqueConstraint("project_id", "name", "version"),
        UniqueConstraint("project_id", "name", "code_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Indexed as the first column of (project_id, name, version).
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(400))
    version: Mapped[int] = mapped_column(Integer)
    code_hash: Mapped[str] = mapped_column(String(64))
    #: JSON schema of the workflow's parameters, from its signature.
    params_schema: Mapped[dict[str, Any]]
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_state_created", "state", "created_at"),
        # The runs lists: newest first, a page at a time, whatever the project holds.
        Index("ix_runs_created", "created_at"),
        # At most one run per schedule tick, whatever the number of schedulers.
        UniqueConstraint("schedule_id", "scheduled_for"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]]
    max_concurrency: Mapped[int | None] = mapped_column(Integer, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    schedule_id: Mapped[int | None] = mapped_column(ForeignKey("schedules.id"), default=None)
    scheduled_for: Mapped[datetime | None] = mapped_column(default=None)
    #: The run this one retries (`mlp retry`): its succeeded tasks were reused.
    retry_of: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class TaskRun(Base):
    __tablename__ = "task_runs"
    __table_args__ = (
        UniqueConstraint("run_id", "node_id"),
        Index("ix_task_runs_cache_key_state", "cache_key", "state"),
        # A run's open tasks (a finish's questions) without reading its ended ones.
        Index("ix_task_runs_run_state", "run_id", "state"),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    #: Indexed as the first column of (run_id, state) and of (run_id, node_id).
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    node_id: Mapped[str] = mapped_column(String(200))
    #: Position in the run's topological order.
    position: Mapped[int] = mapped_column(Integer)
    task_ref: Mapped[str] = mapped_column(String(400))
    code_version: Mapped[str] = mapped_column(String(64))
    upstream: Mapped[list[str]] = mapped_column(JSON)
    #: Arguments, with upstream results as {"__mlp_ref__": node_id} markers.
    inputs: Mapped[dict[str, Any]]
    #: Retry policy, timeout, cache flag, pool.
    options: Mapped[dict[str, Any]]
    pool: Mapped[str | None] = mapped_column(String(100), default=None)
    state: Mapped[str] = mapped_column(String(16))
    cache_key: Mapped[str | None] = mapped_column(String(64), default=None)
    cached_from: Mapped[int | None] = mapped_column(ID, default=None)
    #: Number of the current attempt: the fencing token. 0 before the first attempt.
    current_attempt: Mapped[int] = mapped_column(Integer, default=0)
    #: Attempts lost to the infrastructure (dead worker, expired lease, dead-lettered
    #: dispatch), counted against MLP_MAX_LOST and never against the task's retries.
    lost_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: {"value": ...} or {"__mlp_artifact__": sha256, ...}
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("task_run_id", "number"),
        Index("ix_attempts_state_not_before", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    #: Indexed as the first column of (task_run_id, number).
    task_run_id: Mapped[int] = mapped_column(ID, ForeignKey("task_runs.id"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    pool: Mapped[str | None] = mapped_column(String(100), default=None)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    timeout_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    log: Mapped[str | None] = mapped_column(Text, default=None)
    #: Characters of the attempt's output before ``log`` (which keeps its last part): offsets
    #: into a log count from the start of the whole output.
    log_start: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class LogPart(Base):
    """A piece of a running attempt's output, as its worker shipped it: the pieces of one
    attempt are contiguous from the first kept one (each starts where the last ended; the
    worker deletes those wholly before what it keeps). Written once, never updated, so that
    following a log costs what was printed, not the whole log again; removed once the
    attempt has ended and its whole log is in ``attempts.log``."""

    __tablename__ = "log_parts"

    attempt_id: Mapped[int] = mapped_column(ID, ForeignKey("attempts.id"), primary_key=True)
    #: Characters of the attempt's output before this piece.
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_name_run", "name", "run_id"),)

    #: 64-bit on PostgreSQL: a point per training step, 200,000 a task, counts past 2**31 in
    #: ten thousand such tasks. (SQLite's INTEGER PRIMARY KEY is 64-bit already.)
    id: Mapped[int] = mapped_column(ID, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    task_run_id: Mapped[int] = mapped_column(ID, ForeignKey("task_runs.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MetricSeries(Base):
    """A task run's metric of one name, summed up as its points are stored (the finish that
    stores them updates it in the same transaction): what the CLI, the run page and compare
    show, a row per task and name however many points a training loop logged."""

    __tablename__ = "metric_series"

    task_run_id: Mapped[int] = mapped_column(ID, ForeignKey("task_runs.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    points: Mapped[int] = mapped_column(BigInteger)
    low: Mapped[float] = mapped_column(Float)
    high: Mapped[float] = mapped_column(Float)
    #: The value logged last; the order in which the task first logged each of its names.
    last: Mapped[float] = mapped_column(Float)
    logged_order: Mapped[int] = mapped_column(BigInteger)


class Param(Base):
    """A parameter a task logged with ``ctx.log_param``."""

    __tablename__ = "params"
    __table_args__ = (UniqueConstraint("task_run_id", "name"),)

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    task_run_id: Mapped[int] = mapped_column(ID, ForeignKey("task_runs.id"))
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[Any] = mapped_column(JSON)


class Artifact(Base):
    """A named blob a task saved; the bytes live in the artifact store under their sha256."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    task_run_id: Mapped[int] = mapped_column(ID, ForeignKey("task_runs.id"))
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)  # bytes: a model may well be past 2 GiB
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Pool(Base):
    """A named limit on how many attempts may run at once across all runs."""

    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)


class Schedule(Base):
    """A cron schedule that submits runs of a workflow with fixed params."""

    __tablename__ = "schedules"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Indexed as the first column of (project_id, name).
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(100))
    workflow_ref: Mapped[str] = mapped_column(String(400))
    cron: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]]
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: The next tick to fire; advanced by whichever scheduler creates that tick's run.
    next_fire_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Why its last tick made no run (the workflow gone, its params no longer accepted);
    #: None once a tick makes one.
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


#: What PostgreSQL is to take the number of runs for, as a share of a table's rows (its
#: ``n_distinct`` for the ``run_id`` columns, in place of ANALYZE's estimate): about twenty
#: rows a run. ANALYZE estimates it from the runs the table holds, and on a young database --
#: one run of a thousand tasks and a few small ones -- took every run for half the table:
#: reading a run's task runs became a scan of the whole table (0.66 ms of a chain's first
#: claim, against 0.01 by the index). Migration 0008 sets it on existing databases.
RUN_ID_DISTINCT = -0.05
RUN_ID_TABLES = ("task_runs", "attempts")
_RUN_ID_DISTINCT = DDL(  # type: ignore[no-untyped-call]
    f"ALTER TABLE %(table)s ALTER COLUMN run_id SET (n_distinct = {RUN_ID_DISTINCT})"
).execute_if(dialect="postgresql")
for _table in RUN_ID_TABLES:
    event.listen(Base.metadata.tables[_table], "after_create", _RUN_ID_DISTINCT)
