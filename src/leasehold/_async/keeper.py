"""Background renewal: one keeper per client per process, one batched call per round.

The keeper holds only weak references to leases, so a lease dropped without
release stops being renewed and expires in the store by itself. It tells every
holder about loss (never silently): a lease whose renewal is refused is lost at
once; a lease whose renewals keep failing is lost at its safe deadline.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from leasehold._async._concurrency import (
    KEEPER_LINGER,
    AsyncCall,
    AsyncEvent,
    background_alive,
    spawn,
)
from leasehold._core.backoff import Backoff
from leasehold._core.loss import unanswered
from leasehold._core.policy import decide_renewal, renew_interval
from leasehold._errors import LeaseholdError

if TYPE_CHECKING:
    from leasehold._async.lease import AsyncLease
    from leasehold._async.store import AsyncStore
    from leasehold._core.clock import Clock
    from leasehold._observe import Observer
    from leasehold.events import Primitive

logger = logging.getLogger("leasehold")

IDLE_CHECK = 3600.0


class _Tracked(weakref.ref["AsyncLease"]):
    """A weak reference to a tracked lease that remembers what to report if the
    lease object is garbage-collected without release (``_dropped``)."""

    __slots__ = ("fence", "granted_at", "name", "owner", "primitive")
    primitive: Primitive
    name: str
    fence: int
    owner: str
    granted_at: float

    def __new__(cls, lease: AsyncLease, callback: Any) -> _Tracked:
        tracked = super().__new__(cls, lease, callback)
        # The lease's own fields, not its properties: one per acquire.
        tracked.primitive = lease._primitive
        tracked.name = lease._name
        tracked.fence = lease._fence
        tracked.owner = lease._owner
        tracked.granted_at = lease._granted_at
        return tracked

    @property
    def deadline(self) -> float:
        return math.inf  # for log fields only: the lease object is gone


RETRY_BACKOFF = Backoff(initial=0.05, maximum=1.0)


def _schedule(lease: AsyncLease) -> tuple[float, float]:
    """When ``lease`` was last sent, and when the keeper must next act on it: its
    first renewal (renewing leases) or its safe deadline."""
    sent = lease._last_sent
    due = lease._deadline
    if lease._renew:
        due = min(due, sent + renew_interval(lease._term) * 0.9)
    return sent, due


class AsyncKeeper:
    def __init__(self, store: AsyncStore, clock: Clock, observer: Observer) -> None:
        self._store = store
        self._clock = clock
        self._observer = observer
        self._reset()

    def _reset(self) -> None:
        self._guard = threading.Lock()
        self._leases: dict[int, _Tracked] = {}
        self._handle: object = None
        self._wakeup = AsyncEvent()
        self._pid = os.getpid()
        self._failures = 0
        self._stopped = False
        # When the keeper will look next on its own (monotonic); a new lease wakes
        # it only if it is due earlier, so acquiring N leases is not O(N²).
        self._next_wake = -math.inf
        # The shortest lead time (grant to first renewal) seen: the keeper sleeps
        # no longer than this, so a new lease need not wake it.
        self._shortest_lead = math.inf
        # Before when no tracked lease needs the keeper (a renewal, a deadline):
        # what the last round found, lowered by every lease tracked since. A
        # wake-up before it (the lead-time cap above) costs no round, which would
        # look at every lease.
        self._due_by = -math.inf

    def after_fork_in_child(self) -> None:
        # The child inherits neither the thread nor the task; its leases belong to
        # the parent and must never be renewed or released from here.
        self._reset()

    def track(self, lease: AsyncLease) -> None:
        tracked = _Tracked(lease, self._dropped)
        # Read before the guard: the lease is new, nobody else changes it yet.
        sent, due = _schedule(lease)
        with self._guard:
            if self._pid != os.getpid():
                return
            self._leases[id(lease)] = tracked
            self._stopped = False
            self._shortest_lead = min(self._shortest_lead, due - sent)
            self._due_by = min(self._due_by, due)
            if not background_alive(self._handle):
                self._handle = spawn(self._run, name="leasehold-keeper")
                return
            wake = due < self._next_wake
        if wake:
            self._wakeup.set()

    def reschedule(self, lease: AsyncLease) -> None:
        """``lease``'s TTL changed (``extend(ttl=...)``): its next renewal, or its
        deadline, may now come before the keeper would look again."""
        sent, due = _schedule(lease)
        with self._guard:
            if self._pid != os.getpid() or id(lease) not in self._leases:
                return
            self._shortest_lead = min(self._shortest_lead, due - sent)
            self._due_by = min(self._due_by, due)
            wake = due < self._next_wake
        if wake:
            self._wakeup.set()

    def _dropped(self, tracked: weakref.ref[AsyncLease]) -> None:
        # Called by the garbage collector, in whatever thread it runs: no lock
        # here (the collector may interrupt a holder of the guard); the dead entry
        # is swept by tracked() or the next round. A released or lost lease was
        # forgotten first, and a forgotten reference never calls back.
        assert isinstance(tracked, _Tracked)
        if self._pid != os.getpid():
            return
        held = max(0.0, self._clock.monotonic() - tracked.granted_at)
        self._observer.lost(
            tracked,
            "dropped",
            "the Lease object was garbage-collected without release(); nothing renews "
            "it now and the store lets it expire at the end of its ttl",
            held,
        )

    def forget(self, lease: AsyncLease) -> None:
        # No wake-up: the keeper drops it at its next round, or idles out.
        with self._guard:
            ref = self._leases.get(id(lease))
            if ref is not None and ref() is lease:
                del self._leases[id(lease)]

    def stop(self) -> None:
        with self._guard:
            self._leases.clear()
            self._stopped = True
        self._wakeup.set()

    def running(self) -> bool:
        """Whether the renewer (task or thread) is alive."""
        with self._guard:
            handle = self._handle
        return background_alive(handle)

    def tracked(self) -> list[AsyncLease]:
        with self._guard:
            alive = []
            for key, ref in list(self._leases.items()):
                lease = ref()
                if lease is None:
                    del self._leases[key]
                else:
                    alive.append(lease)
            return alive

    async def _run(self) -> None:
        clock = self._clock
        idle_since: float | None = None
        try:
            while True:
                now = clock.monotonic()
                with self._guard:
                    empty = not self._leases
                    if empty and idle_since is None:
                        idle_since = now
                    idle_for = 0.0 if idle_since is None else now - idle_since
                    # A thread lingers a while when idle, so a client that takes
                    # and releases leases in a loop does not start one per lease.
                    if (
                        self._stopped
                        or self._pid != os.getpid()
                        or (empty and idle_for >= KEEPER_LINGER)
                    ):
                        self._handle = None
                        return
                if empty:
                    delay = min(KEEPER_LINGER - idle_for, self._shortest_lead)
                else:
                    idle_since = None
                    with self._guard:
                        due_by = self._due_by
                    if now >= due_by:
                        with self._guard:
                            self._due_by = math.inf  # leases tracked meanwhile lower it
                        after = await self._round()
                        with self._guard:
                            self._due_by = min(self._due_by, clock.monotonic() + after)
                    # Never longer than a new lease's lead either: a long-lived
                    # lease (a leader's, say) would otherwise let the keeper sleep
                    # past the first renewal of every short lock taken meanwhile,
                    # and each acquire would wake it (a thread switch and ~15
                    # futex calls per acquire + release, sync).
                    delay = self._shortest_lead
                if delay > 0:
                    with self._guard:
                        # Under the guard, as track() compares with it: a lease
                        # tracked while this pass ran is due by then at the latest.
                        now = clock.monotonic()
                        if not empty:
                            delay = min(delay, self._due_by - now)
                        self._next_wake = now + delay
                if delay > 0:
                    await self._wakeup.wait(delay)
                    self._wakeup.clear()
                    self._next_wake = -math.inf
        except BaseException as exc:
            # A renewer that dies must take its leases down loudly, not silently.
            with self._guard:
                self._handle = None
            for lease in self.tracked():
                lease._mark_lost("unreachable", f"the renewer stopped: {exc!r}")
            if not isinstance(exc, Exception):
                raise
            logger.exception(
                "leasehold keeper crashed", extra={"leasehold_event": "keeper_crashed"}
            )

    async def _round(self) -> float:
        """One pass over every tracked lease: detect loss, renew if any is due.
        Returns how long to sleep."""
        clock = self._clock
        now = clock.monotonic()
        leases = [lease for lease in self.tracked() if not lease.released]
        renewable: list[AsyncLease] = []
        due = False
        sleep_for = IDLE_CHECK
        for lease in leases:
            if now >= lease.deadline:
                lease._deadline_lost()
                continue
            if not lease.renewing:
                sleep_for = min(sleep_for, lease.deadline - now)
                continue
            renewable.append(lease)
            decision = decide_renewal(
                now, lease.last_sent, lease.term, lease.deadline, lease.jitter
            )
            if decision.renew_now:
                due = True
            else:
                sleep_for = min(sleep_for, decision.sleep)
        if not due:
            return sleep_for
        return await self._renew(renewable)

    async def _renew(self, leases: list[AsyncLease]) -> float:
        # Renewing every renewable lease (not only the due ones) keeps them in lock
        # step, so 10,000 leases cost one round trip per interval.
        clock = self._clock
        pairs = [(lease, lease.renew_item()) for lease in leases]
        items = [item for _, item in pairs]
        sent = clock.monotonic()
        observer = self._observer
        store = self._store
        call = AsyncCall(lambda: store.renew(items))
        # Wait for the answer, but never past a safe deadline: a call hanging on a
        # dead network path must not delay the news of loss (L2).
        pending = leases
        while not await call.wait(min(lease.deadline for lease in pending) - clock.monotonic()):
            now = clock.monotonic()
            for lease in pending:
                if now >= lease.deadline:
                    lease._mark_lost(*unanswered(lease._failures, lease._last_error))
            pending = [lease for lease in pending if now < lease.deadline]
            if not pending:
                return 0.0
        try:
            answers = call.result()
        except LeaseholdError as exc:
            error = str(exc) or type(exc).__name__
            for lease in pending:
                lease._renewal_failed(error)
            observer.renewal_failed(pending, clock.monotonic() - sent, exc)
            return self._retry_after_failure(pending)
        duration = clock.monotonic() - sent
        silent: list[AsyncLease] = []
        renewed: list[AsyncLease] = []
        for (lease, item), ok in zip(pairs, answers, strict=True):
            if ok is None:
                silent.append(lease)
            elif ok:
                # A lease released (or lost) while its renewal was on the way has
                # had its last event: no Renewed after Released.
                if lease._renewed(sent, item.ttl):
                    renewed.append(lease)
            else:
                lease._refused()
        if renewed:
            observer.renewed(renewed, duration)
        elif len(silent) < len(pairs):
            observer.answered()
        if not silent:
            self._failures = 0
            return 0.0
        # Part of the store (a cluster node) did not answer: those leases are
        # retried like a failed call, the others were renewed.
        for lease in silent:
            lease._renewal_failed("no answer (a part of the store is unreachable)")
        observer.renewal_failed(silent, duration, None)
        return self._retry_after_failure(silent)

    def _retry_after_failure(self, leases: list[AsyncLease]) -> float:
        """How long to wait after a failed renewal of ``leases`` before the next
        attempt (backing off, never past the soonest of their safe deadlines)."""
        self._failures += 1
        retry = RETRY_BACKOFF.delay(self._failures - 1)
        soonest = min(lease.deadline for lease in leases) - self._clock.monotonic()
        return max(0.0, min(retry, soonest))


__all__ = ["AsyncKeeper"]
