"""The context: what the primitives get from their client, so that none imports it.

The client builds one context and hands it to every primitive it makes; the
context holds the store, the clock, this process's holder, the statistics
counters, the per-name gates, and the keeper that renews granted leases.
Dependencies run one way: client -> primitives -> context -> keeper -> lease.
"""

from __future__ import annotations

from leasehold._async.gate import AsyncGates
from leasehold._async.keeper import AsyncKeeper
from leasehold._async.lease import AsyncLease
from leasehold._async.store import AsyncStore
from leasehold._core.clock import Clock
from leasehold._core.records import Holder
from leasehold._core.stats import Counters
from leasehold._observe import Observer


class AsyncContext:
    """The narrow view of a client that primitives and leases use.

    ``client_id`` is the client's ``id()``, as ``leasehold.events`` uses it.
    ``holder`` and ``gates`` are replaced in a forked child (see the client);
    ``closed`` is set once the client is closing, ``store_closed`` just before its
    store closes. ``observer`` is where primitives report what happens (statistics,
    events, logs, health facts; see ``leasehold._observe``).
    """

    def __init__(self, store: AsyncStore, clock: Clock, holder: Holder, client_id: int) -> None:
        self.store = store
        # id() of the client: what leasehold.events tells clients apart by.
        self.client_id = client_id
        self.clock = clock
        self.holder = holder
        self.observer = Observer(client_id=client_id, store=store.url.scheme, clock=clock)
        self.gates = AsyncGates()
        self.keeper = AsyncKeeper(store, clock, self.observer)
        self.closed = False
        self.store_closed = False

    @property
    def counters(self) -> Counters:
        """The statistics counters (the observer's; replaced in a forked child)."""
        return self.observer.counters

    def track(self, lease: AsyncLease) -> None:
        """Renew ``lease`` in the background until it ends."""
        self.keeper.track(lease)

    def reschedule(self, lease: AsyncLease) -> None:
        """``lease``'s TTL changed: the keeper may have to look at it sooner."""
        self.keeper.reschedule(lease)

    def forget(self, lease: AsyncLease) -> None:
        """Stop renewing ``lease`` (released or lost)."""
        self.keeper.forget(lease)
