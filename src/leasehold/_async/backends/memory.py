"""``memory://`` and ``memory://NAME``: threads and tasks of one process.

``memory://NAME`` shares one table between every client that names it, which is
how tests and single-process apps coordinate without a server.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from leasehold._async._concurrency import AsyncEvent
from leasehold._async.store import AsyncStore, AsyncSubscription, HubSubscription, TopicHub
from leasehold._core import validate
from leasehold._core.clock import Clock
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Capabilities,
    HandedOver,
    HolderInfo,
    Record,
    RenewItem,
    WaiterInfo,
    WaitResult,
)
from leasehold._core.table import HandOvers, LeaseTable
from leasehold._core.url import StoreURL


class _Shared:
    def __init__(self) -> None:
        self.table = LeaseTable()
        self.guard = threading.Lock()
        self.waiters: dict[tuple[str, str], AsyncEvent] = {}
        # Subscriptions to announcements, woken directly by announce().
        self.topics = TopicHub()
        # Grants made by a release for a waiter, until its wait() collects them.
        self.handed: dict[tuple[str, str], int] = {}


_NAMED: dict[str, _Shared] = {}
_NAMED_GUARD = threading.Lock()


def _shared_for(store_name: str) -> _Shared:
    if not store_name:
        return _Shared()
    with _NAMED_GUARD:
        return _NAMED.setdefault(store_name, _Shared())


class AsyncMemoryStore(AsyncStore):
    capabilities = Capabilities(
        server_clock=False,
        durable=False,
        cross_host=False,
        notifications=True,
        fence_survives_data_loss=True,
        hand_over=True,
        notes=("one process only", "state is lost with the process"),
        announcements=True,
        cancels_cleanly=True,
    )

    def __init__(self, url: StoreURL, clock: Clock, store_name: str = "") -> None:
        self.url = url
        self._clock = clock
        self._shared = _shared_for(store_name)

    def _wake(self, targets: list[tuple[str, str]]) -> None:
        for key in targets:
            event = self._shared.waiters.get(key)
            if event is not None:
                event.set()

    def _deliver(self, handed: HandOvers) -> None:
        for name, token, fence in handed:
            key = (name, token)
            self._shared.handed[key] = fence
            self._wake([key])

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        shared = self._shared
        with shared.guard:
            result = shared.table.acquire(request, self._clock.monotonic())
            key = (request.name, request.token)
            if isinstance(result, Busy) and result.position is not None:
                # Registered under the same guard as the queue entry, so a release
                # that follows can never find the waiter missing (no lost wake-up).
                shared.waiters.setdefault(key, AsyncEvent())
            elif not isinstance(result, Busy):
                shared.waiters.pop(key, None)
                shared.handed.pop(key, None)
        return result

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        with self._shared.guard:
            return self._shared.table.renew(list(items), self._clock.monotonic())

    async def release(self, name: str, token: str) -> bool:
        shared = self._shared
        with shared.guard:
            held, handed = shared.table.release(name, token, self._clock.monotonic())
            shared.waiters.pop((name, token), None)
            shared.handed.pop((name, token), None)
            self._deliver(handed)
        return held

    async def holders(self, name: str) -> list[HolderInfo]:
        with self._shared.guard:
            return self._shared.table.holders(name, self._clock.monotonic())

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        with self._shared.guard:
            return self._shared.table.leases(prefix, self._clock.monotonic())

    async def waiters(self, prefix: str = "") -> list[WaiterInfo]:
        with self._shared.guard:
            return self._shared.table.waiters(prefix, self._clock.monotonic())

    async def break_lease(self, name: str) -> int:
        shared = self._shared
        with shared.guard:
            count, handed = shared.table.break_lease(name, self._clock.monotonic())
            self._deliver(handed)
        return count

    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        key = (name, token)
        shared = self._shared
        with shared.guard:
            event = shared.waiters.get(key)
        if event is None:
            event = AsyncEvent()  # not queued: nothing will wake it; sleep the timeout
        woken = await event.wait(timeout)
        if not woken:
            return False
        with shared.guard:
            event.clear()
            fence = shared.handed.pop(key, None)
            if fence is not None:
                shared.waiters.pop(key, None)
        return True if fence is None else HandedOver(fence)

    async def read_record(self, key: str) -> Record:
        with self._shared.guard:
            return self._shared.table.read_record(key, self._clock.monotonic())

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        with self._shared.guard:
            return self._shared.table.write_record(
                key, expected_version, value, ttl, self._clock.monotonic()
            )

    async def ping(self) -> None:
        return None

    async def announce(self, topic: str) -> None:
        self._shared.topics.wake(validate.topic(topic))

    def subscribe(self, topic: str) -> AsyncSubscription:
        return HubSubscription(validate.topic(topic), self._shared.topics)

    def __repr__(self) -> str:
        return f"AsyncMemoryStore({self.url.redacted!r})"


def from_url(url: StoreURL, clock: Clock) -> AsyncMemoryStore:
    store_name = url.raw.split("://", 1)[1]
    return AsyncMemoryStore(url, clock, store_name)
