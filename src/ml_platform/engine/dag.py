"""DAG validation and planning: which tasks may run next, and how a run ends."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ml_platform.engine.states import TASK_DONE_OK, TASK_TERMINAL, RunState, TaskState


class DagError(ValueError):
    """The workflow's graph is not a valid DAG; the message names the task at fault."""


def topological_order(upstream: Mapping[str, Sequence[str]]) -> list[str]:
    """Validate the graph and return its tasks in an order where upstreams come first.

    ``upstream`` maps every task id to the ids it depends on. Raises DagError for a
    reference to an unknown task or for a cycle, naming the tasks involved.
    """
    for task_id, deps in upstream.items():
        for dep in deps:
            if dep not in upstream:
                raise DagError(f"task {task_id!r} depends on unknown task {dep!r}")
            if dep == task_id:
                raise DagError(f"task {task_id!r} depends on itself")
    order: list[str] = []
    # 0 = unvisited, 1 = on the current path, 2 = done. Iterative DFS: deep chains must not
    # hit the recursion limit.
    mark = dict.fromkeys(upstream, 0)
    for root in upstream:
        if mark[root]:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        mark[root] = 1
        while stack:
            node, index = stack[-1]
            deps = upstream[node]
            if index < len(deps):
                stack[-1] = (node, index + 1)
                dep = deps[index]
                if mark[dep] == 1:
                    path = [name for name, _ in stack]
                    cycle = path[path.index(dep) :] + [dep]
                    raise DagError("cycle between tasks: " + " -> ".join(reversed(cycle)))
                if mark[dep] == 0:
                    mark[dep] = 1
                    stack.append((dep, 0))
            else:
                stack.pop()
                mark[node] = 2
                order.append(node)
    return order


@dataclass
class Plan:
    """What the scheduler should do next for one run, given its task states."""

    ready: list[str] = field(default_factory=list)
    upstream_failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    #: The run's final state once every task is terminal, else None.
    outcome: RunState | None = None

    def changes(self) -> dict[str, TaskState]:
        """Terminal states decided by this plan, by task id."""
        decided: dict[str, TaskState] = {}
        for ids, state in (
            (self.upstream_failed, TaskState.UPSTREAM_FAILED),
            (self.skipped, TaskState.SKIPPED),
            (self.cancelled, TaskState.CANCELLED),
        ):
            decided.update(dict.fromkeys(ids, state))
        return decided


def plan(
    order: Sequence[str],
    upstream: Mapping[str, Sequence[str]],
    states: Mapping[str, TaskState],
    *,
    cancel_requested: bool = False,
) -> Plan:
    """Decide the next step of a run.

    ``order`` is a topological order of the tasks (see topological_order). A pending task
    whose upstreams all succeeded (or were cached) is ready; one with a failed upstream
    becomes upstream_failed, with a skipped upstream skipped, and everything pending is
    cancelled when the run's cancellation was requested. A task is decided only once all its
    upstreams have ended, so the outcome never depends on which one ended first. Decisions
    cascade downstream within one call.
    """
    result = Plan()
    effective = dict(states)
    for task_id in order:
        if effective[task_id] != TaskState.PENDING:
            continue
        deps = [effective[dep] for dep in upstream[task_id]]
        decided: TaskState | None = None
        if cancel_requested:
            decided = TaskState.CANCELLED
            result.cancelled.append(task_id)
        elif all(s in TASK_DONE_OK for s in deps):
            result.ready.append(task_id)
        elif not all(s in TASK_TERMINAL for s in deps):
            # Decide only once every upstream has ended, so that the outcome does not depend
            # on which upstream happened to end first.
            pass
        elif any(s in (TaskState.FAILED, TaskState.UPSTREAM_FAILED) for s in deps):
            decided = TaskState.UPSTREAM_FAILED
            result.upstream_failed.append(task_id)
        elif any(s is TaskState.CANCELLED for s in deps):
            decided = TaskState.CANCELLED
            result.cancelled.append(task_id)
        else:
            decided = TaskState.SKIPPED
            result.skipped.append(task_id)
        if decided is not None:
            effective[task_id] = decided
    if all(s in TASK_TERMINAL for s in effective.values()):
        result.outcome = run_outcome(effective.values(), cancel_requested=cancel_requested)
    return result


def run_outcome(states: Iterable[TaskState], *, cancel_requested: bool) -> RunState:
    """The final state of a run whose tasks are all terminal."""
    final = list(states)
    if cancel_requested or TaskState.CANCELLED in final:
        return RunState.CANCELLED
    if TaskState.FAILED in final or TaskState.UPSTREAM_FAILED in final:
        return RunState.FAILED
    return RunState.SUCCEEDED


def group_outcome(elements: Sequence[TaskState]) -> TaskState | None:
    """The state of a mapped task once its elements are decided, else None.

    It waits for every element, so the outcome never depends on which ended first. A failed
    (or upstream-failed) element fails it, else a cancelled one cancels it; otherwise it
    succeeds -- with no elements too -- and an element that raised Skip counts as a ``None``
    result, so that one skipped grid point does not stop the evaluation of the others.
    """
    if not all(state in TASK_TERMINAL for state in elements):
        return None
    if any(state in (TaskState.FAILED, TaskState.UPSTREAM_FAILED) for state in elements):
        return TaskState.FAILED
    if TaskState.CANCELLED in elements:
        return TaskState.CANCELLED
    return TaskState.SUCCEEDED
