"""Dispatch carries attempt ids from the scheduler to workers; the database stays the truth.

A lost message can never lose a task: every scheduler pass re-publishes the queued attempts
that are due and have no live delivery, and a worker's claim is a guarded update that only one
worker can win. Two implementations: in-process (embedded mode) and Redis Streams.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:  # imported where used: embedded mode and `mlp runs` never load redis
    import redis

DEFAULT_QUEUE = "default"


def queue_of(pool: str | None) -> str:
    """Attempts of a pool go to that pool's queue; all others to the default queue."""
    return pool or DEFAULT_QUEUE


class Dispatch(NamedTuple):
    """An attempt to offer to workers, and the queue it belongs to."""

    attempt_id: int
    queue: str


@dataclass(frozen=True)
class Delivery:
    """An attempt id as one worker received it; acknowledged once the work is committed."""

    attempt_id: int
    queue: str
    message_id: str | None = None


class Dispatcher(Protocol):
    #: Whether ``receive`` can wait for work (else the caller sleeps between polls).
    blocking: bool

    def publish(self, items: Iterable[Dispatch]) -> None:
        """Offer attempts to workers; publishing one twice is harmless."""

    def receive(self, limit: int, block_seconds: float = 0.0) -> list[Delivery]:
        """Take up to ``limit`` deliveries, waiting up to ``block_seconds`` for the first."""

    def ack(self, *deliveries: Delivery) -> None:
        """The deliveries were handled (committed, or found stale): never deliver them again."""

    def serves(self, queue: str) -> bool:
        """Whether this dispatcher's worker takes work from ``queue``."""


class InProcessDispatcher:
    """The embedded dispatcher: a de-duplicating FIFO inside one process."""

    blocking = False

    def __init__(self) -> None:
        self._queue: deque[Dispatch] = deque()
        self._pending: set[int] = set()

    def publish(self, items: Iterable[Dispatch]) -> None:
        for item in items:
            if item.attempt_id not in self._pending:
                self._pending.add(item.attempt_id)
                self._queue.append(item)

    def receive(self, limit: int, block_seconds: float = 0.0) -> list[Delivery]:
        taken: list[Delivery] = []
        while self._queue and len(taken) < limit:
            item = self._queue.popleft()
            self._pending.discard(item.attempt_id)
            taken.append(Delivery(item.attempt_id, item.queue))
        return taken

    def ack(self, *deliveries: Delivery) -> None:
        """Nothing to do: an in-process delivery is gone once received."""

    def serves(self, queue: str) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._queue)


#: How many attempts one call of the publishing script takes (a larger batch is split: each
#: call holds Redis, ≈ 9 ms for 1,000 here).
PUBLISH_BATCH = 1000

#: KEYS: each attempt's marker, then its stream; ARGV: the markers' lifetime (ms), then the
#: attempts' ids. An attempt whose marker is live (published lately) is skipped.
_PUBLISH = """
for i = 1, #KEYS, 2 do
    if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
        redis.call('XADD', KEYS[i + 1], '*', 'attempt', ARGV[(i + 1) / 2 + 1])
    end
end
"""


class RedisDispatcher:
    """Redis Streams: one stream and consumer group per queue.

    Workers ``XREADGROUP``, do the work, commit with fencing, then ``XACK``. Deliveries left
    unacknowledged by a dead consumer for ``claim_idle_seconds`` are taken over with
    ``XAUTOCLAIM``; a message delivered more than ``max_deliveries`` times goes to the
    dead-letter stream and ``on_dead_letter`` is told, so that its attempt fails with a reason.
    A marker key per published attempt (expiring after ``republish_seconds``) keeps the
    scheduler's re-publishing from flooding the streams; when Redis loses its data the markers
    go too, and the next scheduler pass re-publishes every queued attempt from the database.
    """

    blocking = True

    def __init__(
        self,
        client: redis.Redis,
        *,
        consumer: str,
        prefix: str = "mlp",
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        group: str = "workers",
        claim_idle_seconds: float = 30.0,
        max_deliveries: int = 5,
        republish_seconds: float = 60.0,
        on_dead_letter: Callable[[int, str], None] | None = None,
    ) -> None:
        self.client = client
        self.consumer = consumer
        self.prefix = prefix
        self.queues = list(queues)
        self.group = group
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.max_deliveries = max_deliveries
        self.republish_ms = int(republish_seconds * 1000)
        self.on_dead_letter = on_dead_letter
        self._groups_ready: set[str] = set()
        self._overflow: deque[Delivery] = deque()
        # A delivery becomes reclaimable only after claim_idle_seconds: looking for such
        # deliveries a few times per idle period is enough, and spares two round trips on
        # every receive.
        self._reclaim_every = claim_idle_seconds / 4
        self._next_reclaim = 0.0
        # EVALSHA, and the script sent again if Redis has lost it (a restart).
        self._publish = client.register_script(_PUBLISH)

    def stream(self, queue: str) -> str:
        return f"{self.prefix}:attempts:{queue}"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.prefix}:dead-letter"

    def _marker(self, attempt_id: int) -> str:
        return f"{self.prefix}:published:{attempt_id}"

    def _ensure_group(self, stream: str) -> None:
        import redis

        if stream in self._groups_ready:
            return
        try:
            self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(stream)

    def publish(self, items: Iterable[Dispatch]) -> None:
        """One round trip per PUBLISH_BATCH attempts (a script Redis runs as a whole: no
        publisher that dies midway leaves a marker without its message, which would hold the
        attempt back until the marker expired)."""
        batch = list(items)
        for stream in {self.stream(item.queue) for item in batch}:
            self._ensure_group(stream)
        for start in range(0, len(batch), PUBLISH_BATCH):
            keys: list[str] = []
            args: list[int] = [self.republish_ms]
            for item in batch[start : start + PUBLISH_BATCH]:
                keys += (self._marker(item.attempt_id), self.stream(item.queue))
                args.append(item.attempt_id)
            self._publish(keys=keys, args=args)

    def receive(self, limit: int, block_seconds: float = 0.0) -> list[Delivery]:
        import redis

        taken = [self._overflow.popleft() for _ in range(min(limit, len(self._overflow)))]
        try:
            if len(taken) < limit and time.monotonic() >= self._next_reclaim:
                self._next_reclaim = time.monotonic() + self._reclaim_every
                taken += self._reclaim(limit - len(taken))
            if len(taken) < limit:
                taken += self._read(limit - len(taken), block_seconds if not taken else 0.0)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost its data (restart without persistence): recreate the groups; the
            # scheduler re-publishes queued attempts from the database.
            self._groups_ready.clear()
        # COUNT applies per stream, so a read over several queues may bring more than asked:
        # keep the rest (they are ours in Redis already) for the next call.
        self._overflow.extend(taken[limit:])
        return taken[:limit]

    def _read(self, limit: int, block_seconds: float) -> list[Delivery]:
        for queue in self.queues:
            self._ensure_group(self.stream(queue))
        block = int(block_seconds * 1000) if block_seconds > 0 else None
        reply: Any = self.client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream(queue): ">" for queue in self.queues},
            count=limit,
            block=block,
        )
        deliveries = []
        for stream, messages in reply or []:
            queue = self._queue_of(stream)
            for message_id, fields in messages:
                deliveries.append(self._delivery(queue, message_id, fields))
        return deliveries

    def _reclaim(self, limit: int) -> list[Delivery]:
        taken: list[Delivery] = []
        for queue in self.queues:
            stream = self.stream(queue)
            self._ensure_group(stream)
            self._dead_letter_overdelivered(stream, queue)
            reply: Any = self.client.xautoclaim(
                stream, self.group, self.consumer, self.claim_idle_ms, count=limit - len(taken)
            )
            for message_id, fields in reply[1]:
                if fields:  # a deleted entry comes back without fields
                    taken.append(self._delivery(queue, message_id, fields))
            if len(taken) >= limit:
                break
        return taken

    def _dead_letter_overdelivered(self, stream: str, queue: str) -> None:
        pending: Any = self.client.xpending_range(
            stream, self.group, min="-", max="+", count=100, idle=self.claim_idle_ms
        )
        for entry in pending:
            if entry["times_delivered"] < self.max_deliveries:
                continue
            message_id = _text(entry["message_id"])
            rows: Any = self.client.xrange(stream, min=message_id, max=message_id)
            attempt_id = int(_text(rows[0][1][b"attempt"])) if rows else None
            reason = f"undeliverable: delivered {entry['times_delivered']} times without an ack"
            self.client.xadd(
                self.dead_letter_stream,
                {"attempt": attempt_id or "", "queue": queue, "reason": reason},
            )
            self.client.xack(stream, self.group, message_id)
            if attempt_id is not None and self.on_dead_letter is not None:
                self.on_dead_letter(attempt_id, reason)

    def _queue_of(self, stream: Any) -> str:
        return _text(stream).removeprefix(f"{self.prefix}:attempts:")

    @staticmethod
    def _delivery(queue: str, message_id: Any, fields: Any) -> Delivery:
        return Delivery(int(_text(fields[b"attempt"])), queue, _text(message_id))

    def ack(self, *deliveries: Delivery) -> None:
        """Acknowledge and delete the deliveries' entries: one round trip for all of them."""
        sent = [(self.stream(d.queue), d.message_id) for d in deliveries if d.message_id]
        if not sent:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, message_id in sent:
            pipe.xack(stream, self.group, message_id)
            pipe.xdel(stream, message_id)
        pipe.execute()

    def serves(self, queue: str) -> bool:
        return queue in self.queues

    def queue_depth(self) -> dict[str, int]:
        """Messages waiting per queue (for /metrics)."""
        return {queue: int(self.client.xlen(self.stream(queue))) for queue in self.queues}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
