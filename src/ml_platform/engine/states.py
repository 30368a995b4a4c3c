"""The run, task and attempt state machines, and the transitions each allows."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    CACHED = "cached"
    #: Succeeded in the run this one retries (`mlp retry`): its result, metrics and artifacts
    #: are taken over, it does not run again.
    REUSED = "reused"
    UPSTREAM_FAILED = "upstream_failed"


class AttemptState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    CANCELLED = "cancelled"


S = TypeVar("S", "RunState", "TaskState", "AttemptState")

RUN_TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})
TASK_TERMINAL = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.CANCELLED,
        TaskState.SKIPPED,
        TaskState.CACHED,
        TaskState.REUSED,
        TaskState.UPSTREAM_FAILED,
    }
)
#: Terminal task states whose result downstream tasks may consume.
TASK_DONE_OK = frozenset({TaskState.SUCCEEDED, TaskState.CACHED, TaskState.REUSED})
ATTEMPT_TERMINAL = frozenset(
    {AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.LOST, AttemptState.CANCELLED}
)

RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    # A run whose tasks all come from the cache succeeds without ever running.
    RunState.QUEUED: frozenset(
        {RunState.RUNNING, RunState.SUCCEEDED, RunState.CANCELLED, RunState.FAILED}
    ),
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED}),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
}

TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    # A mapped task runs (as the group of its elements) from the moment it expands, and
    # fails at once when its items cannot be mapped over.
    TaskState.PENDING: frozenset(
        {
            TaskState.QUEUED,
            TaskState.RUNNING,
            TaskState.FAILED,
            TaskState.CACHED,
            TaskState.REUSED,
            TaskState.SKIPPED,
            TaskState.UPSTREAM_FAILED,
            TaskState.CANCELLED,
        }
    ),
    # A queued task goes back to queued when a retry attempt is scheduled.
    TaskState.QUEUED: frozenset(
        {TaskState.QUEUED, TaskState.RUNNING, TaskState.CANCELLED, TaskState.FAILED}
    ),
    TaskState.RUNNING: frozenset(
        {
            TaskState.QUEUED,
            TaskState.SUCCEEDED,
            TaskState.FAILED,
            TaskState.CANCELLED,
            TaskState.SKIPPED,
        }
    ),
    **{state: frozenset() for state in TASK_TERMINAL},
}

ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    # A queued attempt is lost when its dispatch is dead-lettered (delivered to dead workers).
    AttemptState.QUEUED: frozenset(
        {AttemptState.RUNNING, AttemptState.CANCELLED, AttemptState.LOST}
    ),
    AttemptState.RUNNING: frozenset(
        {AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.LOST, AttemptState.CANCELLED}
    ),
    **{state: frozenset() for state in ATTEMPT_TERMINAL},
}


class InvalidTransition(ValueError):
    """A state change that the state machine does not allow."""


def check_transition(table: Mapping[S, frozenset[S]], current: S, target: S) -> None:
    """Raise InvalidTransition unless ``current -> target`` is allowed by ``table``."""
    if target not in table[current]:
        raise InvalidTransition(f"cannot go from {current.value} to {target.value}")


def sources_of(table: Mapping[S, frozenset[S]], target: S) -> frozenset[S]:
    """Every state from which ``target`` may be reached in one step (for guarded updates)."""
    return frozenset(state for state, targets in table.items() if target in targets)
