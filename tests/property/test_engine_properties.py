"""Properties of the engine that must hold for every DAG, failure pattern and policy."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import croniter
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ml_platform.engine.cache import cache_key, canonical_json
from ml_platform.engine.dag import group_outcome, plan, topological_order
from ml_platform.engine.retry import RetryPolicy
from ml_platform.engine.states import TASK_TERMINAL, RunState, TaskState
from ml_platform.service import latest_tick, next_tick

pytestmark = pytest.mark.property


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    """Random DAGs: each task may depend on any task created before it; names shuffled."""
    size = draw(st.integers(min_value=1, max_value=25))
    names = draw(st.permutations([f"t{i}" for i in range(size)]))
    upstream: dict[str, list[str]] = {}
    for index, name in enumerate(names):
        deps = draw(st.sets(st.sampled_from(names[:index]), max_size=4)) if index else set()
        upstream[name] = sorted(deps)
    return upstream


def _ancestors(upstream: dict[str, list[str]], task: str) -> set[str]:
    seen: set[str] = set()
    stack = list(upstream[task])
    while stack:
        dep = stack.pop()
        if dep not in seen:
            seen.add(dep)
            stack.extend(upstream[dep])
    return seen


@given(dags(), st.data())
def test_every_task_runs_once_after_its_upstreams_and_failures_stop_downstream(
    upstream: dict[str, list[str]], data: st.DataObject
) -> None:
    names = list(upstream)
    failing = data.draw(st.sets(st.sampled_from(names)), label="failing")
    skipping = data.draw(st.sets(st.sampled_from(names)), label="skipping") - failing
    order = topological_order(upstream)
    states = dict.fromkeys(names, TaskState.PENDING)
    executed: list[str] = []
    outcome = None
    for _ in range(10 * len(names) + 10):
        decision = plan(order, upstream, states)
        states.update(decision.changes())
        if decision.outcome is not None:
            outcome = decision.outcome
            break
        assert decision.ready, "a run with pending tasks must make progress"
        # Any subset of the ready tasks may finish first, in any order.
        batch = data.draw(st.lists(st.sampled_from(decision.ready), min_size=1, unique=True))
        for task in batch:
            executed.append(task)
            if task in failing:
                states[task] = TaskState.FAILED
            elif task in skipping:
                states[task] = TaskState.SKIPPED
            else:
                states[task] = TaskState.SUCCEEDED
    assert outcome is not None
    assert len(executed) == len(set(executed)), "a task ran twice"
    assert all(state in TASK_TERMINAL for state in states.values())
    position = {task: index for index, task in enumerate(executed)}
    for task in names:
        ups = [states[dep] for dep in upstream[task]]
        if all(state is TaskState.SUCCEEDED for state in ups):
            assert task in position, f"{task} never ran although its upstreams succeeded"
            assert all(position[dep] < position[task] for dep in upstream[task])
            continue
        assert task not in position, f"{task} ran after an upstream did not succeed"
        if any(s in (TaskState.FAILED, TaskState.UPSTREAM_FAILED) for s in ups):
            assert states[task] is TaskState.UPSTREAM_FAILED
        else:
            assert states[task] is TaskState.SKIPPED
        if _ancestors(upstream, task) & set(executed) & failing:
            assert states[task] in (TaskState.UPSTREAM_FAILED, TaskState.SKIPPED)
    ran_and_failed = failing & set(executed)
    assert (outcome is RunState.FAILED) == bool(ran_and_failed)


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    factor = draw(st.floats(min_value=1.0, max_value=10.0))
    base = draw(st.floats(min_value=0.0, max_value=100.0))
    return RetryPolicy(
        retries=draw(st.integers(min_value=0, max_value=50)),
        base_delay=base,
        factor=factor,
        max_delay=draw(st.floats(min_value=base, max_value=10_000.0)),
        jitter=draw(st.floats(min_value=0.0, max_value=factor - 1)),
    )


@given(policies(), st.text(max_size=10))
def test_retry_delays_are_non_decreasing_and_capped(policy: RetryPolicy, seed: str) -> None:
    delays = [policy.delay(n, seed=seed) for n in range(1, 40)]
    assert all(0 <= d <= policy.max_delay for d in delays)
    # Non-decreasing up to floating-point rounding (a factor of 1 + 2e-16 grows by less than
    # the rounding of its own product; below the smallest normal float, a base delay of
    # 5e-324 s, products round by whole steps of 5e-324).
    assert all(a <= b * (1 + 1e-9) + sys.float_info.min for a, b in zip(delays, delays[1:]))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=10,
)


@given(st.sampled_from(["v1", "v2"]), json_values, st.sampled_from(["v1", "v2"]), json_values)
def test_cache_key_changes_iff_code_or_inputs_change(
    code_a: str, inputs_a: Any, code_b: str, inputs_b: Any
) -> None:
    same = code_a == code_b and canonical_json(inputs_a) == canonical_json(inputs_b)
    assert (cache_key("m:t", code_a, inputs_a) == cache_key("m:t", code_b, inputs_b)) == same


@given(dags(), st.data())
def test_mapped_tasks_wait_for_all_their_elements_and_every_run_ends_consistently(
    upstream: dict[str, list[str]], data: st.DataObject
) -> None:
    """The engine's pieces as the service composes them (Platform._advance): plan() for
    the graph, a mapped node expanding into elements that take its upstreams, and
    group_outcome() deciding it once every element ended."""
    names = list(upstream)
    mapped = data.draw(st.sets(st.sampled_from(names)), label="mapped")
    sizes = {m: data.draw(st.integers(0, 4), label=f"size of {m}") for m in sorted(mapped)}
    outcomes = st.sampled_from([TaskState.SUCCEEDED, TaskState.FAILED, TaskState.SKIPPED])
    graph = {name: list(deps) for name, deps in upstream.items()}
    states = dict.fromkeys(names, TaskState.PENDING)
    elements: dict[str, list[str]] = {}
    ended_at: dict[str, int] = {}
    clock = 0
    outcome = None
    for _ in range(20 * len(names) + 20):
        # Settle the mapped tasks whose elements all ended (as Platform._settle_groups).
        for parent, kids in elements.items():
            if states[parent] is TaskState.RUNNING:
                decided = group_outcome([states[k] for k in kids])
                if decided is not None:
                    states[parent] = decided
                    clock += 1
                    ended_at[parent] = clock
        order = topological_order(graph)
        decision = plan(order, graph, states)
        states.update(decision.changes())
        if decision.outcome is not None:
            outcome = decision.outcome
            break
        runnable = []
        for task in decision.ready:
            if task in mapped and task not in elements:  # expand (as Platform._expand)
                kids = [f"{task}[{i}]" for i in range(sizes[task])]
                elements[task] = kids
                for kid in kids:
                    graph[kid] = list(upstream[task])
                    states[kid] = TaskState.PENDING
                states[task] = TaskState.RUNNING
            else:
                runnable.append(task)
        if not runnable:
            continue
        batch = data.draw(st.lists(st.sampled_from(runnable), min_size=1, unique=True))
        for task in batch:
            clock += 1
            ended_at[task] = clock
            states[task] = data.draw(outcomes, label=f"outcome of {task}")
    assert outcome is not None, "the run never ended"
    assert all(state in TASK_TERMINAL for state in states.values())
    for parent, kids in elements.items():
        kid_states = [states[k] for k in kids]
        # Decided only after every element ended.
        assert all(ended_at[k] < ended_at[parent] for k in kids if k in ended_at)
        failed = any(s in (TaskState.FAILED, TaskState.UPSTREAM_FAILED) for s in kid_states)
        assert (states[parent] is TaskState.FAILED) == failed
        if not failed:
            assert states[parent] is TaskState.SUCCEEDED  # skipped elements give None
        for task, deps in upstream.items():
            if (
                parent in deps
                and task in ended_at
                and states[task] is not TaskState.UPSTREAM_FAILED
            ):
                assert ended_at[task] > ended_at[parent], f"{task} ran before {parent} ended"
    any_failed = any(s is TaskState.FAILED for s in states.values())
    assert (outcome is RunState.FAILED) == any_failed


CRONS = [
    "* * * * *",
    "*/7 * * * *",
    "0 3 * * *",
    "15 */2 * * 1-5",
    "0 0 1 * *",
    "5 4 * * sun",
    "0 12 13 * 5",  # the 13th or any Friday: cron's or-rule for the two day fields
    "30 4 29 2 *",  # leap days only
]


def _walked(cron: str, first_due: datetime, now: datetime) -> datetime:
    """The latest tick by now, tick after tick from the first due one."""
    tick = first_due
    while (following := next_tick(cron, tick)) <= now:
        tick = following
    return tick


@given(
    cron=st.sampled_from(CRONS),
    base=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),
    late=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=1)),
)
def test_the_latest_due_tick_is_the_last_one_walked_to(
    cron: str, base: datetime, late: timedelta
) -> None:
    """A schedule due since ``first_due`` fires for its latest tick by now."""
    first_due = next_tick(cron, base.replace(tzinfo=UTC))
    now = first_due + late
    assert latest_tick(cron, first_due, now) == _walked(cron, first_due, now)


def test_a_month_of_missed_ticks_is_not_walked_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler back after a month found an every-minute schedule's latest tick by walking
    43,200 ticks (13 s of its pass, in which it did nothing else); now by one step back."""
    made = []

    class Counted(croniter.croniter):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(croniter, "croniter", Counted)
    now = datetime(2026, 12, 6, 16, 43, 21, 5, tzinfo=UTC)
    first_due = datetime(2026, 11, 6, 16, 44, tzinfo=UTC)
    assert latest_tick("* * * * *", first_due, now) == datetime(2026, 12, 6, 16, 43, tzinfo=UTC)
    assert len(made) <= 2
