"""What each event means for the process metrics: one translation for every exporter.

``Measurer`` turns an event into measurements on the instruments below; the
OpenTelemetry and Prometheus exporters only map instrument keys to their own
instruments, so the two never disagree about what is counted. See
docs/observability.md for what each instrument means.

This runs inside every acquire and release while an exporter is on, so it builds
plain tuples, and exporters cache their labelled instruments by those tuples.
"""

from __future__ import annotations

import threading
from typing import Literal

from leasehold import events
from leasehold.naming import NameGrouper

Instrument = Literal[
    "acquire_wait",  # histogram, s: how long each acquire call waited, by outcome
    "hold",  # histogram, s: grant to release or loss
    "renewal_duration",  # histogram, s: round trip of the renewal call
    "acquisitions",  # counter, by outcome
    "renewals",  # counter, by result
    "losses",  # counter, by reason
    "held",  # up-down: leases held now
    "waiting",  # up-down: acquire calls in progress
    "leader",  # gauge: 1 while this process leads an election of the group
]
Kind = Literal["count", "observe", "add", "set"]
# The attribute most instruments add to the common three: (key, value) or None.
Extra = tuple[str, str] | None
# (kind, instrument, value, extra)
Measurement = tuple[Kind, Instrument, float, Extra]
# primitive, store, name group: the labels every measurement carries.
Common = tuple[str, str, str]

OUTCOMES: dict[type[events.Event], str] = {
    events.Acquired: "granted",
    events.Busy: "busy",
    events.TimedOut: "timeout",
    events.AcquireFailed: "error",
}
# Renewal results: a renewal the store confirmed, one that failed and is retried,
# and one the store refused (the lease is lost: see the losses counter).
RENEWED, FAILED, REFUSED = "renewed", "failed", "refused"

# A caller that stopped waiting (its task cancelled, an election stopped) did not
# time out: counted apart, so timeouts alert on contention only.
CANCELLED = "cancelled"

_GRANTED: Extra = ("outcome", "granted")
_EXTRAS: dict[str, Extra] = {o: ("outcome", o) for o in (*OUTCOMES.values(), CANCELLED)}


def outcome_of(event: events.Event) -> str | None:
    """The ``outcome`` of an event that ends an acquire, else None."""
    if isinstance(event, events.TimedOut) and event.cancelled:
        return CANCELLED
    return OUTCOMES.get(type(event))


class Measurer:
    """Event -> (common labels, measurements). Thread-safe; keeps only the leader
    counts (which elections of a group this process leads right now)."""

    def __init__(self, grouper: NameGrouper) -> None:
        self._grouper = grouper
        self._guard = threading.Lock()
        self._leading: dict[tuple[str, str], set[str]] = {}

    def measure(self, event: events.Event) -> tuple[Common, list[Measurement]]:
        common = (event.primitive, event.store, self._grouper(event.name))
        return common, self._measurements(event, common[2])

    def _measurements(self, event: events.Event, group: str) -> list[Measurement]:
        if isinstance(event, events.AcquireStarted):
            return [("add", "waiting", 1.0, None)]
        if isinstance(event, events.Acquired):
            return [
                ("add", "waiting", -1.0, None),
                ("count", "acquisitions", 1.0, _GRANTED),
                ("observe", "acquire_wait", max(0.0, event.wait), _GRANTED),
                ("add", "held", 1.0, None),
            ]
        if isinstance(event, events.Released):
            return [("add", "held", -1.0, None), ("observe", "hold", max(0.0, event.held), None)]
        if isinstance(event, events.Busy | events.TimedOut | events.AcquireFailed):
            extra = _EXTRAS[
                CANCELLED if getattr(event, "cancelled", False) else OUTCOMES[type(event)]
            ]
            return [
                ("add", "waiting", -1.0, None),
                ("count", "acquisitions", 1.0, extra),
                ("observe", "acquire_wait", max(0.0, event.wait), extra),
            ]
        if isinstance(event, events.Renewed):
            return [
                ("count", "renewals", 1.0, ("result", RENEWED)),
                ("observe", "renewal_duration", max(0.0, event.duration), None),
            ]
        if isinstance(event, events.RenewalFailed):
            return [
                ("count", "renewals", 1.0, ("result", FAILED)),
                ("observe", "renewal_duration", max(0.0, event.duration), None),
            ]
        if isinstance(event, events.Lost):
            found: list[Measurement] = [
                ("add", "held", -1.0, None),
                ("count", "losses", 1.0, ("reason", event.reason)),
                ("observe", "hold", max(0.0, event.held), None),
            ]
            if event.reason == "refused":
                found.append(("count", "renewals", 1.0, ("result", REFUSED)))
            return found
        if isinstance(event, events.ElectionWon | events.ElectionEnded):
            key = (event.store, group)
            with self._guard:
                leading = self._leading.setdefault(key, set())
                if isinstance(event, events.ElectionWon):
                    leading.add(event.name)
                else:
                    leading.discard(event.name)
                value = 1.0 if leading else 0.0
            return [("set", "leader", value, None)]
        return []


__all__ = [
    "CANCELLED",
    "OUTCOMES",
    "outcome_of",
    "Common",
    "Extra",
    "Instrument",
    "Measurement",
    "Measurer",
]
