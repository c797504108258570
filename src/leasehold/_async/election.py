"""Leader election: a lock with limit 1 whose fence is the term number.

Candidates queue in the store's FIFO like any lock waiter, so when a leader resigns
or dies the next candidate is woken (or, on stores without notifications, finds
out on its next poll). Every change of leader made through this module (a grant,
a resignation, the end of a term in ``run()``, a loss, ``client.break_lease``) is
announced on the election's topic (``AsyncStore.announce``), after the store has
made it. ``observe()`` subscribes to that topic before it reads ``holders()``,
and reads again when an announcement arrives, just after the leader's expiry (which
nobody announces), or after a safety poll of ``ttl / 3``. On stores without
announcements it polls ``holders()`` with an interval that adapts to what it sees.
Elections in the same process wake their observers directly as well.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from leasehold import events
from leasehold._async._concurrency import IS_ASYNC, AsyncBodyGuard, AsyncEvent, spawn
from leasehold._async.lease import AsyncLease
from leasehold._async.lock import AsyncLock, QueuePlace
from leasehold._core import validate
from leasehold._core.backoff import Backoff
from leasehold._core.election import (
    CHANGES,
    Leader,
    current_holder,
    leader_from,
    observe_delay,
    rejoin_delay,
    topic,
    watch_delay,
)
from leasehold._errors import (
    AcquireTimeout,
    InvalidArgument,
    LeaseLost,
    StoreMisconfigured,
    StoreUnavailable,
)
from leasehold._observe import lease_fields, log_fields

if TYPE_CHECKING:
    from leasehold._async.context import AsyncContext
    from leasehold._async.store import AsyncStore, AsyncSubscription

logger = logging.getLogger("leasehold")

# A thread blocked in acquire() cannot be interrupted, so sync run() campaigns in
# slices of this length and looks at stop() between them (async run() is cancelled
# at once and campaigns in one piece).
CAMPAIGN_SLICE = 0.5
STORE_RETRY = Backoff(initial=0.1, maximum=5.0)


class LeaderBody(Protocol):
    """What ``run()`` calls while this candidate leads: ``fn(lease)``."""

    async def __call__(self, lease: AsyncLease, /) -> object: ...


class AsyncElection:
    """``client.election(name)``: campaign, lead, resign, observe who leads.

    One object is one candidate (``run()`` or one ``campaign()`` at a time); any
    number of objects, in any number of processes, may take part in the same
    election. ``identity`` is the readable label a leader is known by (default: the
    client's owner label, which is unique per client).
    """

    def __init__(
        self,
        context: AsyncContext,
        name: str,
        *,
        ttl: float = 30.0,
        identity: str | None = None,
        margin: float | None = None,
    ) -> None:
        self._context = context
        self._name = validate.name(name)
        self._ttl = validate.ttl(ttl)
        self._identity = None if identity is None else validate.name(identity, what="identity")
        if margin is not None:
            validate.margin(margin, self._ttl)
        self._margin = margin
        self._state = threading.Lock()
        self._lease: AsyncLease | None = None
        self._campaigning = False
        self._running = False
        self._phase: _Phase | None = None
        self._stop_requested = False
        self._stopped = AsyncEvent()

    @property
    def name(self) -> str:
        return self._name

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def identity(self) -> str:
        """The label this candidate campaigns with unless ``campaign()`` overrides it."""
        return self._identity or self._context.holder.owner

    @property
    def lease(self) -> AsyncLease | None:
        """The leadership lease this object holds, or None when it does not lead."""
        lease = self._lease
        return lease if lease is not None and lease.held else None

    @property
    def leading(self) -> bool:
        """True while this object holds the leadership lease (local, no I/O)."""
        return self.lease is not None

    @property
    def stopped(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping()

    # -- who leads -------------------------------------------------------------------

    async def leader(self) -> Leader | None:
        """Who leads now according to the store (identity, term, since), or None."""
        info = current_holder(await self._context.store.holders(self._name))
        return None if info is None else leader_from(info, time.time())

    async def observe(self) -> AsyncIterator[Leader | None]:
        """Yield who leads now, then every change, until ``stop()``.

        Items are ``Leader`` or None (nobody leads); consecutive items differ, and
        terms only increase: each term is yielded at most once, in order. On stores
        with announcements (``capabilities.announcements``) a change made through
        an election or ``client.break_lease`` anywhere is seen at once; other
        changes (a leader's expiry, a plain ``lock(name)``) just after the
        leader's expiry or within a safety poll of ``ttl / 3``. Other stores are
        polled at most ``ttl / 3`` apart (faster just after a change and around the
        leader's expiry), and changes made by elections in this process are seen at
        once. A term that begins and ends between two looks can be missed. A store
        error before the first answer is raised (it is a configuration problem
        until proven otherwise); later ones are logged and retried.
        """
        store = self._context.store
        # Subscribed before the first read: an announcement after it is never missed.
        async with store.subscribe(topic(self._name)) as subscription:
            local = _LocalWake(subscription)  # stop() and this process's elections
            CHANGES.subscribe(self._name, local)
            try:
                last_term = -1
                vacant: bool | None = None  # what was yielded last; None: nothing yet
                quiet = 0
                failures = 0
                reached = False
                while not self._stopping():
                    try:
                        holders = await store.holders(self._name)
                    except StoreUnavailable as exc:
                        # As for acquire: the first error is a configuration problem,
                        # later ones are transient and retried.
                        if not reached:
                            raise
                        failures += 1
                        logger.warning(
                            "observing %r: store error (%s); retrying",
                            self._name,
                            exc,
                            extra=log_fields("observe_retry", "election", self._name, error=exc),
                        )
                        retry = STORE_RETRY.delay(failures - 1)
                        await subscription.wait(min(retry, self._ttl / 3))
                        continue
                    reached = True
                    failures = 0
                    info = current_holder(holders)
                    if info is None:
                        if vacant is not True:
                            vacant = True
                            quiet = 0
                            self._leader_changed(None)
                            yield None
                        else:
                            quiet += 1
                    elif info.fence > last_term:
                        last_term = info.fence
                        vacant = False
                        quiet = 0
                        leader = leader_from(info, time.time())
                        self._leader_changed(leader)
                        yield leader
                    else:
                        quiet += 1
                    if self._stopping():
                        break
                    expires_in = None if info is None else info.expires_in
                    if subscription.notified:
                        delay = watch_delay(self._ttl, expires_in)
                    else:
                        delay = observe_delay(self._ttl, quiet, expires_in)
                    await subscription.wait(delay)
            finally:
                CHANGES.unsubscribe(self._name, local)

    # -- leading by hand -------------------------------------------------------------

    async def campaign(
        self, identity: str | None = None, timeout: float | None = None
    ) -> AsyncLease:
        """Wait until this candidate leads; return the leadership lease.

        The lease's fence is the term. It is renewed in the background like any
        lease and has the same loss contract (``async with lease:`` cancels the
        body on loss). Release it, or call ``resign()``, to step down. If this
        object already leads, its current lease is returned. ``AcquireTimeout``
        after ``timeout`` seconds (None: wait forever).
        """
        owner = self._owner(identity)
        return await self._campaign(owner, validate.timeout(timeout))

    async def resign(self) -> bool:
        """Step down now; True if this object was leading.

        The next queued candidate is woken at once. Inside ``run()`` the current
        body ends (async: it is cancelled; sync: its lease is released, so
        ``lease.held`` turns False and ``lease.check()`` raises) and the candidate
        campaigns again after a short jittered pause.
        """
        with self._state:
            lease = self._lease
            phase = self._phase if self._phase is not None and self._phase.lease is lease else None
            self._lease = None
            if phase is not None:
                phase.resigning = True  # we release it here; the watcher need not
        if lease is None:
            return False
        if phase is not None:
            phase.wake.set()  # async: cancel the body before the successor can start
        return await lease.release()  # announced by the lease's release hook

    # -- leading in a loop -----------------------------------------------------------

    async def run(self, fn: LeaderBody, *, identity: str | None = None) -> None:
        """Campaign, run ``await fn(lease)`` while leading, campaign again after
        losing, until ``stop()``; then return.

        On loss the body is cancelled exactly as an ``async with lease:`` body is.
        When ``fn`` returns, its term ends (the lease is released) and the candidate
        campaigns again. An exception from ``fn`` other than loss propagates out of
        ``run()`` after leadership is released. Store errors while campaigning are
        logged and retried.
        """
        if not callable(fn):
            raise InvalidArgument("run() needs a callable taking the leadership lease")
        owner = self._owner(identity)
        with self._state:
            if self._running:
                raise InvalidArgument(f"run() is already running for election {self._name!r}")
            self._running = True
        try:
            while not self._stopping():
                lease = await self._campaign_until_stopped(owner)
                if lease is None:
                    return
                if self._stopping():
                    await lease.release()
                    return
                await self._lead(fn, lease)
                if self._stopping():
                    return
                await self._stopped.wait(rejoin_delay(self._ttl))
        finally:
            with self._state:
                self._running = False

    def stop(self) -> None:
        """End ``run()`` and ``observe()``. Thread-safe, idempotent, never blocks;
        callable from a signal handler. Final: a stopped election stays stopped.

        A leading ``run()`` steps down: async, its body is cancelled and the lease
        released when the body has unwound; sync, the lease is released at once
        (the body learns it through ``lease.held`` / ``lease.check()``) and
        ``run()`` returns when the body returns.
        """
        with self._state:
            self._stop_requested = True
            phase = self._phase
        self._stopped.set()
        if phase is not None:
            phase.wake.set()
        CHANGES.announce(self._name)

    # -- internals -------------------------------------------------------------------

    def _stopping(self) -> bool:
        # A method, not an attribute read: stop() flips it from other threads and
        # tasks while we wait, which type narrowing of an attribute cannot know.
        return self._stop_requested

    def _owner(self, identity: str | None) -> str:
        if identity is not None:
            return validate.name(identity, what="identity")
        return self.identity

    async def _announce(self) -> None:
        """Announce a change of leader made here, after the store has made it."""
        CHANGES.announce(self._name)
        if IS_ASYNC:
            # In the background: a granted campaign must not be cancelled (and its
            # lease lost to its caller) while it tells the others.
            spawn(self._announce_in_store, name="leasehold-announce")
        else:
            await self._announce_in_store()

    async def _announce_in_store(self) -> None:
        if not self._context.store_closed:
            await announce_change(self._context.store, self._name)

    def _leader_changed(self, leader: Leader | None) -> None:
        if events.wanted():
            self._context.observer.emit(
                events.LeaderChanged,
                "election",
                self._name,
                leader=None if leader is None else leader.identity,
                term=None if leader is None else leader.term,
            )

    def _announce_loss(self, lease: AsyncLease) -> None:
        # An on_lost callback: it runs in the keeper, which must not wait for the
        # store, so the announcement goes out in the background.
        del lease
        CHANGES.announce(self._name)
        # Without an event loop in this thread, observers notice by their safety poll.
        with contextlib.suppress(RuntimeError):
            spawn(self._announce_in_store, name="leasehold-announce")

    async def _campaign(
        self,
        owner: str,
        timeout: float | None,
        started: float | None = None,
        place: QueuePlace | None = None,
    ) -> AsyncLease:
        """``started``: the start of a campaign that ``_campaign_until_stopped``
        waits out in slices (one acquire as events and statistics see it), keeping
        its queue ``place`` from one slice to the next."""
        with self._state:
            current = self._lease
            if current is not None and current.held:
                return current
            if self._campaigning:
                raise InvalidArgument(
                    f"this Election object is already campaigning for {self._name!r}; "
                    "use one Election object per candidate"
                )
            self._campaigning = True
        term = _Term(self, owner)
        try:
            lock = self._lock(owner, term)
            if started is None:
                lease = await lock.acquire(timeout)
            else:
                found = await lock._observed(
                    started, timeout, blocking=True, final=False, place=place
                )
                if found is None:
                    raise AcquireTimeout(self._name, timeout or 0.0)
                lease = found
        finally:
            with self._state:
                self._campaigning = False
        # However the lease ends -- resign(), run()'s end of term, or the caller's
        # own lease.release() -- its release announces the vacancy.
        term.fence = lease.fence
        lease._after_release = term.released
        with self._state:
            self._lease = lease
        if events.wanted():
            self._context.observer.emit(
                events.ElectionWon, "election", self._name, term=lease.fence, identity=owner
            )
        await self._announce()
        return lease

    def _lock(self, owner: str, term: _Term) -> AsyncLock:
        return AsyncLock(
            self._context,
            self._name,
            ttl=self._ttl,
            limit=1,
            margin=self._margin,
            owner=owner,
            on_lost=term.lost,
            primitive="election",
        )

    async def _campaign_until_stopped(self, owner: str) -> AsyncLease | None:
        place = QueuePlace()
        try:
            return await self._campaign_in_slices(owner, place)
        finally:
            if place.token is not None:
                # Stopped while queued: the place kept between slices goes.
                await self._lock(owner, _Term(self, owner))._leave_queue(place)

    async def _campaign_in_slices(self, owner: str, place: QueuePlace) -> AsyncLease | None:
        failures = 0
        observer = self._context.observer
        started: float | None = None  # the campaign as events and statistics see it
        while not self._stopping():
            phase = _Phase(self, None)
            if started is None:
                started = observer.acquire_started("election", self._name, True)
            try:
                async with phase:
                    return await self._campaign(
                        owner, None if IS_ASYNC else CAMPAIGN_SLICE, started, place
                    )
                # stop() interrupted the campaign; the acquire reported its cancellation.
                started = None
            except AcquireTimeout:
                # The end of a slice, not a timeout anybody asked for: the same
                # campaign goes on, in the same queue place.
                continue
            except StoreMisconfigured:
                raise  # waiting does not fix it
            except StoreUnavailable as exc:
                started = None  # reported as failed; the next try is a new acquire
                failures += 1
                delay = STORE_RETRY.delay(failures - 1)
                logger.warning(
                    "election %r: store error while campaigning (%s); retrying in %.2f s",
                    self._name,
                    exc,
                    delay,
                    extra=log_fields("campaign_retry", "election", self._name, error=exc),
                )
                await self._stopped.wait(delay)
        if started is not None:
            # stop() between slices: the campaign is abandoned, not timed out.
            observer.abandoned("election", self._name, started)
        return None

    async def _lead(self, fn: LeaderBody, lease: AsyncLease) -> None:
        phase = _Phase(self, lease)
        try:
            async with phase, lease:
                await fn(lease)
        except LeaseLost as exc:
            # The lease itself already logged the loss as a warning.
            if lease.lost:
                logger.info(
                    "election %r: leadership lost (term %d: %s); campaigning again",
                    self._name,
                    lease.fence,
                    exc.reason,
                    extra=lease_fields(lease, "leadership_lost"),
                )
        finally:
            # `async with lease` released it, and the release announced it.
            with self._state:
                if self._lease is lease:
                    self._lease = None

    def __repr__(self) -> str:
        state = "leading" if self.leading else ("stopped" if self._stopping() else "idle")
        return f"<{type(self).__name__} {self._name!r} ttl={self._ttl:g}s {state}>"


async def announce_change(store: AsyncStore, name: str) -> None:
    """Tell the observers of election ``name``, in every process, that its leader may
    have changed (``client.break_lease`` calls this too). Best effort: a failure is
    logged, and observers notice the change by their safety poll."""
    try:
        await store.announce(topic(name))
    except StoreUnavailable as exc:
        logger.info(
            "election %r: could not announce a change (%s)",
            name,
            exc,
            extra=log_fields("announce_failed", "election", name, error=exc),
        )


class _Term:
    """One term of this candidate: announces its end and reports it once, whether
    it ends by release (resigned) or by loss. Holds no reference to the lease, so
    a dropped lease is still collected (and expires) as any other."""

    def __init__(self, election: AsyncElection, identity: str) -> None:
        self._election = election
        self._identity = identity
        self._ended = False
        self.fence = 0  # set at the grant

    def _end(self, fence: int, resigned: bool) -> None:
        if self._ended:
            return
        self._ended = True
        election = self._election
        if events.wanted():
            election._context.observer.emit(
                events.ElectionEnded,
                "election",
                election._name,
                term=fence,
                identity=self._identity,
                resigned=resigned,
            )

    def lost(self, lease: AsyncLease) -> None:
        self._end(lease.fence, resigned=False)
        self._election._announce_loss(lease)

    async def released(self) -> None:
        self._end(self.fence, resigned=True)
        election = self._election
        CHANGES.announce(election._name)
        # Awaited, not in the background as after a grant: the release is done
        # (nothing to lose by waiting), and a client closing right after it (an
        # ASGI shutdown) must not close the store under the announcement.
        await election._announce_in_store()


class _LocalWake:
    """What ``CHANGES`` holds for an observer: setting it wakes the subscription."""

    def __init__(self, subscription: AsyncSubscription) -> None:
        self._subscription = subscription

    def set(self) -> None:
        self._subscription.wake()


class _Phase:
    """One interruptible stretch of ``run()``: a campaign, or a term.

    ``stop()`` and ``resign()`` end it by setting ``wake``. Async: a watcher task
    cancels the phase; because the watcher runs on the loop, the cancellation always
    lands while the phase is still awaiting something, and ``__aexit__`` absorbs it
    (the caller's own cancellations pass through). Sync: a thread cannot be
    cancelled, so the watcher releases the lease and the body learns it from the
    lease; a campaign is not watched (it runs in short slices instead).
    """

    def __init__(self, election: AsyncElection, lease: AsyncLease | None) -> None:
        self.election = election
        self.lease = lease
        self.wake = AsyncEvent()
        self.active = False
        self.interrupted = False
        self.resigning = False
        self._guard: AsyncBodyGuard | None = None
        self._watched = False
        self._watcher_done = AsyncEvent()

    async def __aenter__(self) -> _Phase:
        self._guard = AsyncBodyGuard()
        election = self.election
        with election._state:
            self.active = True
            election._phase = self
            # stop() or resign() may have come between the campaign and this term:
            # they found no phase to wake, so the phase wakes itself.
            superseded = self.lease is not None and election._lease is not self.lease
            if election._stop_requested or superseded:
                self.wake.set()
        if IS_ASYNC or self.lease is not None:
            self._watched = True
            spawn(self._watch, name="leasehold-election")
        return self

    async def _watch(self) -> None:
        try:
            await self.wake.wait()
            with self.election._state:
                if not self.active or self._guard is None:
                    return
                guard = self._guard
                # resign() releases the lease itself; stop() cannot (it never blocks).
                lease = None if self.resigning else self.lease
            guard.interrupt()
            if not IS_ASYNC and lease is not None:
                await lease.release()
        finally:
            self._watcher_done.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        election = self.election
        with election._state:
            self.active = False
            if election._phase is self:
                election._phase = None
        self.wake.set()
        if not IS_ASYNC and self._watched:
            # The body may have returned because the watcher began releasing the lease
            # for stop(): finish that before run() returns, so that a returned run()
            # means the store has let go.
            await self._watcher_done.wait()
        if self._guard is not None:
            self.interrupted = self._guard.absorb(exc)
        return self.interrupted


__all__ = ["AsyncElection", "LeaderBody", "announce_change"]
