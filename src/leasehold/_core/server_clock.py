"""An estimate of a server's wall clock from the whole seconds of its HTTP Date headers.

etcd's gateway tells the time only in each answer's ``Date`` header, truncated to a
second. Each answer, sent at local monotonic ``sent`` and received at ``received``,
says the server's clock read ``date <= server < date + 1`` at some moment between
the two, so the offset ``server - local`` lies in ``[date - received, date + 1 -
sent]``. Intersecting those intervals narrows the offset to about one round trip
once answers straddle a change of second (``calibrating`` tells when it has not
yet). Bounds age by a generous clock-rate difference, and an answer that
contradicts them (a server clock step, another member's clock) starts afresh.

How narrow one change of second makes it depends on the round trips around it:
the width is the time from sending the last answer of the old second to receiving
the first of the new one, a couple of milliseconds on a quiet network, a few
hundred on a machine too loaded to answer quickly. Waiting for a later change of
second would not do better under the same load, so the first one ends the
calibration whatever its width; later answers keep narrowing the bounds.

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
    narrowed: bool = False  # once good to the precision asked for, or straddled
    last_date: float | None = None  # the Date of the latest consistent answer
    straddled: bool = False  # answers of two different seconds, consistent
    probe_until: float = float("-inf")  # a probe in flight, trusted until then

    def observe(self, sent: float, received: float, date: float) -> None:
        low, high = date - received, date + 1.0 - sent
        if self.low is None or self.high is None:
            self.low, self.low_at, self.high, self.high_at = low, received, high, received
            self.last_date = date
            return
        current_low = self.low - DRIFT * (received - self.low_at)
        current_high = self.high + DRIFT * (received - self.high_at)
        if low > current_high or high < current_low:
            # Contradiction: the server's clock stepped, or another member answered.
            self.low, self.low_at, self.high, self.high_at = low, received, high, received
            self.narrowed = False
            self.straddled = False
            self.last_date = date
            return
        if date != self.last_date:
            self.straddled = True
            self.last_date = date
        if low > current_low:
            self.low, self.low_at = low, received
        if high < current_high:
            self.high, self.high_at = high, received

    def width(self, now: float) -> float:
        if self.low is None or self.high is None:
            return float("inf")
        return (self.high + DRIFT * (now - self.high_at)) - (self.low - DRIFT * (now - self.low_at))

    def calibrating(self, now: float, precision: float) -> bool:
        """True until the estimate has once been as narrow as ``precision``, or
        answers straddled a change of second (the best these round trips allow).
        Bounds widen again while nothing refreshes them (by DRIFT), but a later
        answer near a change of second narrows them again; an idle client is not
        made to wait a second time."""
        if self.straddled or self.width(now) <= precision:
            self.narrowed = True
        return not self.narrowed

    def claim_probe(self, now: float, hold: float) -> bool:
        """True if no probe is in flight (or the one in flight is older than
        ``hold``): the caller probes, the others wait for its answer. One prober
        at a time, so that many callers calibrating together do not slow every
        round trip, and so the calibration, down."""
        if now < self.probe_until:
            return False
        self.probe_until = now + hold
        return True

    def probe_done(self) -> None:
        self.probe_until = float("-inf")

    def read(self, now: float) -> float | None:
        """The server's clock at local monotonic ``now`` (mid-estimate), None
        before any answer."""
        if self.low is None or self.high is None:
            return None
        low = self.low - DRIFT * (now - self.low_at)
        high = self.high + DRIFT * (now - self.high_at)
        return now + (low + high) / 2
