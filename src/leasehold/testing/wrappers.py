"""Store wrappers for tests: count calls, inject faults. Public, for users' tests too."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    HolderInfo,
    Record,
    RenewItem,
    WaitResult,
)
from leasehold._errors import StoreUnavailable
from leasehold._sync.store import Store, Subscription


class CountingStore(Store):
    """Forwards to ``inner`` and counts calls per operation (``.calls``)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.calls: Counter[str] = Counter()
        self.renew_items: list[int] = []
        self._guard = threading.Lock()

    def _count(self, op: str) -> None:
        with self._guard:
            self.calls[op] += 1

    def acquire(self, request: AcquireRequest) -> AcquireResult:
        self._count("acquire")
        return self.inner.acquire(request)

    def renew(self, items: Sequence[RenewItem]) -> Sequence[bool | None]:
        self._count("renew")
        with self._guard:
            self.renew_items.append(len(items))
        return self.inner.renew(items)

    def release(self, name: str, token: str) -> bool:
        self._count("release")
        return self.inner.release(name, token)

    def holders(self, name: str) -> list[HolderInfo]:
        self._count("holders")
        return self.inner.holders(name)

    def leases(self, prefix: str = "") -> list[HolderInfo]:
        self._count("leases")
        return self.inner.leases(prefix)

    def break_lease(self, name: str) -> int:
        self._count("break_lease")
        return self.inner.break_lease(name)

    def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        self._count("wait")
        return self.inner.wait(name, token, timeout)

    def read_record(self, key: str) -> Record:
        self._count("read_record")
        return self.inner.read_record(key)

    def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        self._count("write_record")
        return self.inner.write_record(key, expected_version, value, ttl)

    def ping(self) -> None:
        self._count("ping")
        self.inner.ping()

    def announce(self, topic: str) -> None:
        self._count("announce")
        self.inner.announce(topic)

    def subscribe(self, topic: str) -> Subscription:
        # Local, no I/O: not counted and never failed (subscriptions poll on errors).
        return self.inner.subscribe(topic)

    def restarts(self, name: str) -> int:
        return self.inner.restarts(name)

    def close(self) -> None:
        self.inner.close()


class FaultyStore(CountingStore):
    """Fails chosen operations with ``StoreUnavailable``.

    ``fail(op, times=N)`` fails the next N calls of ``op``; ``times=None`` fails
    every call until ``heal()``. Failures happen before the call reaches the store.
    """

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self._failing: dict[str, int | None] = {}
        self._hanging: dict[str, float] = {}
        self.failures: Counter[str] = Counter()

    def hang(self, op: str, seconds: float) -> None:
        """Make every call of ``op`` stall ``seconds`` before failing (a dead path)."""
        with self._guard:
            self._hanging[op] = seconds

    def fail(self, op: str, times: int | None = 1) -> None:
        with self._guard:
            self._failing[op] = times

    def heal(self) -> None:
        with self._guard:
            self._failing.clear()
            self._hanging.clear()

    def _count(self, op: str) -> None:
        super()._count(op)
        with self._guard:
            stall = self._hanging.get(op)
        if stall is not None:
            time.sleep(stall)
            with self._guard:
                self.failures[op] += 1
            raise StoreUnavailable(f"injected timeout of {op}")
        with self._guard:
            if op not in self._failing:
                return
            left = self._failing[op]
            if left is not None:
                if left <= 1:
                    del self._failing[op]
                else:
                    self._failing[op] = left - 1
            self.failures[op] += 1
        raise StoreUnavailable(f"injected failure of {op}")
