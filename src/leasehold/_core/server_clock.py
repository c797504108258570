"""An estimate of a server's wall clock from the whole seconds of its HTTP Date headers.

etcd's gateway tells the time only in each answer's ``Date`` header, truncated to a
second. Each answer, sent at local monotonic ``sent`` and received at ``received``,
says the server's clock read ``date <= server < date + 1`` at some moment between
the two, so the offset ``server - local`` lies in ``[date - received, date + 1 -
sent]``. Intersecting those intervals narrows the offset to about one round trip
once answers straddle a change of second (``calibrating`` tells when it has not
yet). Bounds age by a generous clock-rate difference, and an answer that
contradicts them (a server clock step, another member's clock) starts afresh.

Pure: the caller passes the local monotonic readings.
"""

from __future__ import annotations

from dataclasses import dataclass

# How fast two clocks may drift apart: 200 ppm, well beyond any working oscillator.
DRIFT = 2e-4


@dataclass
class ServerClock:
    low: float | None = None  # offset bounds (server - local) and when each was set
    low_at: float = 0.0
    high: float | None = None
    high_at: float = 0.0
    narrowed: bool = False  # once good to the precision asked for

    def observe(self, sent: float, received: float, date: float) -> None:
        low, high = date - received, date + 1.0 - sent
        if self.low is None or self.high is None:
            self.low, self.low_at, self.high, self.high_at = low, received, high, received
            return
        current_low = self.low - DRIFT * (received - self.low_at)
        current_high = self.high + DRIFT * (received - self.high_at)
        if low > current_high or high < current_low:
            # Contradiction: the server's clock stepped, or another member answered.
            self.low, self.low_at, self.high, self.high_at = low, received, high, received
            self.narrowed = False
            return
        if low > current_low:
            self.low, self.low_at = low, received
        if high < current_high:
            self.high, self.high_at = high, received

    def width(self, now: float) -> float:
        if self.low is None or self.high is None:
            return float("inf")
        return (self.high + DRIFT * (now - self.high_at)) - (self.low - DRIFT * (now - self.low_at))

    def calibrating(self, now: float, precision: float) -> bool:
        """True until the estimate has once been as narrow as ``precision``. Bounds
        widen again while nothing refreshes them (by DRIFT), but a later answer
        near a change of second narrows them again; an idle client is not made to
        wait a second time."""
        if self.width(now) <= precision:
            self.narrowed = True
        return not self.narrowed

    def read(self, now: float) -> float | None:
        """The server's clock at local monotonic ``now`` (mid-estimate), None
        before any answer."""
        if self.low is None or self.high is None:
            return None
        low = self.low - DRIFT * (now - self.low_at)
        high = self.high + DRIFT * (now - self.high_at)
        return now + (low + high) / 2
