"""The run page's DAG drawing, for any DAG of up to 200 tasks: no edge passes through a box,
boxes never overlap, every edge runs from its source's foot to its own port on its target's
head (so no two arrowheads share a point), and the picture holds everything."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_platform.ui import graphics
from ml_platform.ui.graphics import Dag, TaskNode

pytestmark = pytest.mark.property
STATES = ["succeeded", "failed", "running", "pending"]


@st.composite
def dags(draw: st.DrawFn) -> list[TaskNode]:
    """A topologically ordered DAG: task i's upstreams are among the tasks before it. Some
    draws make wide layers (grids) and edges that skip many layers."""
    count = draw(st.integers(1, 200))
    fan_in = draw(st.integers(0, 5))
    tasks: list[TaskNode] = []
    for i in range(count):
        upstream = draw(st.lists(st.integers(0, i - 1), max_size=fan_in, unique=True)) if i else []
        state = draw(st.sampled_from(STATES))
        tasks.append(TaskNode(f"t{i}", [f"t{u}" for u in upstream], state))
    return tasks


def _crosses_interior(
    a: tuple[float, float], b: tuple[float, float], box: tuple[float, float, float, float]
) -> bool:
    """Whether segment a-b passes through the inside of box (x, y, w, h), borders excluded
    (Liang-Barsky clipping against the box shrunk by half a pixel)."""
    x, y, w, h = box
    left, right, top, bottom = x + 0.5, x + w - 0.5, y + 0.5, y + h - 0.5
    dx, dy = b[0] - a[0], b[1] - a[1]
    lo, hi = 0.0, 1.0
    for p, q in ((-dx, a[0] - left), (dx, right - a[0]), (-dy, a[1] - top), (dy, bottom - a[1])):
        if p == 0:
            if q < 0:
                return False
            continue
        t = q / p
        if p < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
        if lo > hi:
            return False
    return True


def _rects(dag: Dag) -> list[tuple[float, float, float, float]]:
    return [(b.x, b.y, b.w, b.h) for b in dag.boxes if not b.compact] + [
        (b.x, b.y, b.w, b.h) for b in dag.blocks
    ]


# 40 DAGs of up to 200 tasks a run (random ones locally, a fixed set in CI): ~1 s bare,
# ~8 s under coverage on a busy machine; the suite's time is everyone's.
@settings(max_examples=40)
@given(dags())
def test_no_edge_passes_through_a_box_and_arrowheads_do_not_pile_up(tasks: list[TaskNode]) -> None:
    dag = graphics.layout_dag(tasks)
    rects = _rects(dag)
    # Boxes (and grids) never overlap.
    ordered = sorted(rects)
    for i, (x, y, w, h) in enumerate(ordered):
        for x2, y2, w2, h2 in ordered[i + 1 :]:
            if x2 >= x + w:
                break
            assert y2 >= y + h or y >= y2 + h2, ((x, y, w, h), (x2, y2, w2, h2))
    # No segment of any edge goes through the inside of any box or grid.
    for edge in dag.edges:
        assert len(edge.points) >= 2
        for a, b in zip(edge.points, edge.points[1:]):
            top, bottom = min(a[1], b[1]), max(a[1], b[1])
            for rect in rects:
                if rect[1] < bottom and top < rect[1] + rect[3]:
                    assert not _crosses_interior(a, b, rect), (edge.d, rect)
    # Every edge starts on the foot of a box or grid and ends on the head of another, and no
    # two edges end at the same point.
    heads = [edge.points[-1] for edge in dag.edges]
    assert len(set(heads)) == len(heads)
    for edge in dag.edges:
        (x1, y1), (x2, y2) = edge.points[0], edge.points[-1]
        assert any(r[0] < x1 < r[0] + r[2] and y1 == r[1] + r[3] for r in rects), edge.d
        assert any(r[0] < x2 < r[0] + r[2] and y2 == r[1] for r in rects), edge.d
    # One edge per pair of (task or grid) ends: every upstream link is drawn, once.
    unit = {}
    for index, layer in enumerate(graphics.layers_of(tasks)):
        for t in layer:
            unit[t.node_id] = f"grid{index}" if len(layer) > graphics.WIDE_LAYER else t.node_id
    pairs = {(unit[u], unit[t.node_id]) for t in tasks for u in t.upstream}
    assert len(dag.edges) == len(pairs)
    # The picture holds every box and every bend.
    for x, y, w, h in rects:
        assert 0 <= x and x + w <= dag.width and 0 <= y and y + h <= dag.height
    for edge in dag.edges:
        assert all(0 <= x <= dag.width and 0 <= y <= dag.height for x, y in edge.points)


def test_ordering_removes_the_crossing_that_submission_order_makes() -> None:
    tasks = [
        TaskNode("a", [], "succeeded"),
        TaskNode("b", [], "succeeded"),
        TaskNode("under_b", ["b"], "pending"),
        TaskNode("under_a", ["a"], "pending"),
    ]
    x = {b.node_id: b.x for b in graphics.layout_dag(tasks).boxes}
    assert (x["a"] < x["b"]) == (x["under_a"] < x["under_b"])


def test_a_long_edge_bends_beside_the_layer_it_skips() -> None:
    """split → evaluate skips train's layer: its bend point is beside train, not through it."""
    tasks = [
        TaskNode("split", [], "succeeded"),
        TaskNode("train", ["split"], "succeeded"),
        TaskNode("evaluate", ["train", "split"], "succeeded"),
    ]
    dag = graphics.layout_dag(tasks)
    train = next(b for b in dag.boxes if b.node_id == "train")
    [long] = [e for e in dag.edges if len(e.points) > 2]
    bend = long.points[1]
    assert bend[1] == train.y and not (train.x <= bend[0] <= train.x + train.w)
    # Two edges into evaluate: two arrowheads, apart.
    heads = sorted(e.points[-1][0] for e in dag.edges if e.points[-1][1] > train.y)
    assert len(heads) == 2 and heads[1] - heads[0] >= 30
