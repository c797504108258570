"""Lease timing decisions as pure functions of ``now`` (local monotonic seconds).

The safe deadline is computed from the *send* time of the request that set the
store's expiry: the store received it later, so its expiry is at least
send + ttl on any clock that runs at the same rate. ``margin`` absorbs clock-rate
drift between the two machines and the time to act on a "still held" answer.
"""

from __future__ import annotations

from dataclasses import dataclass

# Redlock's drift factor; 1 % of the ttl is far above real clock-rate differences.
DRIFT_FACTOR = 0.01
MIN_MARGIN = 0.002


def default_margin(ttl: float) -> float:
    return ttl * DRIFT_FACTOR + MIN_MARGIN


def safe_deadline(sent_at: float, ttl: float, margin: float) -> float:
    return sent_at + ttl - margin


def renew_interval(ttl: float) -> float:
    """Renew about three times per ttl so that two failed rounds still leave time."""
    return ttl / 3.0


@dataclass(frozen=True, slots=True)
class RenewDecision:
    renew_now: bool
    lost: bool
    sleep: float


def decide_renewal(
    now: float, last_sent: float, ttl: float, deadline: float, jitter: float
) -> RenewDecision:
    """When to renew one lease next.

    ``jitter`` in [0, 1) moves the renewal earlier by up to 10 % of the interval so
    that many clients do not renew in lock step.
    """
    if now >= deadline:
        return RenewDecision(renew_now=False, lost=True, sleep=0.0)
    due = last_sent + renew_interval(ttl) * (1.0 - 0.1 * jitter)
    if now >= due:
        return RenewDecision(renew_now=True, lost=False, sleep=0.0)
    return RenewDecision(renew_now=False, lost=False, sleep=min(due, deadline) - now)
