"""The store contract: the few atomic operations every backend implements.

Every primitive (lock, semaphore, election, ...) is written once against this
class and never against a backend. A backend is proven by the one conformance
suite in ``leasehold.testing.conformance``.

Rules every operation keeps:

* Each operation is one atomic step in the store (a transaction, a script).
* Expiry is decided by the store's own clock. A holder whose expiry has passed is
  treated as absent by every operation, whether or not it was purged yet.
* Tokens are secret and never returned. Holders are identified to humans by
  ``Holder.owner``.
* Fences are unique per name and strictly increasing across every grant of that
  name, including across expiry, release, ``break_lease`` and store restarts that
  lose data.
* Store errors surface as ``StoreUnavailable`` (never a raw driver exception) and
  contain no credentials.
* After ``os.fork()`` a store used in the child reconnects instead of sharing the
  parent's connections.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import ClassVar, Protocol

from leasehold._async._concurrency import AsyncEvent, AsyncMutex
from leasehold._core import validate
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Capabilities,
    HolderInfo,
    Record,
    RenewItem,
    WaitResult,
)
from leasehold._core.url import StoreURL
from leasehold._errors import StoreUnavailable

logger = logging.getLogger("leasehold")


class AsyncStore(ABC):
    capabilities: ClassVar[Capabilities]
    url: StoreURL

    @abstractmethod
    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        """Try once to add ``request.token`` as a holder of ``request.name``.

        In one atomic step: drop expired holders and expired queue entries; if the
        token already holds the name, refresh its expiry to now + ttl and return its
        existing fence (so retrying an acquire whose answer was lost is safe);
        otherwise grant when fewer than ``limit`` live holders exist *and* fewer
        queued waiters are ahead of this token than there are free places (a token
        that is not queued is behind every queued waiter). A grant issues a new
        fence, stores the holder with expiry now + ttl and removes the token from the
        queue. When not granted and ``queue_ttl`` is set, the token is queued (kept
        at its place if already queued) with expiry now + queue_ttl.

        Returns ``Granted(fence)`` or ``Busy(retry_after, position)``.
        """

    @abstractmethod
    async def renew(self, items: Sequence[RenewItem]) -> Sequence[bool | None]:
        """For each item, atomically: if the token is a live holder of the name, set
        its expiry to now + ttl (replacing, not adding) and answer True; otherwise
        False. One round trip for the whole batch; answers in item order.

        A store whose items live on several servers (a Redis Cluster) answers None
        for the items of a server that could not be reached, so that one server's
        failure does not cost the leases kept on the others; the caller retries
        those items as it would after an error. A store raises ``StoreUnavailable``
        when it could answer no item at all, so a single item is never None."""

    @abstractmethod
    async def release(self, name: str, token: str) -> bool:
        """Remove the token as holder *and* from the wait queue of ``name``.

        True if it was a live holder (a handed-over one too). Idempotent. When places
        become free, wake the first queued waiters that can now be granted (O(1) of
        them, not all). Stores with ``capabilities.hand_over`` make those waiters
        holders in the same atomic step instead of only waking them: a new fence, the
        holder record of the waiter's latest acquire request, expiry
        ``min(queue expiry, now + its requested ttl)``; their ``wait`` then returns
        ``HandedOver``.
        """

    @abstractmethod
    async def holders(self, name: str) -> list[HolderInfo]:
        """The live holders of ``name``, oldest grant first."""

    @abstractmethod
    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        """Every live holder of every name starting with ``prefix``, by name."""

    @abstractmethod
    async def break_lease(self, name: str) -> int:
        """Forcibly remove every holder of ``name`` (the number removed is returned).

        The next grant's fence is higher than any broken holder's, so their fenced
        writes fail. Waiters are woken.
        """

    @abstractmethod
    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        """Block until the store wakes ``token`` waiting on ``name``, or ``timeout``.

        ``HandedOver(fence)`` if a release made the token a holder (see ``release``;
        only stores with ``capabilities.hand_over``), else True if woken. A wake-up
        sent after ``acquire`` returned Busy for a queued token is never missed, even
        if it arrives before ``wait`` is called. Stores without notifications sleep
        for ``timeout`` and return False. Spurious wake-ups are allowed: callers
        always re-try ``acquire`` unless handed over.
        """

    @abstractmethod
    async def read_record(self, key: str) -> Record:
        """The record ``key`` (value None and version 0 if absent or expired) and the
        store's clock at the time of the read.

        Records are the second half of the contract: small values (at most
        ``MAX_RECORD_BYTES``) changed only by compare-and-set, on which primitives
        with richer state (presence rooms, once-only results) are written once.
        Record keys are a namespace of their own, apart from lease names.
        """

    @abstractmethod
    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        """Compare-and-set: if the record's current version (0 when absent or
        expired) equals ``expected_version``, store ``value`` (None deletes it) with
        expiry now + ``ttl`` on the store's clock (None: never expires) and return
        the new version; otherwise change nothing and return None.

        New versions come from the store's fence sequence: strictly greater than
        every version and fence issued before, so a version is never reused for a
        key, even across a store restart that loses data. A deleted or expired record
        reads as version 0 again, so only "absent" can recur (callers treat two
        absent readings as the same state).
        """

    @abstractmethod
    async def ping(self) -> None:
        """One cheap round trip; ``StoreUnavailable`` if the store cannot be used."""

    async def server_time(self) -> float | None:
        """The store's wall clock as Unix seconds, for diagnostics only; None if the
        store has no clock of its own (embedded stores share the host's)."""
        return None

    # -- announcements: optional, with a polling fallback ------------------------------

    async def announce(self, topic: str) -> None:
        """Wake every current subscriber of ``topic``, in every process that uses this
        store: best effort, at most one round trip. Call it *after* the change it
        announces, so that a woken subscriber that reads the store sees the change.

        The default does nothing (stores without ``capabilities.announcements``).
        ``StoreUnavailable`` if the store cannot be reached.
        """
        validate.topic(topic)

    def subscribe(self, topic: str) -> AsyncSubscription:
        """A subscription to ``topic``'s announcements, used as a context manager.

        Enter it first, then read the state you watch, then wait on it and read
        again when the wait returns: an announcement made after the subscription was
        entered is never missed (see ``AsyncSubscription``). No I/O until entered.

        The default is the polling fallback: ``wait`` sleeps out its timeout.
        """
        return AsyncSubscription(validate.topic(topic))

    async def aclose(self) -> None:
        """Release connections. Idempotent."""

    def restarts(self, name: str) -> int:
        """How many restarts (or failovers) of the server that keeps ``name`` this
        store object has noticed, e.g. by a changed Redis run id. No I/O. A lease
        granted before the count grew and then refused was lost to the restart, and
        says so. Stores that cannot tell answer 0 (the default)."""
        del name
        return 0

    def warnings(self) -> list[str]:
        """Configuration problems a user should know about (``leasehold doctor``)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted!r})"


class AsyncSubscription:
    """A subscription to one topic's announcements, from ``AsyncStore.subscribe``.

    Entering it registers it (with the store, where announcements are notified), so
    every announcement made after ``__aenter__`` returned reaches it. ``wait(timeout)``
    returns True when an announcement arrived since the subscription was entered or
    since the previous ``wait`` returned True (any number of them count as one), or
    when ``wake()`` was called; False when ``timeout`` passed first. True may be
    spurious (a store connection was lost and re-established, say): callers re-read
    the state they watch either way. Subscribing never raises for a store problem:
    a subscription that cannot register polls (``wait`` only sleeps) and registers
    again later. One task or thread waits on a subscription at a time.

    This base class is the polling fallback of stores without announcements.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._event = AsyncEvent()

    async def __aenter__(self) -> AsyncSubscription:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _open(self) -> None:
        """Register with the store (backends with announcements override this)."""

    @property
    def notified(self) -> bool:
        """True while announcements reach this subscription; False while it polls
        (the fallback, or a store that cannot register it right now)."""
        return False

    async def wait(self, timeout: float) -> bool:
        """Block until an announcement or ``wake()``, or ``timeout`` seconds."""
        woken = await self._event.wait(max(0.0, timeout))
        if woken:
            # Clearing before the caller looks again loses nothing: whatever set the
            # event before this point made its change before it, too.
            self._event.clear()
        return woken

    def wake(self) -> None:
        """End the current (or next) ``wait`` with True. Thread-safe, never blocks:
        stores call it on an announcement, and owners to interrupt a wait."""
        self._event.set()

    async def aclose(self) -> None:
        """Unregister. Idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.topic!r}>"


class TopicHub:
    """The subscriptions of one process to one store's announcements, by topic.

    Stores whose announcements arrive in one place (an in-process table, one
    listening connection) register subscriptions here and fan each announcement
    out locally. Thread-safe.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._by_topic: dict[str, set[AsyncSubscription]] = {}

    def add(self, subscription: AsyncSubscription) -> None:
        with self._guard:
            self._by_topic.setdefault(subscription.topic, set()).add(subscription)

    def discard(self, subscription: AsyncSubscription) -> None:
        with self._guard:
            subscribed = self._by_topic.get(subscription.topic)
            if subscribed is None:
                return
            subscribed.discard(subscription)
            if not subscribed:
                del self._by_topic[subscription.topic]

    def wake(self, topic: str) -> None:
        with self._guard:
            subscribed = list(self._by_topic.get(topic, ()))
        for subscription in subscribed:
            subscription.wake()

    def wake_all(self) -> None:
        """Wake every subscription: announcements may have been lost (a listening
        connection failed), so every subscriber must look again."""
        with self._guard:
            subscribed = [s for group in self._by_topic.values() for s in group]
        for subscription in subscribed:
            subscription.wake()

    def after_fork_in_child(self) -> None:
        # The guard may have been held by a thread that does not exist in the child;
        # the parent's subscriptions are the parent's.
        self._guard = threading.Lock()
        self._by_topic = {}


class Listener(Protocol):
    """One connection that receives every announcement of a store (LISTEN, SUBSCRIBE)."""

    @property
    def alive(self) -> bool: ...

    async def start(self) -> None:
        """Connect and listen; when this returns, no announcement can be missed.
        ``StoreUnavailable`` (no credentials in it) if that cannot be done."""

    async def aclose(self) -> None: ...


class ListenerSlot:
    """Keeps a store's announcement listener running, for ``HubSubscription``.

    Started when the first subscription needs it, started again after it failed (at
    most every ``retry`` seconds), kept while the store lives. Every start is a new
    *generation*: a subscription that sees a generation it did not know returns from
    ``wait`` once, since announcements may have been lost between the two.
    """

    def __init__(self, make: Callable[[], Listener], *, retry: float, what: str) -> None:
        self._make = make
        self._retry = retry
        self._what = what
        self._mutex = AsyncMutex()
        self._listener: Listener | None = None
        self._generation = 0
        self._retry_at = float("-inf")
        self._closed = False
        self._pid = os.getpid()
        # Listeners inherited over fork(): never used or closed in the child (their
        # sockets belong to the parent), only kept from the garbage collector.
        self._inherited: list[Listener] = []
        self.error: str | None = None

    @property
    def listener(self) -> Listener | None:
        return self._listener

    def _after_fork(self) -> None:
        if os.getpid() == self._pid:
            return
        if self._listener is not None:
            self._inherited.append(self._listener)
        self._listener = None
        self._mutex = AsyncMutex()
        self._retry_at = float("-inf")
        self._pid = os.getpid()

    async def listening(self) -> int | None:
        """The generation of the live listener, starting it if need be; None while
        it cannot be started (subscribers poll meanwhile)."""
        self._after_fork()
        listener = self._listener
        if listener is not None and listener.alive:
            return self._generation
        if self._closed:
            return None
        async with self._mutex:
            listener = self._listener
            if listener is not None and listener.alive:
                return self._generation
            now = time.monotonic()
            if now < self._retry_at:
                return None
            self._listener = None
            if listener is not None:
                await listener.aclose()
            listener = self._make()
            try:
                await listener.start()
            except StoreUnavailable as exc:
                await listener.aclose()
                self._retry_at = now + self._retry
                # A warning when it starts failing (or fails differently), not at
                # every retry: a missing permission would repeat it forever.
                log = logger.warning if str(exc) != self.error else logger.debug
                self.error = str(exc)
                log(
                    "%s: cannot listen for announcements (%s); observers poll, "
                    "retrying every %.0f s",
                    self._what,
                    exc,
                    self._retry,
                )
                return None
            self._listener = listener
            self._generation += 1
            self.error = None
            return self._generation

    async def aclose(self) -> None:
        self._closed = True
        if os.getpid() != self._pid:
            self._after_fork()
            return
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.aclose()


class HubSubscription(AsyncSubscription):
    """A subscription that a store wakes through its ``TopicHub``: directly (memory)
    or from a listening connection (``slot``)."""

    def __init__(self, topic: str, hub: TopicHub, slot: ListenerSlot | None = None) -> None:
        super().__init__(topic)
        self._hub = hub
        self._slot = slot
        self._generation: int | None = None

    async def _open(self) -> None:
        # Registered locally before the listener is known to listen: whatever it
        # receives from then on reaches this subscription.
        self._hub.add(self)
        if self._slot is not None:
            self._generation = await self._slot.listening()

    @property
    def notified(self) -> bool:
        return self._slot is None or self._generation is not None

    async def wait(self, timeout: float) -> bool:
        if self._slot is not None:
            generation = await self._slot.listening()
            if generation != self._generation:
                self._generation = generation
                if generation is not None:
                    return True  # listening anew: what came before may be lost
        return await super().wait(timeout)

    async def aclose(self) -> None:
        self._hub.discard(self)
