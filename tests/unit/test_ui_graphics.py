"""Layout rules of the UI's pictures: DAG layers and grids, timeline bars, metric charts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ml_platform.ui import graphics
from ml_platform.ui.graphics import AttemptSpan, TaskNode


def _fanout(width: int) -> list[TaskNode]:
    leaves = [TaskNode(f"after[{i}]", ["noop"], "succeeded") for i in range(width)]
    return [
        TaskNode("noop", [], "succeeded"),
        *leaves,
        TaskNode("join", [t.node_id for t in leaves], "running"),
    ]


def test_tasks_sit_one_layer_below_their_lowest_upstream() -> None:
    tasks = [
        TaskNode("a", [], "succeeded"),
        TaskNode("b", ["a"], "running"),
        TaskNode("c", ["a", "b"], "pending"),
        TaskNode("d", [], "pending"),
    ]
    layers = graphics.layers_of(tasks)
    assert [[t.node_id for t in layer] for layer in layers] == [["a", "d"], ["b"], ["c"]]
    dag = graphics.layout_dag(tasks)
    y = {b.node_id: b.y for b in dag.boxes}
    assert y["a"] == y["d"] < y["b"] < y["c"]
    assert len(dag.edges) == 3 and not dag.blocks
    assert all(not b.compact for b in dag.boxes)


def test_a_wide_fan_out_becomes_one_grid_with_bundled_edges() -> None:
    dag = graphics.layout_dag(_fanout(1000))
    assert len(dag.boxes) == 1002
    [block] = dag.blocks
    assert block.caption == "1000 tasks: 1000 succeeded"
    assert sum(b.compact for b in dag.boxes) == 1000
    # 2,000 edges drawn as two: root → grid, grid → join.
    assert len(dag.edges) == 2
    assert dag.width <= graphics.MAX_WIDTH + graphics.MARGIN
    assert all(block.x <= b.x and b.x + b.w <= block.x + block.w for b in dag.boxes if b.compact)


def test_labels_are_shortened_and_readable_on_their_fill() -> None:
    [box] = graphics.layout_dag([TaskNode("a-very-long-task-name[123]", [], "pending")]).boxes
    assert box.label == "a-very-long-task-na…"
    assert box.ink == "#1f2933" and box.fill == graphics.color("pending")
    [dark] = graphics.layout_dag([TaskNode("t", [], "failed")]).boxes
    assert dark.ink == "#ffffff"


def test_the_timeline_shows_retries_side_by_side_and_running_attempts_up_to_now() -> None:
    t0 = datetime(2026, 11, 26, 12, tzinfo=UTC)
    spans = [
        AttemptSpan("load", 1, "succeeded", t0, t0 + timedelta(seconds=2)),
        AttemptSpan(
            "train",
            1,
            "lost",
            t0 + timedelta(seconds=2),
            t0 + timedelta(seconds=5),
            "lease expired",
        ),
        AttemptSpan("train", 2, "running", t0 + timedelta(seconds=6), None),
        AttemptSpan("eval", 1, "queued", None, None),
    ]
    timeline = graphics.layout_timeline(spans, now=t0 + timedelta(seconds=10), width=1000)
    assert [name for _, name in timeline.rows] == ["load", "train"]
    lost, running = [b for b in timeline.bars if b.title.startswith("train")]
    assert lost.y == running.y and lost.x + lost.w < running.x
    assert "lease expired" in lost.title and lost.fill == graphics.color("lost")
    assert running.x + running.w == timeline.width - 20  # runs until now, the right edge
    assert timeline.ticks[0].label == "0" and timeline.ticks[-1].x <= timeline.width


def test_a_metric_chart_has_a_series_per_task_in_run_order() -> None:
    chart = graphics.metric_chart(
        ["r1", "r2"],
        [("r2", "evaluate[0]", 0.9), ("r1", "evaluate[0]", 0.8), ("r1", "evaluate[1]", 0.7)],
    )
    first, second = chart.series
    assert first.name == "evaluate[0]" and [p.x for p in first.points] == sorted(
        p.x for p in first.points
    )
    assert first.points[1].y < first.points[0].y  # higher values are drawn higher
    assert first.path.startswith("M") and " L" in first.path
    assert len(second.points) == 1 and [t.label for t in chart.x_ticks] == ["r1", "r2"]
    assert graphics.metric_chart([], []).series == []


def test_a_mapped_task_is_one_node_with_its_element_count_and_their_states() -> None:
    rows: list[tuple[str, list[str], str, str | None]] = [
        ("shards", [], "succeeded", None),
        ("train", ["shards"], "running", None),
        *[(f"train[{i}]", ["shards"], "succeeded", "train") for i in range(38)],
        ("train[38]", ["shards"], "running", "train"),
        ("train[39]", ["shards"], "failed", "train"),
        ("best", ["train"], "pending", None),
    ]
    nodes = graphics.mapped_nodes(rows)
    assert [n.node_id for n in nodes] == ["shards", "train", "best"]
    train = nodes[1]
    assert train.badge == "×40"
    assert train.detail == "40 elements, 38 succeeded, 1 running, 1 failed"
    dag = graphics.layout_dag(nodes)
    [box] = [b for b in dag.boxes if b.node_id == "train"]
    assert box.label == "train ×40" and not box.compact
    assert len(dag.boxes) == 3


def test_series_are_named_by_the_params_that_differ_between_the_tasks() -> None:
    tasks = ["evaluate[0]", "evaluate[1]", "evaluate[2]", "summary"]
    params = {
        "evaluate[0]": {"model": "logistic_regression", "C": 0.1, "seed": 7},
        "evaluate[1]": {"model": "logistic_regression", "C": 10.0, "seed": 7},
        "evaluate[2]": {"model": "random_forest", "max_depth": 4, "seed": 7},
    }
    names = graphics.series_names(tasks, params)
    assert names == {
        "evaluate[0]": "evaluate[0] · model=logistic_regression, C=0.1",
        "evaluate[1]": "evaluate[1] · model=logistic_regression, C=10.0",
        "evaluate[2]": "evaluate[2] · model=random_forest, max_depth=4",
        "summary": "summary",  # logged no params; seed is the same everywhere: left out
    }
    assert graphics.series_names(["a"], {}) == {"a": "a"}
