"""Order the collected tests so that pytest-xdist's workers finish together.

`--dist worksteal` gives worker k the k-th contiguous share of the collection (equal counts),
runs each share front to back, and lets an idle worker take the back half of the longest queue
(by count, not by cost). In the order tests are written, one share can end on a 20 s scenario
that starts when the others are done, and the run waits for it alone.

So, with several workers, the order is made here instead: each test costs what
``tests/durations.json`` says it took (seconds, from a recent run; a test missing from it
costs the median), a module that holds module-scoped fixtures (a server, a browser) stays one
unit so that they start once, and the units are dealt longest first to the share with the
least cost so far that still has room, then each share is ordered longest first. The shares
end with their cheapest tests, which is what the stealing moves.

The order is a pure function of the collection, the file and the number of workers, so every
worker collects the same list (xdist refuses to run otherwise). ``--store-durations`` writes
the durations of the tests it ran into the file (`uv run nox -s tests -- tests
--ignore=tests/smoke --ignore=tests/fuzz --store-durations`).
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")
KEEP_TOGETHER = ("tests/e2e/test_ui_browser.py",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-durations",
        action="store_true",
        help=f"write each test's duration to {DURATIONS.name} when the run ends",
    )


def shares(count: int, workers: int) -> list[int]:
    """How many tests worksteal gives each worker first: ``len // workers_left`` in turn."""
    sizes = []
    for left in range(workers, 0, -1):
        sizes.append(count // left)
        count -= sizes[-1]
    return sizes


def balanced(items: list[pytest.Item], costs: dict[str, float], workers: int) -> list[pytest.Item]:
    """``items`` dealt into ``workers`` shares of worksteal's sizes, equal in cost as far as
    the units allow, each share longest first."""
    known = [costs[item.nodeid] for item in items if item.nodeid in costs]
    default = statistics.median(known) if known else 1.0
    units: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        units[module if module in KEEP_TOGETHER else item.nodeid].append(item)

    def cost(unit: list[pytest.Item]) -> float:
        return sum(costs.get(item.nodeid, default) for item in unit)

    room = shares(len(items), workers)
    bins: list[list[list[pytest.Item]]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for unit in sorted(units.values(), key=lambda unit: (-cost(unit), unit[0].nodeid)):
        fits = [k for k in range(workers) if room[k] >= len(unit)] or range(workers)
        k = min(fits, key=lambda k: (loads[k], k))
        bins[k].append(unit)
        loads[k] += cost(unit)
        room[k] -= len(unit)
    return [item for share in bins for unit in share for item in unit]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or not DURATIONS.exists():
        return
    costs = json.loads(DURATIONS.read_text())
    items[:] = balanced(items, costs, workers)


class _Recorder:
    def __init__(self) -> None:
        self.durations: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.durations[report.nodeid] += report.duration

    def pytest_sessionfinish(self) -> None:
        """Merged into the file: a run of some tests updates theirs and keeps the others."""
        known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        known.update({node: round(seconds, 2) for node, seconds in self.durations.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(known.items())), indent=0) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("store_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Recorder(), "durations-recorder")
