"""A fenced ledger and its checker, for crash tests with several holders.

Each worker appends what it did under a lease to a file of its own (one JSON list
per line): ``["grant", pid, n, fence, t]`` when an acquire returned and
``["write", pid, n, fence, t]`` for each side effect it made under the lease,
``t`` read (time.monotonic(), one clock for every process of the machine) *before*
``lease.check()`` passed. ``n`` counts the worker's acquisitions.
``check_history`` finds what must never happen; ``Violations`` is empty when the
history is clean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Hold:
    """One acquisition: who, its fence, when granted, first and last write."""

    pid: int
    n: int
    fence: int
    granted: float
    first: float | None = None
    last: float | None = None


@dataclass
class Violations:
    reused: list[str] = field(default_factory=list)
    overlapping: list[str] = field(default_factory=list)
    backwards: list[str] = field(default_factory=list)
    quarantine: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reused or self.overlapping or self.backwards or self.quarantine)


def read_holds(directory: Path) -> list[Hold]:
    holds: dict[tuple[int, int], Hold] = {}
    for path in sorted(directory.glob("ledger.*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            kind, pid, n, fence, t = json.loads(line)
            key = (int(pid), int(n))
            if kind == "grant":
                holds[key] = Hold(int(pid), int(n), int(fence), float(t))
            else:
                hold = holds[key]
                hold.first = t if hold.first is None else min(hold.first, t)
                hold.last = t if hold.last is None else max(hold.last, t)
    return sorted(holds.values(), key=lambda h: h.granted)


def check_history(
    holds: list[Hold], *, crashed_at: float | None = None, quarantine: float = 0.0
) -> Violations:
    """What a fenced resource and its holders must never see.

    - reused: two acquisitions with the same fence;
    - backwards: a grant later in time with a fence not above an earlier one's;
    - overlapping: two holders writing in overlapping intervals;
    - quarantine: a grant returned after ``crashed_at`` (the moment every server
      process was gone) but less than ``quarantine`` seconds after it.
    """
    found = Violations()
    by_fence: dict[int, Hold] = {}
    for hold in holds:
        other = by_fence.setdefault(hold.fence, hold)
        if other is not hold:
            found.reused.append(f"fence {hold.fence}: {other} and {hold}")
    highest: Hold | None = None
    for hold in holds:  # in grant order
        if highest is not None and hold.fence <= highest.fence:
            found.backwards.append(f"{hold} granted after {highest}")
        if highest is None or hold.fence > highest.fence:
            highest = hold
    writing = sorted((h for h in holds if h.first is not None), key=lambda h: h.first or 0.0)
    latest: Hold | None = None  # the writer whose last write is latest so far
    for hold in writing:
        assert hold.first is not None and hold.last is not None
        if latest is not None and latest.last is not None and hold.first <= latest.last:
            found.overlapping.append(f"{hold} wrote while {latest} still did")
        if latest is None or (latest.last or 0.0) < hold.last:
            latest = hold
    if crashed_at is not None:
        for hold in holds:
            if crashed_at < hold.granted < crashed_at + quarantine:
                found.quarantine.append(
                    f"{hold} granted {hold.granted - crashed_at:.3f} s after the crash"
                )
    return found
