"""The presence model: pure transitions, and a Hypothesis state machine on every backend.

The state machine runs the real ``Presence`` next to a small model of one room
(members expired eagerly, where the store expires them lazily) and checks after
every step:

* epoch numbers strictly increase; a closed epoch never reopens; ``create`` runs
  once per epoch; a superseded creator's late commit is refused;
* ``members()`` is exactly the model's live members (and, under a fake clock,
  their exact remaining times);
* no acknowledged deadline is in the future for a member the room does not count,
  and ``close_if_idle`` never succeeds while one is (unless the member left or an
  ``observe`` with a newer snapshot removed it);
* ``observe`` never removes an intent, nor a member changed after its snapshot.

Backends whose store clock can be faked get clock jumps (with the model reading
the same clock, so its float arithmetic matches the store's at every boundary);
server-clock backends run with long TTLs and no jumps.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import leasehold
from leasehold._core import presence as core
from leasehold._core.policy import default_margin
from leasehold.testing import BackendHarness

# -- the pure transitions -------------------------------------------------------------------


def open_room(number: int = 5, now: float = 100.0) -> core.Room:
    step = core.commit(
        core.Room(epoch=number, phase=core.CREATING, last_change=now),
        now,
        3,
        number=number,
        payload={"m": 1},
    )
    assert step.write is not None and step.result is True
    return step.write


def test_encode_decode_round_trip() -> None:
    room = open_room()
    room = core.intend(room, 101.0, 7, name="r", member="a", epoch=5, ttl=30.0).write
    assert room is not None
    room = core.join(room, 102.0, 8, name="r", member="b", epoch=5, data={"x": [1]}, ttl=10.0).write
    assert room is not None
    room = core.leave(room, 103.0, 9, member="b", epoch=5).write
    assert room is not None
    again = core.decode("k", core.encode(room))
    assert again == room
    assert again is not None and again.gone["b"] == core.Gone(9, 113.0)
    assert core.decode("k", None) is None
    for bad in (b"", b"[]", b'{"format": 2}', b'{"format": 1, "phase": "ajar"}'):
        with pytest.raises(leasehold.LeaseholdError, match="presence room"):
            core.decode("k", bad)


def test_transitions_do_not_mutate_their_input() -> None:
    room = open_room()
    before = core.encode(room)
    core.intend(room, 101.0, 7, name="r", member="a", epoch=5, ttl=30.0)
    core.observe(
        room, 101.0, 7, name="r", epoch=5, present=frozenset({"z"}), snapshot_version=1, ttl=10.0
    )
    core.settle(room, 10_000.0)
    assert core.encode(room) == before


def test_claim_and_commit_fence_creators() -> None:
    assert core.claim(None, 1.0, 0, number=3, creator="a").write == core.Room(
        epoch=3, phase=core.CREATING, creator="a", last_change=1.0
    )
    creating = core.Room(epoch=3, phase=core.CREATING, creator="a")
    taken = core.claim(creating, 2.0, 4, number=9, creator="b").write
    assert taken is not None and taken.epoch == 9
    assert core.commit(taken, 3.0, 5, number=3, payload=None).write is None  # fenced
    assert core.commit(taken, 3.0, 5, number=9, payload=1).result is True
    opened = open_room(9)
    assert core.claim(opened, 4.0, 6, number=12, creator="c") == core.Step(
        None, leasehold.Epoch(9, {"m": 1})
    )
    closed = core.Room(epoch=9, phase=core.CLOSED)
    with pytest.raises(leasehold.LeaseholdError, match="fence order"):
        core.claim(closed, 5.0, 7, number=9, creator="d")


def test_settle_bounds_times_after_the_store_clock_jumps_back() -> None:
    room = open_room(now=1000.0)
    room = core.join(room, 1000.0, 7, name="r", member="a", epoch=5, data=None, ttl=10.0).write
    assert room is not None
    assert not core.clock_went_back(room, 1000.0)
    # The store clock restarts near zero (SQLite after a reboot): the member keeps
    # at most one ttl, and grace counts from "now", not from a future time.
    assert core.clock_went_back(room, 3.0)
    settled = core.settle(room, 3.0)
    assert settled.members["a"].expires == 13.0
    assert settled.last_change == 3.0
    assert core.snapshot(room, 3.0, 8).members[0].expires_in == 10.0
    # The closer's failed attempt writes the bounded times down; without that, a
    # bound recomputed at every read would slide along with the clock forever.
    step = core.close_if_idle(room, 3.0, 8, epoch=5, grace=0.0, expected_version=None)
    assert step.result is False and step.write is not None
    assert not core.clock_went_back(step.write, 3.0)
    later = core.close_if_idle(step.write, 13.0, 9, epoch=5, grace=0.0, expected_version=None)
    assert later.result is True
    # Without a jump, a refused close writes nothing.
    assert core.close_if_idle(room, 1001.0, 8, epoch=5, grace=0.0, expected_version=None) == (
        core.Step(None, False)
    )


@given(
    ttl=st.floats(0.01, 3600.0),
    now=st.floats(0.0, 1e9),
    later=st.floats(0.0, 1e4),
)
def test_expiry_never_moves_earlier(ttl: float, now: float, later: float) -> None:
    room = open_room(now=now)
    first = core.intend(room, now, 7, name="r", member="a", epoch=5, ttl=30.0).write
    assert first is not None
    joined = core.join(first, now + later, 8, name="r", member="a", epoch=5, data=None, ttl=ttl)
    if joined.write is not None and "a" in joined.write.members:
        assert joined.write.members["a"].expires >= min(first.members["a"].expires, now + later)


# -- the state machine ----------------------------------------------------------------------------

MEMBERS = ["a", "b", "c"]
SEEN: Counter[str] = Counter()  # what the machine exercised, printed with -s


def event(what: str) -> None:
    SEEN[what] += 1


DATA = [None, {"k": 1}, [1, "x"], "text"]


@dataclass
class ModelMember:
    state: str
    data: Any
    expires: float
    ttl: float
    changed: int


@dataclass
class Ack:
    epoch: int
    member: str
    deadline: float


@dataclass
class Creator:
    number: int
    lease: leasehold.Lease
    expires_at: float
    committed: bool = False


@dataclass
class Model:
    phase: str | None = None  # None: absent
    epoch: int = 0
    payload: Any = None
    members: dict[str, ModelMember] = field(default_factory=dict)
    gone: dict[str, tuple[int, float]] = field(default_factory=dict)
    last_change: float = 0.0


def run_machine(harness: BackendHarness, examples: int, *, with_members: bool = True) -> None:
    """``with_members=False`` focuses on epochs: only open, crash, take over, late
    commit, close and clock jumps, so that creator races come up often."""
    fake = harness.clock is not None
    member_ttl, intent_ttl, create_ttl = (10.0, 30.0, 20.0) if fake else (60.0, 120.0, 60.0)
    client = harness.client()
    other = harness.client()  # a second process, as far as the store can tell

    class PresenceMachine(RuleBasedStateMachine):
        snapshots = Bundle("snapshots")
        creators = Bundle("creators")

        @initialize()
        def start(self) -> None:
            name = harness.unique("room")
            self.rooms = [
                c.presence(
                    name, member_ttl=member_ttl, intent_ttl=intent_ttl, create_ttl=create_ttl
                )
                for c in (client, other)
            ]
            self.model = Model()
            self.version = 0
            self.all_epochs: list[int] = []
            self.closed: set[int] = set()
            self.created: list[int] = []
            self.acks: list[Ack] = []
            self.crashed: Creator | None = None
            self.now_value = harness.clock.monotonic() if harness.clock is not None else 0.0
            self.open(0)  # most steps are about an open room; later epochs come from rules

        # -- helpers ----------------------------------------------------------------------

        def room(self, which: int) -> leasehold.Presence:
            return self.rooms[which]

        def now(self) -> float:
            return harness.clock.monotonic() if harness.clock is not None else self.now_value

        def crashed_lease_live(self) -> bool:
            c = self.crashed
            if c is None:
                return False
            # The crashed creator never renews: its grant ends create_ttl after it.
            return not fake or self.now() < c.expires_at

        def expire(self) -> None:
            """Eager expiry in the model (the store does it lazily, with the same result)."""
            now = self.now()
            m = self.model
            for mid, mem in list(m.members.items()):
                if now >= mem.expires:
                    del m.members[mid]
                    m.last_change = max(m.last_change, mem.expires)
            for mid, (_, forget_at) in list(m.gone.items()):
                if now >= forget_at:
                    del m.gone[mid]

        def stored_version(self) -> int:
            return client.store.read_record(core.RECORD_PREFIX + self.rooms[0].room).version

        def wrote(self, expected: bool) -> int:
            """Check whether the step wrote the record; returns the version it read."""
            before = self.version
            self.version = self.stored_version()
            assert (self.version != before) == expected, (before, self.version, expected)
            return before

        def open_number(self) -> int | None:
            return self.model.epoch if self.model.phase == core.OPEN else None

        def pick_epoch(self, which: str) -> int:
            latest = self.model.epoch or 1
            if which == "latest":
                return latest
            if which == "older":
                return self.all_epochs[-2] if len(self.all_epochs) > 1 else latest
            return latest + 1_000_000

        def extend(self, mem: ModelMember, ttl: float) -> None:
            now = self.now()
            if now + ttl >= mem.expires:
                mem.expires = now + ttl
                mem.ttl = ttl

        def remove(self, mid: str, read_version: int) -> None:
            mem = self.model.members.pop(mid)
            self.model.gone[mid] = (read_version, self.now() + mem.ttl)
            self.model.last_change = self.now()
            self.acks = [a for a in self.acks if a.member != mid or a.epoch != self.model.epoch]

        def acked(self, member: leasehold.Member, epoch: int, ttl: float) -> None:
            assert member.deadline is not None
            if fake:
                assert member.deadline == self.now() + ttl - default_margin(ttl)
            self.acks.append(Ack(epoch, member.id, member.deadline))

        def new_epoch(self, number: int) -> None:
            assert not self.all_epochs or number > self.all_epochs[-1], "epoch reused"
            assert number not in self.closed
            self.all_epochs.append(number)

        def expect_stale(self, fn: Any, number: int) -> None:
            with pytest.raises(leasehold.StaleEpoch) as info:
                fn()
            assert info.value.epoch == number
            assert info.value.current == self.open_number()
            self.wrote(False)

        # -- epochs -----------------------------------------------------------------------------

        @rule(which=st.integers(0, 1))
        def open(self, which: int) -> None:
            self.expire()
            calls: list[int] = []

            def create(number: int) -> dict[str, int]:
                calls.append(number)
                return {"n": number}

            if self.model.phase == core.OPEN:
                epoch = self.room(which).open(create, timeout=0)
                assert epoch == leasehold.Epoch(self.model.epoch, self.model.payload)
                assert calls == []
                self.wrote(False)
                return
            if self.crashed_lease_live():  # a creator died holding the creation lease
                with pytest.raises(leasehold.AcquireTimeout):
                    self.room(which).open(create, timeout=0)
                assert calls == []
                self.wrote(False)
                return
            epoch = self.room(which).open(create, timeout=0)
            event(f"open created ({'takeover' if self.model.phase == core.CREATING else 'fresh'})")
            assert calls == [epoch.number] and epoch.payload == {"n": epoch.number}
            self.new_epoch(epoch.number)
            self.created.append(epoch.number)
            self.version = self.stored_version()
            self.model = Model(core.OPEN, epoch.number, epoch.payload, last_change=self.now())
            self.crashed = None
            self.acks = []

        @precondition(lambda self: self.model.phase != core.OPEN and not self.crashed_lease_live())
        @rule(target=creators)
        def crash_creator(self) -> Creator | None:
            """Begin creating like ``open`` does, then die: no commit, no release."""
            self.expire()
            lock = other.lock(
                core.CREATE_LOCK_PREFIX + self.rooms[0].room, ttl=create_ttl, renew=False
            )
            lease = lock.try_acquire()
            assert lease is not None, "nobody else holds the creation lock"
            creator = Creator(lease.fence, lease, self.now() + create_ttl)
            self.crashed = creator
            found = self.rooms[1]._claim(lease.fence)
            if self.model.phase == core.OPEN:
                assert found == leasehold.Epoch(self.model.epoch, self.model.payload)
                self.wrote(False)
                return None
            assert found is None
            self.new_epoch(lease.fence)
            self.wrote(True)
            self.model = Model(core.CREATING, lease.fence, last_change=self.now())
            self.acks = []
            return creator

        @precondition(lambda self: fake and self.crashed_lease_live())
        @rule(target=creators, which=st.integers(0, 1), dies_too=st.booleans())
        def take_over_from_the_dead_creator(self, which: int, dies_too: bool) -> Creator | None:
            """Let the dead creator's lease run out; then the next creator takes over
            (and maybe dies mid-creation too)."""
            assert self.crashed is not None
            harness.advance(max(0.0, self.crashed.expires_at - self.now()) + 0.01)
            if dies_too:
                return self.crash_creator()
            self.open(which)
            return None

        @rule(creator=creators)
        def late_commit(self, creator: Creator | None) -> None:
            if creator is None or creator.committed:
                return
            self.expire()
            mine = self.model.phase == core.CREATING and self.model.epoch == creator.number
            assert self.rooms[1]._commit(creator.number, {"late": creator.number}) is mine
            self.wrote(mine)
            event(f"late commit accepted: {mine}")
            if mine:
                creator.committed = True
                self.created.append(creator.number)
                self.model = Model(
                    core.OPEN, creator.number, {"late": creator.number}, last_change=self.now()
                )

        @rule(
            which=st.integers(0, 1),
            epoch=st.sampled_from(["latest", "older", "future"]),
            grace=st.sampled_from([0.0, 0.0, 2.0, 15.0]),
            use_version=st.booleans(),
            stale_version=st.booleans(),
        )
        def close_if_idle(
            self, which: int, epoch: str, grace: float, use_version: bool, stale_version: bool
        ) -> None:
            self.expire()
            if not fake:
                grace = 0.0
            number = self.pick_epoch(epoch)
            expected = None
            if use_version:
                expected = self.version + 1 if stale_version else self.version
            m = self.model
            now = self.now()
            predicted = (
                m.phase == core.OPEN
                and m.epoch == number
                and (expected is None or expected == self.version)
                and not m.members
                and not now - m.last_change < grace
            )
            closed = self.room(which).close_if_idle(
                epoch=number, grace=grace, expected_version=expected
            )
            assert closed is predicted
            event(f"close_if_idle -> {closed}")
            self.wrote(predicted)
            if closed:
                for ack in self.acks:
                    assert not (ack.epoch == number and ack.deadline > now), (
                        "split: closed under an ack"
                    )
                self.closed.add(number)
                self.model = Model(core.CLOSED, number, m.payload, last_change=now)
                self.acks = []

        # -- members ----------------------------------------------------------------------------

        @precondition(lambda self: with_members)
        @rule(
            which=st.integers(0, 1),
            member=st.sampled_from(MEMBERS),
            epoch=st.sampled_from(["latest", "latest", "older", "future"]),
        )
        def intend(self, which: int, member: str, epoch: str) -> None:
            self.expire()
            number = self.pick_epoch(epoch)
            if self.open_number() != number:
                self.expect_stale(lambda: self.room(which).intend(member, epoch=number), number)
                return
            ack = self.room(which).intend(member, epoch=number)
            read = self.wrote(True)
            mem = self.model.members.get(member)
            if mem is None:
                mem = self.model.members[member] = ModelMember(
                    core.INTENT, None, self.now() + intent_ttl, intent_ttl, read
                )
            else:
                self.extend(mem, intent_ttl)
                mem.changed = read
            self.model.gone.pop(member, None)
            self.model.last_change = self.now()
            assert (ack.state, ack.data) == (mem.state, mem.data)
            self.acked(ack, number, intent_ttl)

        @precondition(lambda self: with_members)
        @rule(
            which=st.integers(0, 1),
            member=st.sampled_from(MEMBERS),
            epoch=st.sampled_from(["latest", "latest", "older", "future"]),
            data=st.sampled_from(DATA),
        )
        def join(self, which: int, member: str, epoch: str, data: Any) -> None:
            self.expire()
            number = self.pick_epoch(epoch)
            if self.open_number() != number:
                self.expect_stale(
                    lambda: self.room(which).join(member, epoch=number, data=data), number
                )
                return
            ack = self.room(which).join(member, epoch=number, data=data)
            read = self.wrote(True)
            mem = self.model.members.get(member)
            if mem is None:
                mem = self.model.members[member] = ModelMember(
                    core.ACTIVE, data, self.now() + member_ttl, member_ttl, read
                )
            else:
                mem.state, mem.data, mem.changed = core.ACTIVE, data, read
                self.extend(mem, member_ttl)
            self.model.gone.pop(member, None)
            self.model.last_change = self.now()
            assert (ack.state, ack.data) == (core.ACTIVE, data)
            self.acked(ack, number, member_ttl)

        @precondition(lambda self: with_members)
        @rule(
            which=st.integers(0, 1),
            member=st.sampled_from(MEMBERS),
            epoch=st.sampled_from(["latest", "latest", "older"]),
        )
        def heartbeat(self, which: int, member: str, epoch: str) -> None:
            self.expire()
            number = self.pick_epoch(epoch)
            if self.open_number() != number:
                self.expect_stale(lambda: self.room(which).heartbeat(member, epoch=number), number)
                return
            mem = self.model.members.get(member)
            if mem is None:
                with pytest.raises(leasehold.MemberGone):
                    self.room(which).heartbeat(member, epoch=number)
                self.wrote(False)
                return
            ack = self.room(which).heartbeat(member, epoch=number)
            read = self.wrote(True)
            ttl = intent_ttl if mem.state == core.INTENT else member_ttl
            self.extend(mem, ttl)
            mem.changed = read
            self.model.last_change = self.now()
            self.acked(ack, number, ttl)

        @precondition(lambda self: with_members)
        @rule(
            which=st.integers(0, 1),
            member=st.sampled_from(MEMBERS),
            epoch=st.sampled_from(["latest", "latest", "older"]),
        )
        def leave(self, which: int, member: str, epoch: str) -> None:
            self.expire()
            number = self.pick_epoch(epoch)
            present = self.open_number() == number and member in self.model.members
            assert self.room(which).leave(member, epoch=number) is present
            read = self.wrote(present)
            if present:
                self.remove(member, read)

        @precondition(lambda self: with_members)
        @rule(target=snapshots, which=st.integers(0, 1))
        def members(self, which: int) -> leasehold.Snapshot:
            self.expire()
            snap = self.room(which).members()
            assert snap.version == self.version
            assert snap.epoch == self.open_number()
            expected = (
                {mid: (mem.state, mem.data) for mid, mem in self.model.members.items()}
                if snap.epoch is not None
                else {}
            )
            assert {m.id: (m.state, m.data) for m in snap.members} == expected
            assert [m.id for m in snap.members] == sorted(expected)
            if fake:
                for m in snap.members:
                    assert m.expires_in == self.model.members[m.id].expires - self.now()
            return snap

        @precondition(lambda self: with_members)
        @rule(
            snap=snapshots, which=st.integers(0, 1), present=st.frozensets(st.sampled_from(MEMBERS))
        )
        def observe(self, snap: leasehold.Snapshot, which: int, present: frozenset[str]) -> None:
            self.expire()
            number = snap.epoch if snap.epoch is not None else self.pick_epoch("latest")
            if self.open_number() != number:
                self.expect_stale(
                    lambda: self.room(which).observe(
                        present, epoch=number, snapshot_version=snap.version
                    ),
                    number,
                )
                return
            before = {mid: (mem.state, mem.changed) for mid, mem in self.model.members.items()}
            result = self.room(which).observe(present, epoch=number, snapshot_version=snap.version)
            m = self.model
            read = self.version
            changed = False
            for mid in sorted(present):
                mem = m.members.get(mid)
                if mem is None:
                    gone = m.gone.get(mid)
                    if gone is not None and gone[0] >= snap.version:
                        continue
                    m.members[mid] = ModelMember(
                        core.ACTIVE, None, self.now() + member_ttl, member_ttl, read
                    )
                    m.gone.pop(mid, None)
                else:
                    mem.state, mem.changed = core.ACTIVE, read
                    self.extend(mem, member_ttl)
                changed = True
            for mid, mem in list(m.members.items()):
                if mid not in present and mem.state == core.ACTIVE and mem.changed < snap.version:
                    self.remove(mid, read)
                    changed = True
            if changed:
                m.last_change = self.now()
            self.wrote(changed)
            assert result.version == self.version
            assert {x.id: x.state for x in result.members} == {
                mid: mem.state for mid, mem in m.members.items()
            }
            event(f"observe changed: {changed}")
            if any(mid not in m.members for mid in before):
                event("observe removed a member")
            kept = {x.id for x in result.members}
            for mid, (state, last) in before.items():
                if mid not in kept:  # removed: only an active member the snapshot saw
                    assert state == core.ACTIVE and last < snap.version, mid

        @precondition(lambda self: fake)
        @rule(seconds=st.sampled_from([0.1, 1.0, 2.0, 9.9, 10.0, 15.0, 20.0, 30.0]))
        def advance(self, seconds: float) -> None:
            harness.advance(seconds)

        # -- invariants ----------------------------------------------------------------------------

        @invariant()
        def acknowledged_members_are_counted(self) -> None:
            if not hasattr(self, "model"):
                return
            self.expire()
            now = self.now()
            if self.model.phase != core.OPEN:
                return
            live_acks = {
                a.member for a in self.acks if a.epoch == self.model.epoch and a.deadline > now
            }
            assert live_acks <= set(self.model.members)
            assert self.rooms[0].current() == (
                leasehold.Epoch(self.model.epoch, self.model.payload)
            )
            assert len(set(self.created)) == len(self.created), "create ran twice for an epoch"
            assert math.isfinite(now)

    run_state_machine_as_test(
        PresenceMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_presence_state_machine(lh_backend: BackendHarness) -> None:
    examples = {"memory": 200, "sqlite": 50}.get(lh_backend.name, 15)
    SEEN.clear()
    run_machine(lh_backend, examples)
    print(lh_backend.name, dict(sorted(SEEN.items())))


def test_epoch_state_machine(lh_backend: BackendHarness) -> None:
    examples = {"memory": 150, "sqlite": 40}.get(lh_backend.name, 10)
    SEEN.clear()
    run_machine(lh_backend, examples, with_members=False)
    print(lh_backend.name, dict(sorted(SEEN.items())))
