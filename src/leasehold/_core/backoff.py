"""Jittered exponential backoff ("full jitter"): retries never synchronise into storms."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.005
    maximum: float = 0.5
    multiplier: float = 2.0

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the delay before retry number ``attempt`` (0-based)."""
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A delay drawn uniformly from [ceiling/2, ceiling]: spread, but never near zero,
        so a crowd of pollers neither synchronises nor spins."""
        top = self.ceiling(attempt)
        draw = (rng or random).random()
        return top * (0.5 + draw / 2)
