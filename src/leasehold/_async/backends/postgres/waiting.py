"""Wake-up keys, waiter registrations and the announcement channel's listener."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import psycopg
import psycopg.errors

from leasehold._async._concurrency import AsyncEvent
from leasehold._async.backends.postgres.listener import NotifyListener
from leasehold._async.backends.postgres.options import _scrub
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


class _AnnounceListener:
    """The ``NotifyListener`` on a schema's announcement channel, as the
    ``Listener`` a ``ListenerSlot`` keeps: its failures are StoreUnavailable,
    password removed."""

    def __init__(self, listener: NotifyListener, what: str, hidden: Sequence[str]) -> None:
        self._listener = listener
        self._what = what
        self._hidden = hidden

    @property
    def alive(self) -> bool:
        return self._listener.alive

    def fileno(self) -> int | None:
        return self._listener.fileno()

    async def start(self) -> None:
        try:
            await self._listener.start()
        except (psycopg.Error, OSError) as exc:
            message = f"{self._what}: LISTEN failed: {str(exc).strip() or type(exc).__name__}"
            raise StoreUnavailable(_scrub(message, self._hidden)) from None

    async def aclose(self) -> None:
        await self._listener.aclose()
