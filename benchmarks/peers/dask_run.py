"""Dask distributed: a LocalCluster of 2 worker processes, 1 thread each."""

from __future__ import annotations

import time
from typing import Any

from distributed import Client, LocalCluster


def noop(value: int = 0) -> float:
    return time.time()


def after(previous: Any, value: int) -> float:
    return time.time()


def join(values: list[float]) -> tuple[float, float]:
    now = time.time()
    return now, now


def sleep_for(seconds: float, value: int) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


class Dask:
    def __init__(self) -> None:
        self.cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = Client(self.cluster)

    def pids(self) -> list[int]:
        info = self.client.scheduler_info()["workers"]
        return [int(w["pid"]) for w in info.values()]

    def fanout(self, width: int) -> tuple[float, list[float], float]:
        t0 = time.time()
        root = self.client.submit(noop, 0, pure=False)
        leaves = [self.client.submit(after, root, i, pure=False) for i in range(width)]
        end = self.client.submit(join, leaves, pure=False)
        starts = [root.result(), *self.client.gather(leaves)]
        join_start, join_end = end.result()
        return t0, [*starts, join_start], join_end

    def chain_of(self, length: int) -> tuple[float, list[float], float]:
        t0 = time.time()
        futures = [self.client.submit(noop, 0, pure=False)]
        for i in range(1, length):
            futures.append(self.client.submit(after, futures[-1], i, pure=False))
        starts = self.client.gather(futures)
        return t0, starts, max(starts)

    def sleeps(self, count: int, seconds: float) -> tuple[float, list[float], float]:
        t0 = time.time()
        futures = [self.client.submit(sleep_for, seconds, i, pure=False) for i in range(count)]
        spans = self.client.gather(futures)
        return t0, [s for s, _ in spans], max(e for _, e in spans)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()
