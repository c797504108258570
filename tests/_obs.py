"""Events as the primitives emit them, for the exporters' unit tests."""

from __future__ import annotations

from typing import Any

from leasehold import events

CLIENT = 7


def ev(
    kind: type[events.Event], name: str = "job:42", primitive: str = "lock", **fields: Any
) -> events.Event:
    return kind(primitive=primitive, name=name, store="redis", client_id=CLIENT, **fields)  # type: ignore[arg-type]


def a_lifetime(name: str = "job:42") -> list[events.Event]:
    """Two acquires of one name: granted after 0.25 s, renewed twice (one failure),
    released after 2 s; then a try that finds it busy, a timed-out wait, an error,
    and a second grant lost to a refused renewal."""
    return [
        ev(events.AcquireStarted, name, blocking=True),
        ev(events.Acquired, name, fence=5, wait=0.25),
        ev(events.Renewed, name, fence=5, duration=0.002),
        ev(
            events.RenewalFailed,
            name,
            fence=5,
            duration=0.5,
            error_type="StoreUnavailable",
            error="down",
            time_left=3.0,
        ),
        ev(events.Released, name, fence=5, held=2.0),
        ev(events.AcquireStarted, name, blocking=False),
        ev(events.Busy, name, wait=0.001),
        ev(events.AcquireStarted, name, blocking=True),
        ev(events.TimedOut, name, wait=1.5),
        ev(events.AcquireStarted, name, blocking=True),
        ev(events.AcquireFailed, name, wait=0.01, error_type="StoreUnavailable", error="down"),
        ev(events.AcquireStarted, name, blocking=True),
        ev(events.Acquired, name, fence=9, wait=0.0),
        ev(events.Lost, name, fence=9, reason="refused", detail="taken over", held=4.0),
    ]
