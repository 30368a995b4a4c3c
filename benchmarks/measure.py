"""Figures common to every system: medians, percentiles, memory, CPU."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum."""
    return statistics.median(values), min(values), max(values)


def rss_of_tree(pid: int) -> int:
    """Resident memory in bytes of a process and all its descendants (0 if it is gone)."""
    total = 0
    for proc in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def cpu_seconds_of_tree(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for proc in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def settle(pid: int, busy_below: float = 0.05, timeout: float = 120.0) -> float:
    """Wait until a process tree uses less than ``busy_below`` of a core; return the wait.

    Prefect's server goes on recording a flow's events after the flow returns: the next system
    must not be measured while it does.
    """
    began = time.monotonic()
    last = cpu_seconds_of_tree(pid)
    while time.monotonic() - began < timeout:
        time.sleep(1.0)
        now = cpu_seconds_of_tree(pid)
        if now - last < busy_below:
            break
        last = now
    return time.monotonic() - began


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found += children
        frontier += children
    return found


class PeakRss(threading.Thread):
    """Samples the summed RSS of some process trees every 20 ms while running; keeps the peak.

    ``pids`` is called at each sample, so process trees that change (workers replaced) count.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            self.peak = max(self.peak, sum(rss_of_tree(pid) for pid in self.pids()))

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._halt.set()
        self.join()
        return self.peak
