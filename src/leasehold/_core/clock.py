"""Every clock read goes through a Clock so tests and the simulator can drive time."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (local decisions only)."""
        ...


class SystemClock:
    # The C function itself, not a method that calls it: a clock read costs no
    # Python frame (nine per acquire + release).
    monotonic = staticmethod(time.monotonic)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told to. Thread-safe.

    Use one FakeClock for the client and the memory or SQLite store to test expiry
    without sleeping: ``clock.advance(31)`` expires a 30 s lease.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a FakeClock never goes backwards")
        with self._lock:
            self._now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.monotonic():.3f})"
