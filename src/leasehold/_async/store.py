"""The store contract: the few atomic operations every backend implements.

Every primitive (lock, semaphore, election, ...) is written once against this
class and never against a backend. A backend is proven by the one conformance
suite in ``leasehold.testing.conformance``.

Rules every operation keeps:

* Each operation is one atomic step in the store (a transaction, a script).
* Expiry is decided by the store's own clock. A holder whose expiry has passed is
  treated as absent by every operation, whether or not it was purged yet.
* Tokens are secret and never returned. Holders are identified to humans by
  ``Holder.owner``.
* Fences are unique per name and strictly increasing across every grant of that
  name, including across expiry, release, ``break_lease`` and store restarts that
  lose data.
* Store errors surface as ``StoreUnavailable`` (never a raw driver exception) and
  contain no credentials.
* After ``os.fork()`` a store used in the child reconnects instead of sharing the
  parent's connections.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Capabilities,
    HolderInfo,
    Record,
    RenewItem,
)
from leasehold._core.url import StoreURL


class AsyncStore(ABC):
    capabilities: ClassVar[Capabilities]
    url: StoreURL

    @abstractmethod
    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        """Try once to add ``request.token`` as a holder of ``request.name``.

        In one atomic step: drop expired holders and expired queue entries; if the
        token already holds the name, refresh its expiry to now + ttl and return its
        existing fence (so retrying an acquire whose answer was lost is safe);
        otherwise grant when fewer than ``limit`` live holders exist *and* fewer
        queued waiters are ahead of this token than there are free places (a token
        that is not queued is behind every queued waiter). A grant issues a new
        fence, stores the holder with expiry now + ttl and removes the token from the
        queue. When not granted and ``queue_ttl`` is set, the token is queued (kept
        at its place if already queued) with expiry now + queue_ttl.

        Returns ``Granted(fence)`` or ``Busy(retry_after, position)``.
        """

    @abstractmethod
    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        """For each item, atomically: if the token is a live holder of the name, set
        its expiry to now + ttl (replacing, not adding) and answer True; otherwise
        False. One round trip for the whole batch; answers in item order."""

    @abstractmethod
    async def release(self, name: str, token: str) -> bool:
        """Remove the token as holder *and* from the wait queue of ``name``.

        True if it was a live holder. Idempotent. When places become free, wake the
        first queued waiters that can now be granted (O(1) of them, not all).
        """

    @abstractmethod
    async def holders(self, name: str) -> list[HolderInfo]:
        """The live holders of ``name``, oldest grant first."""

    @abstractmethod
    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        """Every live holder of every name starting with ``prefix``, by name."""

    @abstractmethod
    async def break_lease(self, name: str) -> int:
        """Forcibly remove every holder of ``name`` (the number removed is returned).

        The next grant's fence is higher than any broken holder's, so their fenced
        writes fail. Waiters are woken.
        """

    @abstractmethod
    async def wait(self, name: str, token: str, timeout: float) -> bool:
        """Block until the store wakes ``token`` waiting on ``name``, or ``timeout``.

        True if woken. A wake-up sent after ``acquire`` returned Busy for a queued
        token is never missed, even if it arrives before ``wait`` is called. Stores
        without notifications sleep for ``timeout`` and return False. Spurious
        wake-ups are allowed: callers always re-try ``acquire``.
        """

    @abstractmethod
    async def read_record(self, key: str) -> Record:
        """The record ``key`` (value None and version 0 if absent or expired) and the
        store's clock at the time of the read.

        Records are the second half of the contract: small values (at most
        ``MAX_RECORD_BYTES``) changed only by compare-and-set, on which primitives
        with richer state (presence rooms, once-only results) are written once.
        Record keys are a namespace of their own, apart from lease names.
        """

    @abstractmethod
    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        """Compare-and-set: if the record's current version (0 when absent or
        expired) equals ``expected_version``, store ``value`` (None deletes it) with
        expiry now + ``ttl`` on the store's clock (None: never expires) and return
        the new version; otherwise change nothing and return None.

        New versions come from the store's fence sequence: strictly greater than
        every version and fence issued before, so a version is never reused for a
        key, even across a store restart that loses data. A deleted or expired record
        reads as version 0 again, so only "absent" can recur (callers treat two
        absent readings as the same state).
        """

    @abstractmethod
    async def ping(self) -> None:
        """One cheap round trip; ``StoreUnavailable`` if the store cannot be used."""

    async def server_time(self) -> float | None:
        """The store's wall clock as Unix seconds, for diagnostics only; None if the
        store has no clock of its own (embedded stores share the host's)."""
        return None

    async def aclose(self) -> None:
        """Release connections. Idempotent."""

    def warnings(self) -> list[str]:
        """Configuration problems a user should know about (``leasehold doctor``)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted!r})"
