"""Wake-up keys, waiter registrations and the announcement channel's listener."""

from __future__ import annotations

import hashlib
from typing import Protocol

from leasehold._async._concurrency import AsyncEvent
from leasehold._async.backends.postgres.listener import NotifyListener
from leasehold._errors import StoreUnavailable


def wake_key(name: str, token: str) -> str:
    """What a NOTIFY carries to wake (name, token): a hash, so tokens stay secret.
    A hand-over sends ``"<wake_key> <fence>"``."""
    return hashlib.sha256(f"{len(name)}:{name}{token}".encode()).hexdigest()[:32]


class _Waiter:
    """A token this store listens for: ``notified`` when a notification arrived,
    ``fence`` when it was a hand-over (the token is a holder now). The event is made
    only by a ``wait`` that has to block: most acquires are granted at once, and
    never need one."""

    __slots__ = ("event", "fence", "notified", "until")

    def __init__(self, until: float) -> None:
        self.until = until
        self.notified = False
        self.fence: int | None = None
        self.event: AsyncEvent | None = None


def announce_channel(schema: str) -> str:
    """The NOTIFY channel of a schema's announcements: fixed per schema, so every
    store on it meets there; hashed, so any schema name makes a short identifier."""
    return "leasehold_announce_" + hashlib.sha256(schema.encode()).hexdigest()[:16]


class ListenerOwner(Protocol):
    """What ``_AnnounceListener`` needs of its store."""

    _listener: NotifyListener | None
    _listener_error: str | None

    async def _listening_channel(self) -> str | None: ...


class _AnnounceListener:
    """The store's one LISTEN connection, as the ``Listener`` a ``ListenerSlot``
    keeps for announcements: starting it starts (or reuses) the store's listener,
    which LISTENs on the announcement channel too; closing it is the store's job."""

    def __init__(self, store: ListenerOwner) -> None:
        self._store = store

    @property
    def alive(self) -> bool:
        listener = self._store._listener
        return listener is not None and listener.alive

    def fileno(self) -> int | None:
        listener = self._store._listener
        return None if listener is None else listener.fileno()

    async def start(self) -> None:
        if await self._store._listening_channel() is None:
            error = self._store._listener_error or "retrying shortly"
            raise StoreUnavailable(f"{self._store!r}: LISTEN failed: {error}")

    async def aclose(self) -> None:
        pass  # the store closes its listener
