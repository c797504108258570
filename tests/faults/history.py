"""What the clients of one fault trial reported, and the checker that judges it.

Every time is ``time.monotonic()`` of this process (CLOCK_MONOTONIC is system-wide on
Linux, so worker processes could record on the same axis). A client *reports the lease
held* from the moment its acquire returned until the earliest of: its safe deadline
(``lease.deadline``, the exact moment ``lease.held`` turns False), the moment its
``on_lost`` callback ran, the moment its release returned. Those are all at or after
the true end, so the checker errs towards seeing an overlap, never away from it.

The checker (``check``) finds:

- ``overlap``: two clients reporting the same name held at one moment;
- ``fence-order``: a grant whose fence is not above every fence granted before it for
  that name (grants ordered by the time the acquire returned);
- ``ledger``: a fenced ledger that accepted a lower fence after a higher one;
- ``bound``: a call that took longer than its bound (or never returned);
- ``dead-body``: user code entered with a lease that was not held at that moment;
- anything a scenario adds itself (``History.violation``).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Hold:
    client: str
    name: str
    fence: int
    start: float  # acquire returned
    sent: float  # send time of the attempt that was granted (lease.last_sent)
    deadline: float | None = None  # final safe deadline; None for a naive lock
    lost_at: float | None = None
    released_at: float | None = None
    lost_reason: str | None = None

    @property
    def end(self) -> float:
        ends = [t for t in (self.deadline, self.lost_at, self.released_at) if t is not None]
        return min(ends) if ends else float("inf")


@dataclass
class Write:
    client: str
    fence: int
    at: float
    accepted: bool
    seq: int | None = None  # commit order in the ledger, for accepted writes


# Timer slack of the measurement itself: the measuring task or thread must be
# scheduled after the call returns, on a shared, loaded 2-core machine. A bound is
# kept when took <= limit + MEASURE_SLACK; docs/safety.md shows the raw numbers.
MEASURE_SLACK = 0.1


@dataclass
class Bound:
    client: str
    call: str
    limit: float
    took: float | None  # None: had not returned when the scenario gave up on it
    outcome: str = ""

    @property
    def kept(self) -> bool:
        return self.took is not None and self.took <= self.limit + MEASURE_SLACK


@dataclass
class Entry:
    client: str
    at: float
    held: bool
    fence: int


@dataclass
class Violation:
    kind: str
    detail: str


@dataclass
class History:
    scenario: str
    backend: str
    api: str
    holds: list[Hold] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    bounds: list[Bound] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    extra: list[Violation] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    fault_started: float | None = None
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, hold: Hold) -> Hold:
        with self._guard:
            self.holds.append(hold)
        return hold

    def write(self, write: Write) -> None:
        with self._guard:
            self.writes.append(write)

    def bound(self, bound: Bound) -> Bound:
        with self._guard:
            self.bounds.append(bound)
        return bound

    def entry(self, client: str, held: bool, fence: int) -> None:
        with self._guard:
            self.entries.append(Entry(client, time.monotonic(), held, fence))

    def violation(self, kind: str, detail: str) -> None:
        with self._guard:
            self.extra.append(Violation(kind, detail))

    def fault(self) -> None:
        """Mark the moment the fault began (takeover time counts from here)."""
        self.fault_started = time.monotonic()


def check(history: History) -> list[Violation]:
    """Every violation in ``history`` (empty: the trial was safe)."""
    found: list[Violation] = list(history.extra)
    by_name: dict[str, list[Hold]] = {}
    for hold in history.holds:
        by_name.setdefault(hold.name, []).append(hold)
    for name, holds in by_name.items():
        ordered = sorted(holds, key=lambda h: h.start)
        for index, first in enumerate(ordered):
            if first.end < first.start:
                found.append(
                    Violation(
                        "dead-lease",
                        f"{first.client} got {name!r} fence {first.fence} "
                        f"{(first.start - first.end) * 1000:.0f} ms after its safe deadline",
                    )
                )
            for second in ordered[index + 1 :]:
                if second.client == first.client and second.fence == first.fence:
                    continue
                overlap = min(first.end, second.end) - max(first.start, second.start)
                if overlap > 0:
                    found.append(
                        Violation(
                            "overlap",
                            f"{first.client} (fence {first.fence}) and {second.client} "
                            f"(fence {second.fence}) both reported {name!r} held for "
                            f"{overlap * 1000:.0f} ms",
                        )
                    )
        highest: Hold | None = None
        for hold in ordered:
            if highest is not None and hold.fence <= highest.fence:
                if hold.fence == highest.fence and hold.client == highest.client:
                    continue  # the same grant, seen again (a retried acquire)
                found.append(
                    Violation(
                        "fence-order",
                        f"{hold.client} got fence {hold.fence} after {highest.client} "
                        f"got {highest.fence} for {name!r}",
                    )
                )
            if highest is None or hold.fence > highest.fence:
                highest = hold
    accepted = sorted(
        (w for w in history.writes if w.accepted),
        key=lambda w: (w.seq if w.seq is not None else 0, w.at),
    )
    top: Write | None = None
    for write in accepted:
        if top is not None and write.fence < top.fence:
            found.append(
                Violation(
                    "ledger",
                    f"the ledger accepted {write.client}'s fence {write.fence} after "
                    f"{top.client}'s fence {top.fence}",
                )
            )
        if top is None or write.fence > top.fence:
            top = write
    for bound in history.bounds:
        if not bound.kept:
            took = "never returned" if bound.took is None else f"took {bound.took:.2f} s"
            found.append(
                Violation(
                    "bound", f"{bound.client}.{bound.call} {took} (bound {bound.limit:.2f} s)"
                )
            )
    for entry in history.entries:
        if not entry.held:
            found.append(
                Violation(
                    "dead-body",
                    f"{entry.client} entered its body with fence {entry.fence} not held",
                )
            )
    return found


def handovers(history: History) -> list[tuple[Hold, Hold]]:
    """Consecutive (previous, next) holders of each name by start time, different clients."""
    pairs: list[tuple[Hold, Hold]] = []
    by_name: dict[str, list[Hold]] = {}
    for hold in history.holds:
        by_name.setdefault(hold.name, []).append(hold)
    for holds in by_name.values():
        ordered = sorted(holds, key=lambda h: h.start)
        for before, after in itertools.pairwise(ordered):
            if before.client != after.client:
                pairs.append((before, after))
    return pairs


def summary(history: History) -> dict[str, Any]:
    """One trial as JSON-ready data: violations, loss lead times, takeover, bounds."""
    violations = check(history)
    leads = [after.sent - before.end for before, after in handovers(history)]
    takeover = None
    if history.fault_started is not None:
        later = [h.start for h in history.holds if h.start > history.fault_started]
        firsts = [h for h in history.holds if h.start <= history.fault_started]
        owners = {h.client for h in firsts}
        others = [
            h.start
            for h in history.holds
            if h.start > history.fault_started and h.client not in owners
        ]
        if others:
            takeover = min(others) - history.fault_started
        elif later and not owners:
            takeover = min(later) - history.fault_started
    return {
        "scenario": history.scenario,
        "backend": history.backend,
        "api": history.api,
        "violations": [asdict(v) for v in violations],
        "lead_ms": [round(x * 1000, 1) for x in leads],
        "takeover_ms": None if takeover is None else round(takeover * 1000, 1),
        "bounds": [
            {
                "call": f"{b.call}",
                "limit": round(b.limit, 3),
                "took": None if b.took is None else round(b.took, 3),
                "outcome": b.outcome,
            }
            for b in history.bounds
        ],
        "holds": len(history.holds),
        "writes": {
            "accepted": sum(1 for w in history.writes if w.accepted),
            "rejected": sum(1 for w in history.writes if not w.accepted),
        },
        "metrics": history.metrics,
    }
