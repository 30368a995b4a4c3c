"""Prometheus metrics, read from the database (the truth) and Redis at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from ml_platform.engine.states import AttemptState, RunState
from ml_platform.store.db import Database
from ml_platform.store.models import Attempt, Run, utcnow

DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


class PlatformCollector(Collector):
    """Runs by state, attempt durations, queue depth, lease expiries and redeliveries."""

    def __init__(
        self, db: Database, redis_client: redis.Redis | None = None, prefix: str = "mlp"
    ) -> None:
        self.db = db
        self.redis = redis_client
        self.prefix = prefix

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        with self.db.session() as session:
            by_state = dict(
                session.execute(select(Run.state, func.count()).group_by(Run.state)).all()
            )
            attempts = dict(
                session.execute(select(Attempt.state, func.count()).group_by(Attempt.state)).all()
            )
            finished = session.execute(
                select(Attempt.started_at, Attempt.finished_at).where(
                    Attempt.state == AttemptState.SUCCEEDED,
                    Attempt.started_at.is_not(None),
                    Attempt.finished_at.is_not(None),
                )
            ).all()
            due = session.scalar(select(func.count()).where(Attempt.state == AttemptState.QUEUED))
            delayed = session.scalar(
                select(func.sum(case((Attempt.not_before > utcnow(), 1), else_=0))).where(
                    Attempt.state == AttemptState.QUEUED
                )
            )
        runs = GaugeMetricFamily("mlp_runs", "Runs by state.", labels=["state"])
        for state in RunState:
            runs.add_metric([state.value], float(by_state.get(state.value, 0)))
        yield runs

        durations = [(end - start).total_seconds() for start, end in finished if start and end]
        buckets = [(str(b), float(sum(1 for d in durations if d <= b))) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(durations))))
        histogram = HistogramMetricFamily(
            "mlp_task_duration_seconds", "Duration of succeeded task attempts."
        )
        histogram.add_metric([], buckets, sum_value=sum(durations))
        yield histogram

        queue = GaugeMetricFamily("mlp_queue_depth", "Queued attempts (database).", labels=["kind"])
        queue.add_metric(["due"], float((due or 0) - (delayed or 0)))
        queue.add_metric(["waiting_for_retry_delay"], float(delayed or 0))
        yield queue

        lost = CounterMetricFamily(
            "mlp_lease_expiries", "Attempts lost because their lease expired."
        )
        lost.add_metric([], float(attempts.get(AttemptState.LOST.value, 0)))
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
