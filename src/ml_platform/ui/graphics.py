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
class Edge:
    """A polyline from a port on its source's bottom to a port on its target's top.

    An edge that skips layers bends through one point per layer it crosses (a *dummy* that
    the ordering places like a narrow task), so it never passes through a box.
    """

    points: list[tuple[float, float]]

    @property
    def d(self) -> str:
        """The SVG path."""
        return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in self.points)


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
    edges: list[Edge] = field(default_factory=list)
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


def _summary(layer: list[TaskNode]) -> str:
    counts: dict[str, int] = {}
    for task in layer:
        counts[task.state] = counts.get(task.state, 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda i: -i[1]))
    return f"{len(layer)} tasks: {parts}"


#: The room a long edge takes in a layer it passes, and the gap beside it.
DUMMY_W, DUMMY_GAP = 6.0, 8.0
#: Barycenter sweeps (down and up) when ordering the layers; the best order found is kept.
ORDER_SWEEPS = 8
#: Sweeps of the coordinate assignment (each pulls a unit towards its neighbours' middle).
PLACE_SWEEPS = 6


@dataclass(eq=False)
class _Unit:
    """What the layout places: a task's box, a grid (a wide layer), or a dummy."""

    layer: int
    w: float
    h: float
    box: Box | None = None
    block: Block | None = None
    members: list[Box] = field(default_factory=list)
    ups: list[_Unit] = field(default_factory=list)
    downs: list[_Unit] = field(default_factory=list)
    x: float = 0.0  # the centre

    @property
    def dummy(self) -> bool:
        return self.box is None and self.block is None

    def gap_to(self, right: _Unit) -> float:
        gap = DUMMY_GAP if self.dummy or right.dummy else NODE_GAP
        return (self.w + right.w) / 2 + gap


def _grid(layer: list[TaskNode], index: int) -> _Unit:
    per_row = max(1, int((MAX_WIDTH - 2 * MARGIN) // (CELL + CELL_GAP)))
    grid_rows = -(-len(layer) // per_row)
    width = min(len(layer), per_row) * (CELL + CELL_GAP) - CELL_GAP + 12
    block = Block(0.0, 0.0, width, grid_rows * (CELL + CELL_GAP) + 22, _summary(layer))
    unit = _Unit(index, block.w, block.h, block=block)
    for i, task in enumerate(layer):
        line, col = divmod(i, per_row)
        # Positions relative to the block until it is placed.
        x, y = 6 + col * (CELL + CELL_GAP), 18 + line * (CELL + CELL_GAP)
        box = Box(task.node_id, task.state, x, y, CELL, CELL, True, task.badge, task.detail)
        unit.members.append(box)
    return unit


def _crossings(upper: list[_Unit], position: dict[int, int]) -> int:
    """Crossings between a layer and the next: inversions of the edges' lower ends."""
    ends = sorted((position[id(a)], position[id(b)]) for a in upper for b in a.downs)
    size = max((b for _, b in ends), default=0) + 2
    tree = [0] * size
    count = seen = 0
    for _, b in ends:
        i, below = b + 1, 0  # how many seen so far end at or left of b
        while i > 0:
            below += tree[i]
            i -= i & -i
        count += seen - below
        seen += 1
        i = b + 1
        while i < size:
            tree[i] += 1
            i += i & -i
    return count


def _order(layers: list[list[_Unit]]) -> list[list[_Unit]]:
    """Barycenter sweeps down and up; returns the order with the fewest crossings seen."""

    position = {id(u): i for layer in layers for i, u in enumerate(layer)}

    def total() -> int:
        return sum(_crossings(layer, position) for layer in layers[:-1])

    best = [list(layer) for layer in layers]
    best_count = total()
    for sweep in range(ORDER_SWEEPS):
        if best_count == 0:
            break
        down = sweep % 2 == 0
        indices = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for index in indices:
            layer = layers[index]

            def key(item: tuple[int, _Unit]) -> tuple[float, int]:
                i, unit = item
                near = unit.ups if down else unit.downs
                if not near:
                    return (float(i), i)
                return (sum(position[id(n)] for n in near) / len(near), i)

            layers[index] = [u for _, u in sorted(enumerate(layer), key=key)]
            position.update((id(u), i) for i, u in enumerate(layers[index]))
        count = total()
        if count < best_count:
            best, best_count = [list(layer) for layer in layers], count
    return best


def _isotonic(targets: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``targets`` (weighted least squares; PAV)."""
    pools: list[list[float]] = []  # [weighted sum, weight, length]
    for t, w in zip(targets, weights):
        pools.append([t * w, w, 1])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            total, weight, length = pools.pop()
            pools[-1][0] += total
            pools[-1][1] += weight
            pools[-1][2] += length
    out: list[float] = []
    for total, weight, length in pools:
        out += [total / weight] * int(length)
    return out


def _pull(unit: _Unit, neighbour: _Unit) -> float:
    """How much a neighbour pulls: tasks follow tasks, long edges follow their own line."""
    return 1.0 if unit.dummy == neighbour.dummy else 0.0


def _place_layer(layer: list[_Unit], towards: str) -> None:
    """Move each unit towards the middle of its neighbours ("ups", "downs" or "both"),
    keeping the layer's order and gaps."""
    offsets = [0.0]
    for left, right in zip(layer, layer[1:]):
        offsets.append(offsets[-1] + left.gap_to(right))
    targets, weights = [], []
    for unit, offset in zip(layer, offsets):
        near = {"ups": unit.ups, "downs": unit.downs}.get(towards, unit.ups + unit.downs)
        # A task follows the tasks it links to directly, not the long edges that reach it; a
        # long edge follows itself (a straight line down): neither drifts sideways.
        pull = [_pull(unit, n) for n in near]
        if not sum(pull):  # only long edges reach it: follow them
            pull = [1.0] * len(near)
        weight = sum(pull)
        desired = sum(n.x * w for n, w in zip(near, pull)) / weight if near else unit.x
        targets.append(desired - offset)
        weights.append(weight if near else 0.01)
    for unit, y, offset in zip(layer, _isotonic(targets, weights), offsets):
        unit.x = y + offset


def _ports(count: int, unit: _Unit) -> list[float]:
    if unit.dummy:
        return [unit.x] * count
    left = unit.x - unit.w / 2
    return [left + unit.w * (k + 1) / (count + 1) for k in range(count)]


def layout_dag(tasks: Sequence[TaskNode]) -> Dag:
    """A layered drawing: longest-path layers, wide layers as grids (their edges bundled),
    long edges through dummies, barycenter ordering, centred coordinates, distinct ports."""
    dag = Dag(width=0.0, height=0.0)
    layers: list[list[_Unit]] = []
    unit_of: dict[str, _Unit] = {}
    for index, members in enumerate(layers_of(tasks)):
        if len(members) > WIDE_LAYER:
            grid = _grid(members, index)
            layers.append([grid])
            unit_of.update((box.node_id, grid) for box in grid.members)
            continue
        row = []
        for task in members:
            box = Box(
                task.node_id, task.state, 0.0, 0.0, NODE_W, NODE_H, False, task.badge, task.detail
            )
            unit_of[task.node_id] = _Unit(index, NODE_W, NODE_H, box=box)
            row.append(unit_of[task.node_id])
        layers.append(row)
    # Edges between units (a grid's members share one end), long ones through dummies; the
    # long edges of one source share its dummies (one line down, branching where they end).
    chains: list[list[_Unit]] = []
    drawn: set[tuple[int, int]] = set()
    linked: set[tuple[int, int]] = set()
    bus: dict[tuple[int, int], _Unit] = {}
    for task in tasks:
        target = unit_of[task.node_id]
        for upstream in task.upstream:
            source = unit_of.get(upstream)
            if source is None or (id(source), id(target)) in drawn:
                continue
            drawn.add((id(source), id(target)))
            chain = [source]
            for between in range(source.layer + 1, target.layer):
                dummy = bus.get((id(source), between))
                if dummy is None:
                    dummy = bus[(id(source), between)] = _Unit(between, DUMMY_W, 0.0)
                    layers[between].append(dummy)
                chain.append(dummy)
            chain.append(target)
            for a, b in zip(chain, chain[1:]):
                if (id(a), id(b)) not in linked:
                    linked.add((id(a), id(b)))
                    a.downs.append(b)
                    b.ups.append(a)
            chains.append(chain)
    layers = _order(layers)
    # Coordinates: packed, then pulled towards neighbours (down, up, ...), then both ways.
    for layer in layers:
        x = 0.0
        for i, unit in enumerate(layer):
            x = x if i == 0 else x + layer[i - 1].gap_to(unit)
            unit.x = x
    for sweep in range(PLACE_SWEEPS):
        down = sweep % 2 == 0
        for layer in layers if down else reversed(layers):
            _place_layer(layer, "ups" if down else "downs")
    for layer in layers:
        _place_layer(layer, "both")
    left = min((u.x - u.w / 2 for layer in layers for u in layer), default=0.0)
    heights = [max((u.h for u in layer), default=0.0) for layer in layers]
    tops: list[float] = []
    y = float(MARGIN)
    for height in heights:
        tops.append(y)
        y += height + LAYER_GAP
    bottoms = [top + height for top, height in zip(tops, heights)]
    for layer, top in zip(layers, tops):
        for unit in layer:
            unit.x += MARGIN - left
            x0 = unit.x - unit.w / 2
            if unit.box is not None:
                unit.box.x, unit.box.y = x0, top
                dag.boxes.append(unit.box)
            elif unit.block is not None:
                unit.block.x, unit.block.y = x0, top
                dag.blocks.append(unit.block)
                for box in unit.members:
                    box.x += x0
                    box.y += top
                dag.boxes += unit.members
    # Ports: a unit's edges leave and arrive at distinct points, in the order of their other ends.
    out_port: dict[tuple[int, int], float] = {}
    in_port: dict[tuple[int, int], float] = {}
    for layer in layers:
        for unit in layer:
            downs = sorted(unit.downs, key=lambda n: n.x)
            out_port.update(((id(unit), id(n)), p) for n, p in zip(downs, _ports(len(downs), unit)))
            ups = sorted(unit.ups, key=lambda n: n.x)
            in_port.update(((id(n), id(unit)), p) for n, p in zip(ups, _ports(len(ups), unit)))
    for chain in chains:
        source, target = chain[0], chain[-1]
        x = out_port[(id(source), id(chain[1]))]
        points = [(x, tops[source.layer] + source.h)]
        if source.h < bottoms[source.layer] - tops[source.layer]:
            points.append((x, bottoms[source.layer]))  # down its own column to the layer's foot
        for dummy in chain[1:-1]:
            points += [(dummy.x, tops[dummy.layer]), (dummy.x, bottoms[dummy.layer])]
        points.append((in_port[(id(chain[-2]), id(target))], tops[target.layer]))
        dag.edges.append(Edge(points))
    right = [b.x + b.w for b in dag.boxes] + [b.x + b.w for b in dag.blocks]
    right += [x for edge in dag.edges for x, _ in edge.points]
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
