"""The watch window's arithmetic: per replica, against its own first sample."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from delivery.watch import Limits, Window, breach, watch

pytestmark = pytest.mark.unit


def metrics(counts: dict[tuple[str, str], float], expiries: float = 0) -> str:
    lines = [
        f'mlp_http_responses_total{{instance="{i}",status_class="{c}"}} {v}'
        for (i, c), v in counts.items()
    ]
    return "\n".join([*lines, f"mlp_lease_expiries_total {expiries}"]) + "\n"


def test_each_replica_is_compared_with_itself() -> None:
    window = Window()
    # Two replicas behind one URL, very different totals: only what happened since counts.
    window.add(metrics({("a", "2xx"): 1000, ("a", "5xx"): 50, ("b", "2xx"): 10}))
    window.add(metrics({("b", "2xx"): 30, ("b", "5xx"): 0}))
    window.add(metrics({("a", "2xx"): 1100, ("a", "5xx"): 50}))
    assert window.responses() == 120 and window.responses("5xx") == 0
    assert breach(window, Limits(60)) is None
    window.add(metrics({("b", "2xx"): 30, ("b", "5xx"): 20}, expiries=0))
    assert breach(window, Limits(60)) == "20 of 140 responses were 5xx (limit 5%)"


def test_lease_expiries_during_the_window_breach() -> None:
    window = Window()
    window.add(metrics({}, expiries=7))
    window.add(metrics({}, expiries=11))
    assert breach(window, Limits(60, max_lease_expiries=3)) == (
        "4 task attempts lost their lease (limit 3)"
    )


def test_watch_polls_until_the_window_ends_or_a_breach() -> None:
    served: list[str] = []
    errors = iter([0, 0, 0, 9])

    def get(url: str, **_: Any) -> httpx.Response:
        served.append(url.rsplit("/", 1)[1])
        if url.endswith("/readyz"):
            return httpx.Response(200, text="ok")
        bad = next(errors)
        return httpx.Response(
            200, text=metrics({("a", "2xx"): 100 + 10 * len(served), ("a", "5xx"): bad})
        )

    found = watch("http://x", Limits(60, interval=0), get=get, sleep=lambda s: None, say=print)
    assert found is not None and "5xx" in found and served.count("readyz") == 4
    down = watch(
        "http://x",
        Limits(60),
        get=lambda url, **_: httpx.Response(503, text='{"status":"not_ready"}'),
        sleep=lambda s: None,
    )
    assert down == '/readyz answered 503: {"status":"not_ready"}'
