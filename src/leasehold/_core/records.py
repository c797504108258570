"""Plain data exchanged between primitives and stores."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Holder:
    """Who asks for a lease: readable identity stored next to the grant.

    ``owner`` is for humans (logs, ``leasehold ls``); it is *not* the secret token.
    """

    owner: str
    host: str
    pid: int

    @classmethod
    def for_this_process(cls, label: str | None = None) -> Holder:
        host = socket.gethostname()
        pid = os.getpid()
        base = label or f"{host}:{pid}"
        return cls(owner=f"{base}:{secrets.token_hex(3)}", host=host, pid=pid)


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    """One atomic acquire attempt.

    ``queue_ttl``: when not None and the attempt fails, the store keeps (or refreshes)
    the token in the name's FIFO wait queue for that many seconds, so that later
    attempts are served in arrival order and a release can wake this waiter alone.
    """

    name: str
    token: str
    holder: Holder
    ttl: float
    limit: int = 1
    queue_ttl: float | None = None


@dataclass(frozen=True, slots=True)
class Granted:
    fence: int


@dataclass(frozen=True, slots=True)
class Busy:
    """Not granted. ``retry_after``: seconds until the earliest holder expires (store clock),
    None if unknown. ``position``: 0-based place in the wait queue, None if not queued."""

    retry_after: float | None = None
    position: int | None = None


AcquireResult = Granted | Busy


@dataclass(frozen=True, slots=True)
class HandedOver:
    """``wait()`` result: a release made the waiting token a holder in its own atomic
    step (stores with ``Capabilities.hand_over``), so the waiter need not ask again.

    The grant's expiry on the store's clock is ``min(queue expiry, grant time + ttl)``
    where the queue expiry was set by the waiter's latest acquire attempt. The waiter's
    safe deadline is therefore the *send* time of that attempt plus
    ``min(ttl, queue_ttl)`` minus the margin: it knows no later point that surely came
    before the grant. Renewing brings the expiry to the full ttl.
    """

    fence: int


WaitResult = bool | HandedOver


@dataclass(frozen=True, slots=True)
class RenewItem:
    name: str
    token: str
    ttl: float


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """A live grant as reported by ``holders()`` and ``leases()``."""

    name: str
    owner: str
    host: str
    pid: int
    fence: int
    limit: int
    held_for: float
    expires_in: float


@dataclass(frozen=True, slots=True)
class WaiterInfo:
    """A live place in a name's wait queue, as reported by ``waiters()``.

    ``position`` is 0-based among the name's live waiters (0 is served first);
    ``expires_in`` is when the place lapses unless the waiter asks again. ``owner``,
    ``host`` and ``pid`` are the waiter's latest request ("" and 0 for a place queued
    by a version that did not store them)."""

    name: str
    owner: str
    host: str
    pid: int
    position: int
    expires_in: float


@dataclass(frozen=True, slots=True)
class Record:
    """A small versioned value as read by ``read_record``.

    ``version`` is 0 when the key is absent (never written, deleted or expired).
    ``now`` is the store's clock at the read, in seconds on the same time base as the
    store's expiries; only differences between two ``now`` values of one store mean
    anything. Primitives use it to decide expiry inside the value (presence members,
    once-only runners) without ever reading the client's clock.
    """

    key: str
    value: bytes | None
    version: int
    now: float


MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers, as data; docs/backends.md is generated from these."""

    server_clock: bool
    durable: bool
    cross_host: bool
    notifications: bool
    fence_survives_data_loss: bool
    # release() makes the first waiter a holder itself and wait() returns HandedOver.
    hand_over: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    # subscribe() is woken by announce() (else its wait() only sleeps: polling).
    announcements: bool = False
    # A grant survives the loss of a server (a consensus store commits it on a
    # quorum), so a failover cannot hand a held name to a second client.
    failover_safe: bool = False
    # A call cancelled midway returns at once (nothing to wait for on the server's
    # side: no query to cancel) and may simply run again. Releases then run in the
    # caller's task, restarted in the background if cancelled, instead of in a task
    # of their own (two passes of the event loop per release).
    cancels_cleanly: bool = False
