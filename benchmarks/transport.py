"""What a dispatch costs per task on this machine: Redis Streams against PostgreSQL's
LISTEN/NOTIFY with SKIP LOCKED claims, beside the transaction a task's claim pays anyway.

Each figure is the median of many sequential operations from one client (a worker's view:
one slot waiting for its next task), in microseconds:

- ``redis_hop``: XADD, then XREADGROUP of that entry, then XACK + XDEL (what a task's
  dispatch costs through our Redis dispatcher, publish to acknowledgement);
- ``redis_hop_batched``: the same for 100 entries at a time, pipelined, per entry;
- ``notify_wakeup``: NOTIFY committed on one connection until a LISTENing connection,
  blocked in its wait, has the notification;
- ``skip_locked_claim``: the claim a PostgreSQL queue makes instead of a delivery: one UPDATE
  of the oldest queued row (``FOR UPDATE SKIP LOCKED``) in its own transaction;
- ``claim_by_id``: the claim we make of a delivered id: one guarded UPDATE by primary key,
  in its own transaction;
- ``commit``: an empty transaction (BEGIN, SELECT 1, COMMIT): the floor under any claim.

The tables are made in a scratch database and dropped; the stream under a scratch key.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import redis

from benchmarks.ours import drop_database, reset_database

ROUNDS = 1_000
BATCH = 100


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


def _timed(action: Callable[[], object], rounds: int = ROUNDS) -> list[float]:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return samples


def _redis(redis_url: str) -> dict[str, float]:
    client = redis.Redis.from_url(redis_url)
    stream = f"mlp-bench-transport:{uuid.uuid4().hex[:8]}"
    client.xgroup_create(stream, "workers", id="0", mkstream=True)
    try:

        def hop() -> None:
            message = client.xadd(stream, {"attempt": "1"})
            got: Any = client.xreadgroup("workers", "w", {stream: ">"}, count=1)
            assert got and got[0][1][0][0] == message  # nosec B101 - the probe's own check
            pipe = client.pipeline(transaction=False)
            pipe.xack(stream, "workers", message)
            pipe.xdel(stream, message)
            pipe.execute()

        single = _timed(hop)
        per_entry = []
        for _ in range(ROUNDS // BATCH):
            began = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for index in range(BATCH):
                pipe.xadd(stream, {"attempt": str(index)})
            ids = pipe.execute()
            batch: Any = client.xreadgroup("workers", "w", {stream: ">"}, count=BATCH)
            assert len(batch[0][1]) == BATCH  # nosec B101
            pipe = client.pipeline(transaction=False)
            pipe.xack(stream, "workers", *ids)
            pipe.xdel(stream, *ids)
            pipe.execute()
            per_entry.append((time.perf_counter() - began) / BATCH)
        return {"redis_hop": _median_us(single), "redis_hop_batched": _median_us(per_entry)}
    finally:
        client.delete(stream)
        client.close()


def _postgres(url: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE probe (id bigserial PRIMARY KEY, state text NOT NULL, "
            "worker text, taken_at timestamptz)"
        )
        conn.execute("CREATE INDEX probe_state_id ON probe (state, id)")
        conn.execute(
            "INSERT INTO probe (state) SELECT 'queued' FROM generate_series(1, %s)",
            (2 * ROUNDS,),
        )
        commit = _timed(lambda: conn.execute("BEGIN; SELECT 1; COMMIT"))
        skip_locked = _timed(
            lambda: conn.execute(
                "UPDATE probe SET state = 'running', worker = 'w', taken_at = now() "
                "WHERE id = (SELECT id FROM probe WHERE state = 'queued' ORDER BY id "
                "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id"
            ).fetchone()
        )
        ids = iter(range(ROUNDS + 1, 2 * ROUNDS + 1))
        by_id = _timed(
            lambda: conn.execute(
                "UPDATE probe SET state = 'running', worker = 'w', taken_at = now() "
                "WHERE id = %s AND state = 'queued' RETURNING id",
                (next(ids),),
            ).fetchone()
        )
    return {
        "commit": _median_us(commit),
        "skip_locked_claim": _median_us(skip_locked),
        "claim_by_id": _median_us(by_id),
        "notify_wakeup": _notify_wakeup(url),
    }


def _notify_wakeup(url: str, rounds: int = ROUNDS // 2) -> float:
    received: list[float] = []
    ready = threading.Event()

    def listen() -> None:
        with psycopg.connect(url, autocommit=True) as listener:
            listener.execute("LISTEN probe")
            ready.set()
            for _ in listener.notifies(stop_after=rounds):
                received.append(time.perf_counter())

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    sent: list[float] = []
    with psycopg.connect(url, autocommit=True) as sender:
        for index in range(rounds):
            before = len(received)
            sent.append(time.perf_counter())
            sender.execute(f"NOTIFY probe, '{index}'")
            deadline = time.perf_counter() + 5
            while len(received) == before and time.perf_counter() < deadline:
                time.sleep(0)  # yield to the listener's thread
    thread.join(10)
    if len(received) != rounds:  # a pairing of sends with the wrong receipts would lie
        raise RuntimeError(f"LISTEN got {len(received)} of {rounds} notifications")
    return _median_us([got - at for at, got in zip(sent, received, strict=True)])


def run(database_url: str, redis_url: str, progress: Callable[[str], None]) -> dict[str, Any]:
    url = reset_database(database_url).replace("postgresql+psycopg://", "postgresql://")
    try:
        figures = {**_redis(redis_url), **_postgres(url), "rounds": ROUNDS}
    finally:
        drop_database(database_url)
    progress("transport: " + ", ".join(f"{k} {v} µs" for k, v in figures.items() if k != "rounds"))
    return figures
