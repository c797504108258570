"""A granted lease: the holder's handle, its safe deadline and its loss contract."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from leasehold import _deadline
from leasehold._async._concurrency import AsyncBodyGuard, AsyncEvent, in_background, shielded
from leasehold._core import validate
from leasehold._core.loss import deadline_loss, refusal
from leasehold._core.policy import safe_deadline
from leasehold._core.records import RenewItem
from leasehold._errors import LeaseLost, StoreUnavailable
from leasehold._observe import lease_fields

if TYPE_CHECKING:
    from leasehold._async.store import AsyncStore
    from leasehold._core.clock import Clock
    from leasehold._core.records import Holder
    from leasehold._observe import Observer
    from leasehold.events import LossReason, Primitive

logger = logging.getLogger("leasehold")

OnLost = Callable[["AsyncLease"], Any]

# How long the release of a lease already lost waits for the store before it goes
# on in the background.
LOST_RELEASE_WAIT = 0.25


class LeaseContext(Protocol):
    """What a lease uses of its client (an ``AsyncContext``, whose module imports this
    one: a protocol keeps the dependency one way)."""

    @property
    def store(self) -> AsyncStore: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def holder(self) -> Holder: ...

    @property
    def observer(self) -> Observer: ...

    def forget(self, lease: AsyncLease) -> None: ...

    def reschedule(self, lease: AsyncLease) -> None: ...


class AsyncLease:
    """Proof of holding ``name`` until ``remaining()`` reaches zero.

    Ownership is per lease object (a secret token inside it), never per thread or
    task: hand the lease to another thread or task to let it release or extend.
    """

    def __init__(
        self,
        *,
        context: LeaseContext,
        name: str,
        token: str,
        fence: int,
        ttl: float,
        margin: float,
        limit: int,
        sent_at: float,
        renew: bool,
        on_lost: OnLost | None,
        owner: str | None = None,
        term: float | None = None,
        primitive: Primitive = "lock",
        restarts: int = 0,
    ) -> None:
        self._context = context
        self._primitive: Primitive = primitive
        # The store's restart count at the grant: a refusal after it grew is a
        # loss to the restart (see AsyncStore.restarts).
        self._restarts = restarts
        # Renewal attempts that failed since the last success, and the last error:
        # the cause of a loss at the safe deadline.
        self._failures = 0
        self._last_error: str | None = None
        # Granted by a release's hand-over (no acquire call of its own).
        self._handed_over = False
        # When the acquire heard of the grant (set by the lock that made it).
        self._answered = sent_at
        self._owner = owner or context.holder.owner
        self._name = name
        self._token = token
        self._fence = fence
        self._ttl = ttl
        self._margin = margin
        self._limit = limit
        self._renew = renew
        self._on_lost = on_lost
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._last_sent = sent_at
        # The validity the store granted from ``sent_at``: the ttl, except for a
        # hand-over, which runs on the waiter's queue place until its first renewal.
        self._term = ttl if term is None else term
        self._deadline = safe_deadline(sent_at, self._term, margin)
        self._granted_at = sent_at
        self._lost_reason: str | None = None
        self._released = False
        # Created by the first wait_lost(): most leases are never waited on.
        self._lost_event: AsyncEvent | None = None
        self._bodies: list[AsyncBodyGuard] = []
        # Spreads renewals of many clients so they do not arrive in lock step.
        self.jitter = random.random()
        # Run once after the store release (an election announces the vacancy).
        self._after_release: Callable[[], Any] | None = None

    # -- what a holder reads -------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def fence(self) -> int:
        return self._fence

    @property
    def primitive(self) -> Primitive:
        """What this lease serves: lock, semaphore, election, presence or once."""
        return self._primitive

    @property
    def owner(self) -> str:
        """The readable holder label stored with the grant (not the secret token)."""
        return self._owner

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def renewing(self) -> bool:
        return self._renew

    def _now(self) -> float:
        return self._context.clock.monotonic()

    def _forked(self) -> bool:
        return os.getpid() != self._pid

    def _unheld_reason(self, now: float) -> str | None:
        if os.getpid() != self._pid:  # _forked(), written out: every check() runs it
            return "the lease belongs to the parent process (os.fork)"
        if self._lost_reason is not None:
            return self._lost_reason
        if self._released:
            return "released"
        if now >= self._deadline:
            return "its safe deadline passed before a renewal succeeded"
        return None

    @property
    def held(self) -> bool:
        return self._unheld_reason(self._context.clock.monotonic()) is None

    @property
    def lost(self) -> bool:
        """True once the lease is known not to be held any more (other than by release)."""
        reason = self._unheld_reason(self._now())
        return reason is not None and reason != "released"

    @property
    def released(self) -> bool:
        return self._released

    def remaining(self) -> float:
        """Seconds the holder may still treat the lease as held (local monotonic clock)."""
        now = self._now()
        if self._unheld_reason(now) is not None:
            return 0.0
        return max(0.0, self._deadline - now)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the lease is held right now. Call it before
        every side effect that the lease protects."""
        reason = self._unheld_reason(self._context.clock.monotonic())
        if reason is not None:
            raise LeaseLost(self._name, self._fence, reason)

    # -- what a holder does -----------------------------------------------------

    async def extend(self, ttl: float | None = None) -> None:
        """Renew now, replacing the TTL (not adding to it). ``LeaseLost`` if not held."""
        new_ttl = self._ttl if ttl is None else validate.ttl(ttl)
        self.check()
        sent = self._now()
        try:
            # Never waits past the safe deadline: by then the answer cannot help.
            with _deadline.bounded(max(0.0, self._deadline - sent)):
                answers = await self._context.store.renew(
                    [RenewItem(self._name, self._token, new_ttl)]
                )
        except StoreUnavailable:
            if self._now() >= self._deadline:
                self._mark_lost("unreachable", "the store was unreachable until the safe deadline")
                raise LeaseLost(self._name, self._fence, "store unreachable") from None
            raise
        if answers and answers[0] is None:  # not for one item (see AsyncStore.renew)
            raise StoreUnavailable(f"renewing {self._name!r}: the store gave no answer")
        if not answers or not answers[0]:
            self._refused()
            self.check()
        if ttl is not None:
            self._ttl = new_ttl
        self._renewed(sent, new_ttl)
        if ttl is not None:
            # A shorter TTL brings the next renewal forward, perhaps before the
            # keeper's next look: tell it, or the lease expires unrenewed.
            self._context.reschedule(self)
        self._context.observer.renewed([self], self._now() - sent)

    async def release(self) -> bool:
        """Give the lease up. Idempotent; False if it was no longer held.

        Shielded from cancellation: once called, the release completes.
        """
        if os.getpid() != self._pid:  # _forked(), written out on the hot path
            return False  # never touch the parent's lease from a child
        context = self._context
        now = context.clock.monotonic()
        if self._lost_reason is None and not self._released and now >= self._deadline:
            # Past its safe deadline before the keeper noticed: it is lost, and
            # says so (log, on_lost, statistics) before it is released.
            self._deadline_lost()
        with self._guard:
            if self._released:
                return False
            was_lost = self._lost_reason is not None
            self._released = True
            event = self._lost_event
        context.forget(self)
        if event is not None:
            event.set()
        # The holder let go now, not when the store answers.
        held_for = max(0.0, min(now, self._deadline) - self._granted_at)
        answered: float | None = now
        store = context.store
        if was_lost:
            # Only a courtesy now (the store may still list us: our safe deadline
            # comes before the store's expiry), never worth more than a moment of
            # the caller's time when the store may be the reason for the loss.
            try:
                with _deadline.bounded(LOST_RELEASE_WAIT):
                    await shielded(
                        lambda: store.release(self._name, self._token),
                        restartable=store.capabilities.cancels_cleanly,
                    )
            except StoreUnavailable:
                in_background(lambda: store.release(self._name, self._token))
            held = False
        else:
            try:
                held = await shielded(
                    lambda: store.release(self._name, self._token),
                    restartable=store.capabilities.cancels_cleanly,
                )
            except StoreUnavailable as exc:
                context.observer.release_failed(self, exc, self._ttl)
                held = False
                answered = None
        if not was_lost:  # a lost lease was counted (and its hold time ended) at the loss
            context.observer.released(self, held_for, answered)
        hook = self._after_release
        if hook is not None:
            await hook()
        return held and not was_lost

    async def wait_lost(self, timeout: float | None = None) -> bool:
        """Wait until the lease is lost or released; True if it happened in time."""
        validate.timeout(timeout)
        with self._guard:
            if self._lost_event is None:
                self._lost_event = AsyncEvent()
            event = self._lost_event
        # Checked after the event exists, so a loss or release in between sets it.
        if not self.held:
            return True
        return await event.wait(timeout)

    async def fence_sql(self, connection: Any, *, table: str = "leasehold_fences") -> int:
        """Check this lease's fence inside the caller's open transaction on
        ``connection`` (see ``leasehold.fence``): ``StaleFence`` if a newer holder
        already wrote, so the transaction rolls back. ``LeaseLost`` first if the
        lease is gone. Async leases take async connections (psycopg
        AsyncConnection, SQLAlchemy AsyncConnection/AsyncSession)."""
        from leasehold import fence as fencing

        self.check()
        highest: int = await fencing.check_async(connection, self._name, self._fence, table=table)
        return highest

    # -- used by the keeper -------------------------------------------------------

    @property
    def deadline(self) -> float:
        return self._deadline

    @property
    def last_sent(self) -> float:
        return self._last_sent

    @property
    def term(self) -> float:
        return self._term

    def renew_item(self) -> RenewItem:
        return RenewItem(self._name, self._token, self._ttl)

    def _held_for(self) -> float:
        """Seconds from the grant to now, or to the safe deadline if that is earlier:
        a lease is not held past it, however late its loss is noticed."""
        return max(0.0, min(self._now(), self._deadline) - self._granted_at)

    def _renewal_failed(self, error: str) -> None:
        self._failures += 1
        self._last_error = error

    def _deadline_lost(self) -> None:
        self._mark_lost(*deadline_loss(self._renew, self._failures, self._last_error))

    def _refused(self) -> None:
        restarted = self._context.store.restarts(self._name) > self._restarts
        self._mark_lost(*refusal(restarted))

    def _renewed(self, sent_at: float, ttl: float) -> bool:
        """A renewal sent at ``sent_at`` succeeded. False if the lease was released
        or lost meanwhile (the renewal came too late to tell anybody about)."""
        self._failures = 0
        with self._guard:
            if sent_at >= self._last_sent:
                self._last_sent = sent_at
                self._term = ttl
                self._deadline = safe_deadline(sent_at, ttl, self._margin)
            return not self._released and self._lost_reason is None

    def _mark_lost(self, cause: LossReason, reason: str) -> None:
        with self._guard:
            if self._released or self._lost_reason is not None or self._forked():
                return
            self._lost_reason = reason
            bodies = list(self._bodies)
            event = self._lost_event
        self._context.forget(self)
        self._context.observer.lost(self, cause, reason, self._held_for())
        if event is not None:
            event.set()
        for body in bodies:
            body.interrupt()
        if self._on_lost is not None:
            try:
                self._on_lost(self)
            except Exception:
                logger.exception(
                    "on_lost callback for %r raised",
                    self._name,
                    extra=lease_fields(self, "on_lost_raised"),
                )

    # -- context manager ----------------------------------------------------------

    async def __aenter__(self) -> AsyncLease:
        # A body starts only under a lease held at this moment: code before its
        # first await (or a sync body) would otherwise run after a successor began.
        reason = self._unheld_reason(self._context.clock.monotonic())
        if reason is not None:
            if self._lost_reason is None and not self._released and not self._forked():
                # Past its safe deadline before the keeper noticed: announced
                # (on_lost, statistics, log) before the exception.
                self._deadline_lost()
                reason = self._lost_reason or reason
            await self.release()
            raise LeaseLost(self._name, self._fence, reason)
        body = AsyncBodyGuard()
        with self._guard:
            self._bodies.append(body)
            already = self._lost_reason is not None
        if already:
            body.interrupt()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._guard:
            body = self._bodies.pop() if self._bodies else None
        ours = body.absorb(exc) if body is not None else False
        reason = None if self._released else self._unheld_reason(self._context.clock.monotonic())
        if reason is not None and self._lost_reason is None and not self._forked():
            # Lost by its deadline before the keeper got round to it: announce it
            # (on_lost, counters, log) before the exception, never after.
            self._deadline_lost()
            reason = self._lost_reason or reason
        await self.release()
        if ours:
            raise LeaseLost(self._name, self._fence, reason or "lost") from None
        if reason is None or isinstance(exc, LeaseLost):
            return
        if exc is None:
            raise LeaseLost(self._name, self._fence, reason)
        if isinstance(exc, Exception):
            raise LeaseLost(self._name, self._fence, reason) from exc
        # Cancellation, KeyboardInterrupt and SystemExit go through untouched.

    def __repr__(self) -> str:
        state = "held" if self.held else ("released" if self._released else "lost")
        return (
            f"<{type(self).__name__} {self._name!r} fence={self._fence} "
            f"owner={self.owner!r} {state} remaining={self.remaining():.3f}s>"
        )


__all__ = ["AsyncLease", "OnLost"]
