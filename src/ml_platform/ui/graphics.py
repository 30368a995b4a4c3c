"""Pictures of runs as data for SVG templates: the DAG, the attempts' timeline, metric charts.

Pure functions over plain values (no database, no HTML), so that every layout rule is tested
on its own. The templates draw what these return; all text goes through Jinja's escaping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Layers wider than this many tasks are drawn as a grid of small squares (a fan-out of 1,000
#: stays one readable block instead of a 140,000-pixel row).
WIDE_LAYER = 12
NODE_W, NODE_H = 150, 34
CELL, CELL_GAP = 14, 4
LAYER_GAP, NODE_GAP, MARGIN = 46, 16, 20
MAX_WIDTH = 1100

STATE_COLORS = {
    "succeeded": "#2e9e5b",
    "cached": "#6cc08b",
    "reused": "#6cc08b",
    "running": "#2f7fd8",
    "queued": "#8fb4e3",
    "pending": "#c9ced6",
    "failed": "#d64545",
    "upstream_failed": "#e89a3c",
    "cancelled": "#6b7280",
    "skipped": "#e2e5ea",
    "lost": "#b06ad6",
}

LIGHT_STATES = frozenset({"pending", "queued", "skipped", "cached", "reused"})


def color(state: str) -> str:
    return STATE_COLORS.get(state, "#c9ced6")


@dataclass(frozen=True)
class TaskNode:
    node_id: str
    upstream: Sequence[str]
    state: str
    #: A mapped task (drawn as one node for all its elements): "×40" and the elements' states.
    badge: str = ""
    detail: str = ""


@dataclass
class Box:
    node_id: str
    state: str
    x: float
    y: float
    w: float
    h: float
    compact: bool  # a square in a wide layer: the label is only its tooltip
    badge: str = ""
    detail: str = ""

    @property
    def fill(self) -> str:
        return color(self.state)

    @property
    def ink(self) -> str:
        """Text colour readable on the fill."""
        return "#1f2933" if self.state in LIGHT_STATES else "#ffffff"

    @property
    def label(self) -> str:
        room = 20 - (len(self.badge) + 1 if self.badge else 0)
        name = self.node_id if len(self.node_id) <= room else self.node_id[: room - 1] + "…"
        return f"{name} {self.badge}" if self.badge else name


@dataclass
class Line:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class Block:
    """The frame around a wide layer, with its caption (e.g. "1000 tasks: 998 succeeded")."""

    x: float
    y: float
    w: float
    h: float
    caption: str


@dataclass
class Dag:
    width: float
    height: float
    boxes: list[Box] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


def layers_of(tasks: Sequence[TaskNode]) -> list[list[TaskNode]]:
    """Longest-path layers (a task sits one below its lowest upstream), in submission order.

    ``tasks`` must come in a topological order (task runs are stored in one).
    """
    depth: dict[str, int] = {}
    for task in tasks:
        depth[task.node_id] = 1 + max((depth.get(u, -1) for u in task.upstream), default=-1)
    layers: list[list[TaskNode]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for task in tasks:
        layers[depth[task.node_id]].append(task)
    return layers


def _order(layer: list[TaskNode], positions: dict[str, float]) -> list[TaskNode]:
    """Barycenter ordering: a task goes under the middle of its upstreams (fewer crossings)."""

    def key(item: tuple[int, TaskNode]) -> tuple[float, int]:
        index, task = item
        known = [positions[u] for u in task.upstream if u in positions]
        return (sum(known) / len(known) if known else float(index), index)

    return [task for _, task in sorted(enumerate(layer), key=key)]


def _summary(layer: list[TaskNode]) -> str:
    counts: dict[str, int] = {}
    for task in layer:
        counts[task.state] = counts.get(task.state, 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda i: -i[1]))
    return f"{len(layer)} tasks: {parts}"


def layout_dag(tasks: Sequence[TaskNode]) -> Dag:
    """Place every task; wide layers become grids; edges into or out of a grid are bundled."""
    dag = Dag(width=0.0, height=0.0)
    where: dict[str, Box] = {}
    block_of: dict[str, Block] = {}
    positions: dict[str, float] = {}
    rows: list[list[Box]] = []
    y = float(MARGIN)
    for layer in layers_of(tasks):
        ordered = _order(layer, positions)
        if len(ordered) > WIDE_LAYER:
            per_row = max(1, int((MAX_WIDTH - 2 * MARGIN) // (CELL + CELL_GAP)))
            grid_rows = -(-len(ordered) // per_row)
            width = min(len(ordered), per_row) * (CELL + CELL_GAP) - CELL_GAP
            block = Block(
                MARGIN - 6, y, width + 12, grid_rows * (CELL + CELL_GAP) + 22, _summary(layer)
            )
            dag.blocks.append(block)
            for i, task in enumerate(ordered):
                line, col = divmod(i, per_row)
                box = Box(
                    task.node_id,
                    task.state,
                    MARGIN + col * (CELL + CELL_GAP),
                    y + 18 + line * (CELL + CELL_GAP),
                    CELL,
                    CELL,
                    True,
                    task.badge,
                    task.detail,
                )
                dag.boxes.append(box)
                where[task.node_id] = box
                block_of[task.node_id] = block
                positions[task.node_id] = box.x
            y += block.h + LAYER_GAP
        else:
            row: list[Box] = []
            for i, task in enumerate(ordered):
                box = Box(
                    task.node_id,
                    task.state,
                    MARGIN + i * (NODE_W + NODE_GAP),
                    y,
                    NODE_W,
                    NODE_H,
                    False,
                    task.badge,
                    task.detail,
                )
                row.append(box)
                where[task.node_id] = box
                positions[task.node_id] = box.x
            dag.boxes += row
            rows.append(row)
            y += NODE_H + LAYER_GAP
    # Centre the narrower layers under the widest one (before the edges are drawn).
    widest = max([b.x + b.w for b in dag.boxes] + [b.x + b.w for b in dag.blocks], default=0.0)
    for row in rows:
        shift = (widest - (row[-1].x + row[-1].w)) / 2
        for box in row:
            box.x += shift
    seen: set[tuple[float, float, float, float]] = set()
    for task in tasks:
        target = where[task.node_id]
        for upstream in task.upstream:
            source = where.get(upstream)
            if source is None:
                continue
            # One edge per pair of (task or grid) ends: a grid's members share one anchor.
            s_block, t_block = block_of.get(upstream), block_of.get(task.node_id)
            x1 = s_block.x + s_block.w / 2 if s_block else source.x + source.w / 2
            y1 = s_block.y + s_block.h if s_block else source.y + source.h
            x2 = t_block.x + t_block.w / 2 if t_block else target.x + target.w / 2
            y2 = t_block.y if t_block else target.y
            key = (x1, y1, x2, y2)
            if key not in seen:
                seen.add(key)
                dag.lines.append(Line(x1, y1, x2, y2))
    right = [b.x + b.w for b in dag.boxes] + [b.x + b.w for b in dag.blocks]
    dag.width = max(right, default=0.0) + MARGIN
    dag.height = max(y - LAYER_GAP + MARGIN, 2 * MARGIN)
    return dag


@dataclass(frozen=True)
class AttemptSpan:
    node_id: str
    number: int
    state: str
    started: datetime | None
    finished: datetime | None
    error: str | None = None


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    state: str
    title: str

    @property
    def fill(self) -> str:
        return color(self.state)


@dataclass
class Tick:
    x: float
    label: str


@dataclass
class Timeline:
    width: float
    height: float
    label_width: float
    rows: list[tuple[float, str]] = field(default_factory=list)  # (y, task) of each row
    bars: list[Bar] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)


def _nice_step(span: float, count: int = 6) -> float:
    raw = span / count
    for step in (
        0.01,
        0.02,
        0.05,
        0.1,
        0.2,
        0.5,
        1,
        2,
        5,
        10,
        15,
        30,
        60,
        120,
        300,
        600,
        1800,
        3600,
        7200,
        21600,
        43200,
        86400,
    ):
        if step >= raw:
            return float(step)
    return 86400.0 * (raw // 86400 + 1)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def layout_timeline(
    attempts: Sequence[AttemptSpan], now: datetime, width: float = 1000
) -> Timeline:
    """A Gantt chart: a row per task, a bar per attempt (retries and lost ones side by side)."""
    started = [a for a in attempts if a.started is not None]
    label_width = 160.0
    if not started:
        return Timeline(width, 40.0, label_width)
    origin = min(a.started for a in started if a.started is not None)
    end = max((a.finished or now) for a in started)
    span = max((end - origin).total_seconds(), 0.001)
    plot = width - label_width - 20
    order: list[str] = []
    for attempt in sorted(started, key=lambda a: (a.started, a.node_id)):
        if attempt.node_id not in order:
            order.append(attempt.node_id)
    row_h = 18.0 if len(order) <= 60 else max(3.0, 1000.0 / len(order))
    top = 24.0
    timeline = Timeline(width, top + row_h * len(order) + 10, label_width)
    row_of = {node: i for i, node in enumerate(order)}
    if row_h >= 10:
        timeline.rows = [(top + i * row_h, node) for i, node in enumerate(order)]
    for attempt in started:
        assert attempt.started is not None  # nosec B101 - filtered above
        begin = (attempt.started - origin).total_seconds()
        finish = ((attempt.finished or now) - origin).total_seconds()
        x = label_width + begin / span * plot
        w = max(2.0, (finish - begin) / span * plot)
        title = (
            f"{attempt.node_id} attempt {attempt.number}: {attempt.state}, "
            f"{_duration(finish - begin)}" + (f" ({attempt.error})" if attempt.error else "")
        )
        timeline.bars.append(
            Bar(
                x,
                top + row_of[attempt.node_id] * row_h + 1,
                w,
                max(2.0, row_h - 3),
                attempt.state,
                title,
            )
        )
    step = _nice_step(span)
    t = 0.0
    while t <= span + 1e-9:
        timeline.ticks.append(Tick(label_width + t / span * plot, _duration(t) if t else "0"))
        t += step
    return timeline


@dataclass
class Point:
    x: float
    y: float
    title: str


@dataclass
class Series:
    name: str
    color: str
    points: list[Point] = field(default_factory=list)

    @property
    def path(self) -> str:
        return " ".join(
            f"{'M' if i == 0 else 'L'}{p.x:.1f},{p.y:.1f}" for i, p in enumerate(self.points)
        )


@dataclass
class Chart:
    width: float
    height: float
    series: list[Series] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)


PALETTE = ["#2f7fd8", "#2e9e5b", "#d64545", "#e89a3c", "#8e5bd6", "#1aa3a3", "#c9488f", "#6b7280"]


def metric_chart(
    runs: Sequence[str],
    values: Sequence[tuple[str, str, float]],
    width: float = 900,
    height: float = 320,
) -> Chart:
    """One metric across runs: x = the runs in order, a series per task that logged it.

    ``values`` holds (run label, task, value); ``runs`` orders the x axis.
    """
    chart = Chart(width, height)
    if not values or not runs:
        return chart
    left, right, top, bottom = 60.0, 20.0, 16.0, 40.0
    low = min(v for _, _, v in values)
    high = max(v for _, _, v in values)
    if high == low:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.08
    low, high = low - pad, high + pad
    x_of = {
        run: left + (i + 0.5) * (width - left - right) / len(runs) for i, run in enumerate(runs)
    }

    def y_of(value: float) -> float:
        return top + (high - value) / (high - low) * (height - top - bottom)

    by_task: dict[str, Series] = {}
    for run, task, value in values:
        series = by_task.get(task)
        if series is None:
            series = Series(task, PALETTE[len(by_task) % len(PALETTE)])
            by_task[task] = series
        series.points.append(Point(x_of[run], y_of(value), f"{task} in {run}: {value:.4g}"))
    for series in by_task.values():
        series.points.sort(key=lambda p: p.x)
    chart.series = list(by_task.values())
    chart.x_ticks = [Tick(x, run) for run, x in x_of.items()]
    step = (high - low) / 4
    chart.y_ticks = [(y_of(low + i * step), f"{low + i * step:.3g}") for i in range(5)]
    return chart


def mapped_nodes(
    tasks: Sequence[tuple[str, Sequence[str], str, str | None]],
) -> list[TaskNode]:
    """The DAG's nodes from (node id, upstream, state, mapped task it is an element of).

    A mapped task's elements are drawn as its one node: ``×N`` and, in its tooltip, how many
    elements are in which state. A fan-out of 500 elements stays one readable node.
    """
    elements: dict[str, list[str]] = {}
    for _, _, state, parent in tasks:
        if parent is not None:
            elements.setdefault(parent, []).append(state)
    nodes = []
    for node_id, upstream, state, parent in tasks:
        if parent is not None:
            continue
        states = elements.get(node_id)
        if states is None:
            nodes.append(TaskNode(node_id, upstream, state))
            continue
        counts: dict[str, int] = {}
        for element in states:
            counts[element] = counts.get(element, 0) + 1
        detail = f"{len(states)} elements" + "".join(
            f", {count} {name}" for name, count in sorted(counts.items(), key=lambda c: -c[1])
        )
        nodes.append(TaskNode(node_id, upstream, state, f"×{len(states)}", detail))
    return nodes


def series_names(tasks: Sequence[str], params: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """A name per task for a chart: the task and the params it logged that differ between
    the tasks ("evaluate[2] · model=random_forest, max_depth=4"); the same params everywhere
    say nothing and are left out."""
    keys: list[str] = []
    for task in tasks:
        keys += [k for k in params.get(task, {}) if k not in keys]
    logging = [t for t in tasks if params.get(t)]  # a task that logged none is no evidence
    differing = [
        key
        for key in keys
        if len({json.dumps(params[t].get(key), sort_keys=True) for t in logging}) > 1
    ]
    names = {}
    for task in tasks:
        own = params.get(task, {})
        shown = ", ".join(f"{k}={own[k]}" for k in differing if k in own)
        names[task] = f"{task} · {shown}" if shown else task
    return names
