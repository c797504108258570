"""What each event means for the process metrics: one translation for every exporter.

``Measurer`` turns an event into measurements on the instruments below; the
OpenTelemetry and Prometheus exporters only map instrument keys to their own
instruments, so the two never disagree about what is counted. See
docs/observability.md for what each instrument means.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
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

OUTCOMES: dict[type[events.Event], str] = {
    events.Acquired: "granted",
    events.Busy: "busy",
    events.TimedOut: "timeout",
    events.AcquireFailed: "error",
}
# Renewal results: a renewal the store confirmed, one that failed and is retried,
# and one the store refused (the lease is lost: see the losses counter).
RENEWED, FAILED, REFUSED = "renewed", "failed", "refused"


@dataclass(frozen=True, slots=True)
class Measurement:
    kind: Kind
    instrument: Instrument
    value: float
    # The common attributes (primitive, store, name_group) and at most one more.
    primitive: str
    store: str
    name_group: str
    extra: tuple[str, str] | None = None


class Measurer:
    """Event -> measurements. Thread-safe; keeps only the leader counts (which
    elections of a group this process leads right now)."""

    def __init__(self, grouper: NameGrouper) -> None:
        self._grouper = grouper
        self._guard = threading.Lock()
        self._leading: dict[tuple[str, str], set[str]] = {}

    def measure(self, event: events.Event) -> list[Measurement]:
        group = self._grouper(event.name)

        def m(
            kind: Kind, instrument: Instrument, value: float, extra: tuple[str, str] | None = None
        ) -> Measurement:
            return Measurement(kind, instrument, value, event.primitive, event.store, group, extra)

        outcome = OUTCOMES.get(type(event))
        if isinstance(event, events.AcquireStarted):
            return [m("add", "waiting", 1)]
        if outcome is not None:
            wait: float = getattr(event, "wait", 0.0)
            found = [
                m("add", "waiting", -1),
                m("count", "acquisitions", 1, ("outcome", outcome)),
                m("observe", "acquire_wait", max(0.0, wait), ("outcome", outcome)),
            ]
            if outcome == "granted":
                found.append(m("add", "held", 1))
            return found
        if isinstance(event, events.Renewed):
            return [
                m("count", "renewals", 1, ("result", RENEWED)),
                m("observe", "renewal_duration", max(0.0, event.duration)),
            ]
        if isinstance(event, events.RenewalFailed):
            return [
                m("count", "renewals", 1, ("result", FAILED)),
                m("observe", "renewal_duration", max(0.0, event.duration)),
            ]
        if isinstance(event, events.Lost):
            found = [
                m("add", "held", -1),
                m("count", "losses", 1, ("reason", event.reason)),
                m("observe", "hold", max(0.0, event.held)),
            ]
            if event.reason == "refused":
                found.append(m("count", "renewals", 1, ("result", REFUSED)))
            return found
        if isinstance(event, events.Released):
            return [m("add", "held", -1), m("observe", "hold", max(0.0, event.held))]
        if isinstance(event, events.ElectionWon | events.ElectionEnded):
            key = (event.store, group)
            with self._guard:
                leading = self._leading.setdefault(key, set())
                if isinstance(event, events.ElectionWon):
                    leading.add(event.name)
                else:
                    leading.discard(event.name)
                value = 1.0 if leading else 0.0
            return [m("set", "leader", value)]
        return []


__all__ = ["OUTCOMES", "Instrument", "Measurement", "Measurer"]
