"""``postgresql://`` and ``postgres://``: PostgreSQL through psycopg 3 and psycopg_pool.

Lease state lives in ordinary tables of one schema (``?schema=``, default
``leasehold``), created idempotently on first use from ``leasehold/_shared/postgres/schema.sql``.
Every operation is one call of a PL/pgSQL function from that file: one round trip,
one short transaction, expiry decided by the server's ``clock_timestamp()``.
Fences come from one WAL-logged sequence, issued in the granting transaction;
record versions (compare-and-set values) come from the same sequence.

Nothing depends on session state (no session advisory locks, temp tables or
prepared statements), so the store is correct behind a transaction-mode pooler
(``?pooler=transaction``). A release hands the place over: the first waiter becomes
the holder in the releasing transaction (schema version 4), and is told its fence by
a NOTIFY on a dedicated LISTEN connection per store when a direct session is
available; otherwise waiters poll, and their next acquire confirms the grant.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict

from leasehold._async import _concurrency
from leasehold._async._concurrency import AsyncEvent
from leasehold._async.backends.postgres import sharing
from leasehold._async.backends.postgres.connection import (
    _LISTENER_RETRY,
    _WAITER_GRACE,
    PostgresConnection,
)
from leasehold._async.backends.postgres.listener import NotifyListener
from leasehold._async.backends.postgres.options import _scrub, parse_options
from leasehold._async.backends.postgres.schema import _waiters_query
from leasehold._async.backends.postgres.waiting import _Waiter, wake_key
from leasehold._async.store import (
    AsyncSubscription,
    HubSubscription,
)
from leasehold._core import validate
from leasehold._core.clock import Clock
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Capabilities,
    Granted,
    HandedOver,
    HolderInfo,
    Record,
    RenewItem,
    WaiterInfo,
    WaitResult,
)
from leasehold._core.url import StoreURL

# Seconds to wait at close for each of the pool's workers (connecting to a stalled
# server, say) to stop; it ends by itself within connect_timeout.
_POOL_CLOSE = 0.2
__all__ = ["AsyncPooledPostgresStore", "AsyncPostgresStore", "from_url"]

log = logging.getLogger("leasehold.postgres")

# The most items one renew() call sends; larger batches take one call per this many
# (the function itself works through 1,000 items at a time). Bounds how long one
# statement runs, well inside statement_timeout.
_RENEW_CALL_ITEMS = 20_000


# The stores of ?durability=relaxed, (listening, behind a pooler): filled in by
# backends/postgres/relaxed.py when the package is imported.
_RELAXED_CLASSES: list[type[AsyncPostgresStore]] = []


class AsyncPostgresStore(PostgresConnection):
    capabilities = Capabilities(
        server_clock=True,
        durable=True,
        cross_host=True,
        notifications=True,
        fence_survives_data_loss=True,
        hand_over=True,
        notes=(
            "expiry on the server's clock (clock_timestamp())",
            "fences from one WAL-logged sequence: never reused, even after a crash",
            "a release hands the place to the first waiter in the same transaction; "
            "LISTEN/NOTIFY tells it its fence, on one connection per process and database",
            "correct behind transaction-mode poolers with ?pooler=transaction (polling)",
            "fences survive failover only with synchronous replication",
        ),
        announcements=True,
    )

    def __new__(cls, url: StoreURL, clock: Clock | None = None) -> AsyncPostgresStore:
        # Behind a transaction pooler the same store has different capabilities;
        # capabilities are class data, so that mode is a subclass.
        target = cls
        if cls is AsyncPostgresStore:
            opts = parse_options(url)
            if not opts.listen:
                target = AsyncPooledPostgresStore
            if opts.relaxed:
                # Registered by the relaxed module, which this package's __init__
                # imports, so the two modules depend one way.
                listening, pooled = _RELAXED_CLASSES
                target = listening if opts.listen else pooled
        instance: AsyncPostgresStore = super().__new__(target)
        return instance

    # -- wake-ups -----------------------------------------------------------------

    async def _listening_channel(self) -> str | None:
        """The channel to be woken on, LISTEN already in place; None means poll."""
        if not self._listens or self._closed:
            return None
        listener = self._listener
        if listener is not None and listener.alive:
            return self._channel
        async with self._listener_mutex:
            listener = self._listener
            if listener is not None and listener.alive:
                return self._channel
            now = self._clock.monotonic()
            if now < self._listener_retry_at:
                return None
            if listener is not None:
                self._listener = None
                await listener.aclose()
            # One LISTEN connection per store for wake-ups and announcements alike.
            listener = NotifyListener(
                self._opts.conninfo,
                (self._channel, self._announce_channel),
                self._dispatch,
                self._on_listener_lost,
            )
            try:
                await listener.start()
            except (psycopg.Error, OSError) as exc:
                await listener.aclose()
                self._listener_retry_at = now + _LISTENER_RETRY
                self._listener_error = _scrub(str(exc), self._opts.secrets)
                log.warning(
                    "%r: cannot LISTEN (%s); waiters poll for %.0f s",
                    self,
                    self._listener_error,
                    _LISTENER_RETRY,
                )
                return None
            self._listener = listener
            self._listener_error = None
            return self._channel

    def _dispatch(self, channel: str, payload: str) -> None:
        if channel == self._channel:
            self._on_notify(payload)
        else:
            self._topics.wake(payload)

    def _on_notify(self, payload: str) -> None:
        key, _, fence = payload.partition(" ")
        with self._waiters_guard:
            entry = self._waiters.get(key)
            if entry is None:
                return
            entry.notified = True
            if fence.isascii() and fence.isdigit():  # anything else only wakes it
                entry.fence = int(fence)
            event = entry.event
        if event is not None:
            event.set()

    def _on_listener_lost(self) -> None:
        # Notifications sent while nobody listens are lost: wake every waiter, whose
        # next acquire re-establishes LISTEN before it queues again.
        with self._waiters_guard:
            events = []
            for entry in self._waiters.values():
                entry.notified = True
                if entry.event is not None:
                    events.append(entry.event)
        for event in events:
            event.set()
        self._topics.wake_all()

    def _arm(self, key: str, queue_ttl: float) -> None:
        """Register (or re-arm) a waiter *before* the acquire that queues it is sent."""
        now = self._clock.monotonic()
        with self._waiters_guard:
            if now >= self._next_sweep:
                self._next_sweep = now + 10.0
                for stale in [k for k, entry in self._waiters.items() if entry.until < now]:
                    del self._waiters[stale]
            entry = self._waiters.get(key)
            if entry is None:
                self._waiters[key] = _Waiter(now + queue_ttl + _WAITER_GRACE)
            else:
                # A hand-over noted before this attempt is what the attempt confirms.
                entry.notified = False
                entry.fence = None
                if entry.event is not None:
                    entry.event.clear()
                entry.until = now + queue_ttl + _WAITER_GRACE

    def _disarm(self, name: str, token: str, key: str | None = None) -> None:
        if self._waiters:
            with self._waiters_guard:
                self._waiters.pop(key or wake_key(name, token), None)

    # -- the store contract ---------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        if os.getpid() != self._pid:  # _after_fork()'s test, written out on the hot path
            self._after_fork()
        channel: str | None = None
        key: str | None = None
        if request.queue_ttl is not None:
            channel = await self._listening_channel()
            if channel is not None:
                key = wake_key(request.name, request.token)
                self._arm(key, request.queue_ttl)
        holder = request.holder
        rows = await self._call(
            "acquire",
            "acquire",
            (
                request.name,
                request.token,
                holder.owner,
                holder.host,
                holder.pid,
                float(request.ttl),
                request.limit,
                None if request.queue_ttl is None else float(request.queue_ttl),
                channel,
                key,
            ),
        )
        granted, fence, retry_after, position = rows[0]
        if granted:
            self._disarm(request.name, request.token, key)
            return Granted(int(fence))
        return Busy(
            retry_after=None if retry_after is None else max(0.0, float(retry_after)),
            position=None if position is None else int(position),
        )

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        # One call (one round trip, one transaction) per _RENEW_CALL_ITEMS items.
        answers: list[bool] = []
        for start in range(0, len(items), _RENEW_CALL_ITEMS):
            chunk = items[start : start + _RENEW_CALL_ITEMS]
            rows = await self._call(
                "renew",
                "renew",
                (
                    [item.name for item in chunk],
                    [item.token for item in chunk],
                    [float(item.ttl) for item in chunk],
                ),
            )
            answers.extend(bool(answer) for answer in rows[0][0])
        return answers

    async def release(self, name: str, token: str) -> bool:
        if os.getpid() != self._pid:  # before _disarm: its lock may be stale in a child
            self._after_fork()
        self._disarm(name, token)
        rows = await self._call("release", "release", (name, token), idempotent=False)
        return bool(rows[0][0])

    async def holders(self, name: str) -> list[HolderInfo]:
        return self._infos(await self._call("holders", "holders_of", (name,)))

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        return self._infos(await self._call("leases", "leases", (prefix,)))

    @staticmethod
    def _infos(rows: list[tuple[Any, ...]]) -> list[HolderInfo]:
        return [
            HolderInfo(
                name=name,
                owner=owner,
                host=host,
                pid=int(pid),
                fence=int(fence),
                limit=int(limit),
                held_for=max(0.0, float(held_for)),
                expires_in=max(0.0, float(expires_in)),
            )
            for name, owner, host, pid, fence, limit, held_for, expires_in in rows
        ]

    async def waiters(self, prefix: str = "") -> list[WaiterInfo]:
        query = _waiters_query(self._opts.schema)
        rows = await self._query("waiters", query, (prefix, prefix), idempotent=True)
        return [
            WaiterInfo(
                name=name,
                owner=owner,
                host=host,
                pid=int(pid),
                position=int(position),
                expires_in=max(0.0, float(expires_in)),
            )
            for name, owner, host, pid, position, expires_in in rows
        ]

    async def break_lease(self, name: str) -> int:
        rows = await self._call("break_lease", "break_lease", (name,), idempotent=False)
        return int(rows[0][0])

    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        self._after_fork()
        key = wake_key(name, token)
        with self._waiters_guard:
            entry = self._waiters.get(key)
        if entry is None:
            # Not queued through this store's listener (polling mode, no queue_ttl,
            # or LISTEN unavailable): nothing will wake us. A hand-over made
            # meanwhile is confirmed by the next acquire.
            await _concurrency.sleep(timeout)
            return False
        with self._waiters_guard:
            event = entry.event
            if event is None and not entry.notified:
                event = entry.event = AsyncEvent()
        if not entry.notified and not (event is not None and await event.wait(timeout)):
            return False
        with self._waiters_guard:
            entry.notified = False
            if entry.event is not None:
                entry.event.clear()
            fence = entry.fence
            if fence is not None and self._waiters.get(key) is entry:
                del self._waiters[key]  # a holder now: nothing more to wake it for
        return True if fence is None else HandedOver(fence)

    async def read_record(self, key: str) -> Record:
        rows = await self._call("read_record", "read_record", (key,))
        value, version, now = rows[0]
        return Record(
            key=key,
            value=None if value is None else bytes(value),
            version=int(version),
            now=float(now),
        )

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        # Not retried: if a first attempt committed before its connection died, a
        # second would find its own version and wrongly answer "lost the race".
        rows = await self._call(
            "write_record",
            "write_record",
            (
                key,
                int(expected_version),
                None if value is None else bytes(value),
                None if ttl is None else float(ttl),
            ),
            idempotent=False,
        )
        version = rows[0][0]
        return None if version is None else int(version)

    async def ping(self) -> None:
        await self._query("ping", b"SELECT 1", (), idempotent=True)

    async def server_time(self) -> float | None:
        rows = await self._query(
            "server_time",
            b"SELECT extract(epoch FROM clock_timestamp())::double precision",
            (),
            idempotent=True,
        )
        return float(rows[0][0])

    async def aclose(self) -> None:
        if not sharing.leave(self):
            return  # other clients of this process still use it
        self._closed = True
        if os.getpid() != self._pid:
            self._after_fork()  # a child never closes what its parent still uses
            return
        listener, self._listener = self._listener, None
        pool, self._pool = self._pool, None
        if listener is not None:
            await listener.aclose()
        await self._announcements.aclose()
        with self._spare_guard:
            spare, self._spare = self._spare, None
        if pool is not None:
            if spare is not None:
                await pool.putconn(spare)  # closed with the pool's others
            # psycopg_pool waits 5 s by default for each worker, which may be
            # trying to connect to a stalled server; closing keeps a tighter bound.
            await pool.close(timeout=min(_POOL_CLOSE, self.operation_timeout))

    # -- announcements --------------------------------------------------------------

    async def announce(self, topic: str) -> None:
        # The topic travels as a parameter (the payload), never as SQL or a channel.
        await self._query(
            "announce",
            b"SELECT pg_notify(%s, %s)",
            (self._announce_channel, validate.topic(topic)),
            idempotent=True,  # a second NOTIFY only wakes subscribers twice
        )

    def subscribe(self, topic: str) -> AsyncSubscription:
        topic = validate.topic(topic)
        if not self._opts.listen:
            return AsyncSubscription(topic)  # no LISTEN behind a transaction pooler
        return HubSubscription(topic, self._topics, self._announcements)

    def warnings(self) -> list[str]:
        found: list[str] = []
        if not self._opts.listen:
            found.append(
                f"{self.url.redacted}: ?pooler=transaction: no LISTEN/NOTIFY, waiters poll"
            )
        if self._listener_error is not None:
            found.append(
                f"{self.url.redacted}: LISTEN failed ({self._listener_error}); waiters poll"
            )
        if self._announcements.error is not None:
            found.append(
                f"{self.url.redacted}: LISTEN for announcements failed "
                f"({self._announcements.error}); observers poll"
            )
        if self._opts.statement_timeout == 0:
            found.append(f"{self.url.redacted}: statement_timeout disabled")
        settings = conninfo_to_dict(self._opts.conninfo)
        host = str(settings.get("host") or "")
        local = all(
            h in ("", "localhost", "127.0.0.1", "::1") or h.startswith("/") for h in host.split(",")
        )
        if not local and settings.get("sslmode") not in ("require", "verify-ca", "verify-full"):
            found.append(
                f"{self.url.redacted}: sslmode is not require/verify-full for a remote host"
            )
        if str(settings.get("keepalives", "1")) == "0":
            found.append(f"{self.url.redacted}: keepalives=0: a dead network path goes unnoticed")
        return found

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted!r})"


class AsyncPooledPostgresStore(AsyncPostgresStore):
    """The same store behind a transaction-mode pooler (``?pooler=transaction``):
    no LISTEN (a pooler does not keep a session), so waiters poll."""

    capabilities = replace(
        AsyncPostgresStore.capabilities,
        notifications=False,
        announcements=False,
        hand_over=False,
        notes=(
            "expiry on the server's clock (clock_timestamp())",
            "fences from one WAL-logged sequence: never reused, even after a crash",
            "transaction-mode pooler: no session state used, no prepared statements",
            "no notifications behind the pooler: waiters poll with jitter (a place "
            "handed over to a waiter is confirmed by its next acquire)",
            "fences survive failover only with synchronous replication",
        ),
    )


def from_url(url: StoreURL, clock: Clock) -> AsyncPostgresStore:
    """Validate the URL and build the store, or share this process's store for it
    (sharing.py); connects lazily on first use."""
    return sharing.shared(sharing.share_key(url, clock), lambda: AsyncPostgresStore(url, clock))
