"""Per-client counters: cheap, thread-safe, no dependencies."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of one client's counters since it was created.

    ``acquired``: grants; ``skipped``: ``try_acquire`` calls that found the name
    busy; ``timed_out``: ``acquire`` calls whose timeout passed. ``renewed``:
    renewals the store confirmed, one per lease (a refused renewal is a loss, not
    a renewal); ``renewal_failures``: renewal attempts that failed and were
    retried, one per lease and attempt. ``lost``: leases that ended without their
    holder releasing them; ``released``: leases released while still held (a
    lost lease is never also counted as released). ``wait_time`` sums the seconds
    spent in acquires that were granted, busy or timed out; ``hold_time`` sums the
    seconds from each grant to its release or its loss (a lost lease's hold time
    ends at the loss, not when its block exits).
    """

    acquired: int = 0
    skipped: int = 0
    timed_out: int = 0
    renewed: int = 0
    renewal_failures: int = 0
    lost: int = 0
    released: int = 0
    wait_time: float = 0.0
    hold_time: float = 0.0


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {f.name: 0 for f in fields(Statistics)}

    def add(self, counter: str, amount: float = 1) -> None:
        with self._lock:
            self._values[counter] += amount

    def add_timed(self, counter: str, timer: str, seconds: float, amount: float = 1) -> None:
        """``counter += amount`` and ``timer += seconds`` in one step (one lock)."""
        with self._lock:
            values = self._values
            values[counter] += amount
            values[timer] += seconds

    def snapshot(self) -> Statistics:
        with self._lock:
            values = dict(self._values)
        return Statistics(
            acquired=int(values["acquired"]),
            skipped=int(values["skipped"]),
            timed_out=int(values["timed_out"]),
            renewed=int(values["renewed"]),
            renewal_failures=int(values["renewal_failures"]),
            lost=int(values["lost"]),
            released=int(values["released"]),
            wait_time=values["wait_time"],
            hold_time=values["hold_time"],
        )

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
