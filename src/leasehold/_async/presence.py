"""Presence rooms: members, join intents and epochs, written once on store records.

The room's whole state is one record (see ``leasehold._core.presence``); every
operation is read -> pure transition -> compare-and-set, retried with jittered
backoff when another writer got there first. Creating an epoch runs under a lease
on ``presence-create:<room>``: its fence becomes the epoch number, so numbers
strictly increase and are never reused, and a creator that dies is taken over
when its lease expires.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from leasehold import events
from leasehold._async._concurrency import IS_ASYNC, sleep
from leasehold._async.lease import AsyncLease
from leasehold._async.lock import AsyncLock, QueuePlace
from leasehold._core import presence as core
from leasehold._core import validate
from leasehold._core.backoff import Backoff
from leasehold._core.policy import default_margin
from leasehold._core.presence import Epoch, Member, Room, Snapshot
from leasehold._core.presence_changes import changes
from leasehold._errors import AcquireTimeout, InvalidArgument
from leasehold._observe import lease_fields

if TYPE_CHECKING:
    from leasehold._async.context import AsyncContext

logger = logging.getLogger("leasehold")

R = TypeVar("R")

# Compare-and-set conflicts are retried at once-ish and then with spreading delays,
# so a crowd of writers on one room never retries in lock step.
CAS_RETRY = Backoff(initial=0.001, maximum=0.1)
# How long an opener waits on the creation lease before it reads the room again.
OPEN_WAIT = Backoff(initial=0.05, maximum=1.0)

# create(number) -> payload; on the async client it may also return an awaitable.
Create = Callable[[int], Any]


class AsyncPresence:
    """``client.presence(room)``: who is in a room, and its epochs.

    ``member_ttl``: how long a joined (active) member counts as present after its
    last join, heartbeat or observation. ``intent_ttl``: how long an intent to join
    counts, covering the connection handshake during which an external presence
    feed cannot see the member yet. ``create_ttl``: the ttl of the creation lease
    (renewed while ``create`` runs; after a creator dies, its epoch is taken over
    within about this long).
    """

    def __init__(
        self,
        context: AsyncContext,
        room: str,
        *,
        member_ttl: float = 10.0,
        intent_ttl: float = 30.0,
        create_ttl: float = 30.0,
    ) -> None:
        self._context = context
        self._room = core.check_room(room)
        self._member_ttl = validate.ttl(member_ttl, what="member_ttl")
        self._intent_ttl = validate.ttl(intent_ttl, what="intent_ttl")
        self._create_ttl = validate.ttl(create_ttl, what="create_ttl")
        self._key = core.RECORD_PREFIX + self._room
        self._lock = AsyncLock(
            context,
            core.CREATE_LOCK_PREFIX + self._room,
            ttl=self._create_ttl,
            primitive="presence",
        )

    @property
    def room(self) -> str:
        return self._room

    @property
    def member_ttl(self) -> float:
        return self._member_ttl

    @property
    def intent_ttl(self) -> float:
        return self._intent_ttl

    # -- epochs ------------------------------------------------------------------------

    async def current(self) -> Epoch | None:
        """The OPEN epoch, or None (never opened, being created, or closed)."""
        record = await self._context.store.read_record(self._key)
        return core.current_epoch(core.decode(self._key, record.value))

    async def open(self, create: Create, *, timeout: float | None = None) -> Epoch:
        """The OPEN epoch, or the next one, opened now.

        ``create(number)`` runs exactly once per epoch, by one caller, holding the
        creation lease; its JSON result is stored as the epoch's payload. Callers
        that arrive meanwhile wait and return the same ``Epoch``. If ``create``
        raises, the error propagates and the next caller creates afresh (with a
        new number). ``AcquireTimeout`` if no epoch opened within ``timeout``.
        """
        if not callable(create):
            raise InvalidArgument("create must be a callable taking the epoch number")
        checked = validate.timeout(timeout)
        clock = self._context.clock
        deadline = None if checked is None else clock.monotonic() + checked
        # The wait for the creation lease, in slices, is one acquire as events and
        # statistics see it: its start while it is pending between slices.
        observer = self._context.observer
        lock = self._lock
        waiting: float | None = None
        attempt = 0
        # The slices keep one queue place (FIFO among openers; a hand-over between
        # slices goes to the next slice), given up when the wait ends without it.
        place = QueuePlace()
        try:
            while True:
                opened = await self.current()
                if opened is not None:
                    if waiting is not None:
                        observer.abandoned("presence", lock.name, waiting)  # not needed
                    return opened
                # Wait on the creation lease, but only for a while: when a creator
                # commits, the lease passes from waiter to waiter one at a time, and a
                # waiter deep in that queue sees the open epoch sooner by looking again.
                wait = OPEN_WAIT.delay(attempt)
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - clock.monotonic()))
                if waiting is None:
                    waiting = observer.acquire_started("presence", lock.name, True)
                # The slice reports its own errors: not pending while it runs.
                started, waiting = waiting, None
                lease = await lock._observed(started, wait, blocking=True, final=False, place=place)
                if lease is None:
                    attempt += 1
                    if deadline is not None and clock.monotonic() >= deadline:
                        observer.not_acquired("presence", lock.name, started, blocking=True)
                        raise AcquireTimeout(self._room, checked or 0.0) from None
                    waiting = started
                    continue
                try:
                    opened = await self._create(lease, create)
                finally:
                    await lease.release()
                if opened is not None:
                    return opened
        except BaseException as exc:
            if waiting is not None:
                observer.acquire_failed("presence", lock.name, waiting, exc)
            raise
        finally:
            if place.token is not None:
                await lock._leave_queue(place)

    async def _create(self, lease: AsyncLease, create: Create) -> Epoch | None:
        """Under the creation lease: claim, create, commit. None if superseded."""
        number = lease.fence
        found = await self._claim(number)
        if found is not None:
            return found
        payload = core.check_payload(await _result_of(create(number)))
        if await self._commit(number, payload):
            return Epoch(number, payload)
        logger.warning(
            "presence %r: epoch %d was taken over before create() committed; its payload "
            "is discarded (clean up what create() made for that epoch number)",
            self._room,
            number,
            extra=lease_fields(lease, "epoch_taken_over"),
        )
        return None

    async def _claim(self, number: int) -> Epoch | None:
        """Write CREATING(number); an OPEN epoch found instead is returned."""
        owner = self._context.holder.owner
        found, _ = await self._apply(
            lambda room, now, version: core.claim(room, now, version, number=number, creator=owner)
        )
        return found

    async def _commit(self, number: int, payload: Any) -> bool:
        """OPEN(number) with ``payload`` if the record still says CREATING(number)."""
        committed, _ = await self._apply(
            lambda room, now, version: core.commit(
                room, now, version, number=number, payload=payload
            )
        )
        return committed

    async def close_if_idle(
        self, *, epoch: int | Epoch, grace: float = 0.0, expected_version: int | None = None
    ) -> bool:
        """Close ``epoch`` if, in one atomic step, it is the OPEN epoch, no intent or
        active member is live, the last membership change is at least ``grace``
        seconds old (store clock) and, when given, the record version still equals
        ``expected_version``. True if this call closed it."""
        number = core.check_epoch(epoch)
        grace_s = core.check_grace(grace)
        expected = (
            None
            if expected_version is None
            else core.check_version(expected_version, what="expected_version")
        )
        closed, _ = await self._apply(
            lambda room, now, version: core.close_if_idle(
                room, now, version, epoch=number, grace=grace_s, expected_version=expected
            )
        )
        return closed

    # -- members -------------------------------------------------------------------------

    async def intend(self, member: str, *, epoch: int | Epoch) -> Member:
        """Announce that ``member`` is about to join ``epoch``: it counts as present
        for ``intent_ttl`` from now. ``StaleEpoch`` if ``epoch`` is not the OPEN one."""
        member_id = core.check_member(member)
        number = core.check_epoch(epoch)
        ttl = self._intent_ttl
        return await self._member_step(
            lambda room, now, version: core.intend(
                room, now, version, name=self._room, member=member_id, epoch=number, ttl=ttl
            ),
            member_id,
            ttl,
        )

    async def join(self, member: str, *, epoch: int | Epoch, data: Any = None) -> Member:
        """Make ``member`` active in ``epoch`` (from an intent, or directly) with
        ``data`` (JSON, at most 16 KiB); present for ``member_ttl`` from now."""
        member_id = core.check_member(member)
        number = core.check_epoch(epoch)
        checked = core.check_data(data)
        ttl = self._member_ttl
        return await self._member_step(
            lambda room, now, version: core.join(
                room,
                now,
                version,
                name=self._room,
                member=member_id,
                epoch=number,
                data=checked,
                ttl=ttl,
            ),
            member_id,
            ttl,
        )

    async def heartbeat(self, member: str, *, epoch: int | Epoch) -> Member:
        """Extend ``member`` by its state's ttl. ``MemberGone`` if it had expired, left
        or was removed; ``StaleEpoch`` if the epoch is not the OPEN one."""
        member_id = core.check_member(member)
        number = core.check_epoch(epoch)
        ttls = {core.INTENT: self._intent_ttl, core.ACTIVE: self._member_ttl}
        return await self._member_step(
            lambda room, now, version: core.heartbeat(
                room, now, version, name=self._room, member=member_id, epoch=number, ttls=ttls
            ),
            member_id,
            None,
        )

    async def leave(self, member: str, *, epoch: int | Epoch) -> bool:
        """Remove ``member``; True if it was a live member of the OPEN epoch
        ``epoch``. Idempotent, and never ``StaleEpoch``: leaving an epoch that is
        gone has nothing left to do."""
        member_id = core.check_member(member)
        number = core.check_epoch(epoch)
        left, _ = await self._apply(
            lambda room, now, version: core.leave(
                room, now, version, member=member_id, epoch=number
            )
        )
        return left

    async def members(self) -> Snapshot:
        """The live members of the OPEN epoch and the record version they were read at."""
        record = await self._context.store.read_record(self._key)
        return core.snapshot(core.decode(self._key, record.value), record.now, record.version)

    async def observe(
        self, present_ids: Iterable[str], *, epoch: int | Epoch, snapshot_version: int
    ) -> Snapshot:
        """Reconcile with an external presence feed.

        Take ``snap = await room.members()`` *before* the feed produced
        ``present_ids`` (for a feed that lags by L seconds: at least L seconds
        before you read it), then call ``observe(present_ids, epoch=...,
        snapshot_version=snap.version)``. Members in ``present_ids`` become or stay
        active for ``member_ttl``; an active member missing from it is removed only
        if nothing about it changed after the snapshot; intents are never removed
        (they expire by themselves). Returns the room as written.
        """
        present = core.check_present(present_ids)
        number = core.check_epoch(epoch)
        since = core.check_version(snapshot_version, what="snapshot_version")
        ttl = self._member_ttl
        room, (version, now) = await self._apply(
            lambda room, now, version: core.observe(
                room,
                now,
                version,
                name=self._room,
                epoch=number,
                present=present,
                snapshot_version=since,
                ttl=ttl,
            )
        )
        return core.snapshot(room, now, version)

    # -- the one atomic step -----------------------------------------------------------------

    async def _member_step(
        self,
        transition: core.Transition[core.Entry],
        member_id: str,
        ttl: float | None,
    ) -> Member:
        """Apply a member transition; ``ttl`` is what it granted (None: the ttl of
        the state the member ended in)."""
        clock = self._context.clock
        entry, _, sent = await self._apply_timed(transition)
        if ttl is None:
            ttl = self._intent_ttl if entry.state == core.INTENT else self._member_ttl
        granted = ttl
        # The store wrote expiry = (its clock at our read) + ttl, and the read
        # happened after ``sent``: this deadline is never later than the store's.
        deadline = sent + granted - default_margin(granted)
        expires_in = max(0.0, deadline - clock.monotonic())
        return Member(member_id, entry.state, entry.data, expires_in, deadline)

    async def _apply(self, transition: core.Transition[R]) -> tuple[R, tuple[int, float]]:
        result, where, _ = await self._apply_timed(transition)
        return result, where

    async def _apply_timed(
        self, transition: core.Transition[R]
    ) -> tuple[R, tuple[int, float], float]:
        """Read, transition, compare-and-set; retried until it applies to the state it
        read. Returns the result, (version, store time) after the step, and the
        local send time of the read the step was decided on."""
        store = self._context.store
        clock = self._context.clock
        attempt = 0
        while True:
            sent = clock.monotonic()
            record = await store.read_record(self._key)
            before = core.decode(self._key, record.value)
            step = transition(before, record.now, record.version)
            if step.write is None:
                return step.result, (record.version, record.now), sent
            value = core.encode(step.write)
            version = await store.write_record(
                self._key, record.version, value, core.record_ttl(step.write)
            )
            if version is not None:
                if events.wanted():
                    self._report(before, step.write, record.now)
                return step.result, (version, record.now), sent
            await sleep(CAS_RETRY.delay(attempt))
            attempt += 1

    def _report(self, before: Room | None, after: Room, now: float) -> None:
        """Events for what a write of ours changed (see presence_changes)."""
        observer = self._context.observer
        for change, member in changes(before, after, now):
            if member is None:
                kind = events.RoomOpened if change == "opened" else events.RoomClosed
                observer.emit(kind, "presence", self._room, epoch=after.epoch)
            else:
                observer.emit(
                    _MEMBER_EVENTS[change], "presence", self._room, member=member, epoch=after.epoch
                )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._room!r} member_ttl={self._member_ttl:g}s "
            f"intent_ttl={self._intent_ttl:g}s>"
        )


_MEMBER_EVENTS: dict[str, type[events.Event]] = {
    "joined": events.MemberJoined,
    "left": events.MemberLeft,
    "intent_expired": events.IntentExpired,
}


async def _result_of(made: Any) -> Any:
    """What ``create`` returned, awaited if it is awaitable (async client only)."""
    if not inspect.isawaitable(made):
        return made
    if not IS_ASYNC:
        close = getattr(made, "close", None)
        if callable(close):
            close()  # no "never awaited" warning on top of our error
        raise InvalidArgument("create returned an awaitable: use AsyncClient.presence")
    return await made


__all__ = ["AsyncPresence"]
