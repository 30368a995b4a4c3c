"""Dynamic fan-out: `task.map` over a list a task computed, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_platform.engine.states import RunState, TaskState
from ml_platform.service import Platform
from tests import workflows
from tests.helpers import execute, run_inline

pytestmark = pytest.mark.integration


def _tasks(platform: Platform, run_id: str) -> dict[str, object]:
    return {t.node_id: t for t in platform.task_runs(run_id)}


def _marks(folder: Path, item: int) -> int:
    return len(list(folder.glob(f"shard{item}-*")))


@pytest.mark.parametrize("n", [0, 1, 40])
def test_a_mapped_task_runs_once_per_element_of_a_computed_list_into_a_fan_in(
    platform: Platform, tmp_path: Path, n: int
) -> None:
    submitted = platform.submit(workflows.mapped, {"n": n, "folder": str(tmp_path)})
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    elements = sorted((k for k in tasks if k.startswith("shard_work[")), key=len)
    assert len(elements) == n
    assert all(tasks[e].state == TaskState.SUCCEEDED for e in elements)
    assert [tasks[f"shard_work[{i}]"].result for i in range(n)] == [
        {"value": i * 10} for i in range(n)
    ]
    assert tasks["shard_work"].state == TaskState.SUCCEEDED
    assert tasks["gather"].result == {"value": {"count": n, "sum": 10 * sum(range(n))}}
    assert [_marks(tmp_path, i) for i in range(n)] == [1] * n  # each element ran once


def test_two_hundred_elements_fan_in_in_order(platform: Platform, tmp_path: Path) -> None:
    """Two hundred elements (the bench maps 10,000: `nox -s bench -- map`)."""
    n = 200
    submitted = platform.submit(workflows.mapped, {"n": n, "folder": str(tmp_path)})
    assert len(submitted.queued) == 1  # shards: the elements do not exist before it ran
    assert run_inline(platform, submitted.run_id, rounds=400) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert len(tasks) == 3 + n
    assert tasks["gather"].result == {"value": {"count": n, "sum": 10 * sum(range(n))}}
    # In order: element i is shard_work[i] and its result is the i-th element's.
    assert [tasks[f"shard_work[{i}]"].result for i in (0, 1, n - 1)] == [
        {"value": 10 * i} for i in (0, 1, n - 1)
    ]


def test_a_failing_element_is_retried_and_a_second_run_takes_every_element_from_the_cache(
    platform: Platform, tmp_path: Path
) -> None:
    params = {"n": 3, "folder": str(tmp_path), "fail": 1}
    first = platform.submit(workflows.mapped, params)
    assert run_inline(platform, first.run_id) is RunState.SUCCEEDED
    attempts = [a for a in platform.attempts(first.run_id)]
    by_task = {t.id: t.node_id for t in platform.task_runs(first.run_id)}
    numbers = sorted((by_task[a.task_run_id], a.number, a.state) for a in attempts)
    assert ("shard_work[1]", 1, "failed") in numbers and (
        "shard_work[1]",
        2,
        "succeeded",
    ) in numbers
    assert [_marks(tmp_path, i) for i in range(3)] == [1, 2, 1]

    second = platform.submit(workflows.mapped, params)
    assert run_inline(platform, second.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(second.run_id)}
    assert [tasks[f"shard_work[{i}]"].state for i in range(3)] == ["cached"] * 3
    assert [_marks(tmp_path, i) for i in range(3)] == [1, 2, 1]  # nothing ran again
    assert tasks["gather"].result == {"value": {"count": 3, "sum": 30}}


def test_an_element_that_keeps_failing_fails_the_mapped_task_once_all_elements_ended(
    platform: Platform, tmp_path: Path
) -> None:
    params = {"n": 4, "folder": str(tmp_path), "fail": 2, "fail_times": 5}
    submitted = platform.submit(workflows.mapped, params)
    assert run_inline(platform, submitted.run_id) is RunState.FAILED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["shard_work[2]"].state == TaskState.FAILED
    # The other elements were not stopped by it: the decision waited for all of them.
    assert [tasks[f"shard_work[{i}]"].state for i in (0, 1, 3)] == ["succeeded"] * 3
    assert tasks["shard_work"].state == TaskState.FAILED
    assert tasks["shard_work"].error == "1 of 4 elements failed: shard_work[2]"
    assert tasks["gather"].state == TaskState.UPSTREAM_FAILED
    assert tasks["gather"].error == "not run: its upstream shard_work failed"


def test_a_literal_list_may_hold_results_and_a_skipped_element_gives_none(
    platform: Platform, tmp_path: Path
) -> None:
    submitted = platform.submit(workflows.mapped_literal, {"folder": str(tmp_path)})
    assert run_inline(platform, submitted.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["shard_work[1]"].state == TaskState.SKIPPED
    assert tasks["shard_work"].state == TaskState.SUCCEEDED
    assert tasks["gather"].result == {"value": {"count": 3, "sum": 20 + 40}}


def test_mapping_over_something_that_is_not_a_list_fails_with_a_clear_message(
    platform: Platform, tmp_path: Path
) -> None:
    submitted = platform.submit(workflows.mapped_over_a_number, {"folder": str(tmp_path)})
    assert run_inline(platform, submitted.run_id) is RunState.FAILED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["shard_work"].error == "cannot map over the result of double: not a list"
    assert tasks["gather"].state == TaskState.UPSTREAM_FAILED


def test_a_list_longer_than_the_limit_fails_the_mapped_task_and_creates_nothing(
    platform: Platform, tmp_path: Path
) -> None:
    platform.settings.max_map_size = 5
    submitted = platform.submit(workflows.mapped, {"n": 6, "folder": str(tmp_path)})
    assert run_inline(platform, submitted.run_id) is RunState.FAILED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert set(tasks) == {"shards", "shard_work", "gather"}
    assert tasks["shard_work"].error == (
        "shard_work would expand into 6 elements, more than MLP_MAX_MAP_SIZE=5"
    )


def test_max_concurrency_caps_the_elements_that_run_at_once(
    platform: Platform, tmp_path: Path
) -> None:
    submitted = platform.submit(workflows.mapped, {"n": 6, "folder": str(tmp_path), "limit": 2})
    [(shards_attempt, _)] = submitted.queued
    claimed = platform.claim(shards_attempt, "w")
    assert claimed is not None
    after = platform.finish(claimed, "w", execute(platform, claimed))
    assert len(after) == 2  # six elements, two queued
    seen_at_once = 0
    for _ in range(50):
        tasks = platform.task_runs(submitted.run_id)
        active = [
            t
            for t in tasks
            if t.node_id.startswith("shard_work[") and t.state in ("queued", "running")
        ]
        seen_at_once = max(seen_at_once, len(active))
        if platform.run(submitted.run_id)[0].state == RunState.SUCCEEDED:
            break
        for attempt_id, _ in platform.schedule(submitted.run_id):
            got = platform.claim(attempt_id, "w")
            if got is not None:
                platform.finish(got, "w", execute(platform, got))
    assert platform.run(submitted.run_id)[0].state == RunState.SUCCEEDED
    assert seen_at_once == 2


def test_retry_reruns_only_the_elements_that_failed(platform: Platform, tmp_path: Path) -> None:
    params = {"n": 4, "folder": str(tmp_path), "fail": 2, "fail_times": 2}
    failed = platform.submit(workflows.mapped, params)
    assert run_inline(platform, failed.run_id) is RunState.FAILED  # 2 runs, both failed
    assert [_marks(tmp_path, i) for i in range(4)] == [1, 1, 2, 1]
    retried = platform.retry(failed.run_id)
    assert run_inline(platform, retried.run_id) is RunState.SUCCEEDED
    assert [_marks(tmp_path, i) for i in range(4)] == [1, 1, 3, 1]  # only element 2 ran
    tasks = {t.node_id: t for t in platform.task_runs(retried.run_id)}
    assert [tasks[f"shard_work[{i}]"].state for i in range(4)] == [
        "reused",
        "reused",
        "succeeded",
        "reused",
    ]
    assert tasks["gather"].result == {"value": {"count": 4, "sum": 60}}
    # From the mapped task: every element runs again (the cache is per element: they are
    # cached hits now, which is what a rerun of unchanged code should be).
    again = platform.retry(retried.run_id, from_task="shard_work")
    assert run_inline(platform, again.run_id) is RunState.SUCCEEDED
    tasks = {t.node_id: t for t in platform.task_runs(again.run_id)}
    assert [tasks[f"shard_work[{i}]"].state for i in range(4)] == ["cached"] * 4
    assert tasks["shard_work"].state == TaskState.SUCCEEDED


def test_cancelling_a_run_mid_map_cancels_the_waiting_elements_and_the_mapped_task(
    platform: Platform, tmp_path: Path
) -> None:
    submitted = platform.submit(workflows.mapped, {"n": 5, "folder": str(tmp_path), "limit": 1})
    [(first, _)] = submitted.queued
    claimed = platform.claim(first, "w")
    assert claimed is not None
    platform.finish(claimed, "w", execute(platform, claimed))
    assert platform.cancel(submitted.run_id) is RunState.CANCELLED
    tasks = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert tasks["shard_work"].state == TaskState.CANCELLED
    assert tasks["gather"].state == TaskState.CANCELLED
    assert {tasks[f"shard_work[{i}]"].state for i in range(5)} == {"cancelled"}
