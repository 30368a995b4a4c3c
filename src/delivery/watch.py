"""The watch window after a deploy: `/readyz` and the platform's own metrics, polled for a
while, compared with what they were when the window opened — like Argo Rollouts' analysis.

A breach ends the deploy as a failure at its *watch* step, so what was live is restored:
- `/readyz` answers anything but 200 (a database, Redis or migration problem);
- the share of 5xx among the API's responses during the window exceeds ``max_5xx_ratio``
  (each replica's `mlp_http_responses_total` is compared with its own first sample: a URL
  behind a load balancer reaches a different replica on each scrape);
- more than ``max_lease_expiries`` task attempts lost their lease during the window (workers
  dying, `mlp_lease_expiries_total`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

RESPONSES = re.compile(
    r'^mlp_http_responses_total\{instance="(?P<instance>[^"]+)",'
    r'status_class="(?P<cls>\dxx)"\} (?P<value>\S+)$',
    re.M,
)
EXPIRIES = re.compile(r"^mlp_lease_expiries_total (?P<value>\S+)$", re.M)


@dataclass(frozen=True)
class Limits:
    seconds: float
    interval: float = 10.0
    max_5xx_ratio: float = 0.05
    max_lease_expiries: int = 3


@dataclass
class Window:
    """What the scrapes showed: per replica and class, the first and the latest counts."""

    first: dict[tuple[str, str], float] = field(default_factory=dict)
    latest: dict[tuple[str, str], float] = field(default_factory=dict)
    expiries: list[float] = field(default_factory=list)

    def add(self, metrics: str) -> None:
        for match in RESPONSES.finditer(metrics):
            key = (match["instance"], match["cls"])
            self.first.setdefault(key, float(match["value"]))
            self.latest[key] = float(match["value"])
        if found := EXPIRIES.search(metrics):
            self.expiries.append(float(found["value"]))

    def responses(self, cls: str | None = None) -> float:
        return sum(
            self.latest[key] - self.first[key]
            for key in self.latest
            if cls is None or key[1] == cls
        )

    def lease_expiries(self) -> float:
        return self.expiries[-1] - self.expiries[0] if self.expiries else 0.0


def breach(window: Window, limits: Limits) -> str | None:
    total, errors = window.responses(), window.responses("5xx")
    if total and errors / total > limits.max_5xx_ratio:
        return f"{errors:.0f} of {total:.0f} responses were 5xx (limit {limits.max_5xx_ratio:.0%})"
    if window.lease_expiries() > limits.max_lease_expiries:
        return (
            f"{window.lease_expiries():.0f} task attempts lost their lease "
            f"(limit {limits.max_lease_expiries})"
        )
    return None


def watch(
    url: str,
    limits: Limits,
    *,
    get: Callable[..., httpx.Response] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = print,
) -> str | None:
    """Poll ``url`` for ``limits.seconds``; the breach found, or None when it stayed healthy.

    ``get`` defaults to one client for the whole window (one connection and one TLS context,
    not a new one at every poll)."""
    if get is None:
        with httpx.Client() as client:
            return watch(url, limits, get=client.get, sleep=sleep, say=say)
    window = Window()
    until = time.monotonic() + limits.seconds
    polls = 0
    while True:
        try:
            ready = get(f"{url}/readyz", timeout=10)
            if ready.status_code != 200:
                return f"/readyz answered {ready.status_code}: {ready.text[:200]}"
            window.add(get(f"{url}/metrics", timeout=10).text)
        except httpx.HTTPError as exc:
            return f"{url} did not answer: {exc}"
        polls += 1
        found = breach(window, limits)
        if found:
            return found
        if time.monotonic() >= until:
            break
        sleep(min(limits.interval, max(0.0, until - time.monotonic())))
    say(
        f"watched {url} for {limits.seconds:.0f} s ({polls} polls): "
        f"{window.responses():.0f} responses, {window.responses('5xx'):.0f} 5xx, "
        f"{window.lease_expiries():.0f} lease expiries"
    )
    return None
