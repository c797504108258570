"""``sqlite:///relative.db`` / ``sqlite:////absolute.db``: processes on one host.

Expiry uses the host's boot-time clock, which wall-clock jumps do not move, and
leases written during an earlier boot count as expired. A release makes the waiter
at the head of the store's FIFO queue a holder in its own transaction (hand-over)
and tells it so with one datagram carrying the fence (``leasehold._wake``);
waiters also look (read-only) at least every FALLBACK_POLL seconds, in case the
datagram cannot reach them (another network namespace sharing the file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from leasehold import _deadline
from leasehold._async._concurrency import IS_ASYNC, run_blocking, sleep, wait_readable
from leasehold._async.store import AsyncStore, AsyncSubscription
from leasehold._core import validate
from leasehold._core.clock import SYSTEM_CLOCK, Clock
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Capabilities,
    Granted,
    HandedOver,
    HolderInfo,
    Record,
    RenewItem,
    WaiterInfo,
    WaitResult,
)
from leasehold._core.url import StoreURL, query_options
from leasehold._errors import InvalidArgument, StoreUnavailable
from leasehold._shared.sqlite import topics as _sqlite_topics
from leasehold._shared.sqlite import wake as _wake
from leasehold._shared.sqlite.connection import NETWORK_FILESYSTEMS, boot_clock
from leasehold._shared.sqlite.tx import SQLiteTables, Wakes

DEFAULT_BUSY_TIMEOUT = 10.0
FALLBACK_POLL = 0.2
# Wake-up sockets kept for reuse by later waits (per process); more are closed.
SPARE_SOCKETS = 8
# A subscription that could not record its address polls this long before retrying.
SUBSCRIBE_RETRY = 5.0

logger = logging.getLogger("leasehold")

T = TypeVar("T")


class _BootClock:
    def monotonic(self) -> float:
        return boot_clock()


class AsyncSQLiteStore(AsyncStore):
    capabilities = Capabilities(
        server_clock=False,
        durable=True,
        cross_host=False,
        notifications=_wake.SUPPORTED,
        fence_survives_data_loss=True,
        hand_over=True,
        notes=(
            "processes on one host; not on network file systems",
            "a release hands the place to the head waiter and wakes it by datagram; "
            "a read-only look every 0.2 s as a fallback",
            "expiry on the host boot-time clock (immune to wall-clock jumps)",
        ),
        announcements=_wake.SUPPORTED,
        # A call on the worker thread runs on there if its caller is cancelled.
        cancels_cleanly=True,
    )

    def __init__(
        self,
        url: StoreURL,
        path: Path,
        *,
        clock: Clock,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        allow_network_fs: bool = False,
    ) -> None:
        self.url = url
        self.path = path
        self._clock = clock
        # Async calls run on the event loop when they need not wait (see _call), so
        # their commits must not checkpoint: a checkpoint writes and syncs the
        # database file. The worker thread checkpoints instead.
        self._tables = SQLiteTables(
            path,
            busy_timeout=busy_timeout,
            allow_network_fs=allow_network_fs,
            autocheckpoint=not IS_ASYNC,
        )
        self._guard = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = -1
        # The wake-up sockets of this process's queued waiters, and spare ones to
        # reuse. Their own lock: ``_guard`` is held through whole transactions.
        self._wake_guard = threading.Lock()
        self._sockets: dict[tuple[str, str], _wake.WakeSocket] = {}
        self._limits: dict[tuple[str, str], int] = {}
        self._spare: list[_wake.WakeSocket] = []
        self._spare_pid = os.getpid()

    def _pool(self) -> ThreadPoolExecutor:
        # One worker thread runs whatever may wait on SQLite, so the event loop never
        # does (see _call); ``_guard`` keeps the loop and the worker from using the
        # connection at once.
        with self._guard:
            if self._executor is None or self._executor_pid != os.getpid():
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="leasehold-sqlite")
                self._executor_pid = os.getpid()
            return self._executor

    async def _call(self, operation: Callable[[], T]) -> T:
        """``operation()`` on the store's connection, serialised by ``_guard``.

        With asyncio, first on the event loop itself if that cannot wait: when no
        other call is using the connection and no other process holds the database
        lock (WAL commits do not sync, and this store's commits never checkpoint),
        a transaction takes some tens of microseconds of CPU, less than handing it
        to the worker thread and back (measured: uncontended acquire + release
        ~225 -> ~75 µs). Anything that may wait (a locked database, the first
        connection, another call in flight) goes to the worker thread, so the
        loop never waits on SQLite."""
        if IS_ASYNC:
            done, result = self._tables.attempt_now(self._guard, operation)
            if done:
                if self._tables.checkpoint_due:
                    self._checkpoint_later()
                return result  # type: ignore[return-value]

        return await run_blocking(self._pool(), lambda: self._guarded(operation))

    def _guarded(self, operation: Callable[[], T]) -> T:
        # Another thread's call may be waiting for the database lock: wait for it
        # no longer than this operation may take.
        if not self._guard.acquire(timeout=_deadline.remaining(self._tables.busy_timeout)):
            raise StoreUnavailable(
                f"{self.url.redacted}: another call on this store kept the database busy"
            )
        try:
            return operation()
        finally:
            self._guard.release()

    def _checkpoint_later(self) -> None:
        self._pool().submit(self._guarded, self._tables.checkpoint)

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        key = (request.name, request.token)
        # A request that may be queued brings its wake-up address along, so being
        # queued and being reachable are one transaction (no second one to arm).
        address = None
        if request.queue_ttl is not None and _wake.SUPPORTED:
            address = self._socket_for(key).address

        result = await self._call(
            lambda: self._tables.acquire(request, self._clock.monotonic(), address)
        )
        if isinstance(result, Granted):
            self._disarm(request.name, request.token)
        elif result.position is not None:
            with self._wake_guard:
                self._limits[key] = request.limit
        elif address is not None:
            self._disarm(request.name, request.token)
        return result

    def _socket_for(self, key: tuple[str, str]) -> _wake.WakeSocket:
        """The waiter's wake-up socket: its own if it has one, else a spare one."""
        with self._wake_guard:
            sock = self._sockets.get(key)
            if sock is not None:
                return sock
            if self._spare_pid != os.getpid():
                # Inherited across fork: the parent's, which this process must not
                # read (it would take the parent's wake-ups). Close our copies.
                inherited = self._spare + list(self._sockets.values())
                self._spare, self._sockets, self._limits = [], {}, {}
                self._spare_pid = os.getpid()
                for old in inherited:
                    old.close()
            sock = self._spare.pop() if self._spare else _wake.WakeSocket()
            self._sockets[key] = sock
            return sock

    def _disarm(self, name: str, token: str) -> None:
        with self._wake_guard:
            sock = self._sockets.pop((name, token), None)
            self._limits.pop((name, token), None)
            if sock is None:
                return
            if len(self._spare) < SPARE_SOCKETS:
                # A hand-over still in flight for the old waiter names its token, so
                # the next user of the socket tells it apart (see _heard).
                self._spare.append(sock)
                return
        sock.close()

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        return await self._call(lambda: self._tables.renew(items, self._clock.monotonic()))

    async def release(self, name: str, token: str) -> bool:
        self._disarm(name, token)
        held, wakes = await self._call(
            lambda: self._tables.release(name, token, self._clock.monotonic())
        )
        _send(wakes)
        return held

    async def holders(self, name: str) -> list[HolderInfo]:
        return await self._call(lambda: self._tables.holders(name, self._clock.monotonic()))

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        return await self._call(lambda: self._tables.leases(prefix, self._clock.monotonic()))

    async def waiters(self, prefix: str = "") -> list[WaiterInfo]:
        return await self._call(lambda: self._tables.waiters(prefix, self._clock.monotonic()))

    async def break_lease(self, name: str) -> int:
        count, wakes = await self._call(
            lambda: self._tables.break_lease(name, self._clock.monotonic())
        )
        _send(wakes)
        return count

    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        if not _wake.SUPPORTED:
            await sleep(timeout)
            return False
        key = (name, token)
        with self._wake_guard:
            sock = self._sockets.get(key)
            limit = self._limits.get(key, 1)
        if sock is None:
            # A waiter queued without an address (normally acquire records it):
            # publish one. A release that came before the address was known sent
            # nothing (it may have handed the place over already), so arming also
            # tells where the waiter stands.
            sock = self._socket_for(key)
            address = sock.address

            armed = await self._call(
                lambda: self._tables.arm(name, token, address, limit, self._clock.monotonic())
            )
            if armed is not False:
                return self._woken(name, token, armed)

        # A local deadline for this call only; expiry decisions stay with the store.
        deadline = time.monotonic() + timeout
        while True:
            heard = _heard(sock.receive(), token)
            if heard is not False:
                return self._woken(name, token, heard)
            remaining = deadline - time.monotonic()
            if remaining > 0 and await wait_readable(sock.fileno(), min(remaining, FALLBACK_POLL)):
                continue
            # No datagram, which may not be able to reach us: a read-only look
            # finds a hand-over (or a free place) all the same, without a write.
            seen = await self._call(
                lambda: self._tables.look(name, token, limit, self._clock.monotonic())
            )
            if seen is not False:
                return self._woken(name, token, seen)
            if deadline - time.monotonic() <= 0:
                return False

    def _woken(self, name: str, token: str, result: WaitResult) -> WaitResult:
        if isinstance(result, HandedOver):
            self._disarm(name, token)  # a holder now: nothing more to wait for
        return result

    async def read_record(self, key: str) -> Record:
        return await self._call(lambda: self._tables.read_record(key, self._clock.monotonic()))

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        return await self._call(
            lambda: self._tables.write_record(
                key, expected_version, value, ttl, self._clock.monotonic()
            )
        )

    async def ping(self) -> None:
        await self._call(self._tables.ping)

    async def aclose(self) -> None:
        with self._wake_guard:
            sockets = list(self._sockets.values()) + self._spare
            self._sockets.clear()
            self._spare = []
        for sock in sockets:
            sock.close()
        if self._executor is not None and self._executor_pid == os.getpid():
            await run_blocking(self._executor, lambda: self._guarded(self._tables.close))
            self._executor.shutdown(wait=False)
        self._executor = None

    # -- announcements: a datagram to every subscriber's socket -----------------------

    async def announce(self, topic: str) -> None:
        validate.topic(topic)
        if not _wake.SUPPORTED:
            return

        gone = _wake.deliver(
            await self._call(lambda: _sqlite_topics.subscribers(self._tables, topic))
        )
        if gone:
            await self._unsubscribe([(topic, address) for address in gone])

    def subscribe(self, topic: str) -> AsyncSubscription:
        topic = validate.topic(topic)
        if not _wake.SUPPORTED:
            return AsyncSubscription(topic)
        return _SQLiteSubscription(self, topic)

    async def _subscribe(self, topic: str, address: str) -> None:
        await self._call(lambda: _sqlite_topics.register(self._tables, topic, address))

    async def _unsubscribe(self, pairs: list[tuple[str, str]]) -> None:
        await self._call(lambda: _sqlite_topics.unregister(self._tables, pairs))

    def warnings(self) -> list[str]:
        found = []
        if self._tables.fs_type in NETWORK_FILESYSTEMS:
            found.append(
                f"{self.path} is on a network file system ({self._tables.fs_type}); "
                "SQLite locking is unreliable there"
            )
        return found


class _SQLiteSubscription(AsyncSubscription):
    """Woken by a datagram on a socket of its own, whose address is recorded under
    the topic in the store file. If recording fails, it polls and tries again later."""

    def __init__(self, store: AsyncSQLiteStore, topic: str) -> None:
        super().__init__(topic)
        self._store = store
        self._sock: _wake.WakeSocket | None = None
        self._retry_at = float("-inf")
        self._closed = False

    async def _open(self) -> None:
        await self._register()

    @property
    def notified(self) -> bool:
        return self._sock is not None

    async def _register(self) -> bool:
        now = time.monotonic()
        if self._closed or now < self._retry_at:
            return False
        sock = _wake.WakeSocket()
        try:
            await self._store._subscribe(self.topic, sock.address)
        except StoreUnavailable as exc:
            sock.close()
            self._retry_at = now + SUBSCRIBE_RETRY
            logger.warning(
                "%r: cannot subscribe to %r (%s); polling for %.0f s",
                self._store,
                self.topic,
                exc,
                SUBSCRIBE_RETRY,
            )
            return False
        self._sock = sock
        return True

    async def wait(self, timeout: float) -> bool:
        sock = self._sock
        if sock is None:
            if await self._register():
                return True  # subscribed only now: what came before was not seen
            return await super().wait(timeout)
        if sock.drain():
            return True
        if await wait_readable(sock.fileno(), max(0.0, timeout)):
            sock.drain()
            return True
        return False

    def wake(self) -> None:
        super().wake()
        sock = self._sock
        if sock is not None:
            _wake.send([sock.address])

    async def aclose(self) -> None:
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        # On failure the next announcement finds nobody there and forgets the address.
        with contextlib.suppress(StoreUnavailable):
            await self._store._unsubscribe([(self.topic, sock.address)])


def _send(wakes: Wakes) -> None:
    """After commit: tell each waiter it was handed a place ("g<fence> <token>") or
    only that it may look again ("w", which is all a leasehold 0.1 waiter gets)."""
    if wakes:
        _wake.send_messages(
            [
                (address, b"w" if grant is None else b"g%d %s" % (grant[0], grant[1].encode()))
                for address, grant in wakes
            ]
        )


def _heard(payloads: list[bytes], token: str) -> WaitResult:
    """What the datagrams a waiter received say: the fence of a hand-over to its
    token, or only that it was woken (True), or nothing (False). A hand-over to
    another token is a late datagram for the socket's previous user: ignored."""
    woken = False
    for payload in payloads:
        if payload.startswith(b"g"):
            fence, _, to = payload[1:].partition(b" ")
            if to == token.encode() and fence.isdigit():
                return HandedOver(int(fence))
        else:
            woken = True
    return woken


def parse_path(url: StoreURL) -> Path:
    rest = url.raw.split("://", 1)[1]
    path_part = rest.split("?", 1)[0]
    if not path_part.startswith("/"):
        raise InvalidArgument(
            f"sqlite url {url.redacted!r} must look like sqlite:///relative.db or "
            "sqlite:////absolute/path.db"
        )
    path = path_part[1:]
    if not path or path.endswith("/"):
        raise InvalidArgument(f"sqlite url {url.redacted!r} names no database file")
    if path == ":memory:":
        raise InvalidArgument("sqlite :memory: is per connection; use memory:// instead")
    return Path(path)


def from_url(url: StoreURL, clock: Clock) -> AsyncSQLiteStore:
    path = parse_path(url)
    options = query_options(url.raw)
    unknown = set(options) - {"busy_timeout", "allow_network_fs"}
    if unknown:
        raise InvalidArgument(
            f"unknown sqlite url option(s) {sorted(unknown)}; allowed: busy_timeout "
            "(seconds), allow_network_fs (0/1)"
        )
    try:
        busy_timeout = float(options.get("busy_timeout", DEFAULT_BUSY_TIMEOUT))
    except ValueError:
        raise InvalidArgument("sqlite busy_timeout must be a number of seconds") from None
    if not 0 < busy_timeout <= 3600:
        raise InvalidArgument("sqlite busy_timeout must be between 0 and 3600 seconds")
    allow = options.get("allow_network_fs", "0")
    if allow not in ("0", "1", "true", "false"):
        raise InvalidArgument("sqlite allow_network_fs must be 0 or 1")
    # The system clock means "the store's own clock": the host's boot-time clock.
    # Any other clock (a FakeClock in tests) drives expiry directly.
    store_clock: Clock = _BootClock() if clock is SYSTEM_CLOCK else clock
    return AsyncSQLiteStore(
        url,
        path,
        clock=store_clock,
        busy_timeout=busy_timeout,
        allow_network_fs=allow in ("1", "true"),
    )
