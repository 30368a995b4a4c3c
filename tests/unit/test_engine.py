"""The pure engine: DAG validation, planning, state machines, retry schedules, cache keys."""

from __future__ import annotations

import math

import pytest

from ml_platform.engine.cache import UnserializableInput, cache_key, canonical_json
from ml_platform.engine.dag import DagError, plan, topological_order
from ml_platform.engine.retry import RetryPolicy
from ml_platform.engine.states import (
    ATTEMPT_TRANSITIONS,
    RUN_TRANSITIONS,
    TASK_TRANSITIONS,
    AttemptState,
    InvalidTransition,
    RunState,
    TaskState,
    check_transition,
    sources_of,
)

pytestmark = pytest.mark.unit


def test_topological_order_puts_upstreams_first() -> None:
    graph = {"train": ["split"], "split": ["load"], "load": [], "report": ["train", "load"]}
    order = topological_order(graph)
    assert order.index("load") < order.index("split") < order.index("train") < order.index("report")


def test_cycle_is_reported_with_its_tasks_in_data_flow_order() -> None:
    # b consumes a, c consumes b, a consumes c: a -> b -> c -> a.
    with pytest.raises(DagError) as info:
        topological_order({"d": [], "a": ["c"], "b": ["a"], "c": ["b"]})
    message = str(info.value)
    assert message.startswith("cycle between tasks: ")
    path = message.removeprefix("cycle between tasks: ").split(" -> ")
    assert path[0] == path[-1] and sorted(path[:-1]) == ["a", "b", "c"]
    rotated = path[path.index("a") :] + path[1 : path.index("a") + 1]
    assert rotated == ["a", "b", "c", "a"]


def test_unknown_reference_names_the_task() -> None:
    with pytest.raises(DagError, match="task 'train' depends on unknown task 'splitt'"):
        topological_order({"train": ["splitt"], "split": []})


def test_self_dependency_is_rejected() -> None:
    with pytest.raises(DagError, match="depends on itself"):
        topological_order({"a": ["a"]})


def test_deep_chain_does_not_hit_the_recursion_limit() -> None:
    graph = {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(5000)}
    assert topological_order(graph)[:3] == ["t0", "t1", "t2"]


def test_plan_cascades_failure_and_skips_and_finishes_run() -> None:
    upstream = {"a": [], "b": ["a"], "c": ["b"], "d": [], "e": ["d"]}
    order = topological_order(upstream)
    states = {
        "a": TaskState.FAILED,
        "b": TaskState.PENDING,
        "c": TaskState.PENDING,
        "d": TaskState.SKIPPED,
        "e": TaskState.PENDING,
    }
    decision = plan(order, upstream, states)
    assert decision.upstream_failed == ["b", "c"]
    assert decision.skipped == ["e"]
    assert decision.ready == []
    assert decision.outcome is RunState.FAILED


def test_plan_readies_tasks_whose_upstreams_succeeded_or_were_cached() -> None:
    upstream = {"a": [], "b": [], "c": ["a", "b"]}
    states = {"a": TaskState.SUCCEEDED, "b": TaskState.CACHED, "c": TaskState.PENDING}
    decision = plan(["a", "b", "c"], upstream, states)
    assert decision.ready == ["c"] and decision.outcome is None


def test_plan_waits_for_running_upstreams() -> None:
    upstream = {"a": [], "b": ["a"], "c": ["a", "d"], "d": []}
    states = {
        "a": TaskState.RUNNING,
        "b": TaskState.PENDING,
        "c": TaskState.PENDING,
        "d": TaskState.FAILED,
    }
    decision = plan(["a", "d", "b", "c"], upstream, states)
    # c already has a failed upstream, but is decided only once a has ended too.
    assert decision.ready == [] and decision.changes() == {} and decision.outcome is None


def test_cancel_requested_cancels_everything_pending() -> None:
    upstream = {"a": [], "b": ["a"]}
    decision = plan(
        ["a", "b"],
        upstream,
        {"a": TaskState.SUCCEEDED, "b": TaskState.PENDING},
        cancel_requested=True,
    )
    assert decision.cancelled == ["b"] and decision.outcome is RunState.CANCELLED


def test_all_succeeded_or_skipped_is_success() -> None:
    states = {"a": TaskState.SUCCEEDED, "b": TaskState.SKIPPED}
    assert plan(["a", "b"], {"a": [], "b": []}, states).outcome is RunState.SUCCEEDED


def test_state_machines() -> None:
    check_transition(TASK_TRANSITIONS, TaskState.PENDING, TaskState.QUEUED)
    check_transition(RUN_TRANSITIONS, RunState.QUEUED, RunState.RUNNING)
    check_transition(ATTEMPT_TRANSITIONS, AttemptState.RUNNING, AttemptState.LOST)
    with pytest.raises(InvalidTransition, match="cannot go from succeeded to running"):
        check_transition(TASK_TRANSITIONS, TaskState.SUCCEEDED, TaskState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition(ATTEMPT_TRANSITIONS, AttemptState.LOST, AttemptState.RUNNING)
    assert sources_of(ATTEMPT_TRANSITIONS, AttemptState.LOST) == {
        AttemptState.QUEUED,  # its dispatch was dead-lettered
        AttemptState.RUNNING,
    }
    assert TaskState.PENDING in sources_of(TASK_TRANSITIONS, TaskState.CACHED)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries must be >= 0"),
        ({"base_delay": -1}, "base delay must be >= 0"),
        ({"factor": 0.5}, "factor must be >= 1"),
        ({"base_delay": 5, "max_delay": 1}, "max delay"),
        ({"factor": 1.5, "jitter": 0.9}, "jitter must be between 0 and factor - 1"),
    ],
)
def test_retry_policy_rejects_bad_numbers(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]  # ints and floats mixed on purpose


def test_retry_delays_grow_then_cap() -> None:
    policy = RetryPolicy(retries=10, base_delay=1, factor=2, max_delay=10, jitter=0)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.may_retry(10) and not policy.may_retry(11)
    assert RetryPolicy(base_delay=1, factor=10, max_delay=5).delay(10_000) == 5
    with pytest.raises(ValueError, match="retry number"):
        policy.delay(0)


def test_retry_jitter_is_reproducible_per_seed() -> None:
    policy = RetryPolicy(retries=3, base_delay=1, factor=2, max_delay=60, jitter=0.5)
    assert policy.delay(2, seed="run:task") == policy.delay(2, seed="run:task")
    assert 2 <= policy.delay(2, seed="x") < 3


def test_canonical_json_and_unserializable_values() -> None:
    assert canonical_json({"b": 1, "a": [1, 2.5, None, True]}) == '{"a":[1,2.5,null,true],"b":1}'
    with pytest.raises(UnserializableInput, match=r"value\['x'\] is a builtins.set"):
        canonical_json({"x": {1, 2}})
    with pytest.raises(UnserializableInput, match="JSON cannot represent"):
        canonical_json(math.nan)
    with pytest.raises(UnserializableInput, match="keys must be strings"):
        canonical_json({1: "a"})


def test_cache_key_depends_on_task_code_and_inputs() -> None:
    base = cache_key("m:f", "v1", {"args": [1]})
    assert base == cache_key("m:f", "v1", {"args": [1]})
    assert base != cache_key("m:f", "v2", {"args": [1]})
    assert base != cache_key("m:f", "v1", {"args": [2]})
    assert base != cache_key("m:g", "v1", {"args": [1]})
