"""The service's shared ground: its settings, database and artifact store, the values its use
cases return, and its errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self, cast

from sqlalchemy import CursorResult, Result, select
from sqlalchemy.orm import Session

from ml_platform.artifacts import ArtifactStore
from ml_platform.config import Settings
from ml_platform.dispatch import Dispatch
from ml_platform.engine.states import AttemptState
from ml_platform.store.db import Database
from ml_platform.store.models import Run

#: A run's DAG as Platform._dag keeps it: upstream, downstream, capped mapped elements.
_Shape = tuple[dict[str, list[str]], dict[str, list[str]], set[str]]
#: Session.info key: the attempts a transaction queued -> their task runs (see _continue).
_MADE = "made"


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
    #: Characters the attempt printed before ``log`` (which keeps the last part of it).
    log_start: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.error = storable_text(self.error)
        self.log = storable_text(self.log)


@dataclass(frozen=True)
class LogPiece:
    """What a running attempt printed since its worker last shipped its log."""

    #: Characters of the attempt's output before this piece.
    start: int
    text: str
    #: Where the output its worker keeps begins: the pieces wholly before it are let go.
    kept_from: int = 0


def storable_text(text: str | None) -> str | None:
    """Text as a database column can hold it: PostgreSQL's text has no NUL character, which a
    task may well print or put in an error; each becomes U+FFFD, as undecodable bytes do."""
    return None if text is None else text.replace("\x00", "\ufffd")


@dataclass
class Heartbeat:
    """Which of a worker's attempts must stop: lease lost, or run cancelled."""

    lost: set[int] = field(default_factory=set)
    cancelled: set[int] = field(default_factory=set)


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched: how a guarded transition knows whether it won."""
    return cast(CursorResult[Any], result).rowcount


class _Abort(Exception):
    """Roll the current transaction back: a guarded update found the state changed."""


class FencedOut(RuntimeError):
    """A worker tried to commit an attempt that is no longer current or no longer its own."""


class _Core:
    """The platform's ground: one database and one artifact store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.artifacts = ArtifactStore(settings.artifacts_dir)
        self._default_project_id: int | None = None
        self._dags: dict[str, _Shape] = {}

    def start(self) -> Self:
        self.db.ensure_schema()
        return self

    def close(self) -> None:
        self.db.dispose()

    def _lock_run(self, session: Session, run_id: str) -> Run:
        run = session.scalar(select(Run).where(Run.id == run_id).with_for_update())
        if run is None:
            raise NotFound(f"no run with id {run_id}")
        return run
