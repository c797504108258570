"""``sqlite:///relative.db`` / ``sqlite:////absolute.db``: processes on one host.

Expiry uses the host's boot-time clock, which wall-clock jumps do not move, and
leases written during an earlier boot count as expired. A release wakes the waiter
at the head of the store's FIFO queue with one datagram (``leasehold._wake``);
waiters also look again at least every FALLBACK_POLL seconds, in case the
datagram cannot reach them (another network namespace sharing the file).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from leasehold import _wake
from leasehold._async._concurrency import run_blocking, sleep, wait_readable
from leasehold._async.store import AsyncStore
from leasehold._core.clock import SYSTEM_CLOCK, Clock
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Capabilities,
    Granted,
    HolderInfo,
    Record,
    RenewItem,
)
from leasehold._core.url import StoreURL, query_options
from leasehold._errors import InvalidArgument
from leasehold._sqlite_tx import NETWORK_FILESYSTEMS, SQLiteTables, boot_clock

DEFAULT_BUSY_TIMEOUT = 10.0
FALLBACK_POLL = 0.2


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
        notes=(
            "processes on one host; not on network file systems",
            "same-host wake-ups by datagram; polling every 0.2 s as a fallback",
            "expiry on the host boot-time clock (immune to wall-clock jumps)",
        ),
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
        self._tables = SQLiteTables(
            path, busy_timeout=busy_timeout, allow_network_fs=allow_network_fs
        )
        self._guard = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = -1
        self._sockets: dict[tuple[str, str], _wake.WakeSocket] = {}
        self._limits: dict[tuple[str, str], int] = {}

    def _pool(self) -> ThreadPoolExecutor:
        # One worker thread owns the connection, so the event loop never blocks on
        # SQLite and the connection is never used by two threads at once.
        with self._guard:
            if self._executor is None or self._executor_pid != os.getpid():
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="leasehold-sqlite")
                self._executor_pid = os.getpid()
            return self._executor

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        def call() -> AcquireResult:
            with self._guard:
                return self._tables.acquire(request, self._clock.monotonic())

        result = await run_blocking(self._pool(), call)
        if isinstance(result, Granted):
            self._disarm(request.name, request.token)
        elif result.position is not None:
            with self._guard:
                self._limits[(request.name, request.token)] = request.limit
        return result

    def _disarm(self, name: str, token: str) -> None:
        with self._guard:
            sock = self._sockets.pop((name, token), None)
            self._limits.pop((name, token), None)
        if sock is not None:
            sock.close()

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        def call() -> list[bool]:
            with self._guard:
                return self._tables.renew(items, self._clock.monotonic())

        return await run_blocking(self._pool(), call)

    async def release(self, name: str, token: str) -> bool:
        def call() -> tuple[bool, list[str]]:
            with self._guard:
                return self._tables.release(name, token, self._clock.monotonic())

        self._disarm(name, token)
        held, wake = await run_blocking(self._pool(), call)
        _wake.send(wake)
        return held

    async def holders(self, name: str) -> list[HolderInfo]:
        def call() -> list[HolderInfo]:
            with self._guard:
                return self._tables.holders(name, self._clock.monotonic())

        return await run_blocking(self._pool(), call)

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        def call() -> list[HolderInfo]:
            with self._guard:
                return self._tables.leases(prefix, self._clock.monotonic())

        return await run_blocking(self._pool(), call)

    async def break_lease(self, name: str) -> int:
        def call() -> tuple[int, list[str]]:
            with self._guard:
                return self._tables.break_lease(name, self._clock.monotonic())

        count, wake = await run_blocking(self._pool(), call)
        _wake.send(wake)
        return count

    async def wait(self, name: str, token: str, timeout: float) -> bool:
        if not _wake.SUPPORTED:
            await sleep(timeout)
            return False
        key = (name, token)
        with self._guard:
            sock = self._sockets.get(key)
        if sock is None:
            # First wait of this waiter: publish a wake-up address. A release that
            # came before the address was known sent nothing, so arming also tells
            # whether the waiter could be served already.
            sock = _wake.WakeSocket()
            with self._guard:
                self._sockets[key] = sock
                limit = self._limits.get(key, 1)
            address = sock.address

            def arm() -> bool:
                with self._guard:
                    return self._tables.arm(name, token, address, limit, self._clock.monotonic())

            if await run_blocking(self._pool(), arm):
                return True
        if sock.drain():
            return True
        if await wait_readable(sock.fileno(), min(timeout, FALLBACK_POLL)):
            sock.drain()
            return True
        return False

    async def read_record(self, key: str) -> Record:
        def call() -> Record:
            with self._guard:
                return self._tables.read_record(key, self._clock.monotonic())

        return await run_blocking(self._pool(), call)

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        def call() -> int | None:
            with self._guard:
                return self._tables.write_record(
                    key, expected_version, value, ttl, self._clock.monotonic()
                )

        return await run_blocking(self._pool(), call)

    async def ping(self) -> None:
        def call() -> None:
            with self._guard:
                self._tables.ping()

        await run_blocking(self._pool(), call)

    async def aclose(self) -> None:
        def call() -> None:
            with self._guard:
                self._tables.close()

        with self._guard:
            sockets = list(self._sockets.values())
            self._sockets.clear()
        for sock in sockets:
            sock.close()
        if self._executor is not None and self._executor_pid == os.getpid():
            await run_blocking(self._executor, call)
            self._executor.shutdown(wait=False)
        self._executor = None

    def warnings(self) -> list[str]:
        found = []
        if self._tables.fs_type in NETWORK_FILESYSTEMS:
            found.append(
                f"{self.path} is on a network file system ({self._tables.fs_type}); "
                "SQLite locking is unreliable there"
            )
        return found


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
