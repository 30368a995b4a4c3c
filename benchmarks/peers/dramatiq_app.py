"""Dramatiq 2 with the Redis broker; fan-in through its own group completion callbacks."""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from dramatiq import group, pipeline
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import GroupCallbacks
from dramatiq.rate_limits.backends import RedisBackend

from benchmarks.peers.marks import ended, started

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"])
broker.add_middleware(
    GroupCallbacks(RedisBackend(client=redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])))
)
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def root(key: str, width: int) -> None:
    started(key)
    leaves = group(leaf.message(key) for _ in range(width))
    leaves.add_completion_callback(join.message(key))
    leaves.run()


@dramatiq.actor(max_retries=0)
def leaf(key: str) -> None:
    started(key)


@dramatiq.actor(max_retries=0)
def join(key: str) -> None:
    started(key)
    ended(key)


@dramatiq.actor(max_retries=0)
def step(key: str, last: bool, previous: int | None = None) -> int:
    started(key)
    if last:
        ended(key)
    return 0


@dramatiq.actor(max_retries=0)
def sleep_for(key: str, seconds: float) -> None:
    started(key)
    time.sleep(seconds)
    ended(key)


def fanout(key: str, width: int) -> None:
    root.send(key, width)


def chain_of(key: str, length: int) -> None:
    pipeline(step.message(key, i == length - 1) for i in range(length)).run()


def sleeps(key: str, count: int, seconds: float) -> None:
    for _ in range(count):
        sleep_for.send(key, seconds)
