"""One event stream: what leasehold does, for your hooks, metrics, traces and logs.

Every primitive reports what happens to it as a typed, immutable event. Statistics,
the OpenTelemetry and Prometheus exporters and your own hooks all subscribe here::

    def hook(event: leasehold.events.Event) -> None:
        if isinstance(event, leasehold.events.Lost):
            alert(event.name, event.reason)

    subscription = leasehold.events.subscribe(hook)            # every client
    subscription = leasehold.events.subscribe(hook, client=c)  # one client only
    subscription.close()                                       # or use ``with``

Handlers run synchronously, in the thread (or on the event loop) where the thing
happened, right after it happened, so they must be quick and must not block or do
I/O; hand work to a queue if you need to. A handler that raises is logged (once per
handler) and never disturbs the primitive. With nobody subscribed no event object is
even built: ``wanted()`` is one attribute check.

Names (``name``) are the lease, election, room or once key as given: they may carry
ids, so never use them as metric labels as they are (see ``leasehold.naming``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

logger = logging.getLogger("leasehold.events")

Primitive = Literal["lock", "semaphore", "election", "presence", "once"]

# Why a lease stopped being held (``Lost.reason``); a small closed set, usable as
# a metric label.
LossReason = Literal[
    # the store answered a renewal or extend with "not yours" (expired on the
    # store's clock, broken with ``break``, or another holder got it)
    "refused",
    # the client saw the store restart (Redis run id changed): its leases are gone
    "restart",
    # renewals failed (store unreachable or erroring) until the safe deadline
    "unreachable",
    # the safe deadline passed with no renewal attempt failing: the process was
    # paused (GC, SIGSTOP, blocked event loop) or the lease does not renew
    "deadline",
    # the Lease object was garbage-collected without release() (a bug in the
    # caller): nothing renews it any more and the store lets it expire
    "dropped",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Fields every event has.

    ``store`` is the URL scheme of the client's store (``redis``, ``postgresql``,
    ``sqlite``, ``memory``, ...); ``client_id`` tells events of different clients
    in one process apart (``id()`` of the client; not stable across processes).
    """

    primitive: Primitive
    name: str
    store: str
    client_id: int


# -- acquiring ---------------------------------------------------------------------
# Every acquire call emits AcquireStarted, then exactly one of Acquired, Busy,
# TimedOut or AcquireFailed (a "waiting" gauge goes up and down with them).


@dataclass(frozen=True, slots=True, kw_only=True)
class AcquireStarted(Event):
    """An acquire began; ``blocking`` is False for ``try_acquire``."""

    blocking: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquired(Event):
    """Granted. ``wait`` seconds since the call began; ``handed_over`` when a
    release handed the place to this waiter (no second call)."""

    fence: int
    wait: float
    handed_over: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Busy(Event):
    """``try_acquire`` found the name held (the "skip this run" path)."""

    wait: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TimedOut(Event):
    """``acquire(timeout=...)`` gave up; ``wait`` is how long it waited.
    ``cancelled`` is True when the caller stopped waiting instead (its task was
    cancelled, an election was stopped): not a timeout anybody set, but the
    acquire still ends here, so gauges of waiters stay right."""

    wait: float
    cancelled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AcquireFailed(Event):
    """The acquire ended with an error (store unavailable, misconfigured, ...).
    ``error`` is the exception's text (never contains credentials)."""

    wait: float
    error_type: str
    error: str


# -- holding -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Renewed(Event):
    """A renewal the store confirmed (not one answered after the lease was
    released or lost). ``duration`` is the round trip of the call that carried it
    (one call may carry many leases)."""

    fence: int
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewalFailed(Event):
    """A renewal attempt failed and will be retried; ``time_left`` is the seconds
    until this lease's safe deadline. A renewal the store refuses is not a failure
    but a loss (``Lost`` with reason ``refused``)."""

    fence: int
    duration: float
    error_type: str
    error: str
    time_left: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Lost(Event):
    """The lease is no longer held and the holder did not release it. ``held`` is
    seconds from grant to loss; ``detail`` is the human-readable cause."""

    fence: int
    reason: LossReason
    detail: str
    held: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Released(Event):
    """The holder released the lease while still holding it. ``held`` is seconds
    from grant to release. A lease already lost emits no ``Released``."""

    fence: int
    held: float


# -- elections ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectionWon(Event):
    """This candidate became leader with term ``term`` (the lease's fence)."""

    term: int
    identity: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectionEnded(Event):
    """This candidate stopped leading: ``resigned`` when it gave up by itself,
    else it lost the lease (see the ``Lost`` event just before)."""

    term: int
    identity: str
    resigned: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaderChanged(Event):
    """An observer saw the leader change; ``leader`` is None while nobody leads."""

    leader: str | None
    term: int | None


# -- presence ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomOpened(Event):
    """A room got a new epoch (the first join or intent after it was closed)."""

    epoch: int


# Presence events are reported by the client whose write made the change, so each
# change is reported once across the fleet.


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberJoined(Event):
    """This client's write made ``member`` active (``join``, or ``observe``)."""

    member: str
    epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberLeft(Event):
    """This client's write removed ``member`` (``leave``, ``observe``) or dropped it
    after it expired."""

    member: str
    epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IntentExpired(Event):
    """A join intent lapsed before its member joined. Reported by the client whose
    write dropped it from the room (the next writer), so once across the fleet."""

    member: str
    epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomClosed(Event):
    epoch: int


# -- once ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OnceRan(Event):
    """This caller ran the function and stored its result."""

    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OnceReused(Event):
    """This caller got the result another caller stored (or an earlier run)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OnceFailed(Event):
    """The function raised in this caller; the failure is stored or retried as
    configured."""

    duration: float
    error_type: str
    error: str


Handler = Callable[[Event], object]


class Subscription:
    """A subscribed handler; ``close()`` (or leaving ``with``) unsubscribes."""

    def __init__(self, handler: Handler, client_id: int | None) -> None:
        self.handler = handler
        self.client_id = client_id
        self._failed = False

    def close(self) -> None:
        _unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        scope = "all clients" if self.client_id is None else f"client {self.client_id:#x}"
        return f"<Subscription {self.handler!r} ({scope})>"


# Copy-on-write: emitters read the tuple without a lock; subscribing replaces it.
_subscriptions: tuple[Subscription, ...] = ()
_guard = threading.Lock()


def subscribe(handler: Handler, *, client: object | None = None) -> Subscription:
    """Call ``handler(event)`` for every event of every client in this process, or
    of ``client`` only (a ``Client`` or ``AsyncClient``)."""
    global _subscriptions
    checked: object = handler  # typed callers cannot pass anything else; others can
    if not callable(checked):
        from leasehold._errors import InvalidArgument

        raise InvalidArgument("handler must be a callable taking one event")
    subscription = Subscription(handler, None if client is None else id(client))
    with _guard:
        _subscriptions = (*_subscriptions, subscription)
    return subscription


def _unsubscribe(subscription: Subscription) -> None:
    global _subscriptions
    with _guard:
        _subscriptions = tuple(s for s in _subscriptions if s is not subscription)


def wanted() -> bool:
    """True when anybody listens: emitters build events only then."""
    return bool(_subscriptions)


def emit(event: Event) -> None:
    """Deliver ``event`` to its subscribers. Never raises."""
    for subscription in _subscriptions:
        if subscription.client_id is not None and subscription.client_id != event.client_id:
            continue
        try:
            subscription.handler(event)
        except Exception:
            if not subscription._failed:
                subscription._failed = True
                logger.exception(
                    "leasehold event handler %r raised (logged once; it stays subscribed)",
                    subscription.handler,
                )


__all__ = [
    "AcquireFailed",
    "AcquireStarted",
    "Acquired",
    "Busy",
    "ElectionEnded",
    "ElectionWon",
    "Event",
    "Handler",
    "IntentExpired",
    "LeaderChanged",
    "Lost",
    "LossReason",
    "MemberJoined",
    "MemberLeft",
    "OnceFailed",
    "OnceRan",
    "OnceReused",
    "Primitive",
    "Released",
    "Renewed",
    "RenewalFailed",
    "RoomClosed",
    "RoomOpened",
    "Subscription",
    "TimedOut",
    "emit",
    "subscribe",
    "wanted",
]
