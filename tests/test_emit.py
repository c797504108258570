"""Every primitive emits its events (leasehold.events), sync and async.

Real clocks and real stores: the memory store for each event, SQLite and Redis
for the common path, and a real Redis restarted by the test for the "restart"
loss reason.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import leasehold
from leasehold import events
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.url import parse
from leasehold._sync.backends import open_store
from leasehold.testing import BackendHarness
from leasehold.testing.wrappers import FaultyStore

E = TypeVar("E", bound=events.Event)


class Recorder:
    """Every event of one client, in order."""

    def __init__(self, client: object) -> None:
        self.events: list[events.Event] = []
        self._guard = threading.Lock()
        self._subscription = events.subscribe(self._add, client=client)

    def _add(self, event: events.Event) -> None:
        with self._guard:
            self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        with self._guard:
            return [e for e in self.events if isinstance(e, kind)]

    def kinds(self) -> list[str]:
        with self._guard:
            return [type(e).__name__ for e in self.events]

    def close(self) -> None:
        self._subscription.close()


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture
def client() -> Iterator[leasehold.Client]:
    c = leasehold.Client(memory_url())
    yield c
    c.close()


@pytest.fixture
def seen(client: leasehold.Client) -> Iterator[Recorder]:
    recorder = Recorder(client)
    yield recorder
    recorder.close()


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- acquiring ------------------------------------------------------------------------


def test_acquire_and_release(client: leasehold.Client, seen: Recorder) -> None:
    lease = client.lock("a").acquire()
    time.sleep(0.05)
    lease.release()
    assert seen.kinds() == ["AcquireStarted", "Acquired", "Released"]
    started, acquired, released = seen.events
    assert isinstance(started, events.AcquireStarted) and started.blocking
    assert isinstance(acquired, events.Acquired) and isinstance(released, events.Released)
    for event in seen.events:
        assert (event.primitive, event.name, event.store) == ("lock", "a", "memory")
        assert event.client_id == id(client)
    assert acquired.fence == released.fence == lease.fence
    assert acquired.wait >= 0 and not acquired.handed_over
    assert 0.05 <= released.held < 5


def test_semaphore_events_say_semaphore(client: leasehold.Client, seen: Recorder) -> None:
    with client.semaphore("s", limit=2):
        pass
    assert {e.primitive for e in seen.events} == {"semaphore"}


def test_try_acquire_busy_and_timeout(client: leasehold.Client, seen: Recorder) -> None:
    held = client.lock("b").acquire()
    assert client.lock("b").try_acquire() is None
    with pytest.raises(leasehold.AcquireTimeout):
        client.lock("b").acquire(timeout=0.1)
    held.release()
    assert seen.kinds() == [
        "AcquireStarted",
        "Acquired",
        "AcquireStarted",
        "Busy",
        "AcquireStarted",
        "TimedOut",
        "Released",
    ]
    starts = seen.of(events.AcquireStarted)
    assert [s.blocking for s in starts] == [True, False, True]
    [timed_out] = seen.of(events.TimedOut)
    assert timed_out.wait >= 0.1 and not timed_out.cancelled


def test_acquire_error() -> None:
    store = FaultyStore(open_store(parse(memory_url()), SYSTEM_CLOCK))
    # A first error may be a lost reply: it is retried with the same token for one
    # operation timeout (issue #21), so the store keeps failing here.
    client = leasehold.Client(store=store, operation_timeout=0.2)
    seen = Recorder(client)
    try:
        store.fail("acquire", times=None)
        with pytest.raises(leasehold.StoreUnavailable):
            client.lock("e").acquire()
    finally:
        seen.close()
        client.close()
    assert seen.kinds() == ["AcquireStarted", "AcquireFailed"]
    [failed] = seen.of(events.AcquireFailed)
    assert failed.error_type == "StoreUnavailable" and failed.error
    assert client.health().store_error is not None


def test_hand_over_is_reported(client: leasehold.Client, seen: Recorder) -> None:
    first = client.lock("h").acquire()
    got: list[leasehold.Lease] = []
    waiter = threading.Thread(target=lambda: got.append(client.lock("h").acquire(timeout=10)))
    waiter.start()
    wait_until(lambda: len(seen.of(events.AcquireStarted)) == 2)
    time.sleep(0.1)  # the waiter is queued
    first.release()
    waiter.join(10)
    got[0].release()
    acquired = seen.of(events.Acquired)
    assert [a.handed_over for a in acquired] == [False, True]
    assert acquired[1].fence > acquired[0].fence


# -- holding -------------------------------------------------------------------------


def test_renewals_are_reported_per_lease(client: leasehold.Client, seen: Recorder) -> None:
    a = client.lock("r1", ttl=0.3).acquire()
    b = client.lock("r2", ttl=0.3).acquire()
    wait_until(lambda: {e.name for e in seen.of(events.Renewed)} == {"r1", "r2"})
    a.release()
    b.release()
    for renewed in seen.of(events.Renewed):
        assert renewed.duration >= 0
        assert renewed.fence == {"r1": a.fence, "r2": b.fence}[renewed.name]
    assert client.health().last_renewal_age is not None


def test_failed_renewals_then_loss_as_unreachable() -> None:
    store = FaultyStore(open_store(parse(memory_url()), SYSTEM_CLOCK))
    client = leasehold.Client(store=store)
    seen = Recorder(client)
    try:
        lease = client.lock("u", ttl=0.6).acquire()
        store.fail("renew", times=None)
        wait_until(lambda: lease.lost and seen.of(events.Lost))
        lease.release()
    finally:
        seen.close()
        client.close()
    failures = seen.of(events.RenewalFailed)
    assert failures, seen.kinds()
    assert all(0 <= f.time_left < 0.6 and f.error_type == "StoreUnavailable" for f in failures)
    assert [f.time_left for f in failures] == sorted((f.time_left for f in failures), reverse=True)
    [lost] = seen.of(events.Lost)
    assert lost.reason == "unreachable"
    assert f"{len(failures)} renewal attempt(s) failed" in lost.detail
    assert "last error" in lost.detail
    assert not seen.of(events.Released), "a lost lease is never also released"


def test_refused_renewal_is_a_loss_not_a_renewal(client: leasehold.Client, seen: Recorder) -> None:
    lease = client.lock("x", ttl=0.6).acquire()
    renewed_before = client.statistics().renewed
    assert client.break_lease("x") == 1
    wait_until(lambda: lease.lost and seen.of(events.Lost))
    lease.release()
    [lost] = seen.of(events.Lost)
    assert lost.reason == "refused" and "no longer held" in lost.detail
    assert client.statistics().renewed == renewed_before
    assert 0 < lost.held < 2


def test_deadline_loss_of_a_lease_that_does_not_renew(
    client: leasehold.Client, seen: Recorder
) -> None:
    with pytest.raises(leasehold.LeaseLost), client.lock("d", ttl=0.3, renew=False):
        time.sleep(0.6)
    [lost] = seen.of(events.Lost)
    assert lost.reason == "deadline" and "does not renew" in lost.detail
    assert lost.held == pytest.approx(0.3, abs=0.1)
    assert not seen.of(events.Released)


def test_deadline_loss_while_paused_says_so(client: leasehold.Client, seen: Recorder) -> None:
    # A holder whose keeper never got to renew (a paused process): simulated by a
    # lease whose safe deadline passed with no renewal attempt at all.
    lease = client.lock("p", ttl=30).acquire()
    lease._deadline = client.clock.monotonic() - 0.01  # the pause ate the whole ttl
    assert not lease.release()
    [lost] = seen.of(events.Lost)
    assert lost.reason == "deadline" and "paused" in lost.detail


# -- elections, presence, once ----------------------------------------------------------


def test_election_events(client: leasehold.Client, seen: Recorder) -> None:
    election = client.election("e", ttl=1)
    changes: list[events.LeaderChanged] = []
    observer = client.election("e", ttl=1)
    done = threading.Event()

    def observe() -> None:
        for _ in observer.observe():
            changes[:] = seen.of(events.LeaderChanged)
            if len(changes) >= 3:
                break
        done.set()

    watcher = threading.Thread(target=observe)
    watcher.start()
    wait_until(lambda: seen.of(events.LeaderChanged))  # "nobody leads"
    lease = election.campaign(identity="me")
    # A term that begins and ends between two looks may be missed: let it look.
    wait_until(lambda: len(seen.of(events.LeaderChanged)) >= 2)
    assert election.resign()
    assert done.wait(10)
    observer.stop()
    watcher.join(10)
    [won] = seen.of(events.ElectionWon)
    [ended] = seen.of(events.ElectionEnded)
    assert (won.term, won.identity) == (lease.fence, "me")
    assert (ended.term, ended.resigned) == (lease.fence, True)
    assert [(c.leader, c.term) for c in changes] == [
        (None, None),
        ("me", lease.fence),
        (None, None),
    ]
    assert {e.primitive for e in seen.events} == {"election"}


def test_election_lost_is_not_resigned(client: leasehold.Client, seen: Recorder) -> None:
    lease = client.election("e2", ttl=0.6).campaign()
    client.break_lease("e2")
    wait_until(lambda: lease.lost and seen.of(events.ElectionEnded))
    [ended] = seen.of(events.ElectionEnded)
    assert not ended.resigned
    kinds = seen.kinds()
    assert kinds.index("Lost") < kinds.index("ElectionEnded")
    lease.release()
    assert len(seen.of(events.ElectionEnded)) == 1


def test_presence_events(client: leasehold.Client, seen: Recorder) -> None:
    room = client.presence("room", member_ttl=5, intent_ttl=0.2)
    epoch = room.open(lambda number: {"n": number})
    room.join("alice", epoch=epoch)
    room.intend("bob", epoch=epoch)
    time.sleep(0.3)  # bob's intent lapses
    assert room.leave("alice", epoch=epoch)
    assert room.close_if_idle(epoch=epoch)
    presence = [e for e in seen.events if e.name == "room"]
    assert [(type(e).__name__, getattr(e, "member", None)) for e in presence] == [
        ("RoomOpened", None),
        ("MemberJoined", "alice"),
        # One write (alice leaving) drops bob's lapsed intent too; members in order.
        ("MemberLeft", "alice"),
        ("IntentExpired", "bob"),
        ("RoomClosed", None),
    ]
    assert {e.primitive for e in seen.events} == {"presence"}
    assert all(getattr(e, "epoch", epoch.number) == epoch.number for e in presence)


def test_once_events(client: leasehold.Client, seen: Recorder) -> None:
    once = client.once("job")
    assert once.run(lambda: 42) == 42
    assert once.run(lambda: 43) == 42

    def broken() -> None:
        raise ValueError("nope")

    with pytest.raises(ValueError):
        client.once("other").run(broken)
    [ran] = seen.of(events.OnceRan)
    [reused] = seen.of(events.OnceReused)
    [failed] = seen.of(events.OnceFailed)
    assert (ran.name, reused.name, failed.name) == ("job", "job", "other")
    assert ran.duration >= 0 and failed.error_type == "ValueError" and failed.error == "nope"
    assert {e.primitive for e in seen.events} == {"once"}


# -- async ----------------------------------------------------------------------------


def test_async_events_and_cancellation() -> None:
    async def main() -> list[events.Event]:
        async with leasehold.AsyncClient(memory_url()) as client:
            seen = Recorder(client)
            try:
                lease = await client.lock("a", ttl=0.3).acquire()
                while not seen.of(events.Renewed):
                    await asyncio.sleep(0.01)
                waiter = asyncio.ensure_future(client.lock("a").acquire())
                await asyncio.sleep(0.1)
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                await lease.release()
                async with client.lock("gone", ttl=0.2, renew=False):
                    await asyncio.sleep(1)
            except leasehold.LeaseLost:
                pass
            finally:
                seen.close()
            return seen.events

    seen = asyncio.run(main())
    kinds = [type(e).__name__ for e in seen]
    assert kinds[:3] == ["AcquireStarted", "Acquired", "Renewed"]
    [cancelled] = [e for e in seen if isinstance(e, events.TimedOut)]
    assert cancelled.cancelled
    [lost] = [e for e in seen if isinstance(e, events.Lost)]
    assert lost.name == "gone" and lost.reason == "deadline"
    assert lost.held == pytest.approx(0.2, abs=0.1)
    assert sum(isinstance(e, events.AcquireStarted) for e in seen) == 3
    ends = (events.Acquired, events.Busy, events.TimedOut, events.AcquireFailed)
    assert sum(isinstance(e, ends) for e in seen) == 3


# -- other stores ---------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def store_harness(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[BackendHarness]:
    from tests.conftest import param_harness

    yield from param_harness(request, tmp_path)


def test_lock_events_on_real_stores(store_harness: BackendHarness) -> None:
    client = store_harness.real_client()
    seen = Recorder(client)
    name = store_harness.unique()
    try:
        lease = client.lock(name, ttl=0.5).acquire(timeout=5)
        wait_until(lambda: seen.of(events.Renewed))
        assert client.lock(name).try_acquire() is None
        lease.release()
    finally:
        seen.close()
        client.close()
    expected_store = parse(store_harness.url).scheme
    assert {e.store for e in seen.events} == {expected_store}
    assert seen.kinds()[:3] == ["AcquireStarted", "Acquired", "Renewed"]
    assert "Busy" in seen.kinds() and seen.kinds()[-1] == "Released"


def test_redis_restart_is_the_loss_reason(redis_server: Any) -> None:
    from tests.servers.redis import RedisServer

    with RedisServer() as server:
        client = leasehold.Client(server.url)
        seen = Recorder(client)
        try:
            lease = client.lock("r", ttl=3).acquire(timeout=5)
            server.restart()  # no persistence: the lease is gone with the data
            wait_until(lambda: lease.lost and seen.of(events.Lost), timeout=15)
            with pytest.raises(leasehold.LeaseLost, match="restarted"):
                lease.check()
            lease.release()
        finally:
            seen.close()
            client.close()
    [lost] = seen.of(events.Lost)
    assert lost.reason == "restart", lost
    assert "run id" in lost.detail


def test_redis_restart_with_persistence_is_the_loss_reason(redis_server: Any) -> None:
    from tests.servers.redis import RedisServer

    with RedisServer(appendonly=True) as server:
        client = leasehold.Client(server.url)
        seen = Recorder(client)
        try:
            lease = client.lock("r", ttl=3).acquire(timeout=5)
            server.restart()  # the grant survives, stamped by the old server process
            wait_until(lambda: lease.lost and seen.of(events.Lost), timeout=15)
            lease.release()
        finally:
            seen.close()
            client.close()
    [lost] = seen.of(events.Lost)
    assert lost.reason == "restart", lost


def test_redis_break_is_refused_not_restart(redis_server: Any) -> None:
    client = leasehold.Client(redis_server.url)
    seen = Recorder(client)
    name = f"b:{uuid.uuid4().hex}"
    try:
        lease = client.lock(name, ttl=1).acquire(timeout=5)
        client.break_lease(name)
        wait_until(lambda: lease.lost and seen.of(events.Lost))
        lease.release()
    finally:
        seen.close()
        client.close()
    [lost] = seen.of(events.Lost)
    assert lost.reason == "refused"


def test_presence_open_waits_as_one_acquire(client: leasehold.Client, seen: Recorder) -> None:
    gate = threading.Event()

    def slow(number: int) -> int:
        assert gate.wait(10)
        return number

    creator = threading.Thread(target=client.presence("r2").open, args=(slow,))
    creator.start()
    wait_until(lambda: seen.of(events.Acquired))
    got: list[leasehold.Epoch] = []
    waiter = threading.Thread(target=lambda: got.append(client.presence("r2").open(lambda n: n)))
    waiter.start()
    time.sleep(1.5)  # the waiter looks again in several slices meanwhile
    gate.set()
    creator.join(10)
    waiter.join(10)
    assert got and got[0].number == seen.of(events.Acquired)[0].fence
    ends = (events.Acquired, events.Busy, events.TimedOut, events.AcquireFailed)
    assert len(seen.of(events.AcquireStarted)) == 2
    assert len([e for e in seen.events if isinstance(e, ends)]) == 2
    assert client.statistics().timed_out == 0


def test_extend_is_a_renewal(client: leasehold.Client, seen: Recorder) -> None:
    lease = client.lock("ext", ttl=30).acquire()
    lease.extend(60)
    lease.release()
    [renewed] = seen.of(events.Renewed)
    assert renewed.fence == lease.fence and renewed.duration >= 0
    assert client.statistics().renewed == 1
