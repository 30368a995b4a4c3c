"""The watch window's arithmetic: per replica, against its own first sample."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def test_a_watch_polls_over_one_connection() -> None:
    """Without a ``get`` given, the window's polls share one client: one connection (and one
    TLS context) for the window, not one per request."""
    peers: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_GET(self) -> None:  # noqa: N802 - the handler's API
            peers.append(self.client_address[1])
            body = b"ok" if self.path == "/readyz" else metrics({("a", "2xx"): 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        found = watch(url, Limits(0.3, interval=0.1), say=lambda _m: None)
    finally:
        server.shutdown()
        server.server_close()
    assert found is None
    assert len(peers) >= 4 and len(set(peers)) == 1, peers
