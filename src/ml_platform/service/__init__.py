"""Use cases: register workflows, submit and cancel runs, schedule, claim and finish attempts.

Every state change is a short transaction whose UPDATE is guarded by the state it expects,
so that concurrent schedulers and workers cannot both win. Locks are taken run, then task run,
then attempt -- with two exceptions made for throughput, both on rows no other transaction
locks in the other order: a claim does not lock the run (its guarded UPDATEs decide), and a
successful finish locks the run last, for the decision about what follows.

One module per use case, each a layer of ``Platform``:

- ``core``: the settings, database and artifact store; the values returned; the errors.
- ``queries``: the read models the CLI, API, UI and metrics use.
- ``planning``: a run's next steps under its lock (the engine's plan, mapped tasks, queuing).
- ``runs``: register, submit, retry and cancel.
- ``execution``: the hot path — claim, heartbeat, finish and continue, reap — and the
  scheduler's pass.
- ``hot_path``: a chain's step (a success and its next task's start and claim) in one
  statement, committed on its own; it locks the run first, as a decision does.
- ``schedules``: cron.
- ``retention``: removing ended runs older than an age, and the blobs nothing names.
"""

from __future__ import annotations

from ml_platform.service.core import (
    ClaimedAttempt,
    FencedOut,
    Heartbeat,
    LogPiece,
    NotFound,
    Outcome,
    Submitted,
)
from ml_platform.service.execution import Execution, timeout_outcome
from ml_platform.service.queries import (
    DURATION_BUCKETS,
    LogPart,
    MetricSummary,
    RunProgress,
    Stats,
)
from ml_platform.service.retention import Pruned, Retention, RunNotEnded
from ml_platform.service.runs import RetryError, ScheduleChanged, Tick
from ml_platform.service.schedules import ScheduleError, Schedules, latest_tick, next_tick

# The rows the queries return, as the faces name them (they need not reach into the store).
from ml_platform.store.models import Run as RunRow
from ml_platform.store.models import Schedule as ScheduleRow
from ml_platform.store.models import Workflow as WorkflowRow

__all__ = [
    "DURATION_BUCKETS",
    "ClaimedAttempt",
    "FencedOut",
    "Heartbeat",
    "LogPart",
    "LogPiece",
    "MetricSummary",
    "NotFound",
    "Outcome",
    "Platform",
    "Pruned",
    "RetryError",
    "RunNotEnded",
    "RunProgress",
    "RunRow",
    "ScheduleChanged",
    "ScheduleError",
    "ScheduleRow",
    "Stats",
    "Submitted",
    "Tick",
    "WorkflowRow",
    "latest_tick",
    "next_tick",
    "timeout_outcome",
]


class Platform(Schedules, Execution, Retention):
    """The platform's use cases over one database and one artifact store."""
