"""Per-client counters: cheap, thread-safe, no dependencies."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of one client's counters since it was created.

    ``wait_time`` sums the seconds spent in successful or failed acquires;
    ``hold_time`` sums the seconds between grant and release or loss.
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
