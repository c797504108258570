"""Presence rooms on every backend: epochs, members, closing, observing, racing.

Expiry tests use the harness's fake clock where the backend allows it and short
real TTLs on server-clock backends. The concurrency tests run real threads (every
backend) and real processes (SQLite, marked slow).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import leasehold
from leasehold._core import presence as core
from leasehold.testing import BackendHarness

ROOT = Path(__file__).resolve().parent.parent


class Counter:
    """A ``create`` that counts its calls and returns a meeting id."""

    def __init__(self, pause: float = 0.0) -> None:
        self.calls: list[int] = []
        self.pause = pause
        self._guard = threading.Lock()

    def __call__(self, number: int) -> dict[str, Any]:
        with self._guard:
            self.calls.append(number)
        if self.pause:
            time.sleep(self.pause)
        return {"meeting": f"m-{number}", "tags": ("a", "b")}


def ttls(harness: BackendHarness) -> tuple[float, float]:
    """(member_ttl, intent_ttl): long under a fake clock, short with a real one."""
    return (10.0, 30.0) if harness.fake_clock else (0.6, 1.2)


def new_room(
    harness: BackendHarness, *, expiring: bool = False, **kwargs: Any
) -> leasehold.Presence:
    """A fresh room. With a real clock its members outlive the test unless
    ``expiring`` asks for the short TTLs of ``ttls()``."""
    member_ttl, intent_ttl = ttls(harness) if harness.fake_clock or expiring else (30.0, 60.0)
    kwargs.setdefault("member_ttl", member_ttl)
    kwargs.setdefault("intent_ttl", intent_ttl)
    return harness.client().presence(harness.unique("room"), **kwargs)


def ids(snapshot: leasehold.Snapshot) -> dict[str, str]:
    return {m.id: m.state for m in snapshot.members}


# -- epochs --------------------------------------------------------------------------------


def test_open_creates_once_and_returns_the_open_epoch(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    create = Counter()
    assert room.current() is None
    assert room.members() == leasehold.Snapshot(epoch=None, members=[], version=0)
    epoch = room.open(create)
    assert create.calls == [epoch.number]
    assert epoch.payload == {"meeting": f"m-{epoch.number}", "tags": ["a", "b"]}  # as JSON
    assert room.open(create) == epoch
    assert create.calls == [epoch.number]
    assert room.current() == epoch
    other = lh_backend.client().presence(room.room)  # another client, same room
    assert other.current() == epoch
    assert other.open(Counter()) == epoch
    snap = room.members()
    assert (snap.epoch, snap.members) == (epoch.number, [])
    assert snap.version > 0


def test_epochs_strictly_increase_and_closed_never_reopens(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    seen: list[int] = []
    for _ in range(4):
        epoch = room.open(Counter())
        seen.append(epoch.number)
        room.intend("u", epoch=epoch.number)
        assert room.leave("u", epoch=epoch.number) is True
        assert room.close_if_idle(epoch=epoch.number) is True
        assert room.close_if_idle(epoch=epoch.number) is False  # already closed
        assert room.current() is None
        for op in (
            lambda n: room.intend("u", epoch=n),
            lambda n: room.join("u", epoch=n),
            lambda n: room.heartbeat("u", epoch=n),
            lambda n: room.observe(["u"], epoch=n, snapshot_version=0),
        ):
            with pytest.raises(leasehold.StaleEpoch) as info:
                op(epoch.number)
            assert (info.value.epoch, info.value.current) == (epoch.number, None)
        assert room.leave("u", epoch=epoch.number) is False  # idempotent, not an error
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    latest = room.open(Counter())
    with pytest.raises(leasehold.StaleEpoch) as info:
        room.join("u", epoch=seen[-1])
    assert info.value.current == latest.number
    assert "not current" in str(info.value) and str(latest.number) in str(info.value)


def test_create_failure_propagates_and_the_next_open_creates_afresh(
    lh_backend: BackendHarness,
) -> None:
    room = new_room(lh_backend)

    def broken(number: int) -> object:
        raise RuntimeError(f"provider down for {number}")

    with pytest.raises(RuntimeError, match="provider down"):
        room.open(broken)
    assert room.current() is None
    with pytest.raises(leasehold.InvalidArgument, match="JSON"):
        room.open(lambda n: {"not json": object()})
    with pytest.raises(leasehold.InvalidArgument, match="payload"):
        room.open(lambda n: "x" * (core.MAX_PAYLOAD_BYTES + 1))
    create = Counter()
    epoch = room.open(create)
    assert create.calls == [epoch.number]
    assert lh_backend.client().holders(core.CREATE_LOCK_PREFIX + room.room) == []  # released


def crash_creator(client: leasehold.Client, room: leasehold.Presence, ttl: float) -> int:
    """Start creating an epoch like ``open`` does, then "die": never commit, never
    release, never renew. Returns the abandoned epoch number."""
    lease = client.lock(core.CREATE_LOCK_PREFIX + room.room, ttl=ttl, renew=False).try_acquire()
    assert lease is not None
    assert room._claim(lease.fence) is None
    return lease.fence


def test_dead_creator_is_taken_over_and_its_late_commit_fenced(
    lh_backend: BackendHarness,
) -> None:
    ttl = lh_backend.short_ttl
    client = lh_backend.client()
    room = client.presence(lh_backend.unique("room"), create_ttl=ttl)
    dead = crash_creator(client, room, ttl)
    assert room.current() is None  # CREATING is not open
    with pytest.raises(leasehold.AcquireTimeout):
        room.open(Counter(), timeout=0)  # the creator's lease is still live
    lh_backend.advance(ttl + 0.05)
    create = Counter()
    epoch = room.open(create)
    assert epoch.number > dead and create.calls == [epoch.number]
    assert room._commit(dead, {"late": True}) is False  # fenced
    assert room.current() == epoch


def test_late_commit_without_takeover_is_accepted(lh_backend: BackendHarness) -> None:
    ttl = lh_backend.short_ttl
    client = lh_backend.client()
    room = client.presence(lh_backend.unique("room"), create_ttl=ttl)
    number = crash_creator(client, room, ttl)
    lh_backend.advance(ttl + 0.05)
    # The lease is gone but nobody took over: the record still says CREATING(number).
    assert room._commit(number, {"late": True}) is True
    assert room.current() == leasehold.Epoch(number, {"late": True})
    assert room.open(Counter()) == leasehold.Epoch(number, {"late": True})


def test_waiters_get_the_creators_epoch(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    create = Counter(pause=0.2)
    results: list[leasehold.Epoch] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(50)
    clients = [lh_backend.client() for _ in range(5)]  # 10 threads share each client

    def opener(i: int) -> None:
        try:
            mine = clients[i % 5].presence(room.room)
            barrier.wait()
            results.append(mine.open(create))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == 50
    assert len(create.calls) == 1
    assert results[0].number == create.calls[0]
    assert all(epoch == results[0] for epoch in results)


def _opener_orders(url: str, room: str) -> list[tuple[str, ...]]:
    """A creator holds the creation lease of ``room`` for 1.5 s while two openers
    wait for it, ``first`` 0.2 s before ``second``: the queue's order (by owner)
    sampled meanwhile. Openers wait in slices (50 ms growing) and re-read the room
    between them."""
    release = threading.Event()
    with (
        leasehold.Client(url) as c0,
        leasehold.Client(url, identity="first") as c1,
        leasehold.Client(url, identity="second") as c2,
    ):

        def create(number: int) -> dict[str, int]:
            release.wait(10)
            return {"n": number}

        name = f"presence-create:{room}"
        openers = [threading.Thread(target=c0.presence(room).open, args=(create,), daemon=True)]
        openers[0].start()
        for _ in range(500):  # the creator holds the creation lease
            if c0.holders(name):
                break
            time.sleep(0.01)
        for client in (c1, c2):
            opener = threading.Thread(target=client.presence(room).open, args=(create,))
            opener.daemon = True
            opener.start()
            openers.append(opener)
            time.sleep(0.2)
        orders: list[tuple[str, ...]] = []
        end = time.monotonic() + 1.5
        for _ in range(1000):
            if time.monotonic() >= end:
                break
            waiting = sorted(c0.waiters(name), key=lambda w: w.position)
            orders.append(tuple(w.owner.split(":")[0] for w in waiting))
            time.sleep(0.01)
        release.set()
        for opener in openers:
            opener.join(10)
        assert c0.waiters(name) == [] and c0.holders(name) == []
    return orders


def test_openers_keep_their_queue_places_across_slices(lh_backend: BackendHarness) -> None:
    url = lh_backend.fresh_url() if lh_backend.fake_clock else lh_backend.url
    orders = _opener_orders(url, lh_backend.unique("room"))
    assert len(orders) > 20, orders
    both = [order for order in orders if len(order) == 2]
    assert both, orders
    assert all(order == ("first", "second") for order in both), orders


def test_opener_order_check_fires_when_slices_queue_anew(
    tmp_path: Path, forgetful_slices: None
) -> None:
    """Control: openers whose slices forget their place requeue at the back."""
    orders = _opener_orders(f"sqlite:///{tmp_path / 'control.db'}", "control")
    assert ("second", "first") in orders, orders


# -- members ---------------------------------------------------------------------------------


def test_intend_join_heartbeat_leave(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    member_ttl, intent_ttl = room.member_ttl, room.intent_ttl
    n = room.open(Counter()).number
    clock = room._context.clock
    before = clock.monotonic()
    ack = room.intend("alice", epoch=n)
    assert (ack.id, ack.state, ack.data) == ("alice", "intent", None)
    assert ack.deadline is not None
    assert before + intent_ttl * 0.98 - 0.002 <= ack.deadline <= clock.monotonic() + intent_ttl
    assert 0 < ack.expires_in <= intent_ttl
    assert ids(room.members()) == {"alice": "intent"}
    joined = room.join("alice", epoch=n, data={"name": "Alice", "mic": False})
    assert (joined.state, joined.data) == ("active", {"name": "Alice", "mic": False})
    direct = room.join("bob", epoch=n)  # no intent first
    assert direct.state == "active"
    snap = room.members()
    assert ids(snap) == {"alice": "active", "bob": "active"}
    assert [m.id for m in snap.members] == ["alice", "bob"]
    assert snap.members[0].data == {"name": "Alice", "mic": False}
    assert all(m.deadline is None and m.expires_in > 0 for m in snap.members)
    beat = room.heartbeat("bob", epoch=n)
    assert beat.state == "active" and beat.expires_in <= member_ttl
    assert room.leave("bob", epoch=n) is True
    assert room.leave("bob", epoch=n) is False
    with pytest.raises(leasehold.MemberGone) as info:
        room.heartbeat("bob", epoch=n)
    assert (info.value.member, info.value.epoch, info.value.room) == ("bob", n, room.room)
    with pytest.raises(leasehold.MemberGone):
        room.heartbeat("carol", epoch=n)
    assert ids(room.members()) == {"alice": "active"}


def test_members_expire_on_the_store_clock(lh_backend: BackendHarness) -> None:
    member_ttl, intent_ttl = ttls(lh_backend)
    room = new_room(lh_backend, expiring=True)
    n = room.open(Counter()).number
    room.intend("intent-only", epoch=n)
    room.join("active", epoch=n)
    lh_backend.advance(member_ttl + 0.1)
    assert ids(room.members()) == {"intent-only": "intent"}
    with pytest.raises(leasehold.MemberGone):
        room.heartbeat("active", epoch=n)
    room.heartbeat("intent-only", epoch=n)  # an intent can be kept alive too
    lh_backend.advance(intent_ttl + 0.1)
    assert room.members().members == []
    with pytest.raises(leasehold.MemberGone):
        room.heartbeat("intent-only", epoch=n)
    assert room.close_if_idle(epoch=n) is True


def test_join_never_shortens_an_acknowledged_intent(local_backend: BackendHarness) -> None:
    room = new_room(local_backend)  # member_ttl 10, intent_ttl 30
    n = room.open(Counter()).number
    intent = room.intend("u", epoch=n)
    local_backend.advance(1.0)
    room.join("u", epoch=n)
    local_backend.advance(15.0)  # past the join's ttl, within the intent's
    assert intent.deadline is not None and local_backend.clock is not None
    assert local_backend.clock.monotonic() < intent.deadline
    assert room.close_if_idle(epoch=n) is False
    assert ids(room.members()) == {"u": "active"}
    local_backend.advance(15.0)
    assert room.close_if_idle(epoch=n) is True


def test_acknowledged_deadline_is_never_after_the_store_expiry(
    local_backend: BackendHarness,
) -> None:
    room = new_room(local_backend)
    n = room.open(Counter()).number
    clock = local_backend.clock
    assert clock is not None
    for ack in (room.intend("a", epoch=n), room.join("b", epoch=n), room.heartbeat("b", epoch=n)):
        assert ack.deadline is not None
        stored = {m.id: m for m in room.members().members}[ack.id]
        assert ack.deadline < clock.monotonic() + stored.expires_in
        local_backend.advance(0.5)


# -- closing -------------------------------------------------------------------------------


def test_close_if_idle_rules(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    n = room.open(Counter()).number
    assert room.close_if_idle(epoch=n + 1) is False  # not the open epoch
    room.intend("u", epoch=n)
    assert room.close_if_idle(epoch=n) is False  # a live intent
    room.join("u", epoch=n)
    assert room.close_if_idle(epoch=n) is False  # a live member
    snap = room.members()
    room.leave("u", epoch=n)
    assert room.close_if_idle(epoch=n, expected_version=snap.version) is False  # changed
    grace = 3.0 if lh_backend.fake_clock else 0.5
    assert room.close_if_idle(epoch=n, grace=grace) is False  # the leave was just now
    lh_backend.advance(grace + 0.05)
    snap = room.members()
    assert snap.members == [] and snap.epoch == n
    assert (
        room.close_if_idle(
            epoch=leasehold.Epoch(n, None), grace=grace, expected_version=snap.version
        )
        is True
    )
    assert room.members().epoch is None


def test_grace_counts_from_the_last_expiry(local_backend: BackendHarness) -> None:
    room = new_room(local_backend)  # member_ttl 10
    n = room.open(Counter()).number
    room.join("u", epoch=n)
    local_backend.advance(10.0 + 4.0)  # expired 4 s ago, unnoticed by anyone
    assert room.close_if_idle(epoch=n, grace=5.0) is False
    local_backend.advance(1.0)
    assert room.close_if_idle(epoch=n, grace=5.0) is True


def test_a_fresh_epoch_is_protected_by_grace(local_backend: BackendHarness) -> None:
    room = new_room(local_backend)
    n = room.open(Counter()).number
    assert room.close_if_idle(epoch=n, grace=2.0) is False
    local_backend.advance(2.0)
    assert room.close_if_idle(epoch=n, grace=2.0) is True


# -- observing an external presence feed ---------------------------------------------------


def test_observe_adds_refreshes_and_removes_only_what_the_snapshot_saw(
    lh_backend: BackendHarness,
) -> None:
    room = new_room(lh_backend)
    n = room.open(Counter()).number
    room.join("old", epoch=n)
    room.intend("handshaking", epoch=n)
    snap = room.members()
    room.join("new", epoch=n)  # after the snapshot: the feed may not show it yet
    after = room.observe(["feed-only"], epoch=n, snapshot_version=snap.version)
    assert ids(after) == {"handshaking": "intent", "new": "active", "feed-only": "active"}
    assert after.version > snap.version and after.epoch == n
    assert ids(room.members()) == ids(after)
    # The feed now shows the intending member: it is promoted and refreshed.
    snap = room.members()
    after = room.observe(
        ["handshaking", "new", "feed-only"], epoch=n, snapshot_version=snap.version
    )
    assert ids(after) == {"handshaking": "active", "new": "active", "feed-only": "active"}


def test_observe_never_removes_intents(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    n = room.open(Counter()).number
    room.intend("u", epoch=n)
    snap = room.members()
    assert ids(room.observe([], epoch=n, snapshot_version=snap.version)) == {"u": "intent"}
    assert room.close_if_idle(epoch=n) is False


def test_observe_with_a_stale_snapshot_keeps_newer_changes(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    n = room.open(Counter()).number
    room.join("u", epoch=n)
    stale = room.members()
    room.heartbeat("u", epoch=n)  # newer evidence than that snapshot
    assert ids(room.observe([], epoch=n, snapshot_version=stale.version)) == {"u": "active"}
    fresh = room.members()
    assert ids(room.observe([], epoch=n, snapshot_version=fresh.version)) == {}
    # It left after `fresh` was taken: a feed older than that must not bring it back.
    room.join("v", epoch=n)
    before_leave = room.members()
    room.leave("v", epoch=n)
    assert ids(room.observe(["v"], epoch=n, snapshot_version=before_leave.version)) == {}
    # A feed read after the leave is newer evidence: the member is back.
    after_leave = room.members()
    assert ids(room.observe(["v"], epoch=n, snapshot_version=after_leave.version)) == {
        "v": "active"
    }


def test_observe_refuses_a_snapshot_from_elsewhere(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    n = room.open(Counter()).number
    with pytest.raises(leasehold.InvalidArgument, match="snapshot_version"):
        room.observe([], epoch=n, snapshot_version=room.members().version + 10**12)
    with pytest.raises(leasehold.StaleEpoch):
        room.observe([], epoch=n + 1, snapshot_version=0)


# -- the async API -------------------------------------------------------------------------


def test_async_presence(lh_backend: BackendHarness) -> None:
    async def main() -> None:
        async with lh_backend.async_client() as client:
            room = client.presence(lh_backend.unique("room"))
            assert isinstance(room, leasehold.AsyncPresence)
            calls: list[int] = []

            async def create(number: int) -> dict[str, int]:
                calls.append(number)
                await asyncio.sleep(0.05)
                return {"n": number}

            epochs = await asyncio.gather(*(room.open(create) for _ in range(10)))
            assert len(calls) == 1
            assert all(e == leasehold.Epoch(calls[0], {"n": calls[0]}) for e in epochs)
            n = epochs[0].number
            assert (await room.open(lambda number: {"sync": number})).number == n
            assert (await room.intend("a", epoch=n)).state == "intent"
            assert (await room.join("a", epoch=n, data=[1, 2])).data == [1, 2]
            assert (await room.heartbeat("a", epoch=n)).state == "active"
            snap = await room.members()
            assert ids(snap) == {"a": "active"}
            assert await room.close_if_idle(epoch=n) is False
            snap = await room.observe(["a"], epoch=n, snapshot_version=snap.version)
            assert await room.leave("a", epoch=n) is True
            assert await room.close_if_idle(epoch=n) is True
            assert await room.current() is None
            with pytest.raises(leasehold.StaleEpoch):
                await room.join("a", epoch=n)

    asyncio.run(main())


def test_async_cancelled_creator_is_taken_over(local_backend: BackendHarness) -> None:
    async def main() -> None:
        async with local_backend.async_client() as client:
            room = client.presence(local_backend.unique("room"))
            started = asyncio.Event()

            async def slow(number: int) -> int:
                started.set()
                await asyncio.sleep(3600)
                return number

            task = asyncio.create_task(room.open(slow))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The lease was released on the way out: the next caller takes over now.
            epoch = await asyncio.wait_for(room.open(lambda n: "ok"), 5)
            assert epoch.payload == "ok"

    asyncio.run(main())


# -- bad input, before any I/O -------------------------------------------------------------


class NoIO:
    """Stands in for the store and fails the test on any use: proves validation
    happens before any I/O."""

    def __getattr__(self, item: str) -> object:
        raise AssertionError(f"I/O ({item}) before validation")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.presence(""),
        lambda c: c.presence("r" * (core.MAX_ROOM_LENGTH + 1)),
        lambda c: c.presence("a\nb"),
        lambda c: c.presence(42),
        lambda c: c.presence("r", member_ttl=0),
        lambda c: c.presence("r", intent_ttl=float("nan")),
        lambda c: c.presence("r", create_ttl=True),
        lambda c: c.presence("r").open("not callable"),
        lambda c: c.presence("r").open(lambda n: n, timeout=-1),
        lambda c: c.presence("r").intend("", epoch=1),
        lambda c: c.presence("r").intend(7, epoch=1),
        lambda c: c.presence("r").intend("u", epoch=0),
        lambda c: c.presence("r").intend("u", epoch=True),
        lambda c: c.presence("r").intend("u", epoch="1"),
        lambda c: c.presence("r").join("u", epoch=1, data={1, 2}),
        lambda c: c.presence("r").join("u", epoch=1, data=float("nan")),
        lambda c: c.presence("r").join("u", epoch=1, data="lone \udc80 surrogate"),
        lambda c: c.presence("r").join("u", epoch=1, data={"k": object()}),
        lambda c: c.presence("r").join("u", epoch=1, data="x" * (core.MAX_DATA_BYTES + 1)),
        lambda c: c.presence("r").heartbeat("u\x00", epoch=1),
        lambda c: c.presence("r").leave(None, epoch=1),
        lambda c: c.presence("r").close_if_idle(epoch=1, grace=-1),
        lambda c: c.presence("r").close_if_idle(epoch=1, grace=float("inf")),
        lambda c: c.presence("r").close_if_idle(epoch=1, expected_version=-1),
        lambda c: c.presence("r").close_if_idle(epoch=1, expected_version=1.5),
        lambda c: c.presence("r").observe("alice", epoch=1, snapshot_version=0),
        lambda c: c.presence("r").observe([""], epoch=1, snapshot_version=0),
        lambda c: c.presence("r").observe(None, epoch=1, snapshot_version=0),
        lambda c: c.presence("r").observe([], epoch=1, snapshot_version=None),
    ],
)
def test_bad_arguments_fail_before_io(call: Any) -> None:
    client = leasehold.Client("memory://")
    client.store = NoIO()  # type: ignore[assignment]
    with pytest.raises(leasehold.InvalidArgument):
        call(client)


def test_a_foreign_record_is_reported_not_misread(lh_backend: BackendHarness) -> None:
    room = new_room(lh_backend)
    store = lh_backend.client().store
    assert store.write_record(core.RECORD_PREFIX + room.room, 0, b"not json") is not None
    with pytest.raises(leasehold.LeaseholdError, match="presence room"):
        room.current()


def test_sync_mirrors_async() -> None:
    public = {n for n in dir(leasehold.AsyncPresence) if not n.startswith("_")}
    assert public == {n for n in dir(leasehold.Presence) if not n.startswith("_")}
    assert {
        "open",
        "current",
        "intend",
        "join",
        "heartbeat",
        "leave",
        "members",
        "close_if_idle",
        "observe",
    } <= public


def test_repr_and_properties() -> None:
    room = leasehold.Client("memory://").presence("room:1", member_ttl=5, intent_ttl=20)
    assert (room.room, room.member_ttl, room.intent_ttl) == ("room:1", 5.0, 20.0)
    assert "room:1" in repr(room) and "member_ttl=5s" in repr(room)


# -- close racing intend, for real -----------------------------------------------------------


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def race_close_and_intend(harness: BackendHarness, rounds: int) -> tuple[int, int]:
    """Each round: an idle open epoch; one thread intends while another closes.
    Never both: an acknowledged intent (deadline in the future) and a successful
    close of the same epoch. Returns (closes won, intents won)."""
    # Real clocks, one store: a fresh store for fake-clock backends.
    url = harness.fresh_url() if harness.fake_clock else harness.url
    clients = [leasehold.Client(url), leasehold.Client(url)]
    intender = clients[0].presence(harness.unique("race"), intent_ttl=30.0)
    closer = clients[1].presence(intender.room)
    barrier = threading.Barrier(2)
    rng = random.Random(rounds)
    # Each side starts after its own random pause (drawn up front, so the threads
    # never share the generator), so each wins about half of the rounds.
    pauses = [[rng.random() * 0.0004 for _ in range(rounds)] for _side in range(2)]
    epochs: list[int] = []
    intents: list[tuple[int, float | None]] = []
    closes: list[tuple[int, bool, float]] = []

    def intend_side() -> None:
        for i in range(rounds):
            barrier.wait()
            n = epochs[i]
            spin(pauses[0][i])
            try:
                ack = intender.intend("u", epoch=n)
                intents.append((n, ack.deadline))
            except leasehold.StaleEpoch:
                intents.append((n, None))
            barrier.wait()

    def close_side() -> None:
        for i in range(rounds):
            epochs.append(closer.open(lambda number: number).number)
            barrier.wait()
            n = epochs[i]
            spin(pauses[1][i])
            closed = closer.close_if_idle(epoch=n)
            closes.append((n, closed, time.monotonic()))
            barrier.wait()
            if not closed:
                closer.leave("u", epoch=n)
                assert closer.close_if_idle(epoch=n) is True

    threads = [threading.Thread(target=intend_side), threading.Thread(target=close_side)]
    interval = sys.getswitchinterval()
    # Switch threads every few microseconds, so the two operations interleave
    # inside the store calls too, not only one after the other.
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        sys.setswitchinterval(interval)
        for client in clients:
            client.close()
    assert len(intents) == len(closes) == rounds
    closes_won = intents_won = 0
    for (n, deadline), (m, closed, at) in zip(intents, closes, strict=True):
        assert n == m
        assert not (closed and deadline is not None and deadline > at), f"split in epoch {n}"
        assert closed != (deadline is not None)  # exactly one of them won
        closes_won += closed
        intents_won += deadline is not None
    return closes_won, intents_won


def test_close_racing_intend_threads(lh_backend: BackendHarness) -> None:
    rounds = {"memory": 3000, "sqlite": 1000}.get(lh_backend.name, 250)
    closes_won, intents_won = race_close_and_intend(lh_backend, rounds)
    print(f"{lh_backend.name}: {rounds} rounds, close won {closes_won}, intend won {intents_won}")


# -- real processes ------------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests._presence_workers", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.slow
def test_concurrent_opens_in_processes_create_one_epoch(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    url = f"sqlite:///{tmp_path / 'rooms.db'}"
    calls = tmp_path / "calls.jsonl"
    start = time.monotonic() + 1.5  # every process is importing by then
    for _ in range(5):
        procs.append(spawn("open", url, "room:procs", str(calls), "10", str(start)))
    results = [json.loads(line) for proc in procs for line in finish(proc).splitlines()]
    assert len(results) == 50
    created = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(created) == 1
    assert {tuple(r) for r in results} == {(created[0], f"m-{created[0]}")}


@pytest.mark.slow
def test_close_racing_intend_processes(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Two processes act on the same idle epoch at the same instant (a shared
    CLOCK_MONOTONIC schedule), one round per room, many rounds."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    rounds = 1200
    client = leasehold.Client(url)
    epochs = {
        f"race:{i}": client.presence(f"race:{i}").open(lambda number: number).number
        for i in range(rounds)
    }
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(epochs))
    start = time.monotonic() + 1.5
    procs.append(spawn("race", url, str(plan), "close", str(start)))
    procs.append(spawn("race", url, str(plan), "intend", str(start)))
    closes, intents = (
        {r[0]: r[1:] for r in map(json.loads, finish(proc, timeout=120).splitlines())}
        for proc in procs
    )
    assert len(intents) == len(closes) == rounds
    won = {"close": 0, "intend": 0}
    for room, (closed, at) in closes.items():
        (deadline,) = intents[room]
        assert not (closed and deadline is not None and deadline > at), f"split in {room}"
        assert closed != (deadline is not None)  # exactly one of them won
        won["close" if closed else "intend"] += 1
    print(f"sqlite, 2 processes: {rounds} rounds, {won}")
    client.close()
