"""Start and end marks that tasks leave in Redis, read by the runner (same for every peer)."""

from __future__ import annotations

import os
import time

import redis

_client: redis.Redis | None = None


def client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    return _client


def started(key: str) -> None:
    client().rpush(f"{key}:starts", time.time())


def ended(key: str) -> None:
    client().rpush(f"{key}:ends", time.time())


def wait_for(key: str, ends: int, timeout: float = 300.0) -> tuple[list[float], float]:
    """Block until ``ends`` end marks exist; return the start marks and the last end."""
    r = client()
    deadline = time.monotonic() + timeout
    while int(r.llen(f"{key}:ends")) < ends:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {r.llen(f'{key}:ends')} of {ends} ends after {timeout} s")
        time.sleep(0.002)
    starts = [float(v) for v in r.lrange(f"{key}:starts", 0, -1)]
    last = max(float(v) for v in r.lrange(f"{key}:ends", 0, -1))
    r.delete(f"{key}:starts", f"{key}:ends")
    return starts, last
