"""Prometheus metrics, read from the database (the truth) and Redis at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ml_platform.engine.states import RunState
from ml_platform.service import DURATION_BUCKETS, Platform


class PlatformCollector(Collector):
    """Runs by state, attempt durations, queue depth, lease expiries, redeliveries and each
    pool's slots and use."""

    def __init__(
        self, platform: Platform, redis_client: redis.Redis | None = None, prefix: str = "mlp"
    ) -> None:
        self.platform = platform
        self.redis = redis_client
        self.prefix = prefix

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        stats = self.platform.stats()
        runs = GaugeMetricFamily("mlp_runs", "Runs by state.", labels=["state"])
        for state in RunState:
            runs.add_metric([state.value], float(stats.runs_by_state.get(state.value, 0)))
        yield runs

        buckets = [
            (str(b), n) for b, n in zip(DURATION_BUCKETS, stats.duration_buckets, strict=True)
        ]
        buckets.append(("+Inf", stats.duration_count))
        histogram = HistogramMetricFamily(
            "mlp_task_duration_seconds", "Duration of succeeded task attempts."
        )
        histogram.add_metric([], buckets, sum_value=stats.duration_sum)
        yield histogram

        queue = GaugeMetricFamily("mlp_queue_depth", "Queued attempts (database).", labels=["kind"])
        queue.add_metric(["due"], float(stats.due))
        queue.add_metric(["waiting_for_retry_delay"], float(stats.delayed))
        yield queue

        lost = CounterMetricFamily(
            "mlp_lease_expiries", "Attempts lost because their lease expired."
        )
        lost.add_metric([], float(stats.lost_attempts))
        yield lost

        redelivered = CounterMetricFamily(
            "mlp_dispatch_redeliveries", "Dispatch messages taken over from another consumer."
        )
        count = 0.0
        if self.redis is not None:
            value = self.redis.get(f"{self.prefix}:stats:redeliveries")
            count = float(value) if value is not None else 0.0
        redelivered.add_metric([], count)
        yield redelivered

        slots = GaugeMetricFamily(
            "mlp_pool_slots", "A pool's limit on attempts running at once.", labels=["pool"]
        )
        busy = GaugeMetricFamily(
            "mlp_pool_busy", "A pool's attempts queued or running.", labels=["pool"]
        )
        for name, limit, used in self.platform.pools():
            if limit is not None:
                slots.add_metric([name], float(limit))
            busy.add_metric([name], float(used))
        yield slots
        yield busy
