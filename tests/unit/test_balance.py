"""The order that makes pytest-xdist's workers finish together (tests/balance.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import pytest

from tests.balance import KEEP_TOGETHER, balanced, shares

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Fake:
    nodeid: str


def _items(names: list[str]) -> list[Any]:
    return [Fake(name) for name in names]


def test_shares_are_the_counts_worksteal_hands_out() -> None:
    assert shares(10, 4) == [2, 2, 3, 3]
    assert shares(408, 4) == [102, 102, 102, 102]
    assert sum(shares(7, 3)) == 7


def test_each_share_costs_about_the_same_and_starts_with_its_longest() -> None:
    costs = {f"m.py::t{i}": float(i) for i in range(40)}
    items = _items(list(costs))
    ordered = cast(list[Fake], balanced(cast(Any, items), costs, 4))
    assert sorted(i.nodeid for i in ordered) == sorted(costs)  # nothing lost, nothing twice
    loads, start = [], 0
    for size in shares(40, 4):
        share = [costs[i.nodeid] for i in ordered[start : start + size]]
        start += size
        assert share == sorted(share, reverse=True)
        loads.append(sum(share))
    # 195 s each; in written order the first share would cost 45 s and the last 345 s.
    assert max(loads) - min(loads) <= 1
    assert cast(list[Fake], balanced(cast(Any, items), costs, 4)) == ordered  # every time the same


def test_a_module_with_shared_fixtures_stays_together_and_unknown_tests_cost_the_median() -> None:
    together = KEEP_TOGETHER[0]
    names = [f"{together}::a", "x.py::long", f"{together}::b", "x.py::new", "x.py::short"]
    costs = {f"{together}::a": 3.0, f"{together}::b": 3.0, "x.py::long": 5.0, "x.py::short": 1.0}
    ordered = [i.nodeid for i in cast(list[Fake], balanced(cast(Any, _items(names)), costs, 2))]
    position = ordered.index(f"{together}::a")
    assert ordered[position + 1] == f"{together}::b"  # one unit of 6.0 s, the longest
    assert ordered[0] == f"{together}::a"
    assert set(ordered) == set(names)
