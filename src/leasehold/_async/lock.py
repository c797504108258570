"""Lock and semaphore handles: written once against the store contract.

A handle does no I/O until ``acquire``. ``limit`` > 1 makes it a semaphore.
"""

from __future__ import annotations

import logging
from binascii import b2a_base64
from dataclasses import replace
from os import urandom
from types import TracebackType
from typing import TYPE_CHECKING

from leasehold import _deadline
from leasehold._async._concurrency import current_actor, in_background, shielded
from leasehold._async.lease import AsyncLease, OnLost
from leasehold._core import validate
from leasehold._core.backoff import Backoff
from leasehold._core.policy import default_margin, safe_deadline
from leasehold._core.records import (
    AcquireRequest,
    Busy,
    Granted,
    HandedOver,
    Holder,
    WaitResult,
)
from leasehold._errors import (
    AcquireTimeout,
    InvalidArgument,
    NoAnswer,
    StoreMisconfigured,
    StoreUnavailable,
)
from leasehold._observe import log_fields

if TYPE_CHECKING:
    from leasehold._async.context import AsyncContext
    from leasehold.events import Primitive

logger = logging.getLogger("leasehold")

# A waiter keeps its place in the store's FIFO queue for QUEUE_TTL seconds after
# each attempt; a waiter that dies silently blocks the queue at most that long.
QUEUE_TTL = 3.0
QUEUE_REFRESH = QUEUE_TTL / 3
# Stores without notifications are polled; the head of the queue polls fastest
# because it is the one that will be served next.
POLL_INITIAL = 0.0005
POLL_HEAD = 0.002
POLL_STEP = 0.01
POLL_MAX = 0.5
STORE_RETRY = Backoff(initial=0.05, maximum=2.0)
# The shares of an acquire's slack (see call_slack) that its last store call may
# use past the deadline, and its clean-up after that (then it goes on in the
# background); the rest is for the machine's own delays.
SLACK_SHARE = 0.3
CLEANUP_SHARE = 0.1
# How often ``with lock:`` asks again for a lease that expired before its body began.
ENTER_ATTEMPTS = 3
# An acquire attempt whose own bound is at least this much longer than the store's
# operation timeout needs no guard of its own: the store's ends the call first.
GUARD_REDUNDANT = 0.05


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def new_token() -> str:
    """A secret owner token: 24 random bytes, URL-safe base64 (what
    ``secrets.token_urlsafe(24)`` makes, in C calls only: base64's functions are
    Python ones)."""
    return b2a_base64(urandom(24), newline=False).translate(_URLSAFE).decode("ascii")


class QueuePlace:
    """A place in a name's wait queue kept from one acquire to the next.

    A sync election campaign waits in slices (so that it hears ``stop()``); each
    slice goes on with the token the last one queued, so the candidate keeps its
    place and a hand-over that reaches it between slices is taken by the next
    slice (the store answers a holder's token with its grant) instead of being
    given back. ``token``: the token queued, None before the first slice and once
    the place was given up or became a lease. Whoever keeps a place gives it up
    (``AsyncLock._leave_queue``) when it stops waiting without a lease."""

    __slots__ = ("token",)

    def __init__(self) -> None:
        self.token: str | None = None


def call_slack(timeout: float | None) -> float:
    """How far past its timeout an acquire may return: max(0.5 s, 10 % of it)."""
    return max(0.5, 0.1 * (timeout or 0.0))


def poll_delay(attempt: int, position: int | None) -> float:
    ceiling = min(POLL_MAX, POLL_HEAD + POLL_STEP * (position or 0))
    return Backoff(initial=POLL_INITIAL, maximum=ceiling).delay(attempt)


class AsyncLock:
    """``client.lock(name)``: exclusive (limit 1) or counting (limit N) lease handle."""

    def __init__(
        self,
        context: AsyncContext,
        name: str,
        *,
        ttl: float = 30.0,
        limit: int = 1,
        renew: bool = True,
        on_lost: OnLost | None = None,
        margin: float | None = None,
        owner: str | None = None,
        primitive: Primitive | None = None,
    ) -> None:
        self._context = context
        self._name = validate.name(name)
        self._ttl = validate.ttl(ttl)
        self._limit = validate.limit(limit)
        # What events and metrics call it: an election's, a once's or a presence
        # room's lock says so.
        self._primitive: Primitive = primitive or ("semaphore" if self._limit > 1 else "lock")
        if not isinstance(renew, bool):
            raise InvalidArgument(f"renew must be a bool, got {type(renew).__name__}")
        self._renew = renew
        if on_lost is not None and not callable(on_lost):
            raise InvalidArgument("on_lost must be a callable taking the lease")
        self._on_lost = on_lost
        self._margin = (
            default_margin(self._ttl) if margin is None else validate.margin(margin, self._ttl)
        )
        # A readable label stored with the grant instead of the client's own (an
        # election candidate's identity); the secret token stays per attempt.
        self._owner = None if owner is None else validate.name(owner, what="owner")
        self._entered: dict[int, list[AsyncLease]] = {}
        # This handle's local queue (see AsyncGates).
        self._gate_key = (self._name, self._limit)

    @property
    def name(self) -> str:
        return self._name

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def limit(self) -> int:
        return self._limit

    async def acquire(self, timeout: float | None = None) -> AsyncLease:
        """Wait until granted; ``AcquireTimeout`` after ``timeout`` seconds (None:
        forever). Waiters are served in arrival order."""
        checked = validate.timeout(timeout)
        # _observed() written out: one call frame less on the hot path.
        observer = self._context.observer
        started = observer.acquire_started(self._primitive, self._name, True)
        try:
            lease = await self._acquire(checked, queue=checked != 0, started=started, begun=started)
        except BaseException as exc:
            observer.acquire_failed(self._primitive, self._name, started, exc)
            raise
        if lease is None:
            observer.not_acquired(self._primitive, self._name, started, blocking=True)
            raise AcquireTimeout(self._name, checked or 0.0)
        observer.acquired(
            self._primitive,
            self._name,
            lease._fence,
            started,
            lease._handed_over,
            now=lease._answered,
        )
        return lease

    async def try_acquire(self) -> AsyncLease | None:
        """One attempt: the lease, or None if it is busy (the "skip if busy" path)."""
        started = self._context.observer.acquire_started(self._primitive, self._name, False)
        return await self._observed(started, 0.0, blocking=False, begun=started)

    async def _observed(
        self,
        started: float,
        timeout: float | None,
        *,
        blocking: bool,
        final: bool = True,
        begun: float | None = None,
        place: QueuePlace | None = None,
    ) -> AsyncLease | None:
        """One acquire, reported: exactly one outcome per ``acquire_started``
        (``final=False``: a slice of a longer wait, whose timeout is not an outcome).
        ``begun``: ``started`` when it was read just now (see ``_acquire``).
        ``place``: a queue place kept when the timeout passes (see QueuePlace)."""
        observer = self._context.observer
        try:
            lease = await self._acquire(
                timeout,
                queue=blocking and timeout != 0,
                started=started,
                begun=begun,
                place=place,
            )
        except BaseException as exc:
            observer.acquire_failed(self._primitive, self._name, started, exc)
            raise
        if lease is not None:
            observer.acquired(
                self._primitive,
                self._name,
                lease._fence,
                started,
                lease._handed_over,
                now=lease._answered,
            )
        elif final:
            observer.not_acquired(self._primitive, self._name, started, blocking=blocking)
        return lease

    async def _acquire(
        self,
        timeout: float | None,
        *,
        queue: bool,
        started: float,
        begun: float | None = None,
        place: QueuePlace | None = None,
    ) -> AsyncLease | None:
        """``begun``: a clock reading taken just before (the caller's ``started``
        when ``timeout`` counts from it), from which the attempts count their
        ``timeout`` when nothing was waited for before them: one clock read less on
        the hot path. None: they read the clock."""
        context = self._context
        clock = context.clock
        if not queue:
            return await self._attempts(
                timeout, queue=False, started=clock.monotonic() if begun is None else begun
            )
        key = self._gate_key
        gates = context.gates
        turn = gates.join(key)
        try:
            if turn is None and begun is not None:
                return await self._attempts(timeout, queue=True, started=begun, place=place)
            if turn is not None and not turn.is_set():
                wait = None if timeout is None else max(0.0, started + timeout - clock.monotonic())
                if not await turn.wait(wait):
                    return None
            remaining = None if timeout is None else max(0.0, started + timeout - clock.monotonic())
            return await self._attempts(
                remaining, queue=True, started=clock.monotonic(), place=place
            )
        finally:
            gates.leave(key, turn)

    def _request(self, token: str, holder: Holder, *, queue: bool) -> AcquireRequest:
        return AcquireRequest(
            name=self._name,
            token=token,
            holder=holder,
            ttl=self._ttl,
            limit=self._limit,
            queue_ttl=QUEUE_TTL if queue else None,
        )

    async def _attempts(
        self,
        timeout: float | None,
        *,
        queue: bool,
        started: float,
        place: QueuePlace | None = None,
    ) -> AsyncLease | None:
        """Attempts until granted or ``timeout`` seconds from ``started`` (a clock
        reading taken just before) have passed. With a ``place``, they go on with
        its token, and when the timeout passes the queue place stays (the caller
        gives it up); any other way out (a lease, an error, a cancellation) leaves
        the place with nothing to give up."""
        context = self._context
        store = context.store
        clock = context.clock
        holder = context.holder
        if self._owner is not None:
            holder = replace(holder, owner=self._owner)
        token = new_token() if place is None or place.token is None else place.token
        if place is not None:
            place.token = token
        request = self._request(token, holder, queue=queue)
        deadline = None if timeout is None else started + timeout
        slack = call_slack(timeout)
        attempt = 0
        failures = 0
        reached_store = False
        queued_at: float | None = None  # send time of the attempt that last queued us

        def give_up_at() -> float | None:
            # Until when a store error (a lost reply, a dropped connection) is
            # retried with the same token: the caller's deadline; for a single
            # attempt (try_acquire) and for a store never reached yet, the
            # operation timeout; else (no timeout, store seen) for ever.
            if deadline is not None and timeout:
                return deadline
            if deadline is not None or not reached_store:
                return started + store.operation_timeout
            return None

        def bound(now: float) -> float | None:
            # Each store call ends by the time the caller gives up, plus a share
            # of the slack its bound allows (another share is for the clean-up,
            # the rest for the machine's own delays).
            limit = give_up_at()
            if limit is None:
                return None
            return max(0.0, limit - now) + slack * SLACK_SHARE

        # The first attempt is sent now: its send time is the start (a reading
        # taken a moment earlier, so the lease's safe deadline errs early).
        sent = started
        try:
            while True:
                seconds = bound(sent)
                call: _deadline.Deadline | None = None
                try:
                    if seconds is None or seconds >= store.operation_timeout + GUARD_REDUNDANT:
                        # The store call's own bound (its operation timeout) ends
                        # it first: a guard of ours would change nothing.
                        result = await store.acquire(request)
                    else:
                        with _deadline.bounded(seconds) as call:
                            result = await store.acquire(request)
                except StoreMisconfigured:
                    raise  # waiting does not fix it
                except StoreUnavailable as exc:
                    failures += 1
                    now = clock.monotonic()
                    # A call ended by a deadline (ours or the store's) says NoAnswer.
                    out_of_time = isinstance(exc, NoAnswer) or (call is not None and call.expired)
                    if out_of_time and deadline is not None and timeout and now >= deadline:
                        # The caller's own time ran out while the store was slow
                        # or silent: a timeout like any other (the grant it may
                        # have made is released).
                        logger.info(
                            "acquire %r: %s",
                            self._name,
                            exc,
                            extra=log_fields("acquire_no_answer", self._primitive, self._name),
                        )
                        if place is None:
                            await self._let_go(token, slack * CLEANUP_SHARE)
                        return None
                    limit = give_up_at()
                    if limit is not None and now >= limit:
                        raise
                    context.observer.acquire_retry(self._name, exc)
                    pause = STORE_RETRY.delay(failures - 1)
                    if limit is not None:
                        pause = min(pause, limit - now)
                    if await self._wait(token, pause, bound(clock.monotonic()), deadline) is None:
                        if place is None:
                            await self._let_go(token, slack * CLEANUP_SHARE)
                        return None
                    sent = clock.monotonic()
                    continue
                reached_store = True
                failures = 0
                if isinstance(result, Granted):
                    lease = self._granted(token, fence=result.fence, owner=holder.owner, sent=sent)
                    if lease is not None:
                        if place is not None:
                            place.token = None  # the lease's now
                        return lease
                    # The answer came too late to hold anything: let that grant go
                    # and ask again under a new token (a release of the old one
                    # still on its way must not remove the new grant).
                    self._let_go_later(token)
                    token = new_token()
                    if place is not None:
                        place.token = token
                    request = self._request(token, holder, queue=queue)
                    queued_at = None
                    result = Busy(retry_after=0.0, position=None)
                elif result.position is not None:
                    queued_at = sent
                now = clock.monotonic()
                if deadline is not None and now >= deadline:
                    if queue and place is None:
                        await self._let_go(token, slack * CLEANUP_SHARE)
                    return None
                pause = self._pause(result, attempt, store.capabilities.notifications)
                if deadline is not None:
                    pause = min(pause, deadline - now)
                woken = await self._wait(token, pause, bound(clock.monotonic()), deadline)
                if woken is None:
                    if queue and place is None:
                        await self._let_go(token, slack * CLEANUP_SHARE)
                    return None
                term = min(self._ttl, QUEUE_TTL)
                if (
                    isinstance(woken, HandedOver)
                    and self._renew
                    and queued_at is not None
                    and clock.monotonic() < queued_at + term / 2
                ):
                    # A release made us holder on our queue place (store.release):
                    # valid from our last queueing attempt for min(ttl, QUEUE_TTL),
                    # and the keeper renews it to the full ttl. A lease that does
                    # not renew, or whose last attempt is too old to vouch for
                    # half of that (a short ttl), confirms with one more attempt.
                    lease = self._granted(
                        token,
                        fence=woken.fence,
                        owner=holder.owner,
                        sent=queued_at,
                        term=term,
                    )
                    if lease is not None:
                        if place is not None:
                            place.token = None
                        return lease
                attempt += 1
                sent = clock.monotonic()
        except BaseException as exc:
            if place is not None:
                place.token = None  # given up here
            if isinstance(exc, StoreMisconfigured) and not reached_store and not failures:
                # The store's only answer refused the request (credentials, a
                # permission): it did nothing, and a clean-up would be refused too.
                raise
            # Cancelled, timed out or failed mid-call: the store may have granted or
            # queued us without our hearing the answer. Undo both: shielded, for
            # at most a share of the slack, then in the background.
            undone = await self._let_go(token, slack * CLEANUP_SHARE, quiet=not reached_store)
            if not undone and reached_store:
                logger.warning(
                    "acquire %r interrupted and the store did not confirm the clean-up; "
                    "any grant expires within %g s",
                    self._name,
                    self._ttl,
                    extra=log_fields("acquire_interrupted", self._primitive, self._name),
                )
            raise

    async def _wait(
        self, token: str, pause: float, bound: float | None, deadline: float | None
    ) -> WaitResult | None:
        """``store.wait`` within the attempt's bound; None if it failed after the
        caller's deadline (the caller has timed out), else its error."""
        try:
            with _deadline.bounded(bound):
                return await self._context.store.wait(self._name, token, pause)
        except StoreMisconfigured:
            raise
        except StoreUnavailable:
            if deadline is not None and self._context.clock.monotonic() >= deadline:
                return None
            raise

    async def _let_go(self, token: str, seconds: float, *, quiet: bool = False) -> bool:
        """Release ``token``'s grant or queue place, waiting at most ``seconds``;
        if the store does not confirm by then, try again in the background. True
        if the store confirmed."""
        store = self._context.store
        try:
            with _deadline.bounded(seconds):
                await shielded(
                    lambda: store.release(self._name, token),
                    restartable=store.capabilities.cancels_cleanly,
                )
        except StoreUnavailable as exc:
            # Before the store ever answered (a wrong URL, say) there is nothing
            # to undo worth a word; the caller sees the real error.
            logger.log(
                logging.DEBUG if quiet else logging.INFO,
                "releasing an abandoned acquire of %r: %s; trying again in the background",
                self._name,
                exc,
                extra=log_fields("acquire_cleanup", self._primitive, self._name),
            )
            if not isinstance(exc, StoreMisconfigured):
                self._let_go_later(token)
            return False
        return True

    async def _leave_queue(self, place: QueuePlace) -> None:
        """Give up a place kept by slices that ended without a lease (the token may
        also have been handed the name meanwhile: releasing it passes it on)."""
        token = place.token
        if token is not None:
            place.token = None
            await self._let_go(token, call_slack(None) * CLEANUP_SHARE)

    def _let_go_later(self, token: str) -> None:
        store = self._context.store
        in_background(lambda: store.release(self._name, token))

    def _granted(
        self,
        token: str,
        *,
        fence: int,
        owner: str,
        sent: float,
        term: float | None = None,
    ) -> AsyncLease | None:
        """The lease for a grant; None if its answer came at or after the grant's
        safe deadline (a reply delayed past the ttl): no dead lease reaches the
        caller."""
        context = self._context
        now = context.clock.monotonic()
        if now >= safe_deadline(sent, self._ttl if term is None else term, self._margin):
            logger.warning(
                "acquire %r: the grant (fence %d) was answered %.3f s after it was asked "
                "for, past its safe deadline; releasing it and trying again",
                self._name,
                fence,
                now - sent,
                extra=log_fields("late_grant", self._primitive, self._name, fence=fence),
            )
            return None
        lease = AsyncLease(
            context=context,
            name=self._name,
            token=token,
            fence=fence,
            ttl=self._ttl,
            margin=self._margin,
            limit=self._limit,
            sent_at=sent,
            renew=self._renew,
            on_lost=self._on_lost,
            owner=owner,
            term=term,
            primitive=self._primitive,
            restarts=context.store.restarts(self._name),
        )
        lease._handed_over = term is not None  # only a hand-over passes a term
        lease._answered = now  # when the grant was heard of (the acquire's end)
        context.track(lease)
        return lease

    @staticmethod
    def _pause(result: Busy, attempt: int, notifications: bool) -> float:
        pause = QUEUE_REFRESH if notifications else poll_delay(attempt, result.position)
        if result.retry_after is not None:
            # Expiry announces itself to nobody: look again just after it.
            pause = min(pause, result.retry_after + 0.001)
        return max(0.0, pause)

    # -- context manager: ``async with client.lock(name) as lease`` ---------------

    async def __aenter__(self) -> AsyncLease:
        # The body starts only with a lease held at that moment: one that expired
        # between grant and here (a process paused that long) is given up and
        # asked for again, a few times at most.
        for _ in range(ENTER_ATTEMPTS - 1):
            lease = await self.acquire()
            if lease.held:
                break
            await lease.release()
        else:
            lease = await self.acquire()
        entered = await lease.__aenter__()  # LeaseLost if even that one is not held
        self._entered.setdefault(id(current_actor()), []).append(lease)
        return entered

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        key = id(current_actor())
        stack = self._entered.get(key)
        if not stack:
            return
        lease = stack.pop()
        if not stack:
            del self._entered[key]
        await lease.__aexit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        kind = "semaphore" if self._limit > 1 else "lock"
        return (
            f"<{type(self).__name__} {kind} {self._name!r} ttl={self._ttl:g}s limit={self._limit}>"
        )
