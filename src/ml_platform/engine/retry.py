"""Retry schedules: exponential backoff with bounded jitter and a maximum delay."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a task is retried.

    The delay before retry ``n`` (n = 1 after the first failure) is
    ``min(max_delay, base_delay * factor ** (n - 1) * (1 + jitter * u))`` with ``u`` uniform in
    [0, 1), seeded per task so that a schedule can be replayed. ``jitter`` is at most
    ``factor - 1``, which keeps the delays non-decreasing.
    """

    retries: int = 0
    base_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.base_delay < 0:
            raise ValueError(f"retry base delay must be >= 0 seconds, got {self.base_delay}")
        if self.factor < 1:
            raise ValueError(f"retry backoff factor must be >= 1, got {self.factor}")
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"retry max delay ({self.max_delay}) must be >= base delay ({self.base_delay})"
            )
        if not 0 <= self.jitter <= self.factor - 1:
            raise ValueError(
                f"retry jitter must be between 0 and factor - 1 ({self.factor - 1}), "
                f"got {self.jitter}"
            )

    def may_retry(self, failed_attempts: int) -> bool:
        """Whether another attempt is allowed after ``failed_attempts`` failures."""
        return failed_attempts <= self.retries

    def delay(self, retry_number: int, seed: str = "") -> float:
        """Seconds to wait before retry ``retry_number`` (1-based)."""
        if retry_number < 1:
            raise ValueError(f"retry number must be >= 1, got {retry_number}")
        # Jitter spreads retries of many tasks apart; it is not a security measure.
        u = random.Random(f"{seed}:{retry_number}").random()  # nosec B311
        exponent = min(retry_number - 1, 1024)  # beyond this the cap applies anyway
        try:
            raw = self.base_delay * self.factor**exponent * (1 + self.jitter * u)
        except OverflowError:
            return self.max_delay
        return min(self.max_delay, raw)
