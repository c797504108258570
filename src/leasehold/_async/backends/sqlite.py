"""``sqlite:///relative.db`` / ``sqlite:////absolute.db``: processes on one host.

Expiry uses the host's boot-time clock, which wall-clock jumps do not move, and
leases written during an earlier boot count as expired. There is no notification
channel between processes, so waiters poll with jittered backoff; the store's FIFO
queue keeps that fair.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from leasehold._async._concurrency import run_blocking, sleep
from leasehold._async.store import AsyncStore
from leasehold._core.clock import SYSTEM_CLOCK, Clock
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Capabilities,
    HolderInfo,
    RenewItem,
)
from leasehold._core.url import StoreURL, query_options
from leasehold._errors import InvalidArgument
from leasehold._sqlite_tx import NETWORK_FILESYSTEMS, SQLiteTables, boot_clock

DEFAULT_BUSY_TIMEOUT = 10.0


class _BootClock:
    def monotonic(self) -> float:
        return boot_clock()


class AsyncSQLiteStore(AsyncStore):
    capabilities = Capabilities(
        server_clock=False,
        durable=True,
        cross_host=False,
        notifications=False,
        fence_survives_data_loss=True,
        notes=(
            "processes on one host; not on network file systems",
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

        return await run_blocking(self._pool(), call)

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        def call() -> list[bool]:
            with self._guard:
                return self._tables.renew(items, self._clock.monotonic())

        return await run_blocking(self._pool(), call)

    async def release(self, name: str, token: str) -> bool:
        def call() -> bool:
            with self._guard:
                return self._tables.release(name, token, self._clock.monotonic())

        return await run_blocking(self._pool(), call)

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
        def call() -> int:
            with self._guard:
                return self._tables.break_lease(name, self._clock.monotonic())

        return await run_blocking(self._pool(), call)

    async def wait(self, name: str, token: str, timeout: float) -> bool:
        await sleep(timeout)
        return False

    async def ping(self) -> None:
        def call() -> None:
            with self._guard:
                self._tables.ping()

        await run_blocking(self._pool(), call)

    async def aclose(self) -> None:
        def call() -> None:
            with self._guard:
                self._tables.close()

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
