"""Dispatch carries attempt ids from the scheduler to workers; the database stays the truth.

A lost message can never lose a task: every scheduler pass re-publishes the queued attempts
that are due, and a worker's claim is a guarded update that only one worker can win.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol


class Dispatcher(Protocol):
    def publish(self, attempt_ids: Iterable[int]) -> None:
        """Offer attempts to workers; publishing one twice is harmless."""

    def receive(self, limit: int) -> list[int]:
        """Take up to ``limit`` attempt ids offered to this worker."""


class InProcessDispatcher:
    """The embedded dispatcher: a de-duplicating FIFO inside one process."""

    def __init__(self) -> None:
        self._queue: deque[int] = deque()
        self._pending: set[int] = set()

    def publish(self, attempt_ids: Iterable[int]) -> None:
        for attempt_id in attempt_ids:
            if attempt_id not in self._pending:
                self._pending.add(attempt_id)
                self._queue.append(attempt_id)

    def receive(self, limit: int) -> list[int]:
        taken: list[int] = []
        while self._queue and len(taken) < limit:
            attempt_id = self._queue.popleft()
            self._pending.discard(attempt_id)
            taken.append(attempt_id)
        return taken

    def __len__(self) -> int:
        return len(self._queue)
