"""AsyncClient: the entry point. One store, one keeper, many primitives."""

from __future__ import annotations

import os
import threading
import weakref
from types import TracebackType

from leasehold._async.backends import open_store
from leasehold._async.context import AsyncContext
from leasehold._async.election import AsyncElection, announce_change
from leasehold._async.gate import AsyncGates
from leasehold._async.lease import OnLost
from leasehold._async.lock import AsyncLock
from leasehold._async.once import DEFAULT_KEEP, AsyncOnce
from leasehold._async.presence import AsyncPresence
from leasehold._async.store import AsyncStore
from leasehold._core import validate
from leasehold._core.clock import SYSTEM_CLOCK, Clock
from leasehold._core.defaults import default_url
from leasehold._core.health import Health, LeaseFacts, assess
from leasehold._core.once import Serializer
from leasehold._core.records import Holder, HolderInfo
from leasehold._core.stats import Statistics
from leasehold._core.url import parse
from leasehold._errors import InvalidArgument

_CLIENTS: weakref.WeakSet[AsyncClient] = weakref.WeakSet()
_CLIENTS_GUARD = threading.Lock()


class AsyncClient:
    """Coordination primitives on one store.

    ``url``: ``memory://``, ``sqlite:///path.db``, ``redis://...``, ``postgresql://...``,
    ``etcd://host:2379[,host:2379...]``;
    default ``$LEASEHOLD_URL``, else a SQLite file in the user's state directory.
    ``clock`` drives every local time decision (tests pass a FakeClock).
    ``identity`` is a readable label stored with grants (default host:pid).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        store: AsyncStore | None = None,
        clock: Clock | None = None,
        identity: str | None = None,
    ) -> None:
        if identity is not None:
            validate.name(identity, what="identity")
        self.clock: Clock = clock or SYSTEM_CLOCK
        if store is None:
            store = open_store(parse(default_url() if url is None else url), self.clock)
        elif url is not None:
            raise InvalidArgument("pass either url or store, not both")
        self.store: AsyncStore = store
        self._identity = identity
        # What the primitives get: they never see the client itself.
        self._context = AsyncContext(store, self.clock, Holder.for_this_process(identity), id(self))
        with _CLIENTS_GUARD:
            _CLIENTS.add(self)

    @property
    def holder(self) -> Holder:
        """This client's identity in grants (owner token, host, pid)."""
        return self._context.holder

    @property
    def url(self) -> str:
        """The store URL with any password replaced by ***."""
        return self.store.url.redacted

    # -- primitives ------------------------------------------------------------

    def lock(
        self,
        name: str,
        ttl: float = 30.0,
        *,
        renew: bool = True,
        on_lost: OnLost | None = None,
        margin: float | None = None,
    ) -> AsyncLock:
        """An exclusive lease handle for ``name``. No I/O until acquired."""
        return AsyncLock(
            self._context, name, ttl=ttl, limit=1, renew=renew, on_lost=on_lost, margin=margin
        )

    def semaphore(
        self,
        name: str,
        limit: int,
        ttl: float = 30.0,
        *,
        renew: bool = True,
        on_lost: OnLost | None = None,
        margin: float | None = None,
    ) -> AsyncLock:
        """At most ``limit`` concurrent holders of ``name``; the lock interface."""
        return AsyncLock(
            self._context, name, ttl=ttl, limit=limit, renew=renew, on_lost=on_lost, margin=margin
        )

    def election(
        self,
        name: str,
        ttl: float = 30.0,
        *,
        identity: str | None = None,
        margin: float | None = None,
    ) -> AsyncElection:
        """A candidate in the leader election ``name`` (a lock with limit 1 whose
        fence is the term). ``identity`` labels this candidate when it leads."""
        return AsyncElection(self._context, name, ttl=ttl, identity=identity, margin=margin)

    def presence(
        self,
        room: str,
        member_ttl: float = 10.0,
        intent_ttl: float = 30.0,
        *,
        create_ttl: float = 30.0,
    ) -> AsyncPresence:
        """The presence room ``room``: members with intents to join, and epochs that
        an idle-room closer can never split in two. No I/O until used."""
        return AsyncPresence(
            self._context, room, member_ttl=member_ttl, intent_ttl=intent_ttl, create_ttl=create_ttl
        )

    def once(
        self,
        key: str,
        ttl: float = 30.0,
        *,
        keep: float | None = DEFAULT_KEEP,
        retry_failed: bool = True,
        serializer: Serializer | None = None,
        timeout: float | None = None,
        margin: float | None = None,
    ) -> AsyncOnce:
        """Once-only execution for ``key``: ``await client.once(key).run(fn)`` runs
        ``fn`` in exactly one caller and gives every caller its stored result, kept
        for ``keep`` seconds. No I/O until used."""
        return AsyncOnce(
            self._context,
            key,
            ttl=ttl,
            keep=keep,
            retry_failed=retry_failed,
            serializer=serializer,
            timeout=timeout,
            margin=margin,
        )

    # -- inspection ------------------------------------------------------------

    async def holders(self, name: str) -> list[HolderInfo]:
        """Live holders of ``name``: owner, host, pid, fence, held for, expires in."""
        return await self.store.holders(validate.name(name))

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        """Every live lease whose name starts with ``prefix``."""
        return await self.store.leases(validate.prefix(prefix))

    async def break_lease(self, name: str) -> int:
        """Forcibly release every holder of ``name``; returns how many were removed.
        The next grant's fence is higher, so the broken holders' fenced writes fail.
        If ``name`` is an election, its observers are told at once."""
        removed = await self.store.break_lease(validate.name(name))
        if removed:
            await announce_change(self.store, name)
        return removed

    def statistics(self) -> Statistics:
        """This client's counters since it was created (see ``Statistics``)."""
        return self._context.counters.snapshot()

    def health(self) -> Health:
        """What this client knows about itself right now, without I/O: whether its
        renewer runs, how long ago the store last confirmed a renewal or answered
        at all, and which held leases are within one renewal interval of their safe
        deadline (see ``Health``)."""
        context = self._context
        leases = [
            LeaseFacts(lease.name, lease.deadline, lease.term, lease.renewing)
            for lease in context.keeper.tracked()
            if not lease.released and not lease.lost
        ]
        observer = context.observer
        return assess(
            self.clock.monotonic(),
            leases,
            keeper_running=context.keeper.running(),
            last_renewal=observer.last_renewal,
            last_answer=observer.last_answer,
            last_failure=observer.last_failure,
            last_error=observer.last_error,
        )

    # -- lifecycle ---------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        context = self._context
        context.keeper.after_fork_in_child()
        context.gates = AsyncGates()
        context.observer.after_fork_in_child()
        context.holder = Holder.for_this_process(self._identity)

    async def aclose(self) -> None:
        """Release every lease this client still holds, stop renewing, disconnect."""
        context = self._context
        if context.closed:
            return
        context.closed = True
        for lease in context.keeper.tracked():
            await lease.release()
        context.keeper.stop()
        context.store_closed = True
        await self.store.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url!r}>"


def _after_fork_in_child() -> None:
    global _CLIENTS_GUARD
    _CLIENTS_GUARD = threading.Lock()
    for client in list(_CLIENTS):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
