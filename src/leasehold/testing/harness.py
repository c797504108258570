"""BackendHarness: how the conformance suite reaches one backend."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from leasehold._async.client import AsyncClient
from leasehold._core.clock import FakeClock
from leasehold._sync.client import Client


@dataclass
class BackendHarness:
    """One backend under test.

    ``url``: a store URL private to the test (or shared, since every test uses
    fresh names). ``clock``: a FakeClock that drives the store's expiry, when the
    backend allows it (memory, SQLite); None for server-clock backends, which are
    then driven by real sleeps with short TTLs. ``fresh_url`` returns a URL for an
    independent store with the real clock (for tests that must really wait).
    ``real_ttl``: the short TTL on a real clock; ``expiry_slack``: how long after a
    TTL the store may take to expire it (etcd leases have whole seconds and are
    checked twice a second).
    """

    name: str
    url: str
    clock: FakeClock | None
    fresh_url: Callable[[], str]
    real_ttl: float = 0.6
    expiry_slack: float = 0.3
    _clients: list[Any] = field(default_factory=list)

    @property
    def fake_clock(self) -> bool:
        return self.clock is not None

    @property
    def short_ttl(self) -> float:
        """A TTL for expiry tests: long under a fake clock, short with a real one."""
        return 30.0 if self.fake_clock else self.real_ttl

    def unique(self, stem: str = "t") -> str:
        return f"{stem}:{uuid.uuid4().hex[:12]}"

    def client(self, **kwargs: Any) -> Client:
        client = Client(self.url, clock=self.clock, **kwargs)
        self._clients.append(client)
        return client

    def async_client(self, **kwargs: Any) -> AsyncClient:
        return AsyncClient(self.url, clock=self.clock, **kwargs)

    def real_client(self, **kwargs: Any) -> Client:
        client = Client(self.fresh_url() if self.fake_clock else self.url, **kwargs)
        self._clients.append(client)
        return client

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the store's clock."""
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def advance_past(self, ttl: float) -> None:
        """Let a TTL (and the store's slack in expiring it) pass."""
        self.advance(ttl + (0.3 if self.fake_clock else self.expiry_slack))

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
