"""The store conformance suite: every backend must pass all of it.

Use from a test module with an ``lh_backend`` fixture returning a BackendHarness::

    from leasehold.testing.conformance import *  # noqa: F403

Tests use fresh names, so one server can serve every test.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from typing import Any

import pytest

from leasehold._core.records import AcquireRequest, Busy, Granted, HandedOver, Holder, RenewItem
from leasehold._errors import AcquireTimeout, LeaseLost
from leasehold.testing._announcements import (
    test_announce_reaches_every_subscriber_of_its_topic_only,
    test_announce_wakes_a_subscriber_promptly,
    test_announcement_between_waits_is_not_lost,
    test_announcements_in_async_code,
    test_subscription_fallback_polls,
    test_subscription_times_out_and_checks_topics,
)
from leasehold.testing.harness import BackendHarness

__all__ = [
    "test_acquire_timeout_raises",
    "test_announce_reaches_every_subscriber_of_its_topic_only",
    "test_announce_wakes_a_subscriber_promptly",
    "test_announcement_between_waits_is_not_lost",
    "test_announcements_in_async_code",
    "test_break_lease_bumps_fence_and_loses_holder",
    "test_cancelled_acquire_leaves_lock_free",
    "test_exclusive_until_released",
    "test_expiry_by_store_clock",
    "test_extend_replaces_ttl",
    "test_fences_strictly_increase",
    "test_hand_over_to_a_dead_waiter_lasts_only_its_queue_place",
    "test_hand_over_to_a_long_waiting_short_lease_is_confirmed",
    "test_handed_over_lease_is_renewed_to_its_full_ttl",
    "test_holders_and_leases_report_what_is_held",
    "test_only_owner_mutates",
    "test_queue_is_fifo",
    "test_record_compare_and_set",
    "test_record_concurrent_increments_lose_nothing",
    "test_record_expiry_and_clock",
    "test_release_hands_the_place_to_the_head_waiter",
    "test_release_wakes_only_the_head_waiter",
    "test_renew_batch_answers_in_order",
    "test_retried_acquire_is_idempotent",
    "test_semaphore_limit",
    "test_subscription_fallback_polls",
    "test_subscription_times_out_and_checks_topics",
    "test_waiter_acquires_after_release",
]

HOLDER = Holder(owner="conformance", host="localhost", pid=1)


def _request(name: str, token: str, ttl: float = 30.0, **kw: object) -> AcquireRequest:
    return AcquireRequest(name=name, token=token, holder=HOLDER, ttl=ttl, **kw)  # type: ignore[arg-type]


def test_exclusive_until_released(lh_backend: BackendHarness) -> None:
    a, b = lh_backend.client(), lh_backend.client()
    name = lh_backend.unique()
    lease = a.lock(name).acquire(timeout=5)
    assert lease.held
    assert b.lock(name).try_acquire() is None
    assert a.lock(name).try_acquire() is None  # a lease is not re-entrant per client
    assert lease.release() is True
    assert lease.release() is False  # idempotent
    again = b.lock(name).try_acquire()
    assert again is not None
    again.release()


def test_fences_strictly_increase(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    name = lh_backend.unique()
    lock = client.lock(name, ttl=lh_backend.short_ttl, renew=False)
    fences = []
    for _ in range(3):  # acquire / release
        lease = lock.acquire(timeout=5)
        fences.append(lease.fence)
        lease.release()
    lease = lock.acquire(timeout=5)  # expiry
    fences.append(lease.fence)
    lh_backend.advance_past(lh_backend.short_ttl)
    lease = lock.acquire(timeout=5)
    fences.append(lease.fence)
    client.break_lease(name)  # forced release
    lease = lock.acquire(timeout=5)
    fences.append(lease.fence)
    lease.release()
    assert fences == sorted(fences) and len(set(fences)) == len(fences), fences


def test_expiry_by_store_clock(lh_backend: BackendHarness) -> None:
    a, b = lh_backend.client(), lh_backend.client()
    name = lh_backend.unique()
    ttl = lh_backend.short_ttl
    first = a.lock(name, ttl=ttl, renew=False).acquire(timeout=5)
    assert b.lock(name, ttl=ttl).try_acquire() is None
    lh_backend.advance_past(ttl)
    assert first.lost
    with pytest.raises(LeaseLost):
        first.check()
    second = b.lock(name, ttl=ttl, renew=False).try_acquire()
    assert second is not None and second.fence > first.fence
    assert first.release() is False  # a superseded holder cannot release the successor
    assert second.held
    assert [h.fence for h in b.holders(name)] == [second.fence]
    second.release()


def test_only_owner_mutates(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    store = client.store
    name = lh_backend.unique()
    lease = client.lock(name).acquire(timeout=5)
    forged = secrets.token_urlsafe(24)
    assert store.release(name, forged) is False
    assert store.renew([RenewItem(name, forged, 30.0)]) == [False]
    assert [h.fence for h in client.holders(name)] == [lease.fence]
    assert lease.held
    lease.release()


def test_extend_replaces_ttl(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    name = lh_backend.unique()
    ttl = lh_backend.short_ttl
    lease = client.lock(name, ttl=ttl, renew=False).acquire(timeout=5)
    lh_backend.advance(ttl * 0.6)
    lease.extend()
    lh_backend.advance(ttl * 0.6)
    assert lease.held  # 1.2 ttl after the grant, but 0.6 ttl after the extension
    lease.extend(ttl=ttl * 3)
    assert lease.ttl == ttl * 3
    holders = client.holders(name)
    assert holders and holders[0].expires_in > ttl * 2
    lease.release()
    with pytest.raises(LeaseLost):
        lease.extend()


def test_holders_and_leases_report_what_is_held(lh_backend: BackendHarness) -> None:
    client = lh_backend.client(identity="reporter")
    prefix = lh_backend.unique("rep") + ":"
    names = [prefix + suffix for suffix in ("a", "b", "c%_")]
    leases = [client.lock(n, ttl=60).acquire(timeout=5) for n in names]
    other = client.lock(lh_backend.unique("other"), ttl=60).acquire(timeout=5)
    infos = client.leases(prefix)
    assert sorted(i.name for i in infos) == sorted(names)
    for info in infos:
        assert info.owner.startswith("reporter")
        assert info.pid > 0 and info.host
        assert 0 < info.expires_in <= 60
        assert info.held_for >= 0
    by_name = {i.name: i for i in infos}
    assert [by_name[n].fence for n in names] == [lease.fence for lease in leases]
    assert client.holders(names[0])[0].fence == leases[0].fence
    assert any(i.name == other.name for i in client.leases(""))
    for lease in [*leases, other]:
        lease.release()
    assert client.leases(prefix) == []
    assert client.holders(names[0]) == []


def test_acquire_timeout_raises(lh_backend: BackendHarness) -> None:
    client = lh_backend.real_client()
    name = lh_backend.unique()
    lease = client.lock(name).acquire(timeout=5)
    started = time.monotonic()
    with pytest.raises(AcquireTimeout) as info:
        client.lock(name).acquire(timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 5
    assert isinstance(info.value, TimeoutError)
    lease.release()
    assert client.statistics().timed_out == 1


def test_waiter_acquires_after_release(lh_backend: BackendHarness) -> None:
    client = lh_backend.real_client()
    name = lh_backend.unique()
    lease = client.lock(name).acquire(timeout=5)
    got: list[int] = []

    def waiter() -> None:
        got.append(client.lock(name).acquire(timeout=10).fence)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    assert not got
    lease.release()
    thread.join(10)
    assert got and got[0] > lease.fence


def test_handed_over_lease_is_renewed_to_its_full_ttl(lh_backend: BackendHarness) -> None:
    """A waiter handed the place (no second call) starts on its queue place and the
    keeper brings it to the full ttl long before that runs out."""
    waiter_client = lh_backend.real_client()  # real time: the keeper must run
    name = lh_backend.unique()
    lease = waiter_client.lock(name).acquire(timeout=5)
    got: list[Any] = []
    thread = threading.Thread(
        target=lambda: got.append(waiter_client.lock(name, ttl=30).acquire(timeout=10))
    )
    thread.start()
    time.sleep(0.3)
    lease.release()
    thread.join(10)
    [handed] = got
    assert handed.fence > lease.fence
    if waiter_client.store.capabilities.hand_over:
        assert handed.remaining() <= 3.0  # min(ttl, queue ttl) from its last attempt
    deadline = time.monotonic() + 5.0
    while handed.remaining() < 20.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handed.remaining() > 20.0
    [info] = waiter_client.holders(name)
    assert info.fence == handed.fence and info.expires_in > 20.0
    handed.release()
    assert waiter_client.holders(name) == []


def test_hand_over_to_a_long_waiting_short_lease_is_confirmed(
    lh_backend: BackendHarness,
) -> None:
    """A hand-over only vouches for min(ttl, queue ttl) from the waiter's last
    queueing attempt. With ttl=1 and that attempt 0.7 s old, using it would leave
    0.3 s; the lock confirms instead and gets its full second."""
    client = lh_backend.real_client()
    name = lh_backend.unique()
    lease = client.lock(name).acquire(timeout=5)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(client.lock(name, ttl=1).acquire(10)))
    thread.start()
    time.sleep(0.7)  # less than the waiter's 1 s queue refresh
    lease.release()
    thread.join(10)
    [short] = got
    assert short.fence > lease.fence
    assert short.remaining() > 0.8
    short.release()


def test_semaphore_limit(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    name = lh_backend.unique()
    sem = client.semaphore(name, 3)
    leases = [sem.try_acquire() for _ in range(3)]
    assert all(lease is not None for lease in leases)
    assert sem.try_acquire() is None
    fences = [lease.fence for lease in leases if lease is not None]
    assert fences == sorted(set(fences))
    assert len(client.holders(name)) == 3
    leases[1].release()  # type: ignore[union-attr]
    fourth = sem.try_acquire()
    assert fourth is not None and fourth.fence > max(fences)
    for lease in [leases[0], leases[2], fourth]:
        lease.release()  # type: ignore[union-attr]


def test_retried_acquire_is_idempotent(lh_backend: BackendHarness) -> None:
    store = lh_backend.client().store
    name, token = lh_backend.unique(), secrets.token_urlsafe(24)
    first = store.acquire(_request(name, token))
    second = store.acquire(_request(name, token))  # the answer to the first was "lost"
    assert isinstance(first, Granted) and second == first
    assert len(store.holders(name)) == 1
    assert store.release(name, token) is True


def test_queue_is_fifo(lh_backend: BackendHarness) -> None:
    store = lh_backend.client().store
    name = lh_backend.unique()
    holder, w1, w2, w3 = (secrets.token_urlsafe(24) for _ in range(4))
    assert isinstance(store.acquire(_request(name, holder)), Granted)
    positions = []
    for token in (w1, w2, w3):
        result = store.acquire(_request(name, token, queue_ttl=10.0))
        assert isinstance(result, Busy)
        positions.append(result.position)
    assert positions == [0, 1, 2]
    # An unqueued caller cannot barge past queued waiters.
    store.release(name, holder)
    assert isinstance(store.acquire(_request(name, secrets.token_urlsafe(24))), Busy)
    assert isinstance(store.acquire(_request(name, w3, queue_ttl=10.0)), Busy)
    granted = store.acquire(_request(name, w1, queue_ttl=10.0))
    assert isinstance(granted, Granted)
    # A waiter that gives up (release of its token) leaves the queue.
    store.release(name, w2)
    store.release(name, w1)
    assert isinstance(store.acquire(_request(name, w3, queue_ttl=10.0)), Granted)
    store.release(name, w3)


def test_release_wakes_only_the_head_waiter(lh_backend: BackendHarness) -> None:
    store = lh_backend.client().store
    if not store.capabilities.notifications:
        pytest.skip(f"{lh_backend.name} has no notifications; waiters poll")
    name = lh_backend.unique()
    holder, head, second = (secrets.token_urlsafe(24) for _ in range(3))
    first = store.acquire(_request(name, holder))
    assert isinstance(first, Granted)
    store.acquire(_request(name, head, queue_ttl=10.0))
    store.acquire(_request(name, second, queue_ttl=10.0))
    store.release(name, holder)  # wake-up sent before anyone waits: must not be lost
    started = time.monotonic()
    woken = store.wait(name, head, 5.0)
    assert time.monotonic() - started < 2.0
    if store.capabilities.hand_over:
        assert isinstance(woken, HandedOver)
        assert woken.fence > first.fence
    else:
        assert woken is True
    assert store.wait(name, second, 0.2) is False
    store.release(name, head)
    store.release(name, second)


def test_release_hands_the_place_to_the_head_waiter(lh_backend: BackendHarness) -> None:
    """With ``hand_over`` the head waiter is a full holder as soon as the release
    commits: counted, listed, renewable, releasable, confirmed by a late acquire."""
    store = lh_backend.client().store
    if not store.capabilities.hand_over:
        pytest.skip(f"{lh_backend.name} wakes waiters instead of handing over")
    name = lh_backend.unique()
    holder, head, second, outsider = (secrets.token_urlsafe(24) for _ in range(4))
    first = store.acquire(_request(name, holder))
    assert isinstance(first, Granted)
    assert isinstance(store.acquire(_request(name, head, queue_ttl=10.0)), Busy)
    assert isinstance(store.acquire(_request(name, second, queue_ttl=10.0)), Busy)
    assert store.release(name, holder) is True
    # Already a holder before it waits: nobody can take the place meanwhile.
    assert isinstance(store.acquire(_request(name, outsider)), Busy)
    held = store.holders(name)
    assert len(held) == 1
    handed = store.wait(name, head, 5.0)
    assert isinstance(handed, HandedOver)
    assert held[0].fence == handed.fence > first.fence
    # Its expiry is its queue place (10 s), not yet the full ttl of the request.
    assert held[0].expires_in <= 10.0 + 0.5
    assert store.renew([RenewItem(name, head, 30.0)]) == [True]
    assert store.holders(name)[0].expires_in > 20.0
    # An acquire that runs after the hand-over (a lost wake-up) confirms it.
    again = store.acquire(_request(name, head, queue_ttl=10.0))
    assert again == Granted(handed.fence)
    assert store.release(name, head) is True
    # The next in line is handed the place in turn, with a higher fence.
    following = store.wait(name, second, 5.0)
    assert isinstance(following, HandedOver)
    assert following.fence > handed.fence
    assert store.release(name, second) is True
    assert store.holders(name) == []


def test_hand_over_to_a_dead_waiter_lasts_only_its_queue_place(
    lh_backend: BackendHarness,
) -> None:
    store = lh_backend.client().store
    if not store.capabilities.hand_over:
        pytest.skip(f"{lh_backend.name} wakes waiters instead of handing over")
    name = lh_backend.unique()
    holder, ghost, alive = (secrets.token_urlsafe(24) for _ in range(3))
    store.acquire(_request(name, holder))
    # The ghost queues for 0.5 s and never comes back; its request asked for 60 s.
    store.acquire(_request(name, ghost, ttl=60.0, queue_ttl=0.5))
    store.release(name, holder)
    assert len(store.holders(name)) == 1  # handed to the ghost
    lh_backend.advance(0.7)
    granted = store.acquire(_request(name, alive))
    assert isinstance(granted, Granted)
    store.release(name, alive)


def test_renew_batch_answers_in_order(lh_backend: BackendHarness) -> None:
    store = lh_backend.client().store
    names = [lh_backend.unique() for _ in range(50)]
    tokens = [secrets.token_urlsafe(24) for _ in names]
    for name, token in zip(names, tokens, strict=True):
        store.acquire(_request(name, token))
    items = [
        RenewItem(name, token if i % 3 else "not-the-owner", 30.0)
        for i, (name, token) in enumerate(zip(names, tokens, strict=True))
    ]
    assert store.renew(items) == [bool(i % 3) for i in range(len(items))]
    assert store.renew([]) == []
    for name, token in zip(names, tokens, strict=True):
        store.release(name, token)


def test_break_lease_bumps_fence_and_loses_holder(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    name = lh_backend.unique()
    lease = client.lock(name, renew=False).acquire(timeout=5)
    assert client.break_lease(name) == 1
    assert client.holders(name) == []
    with pytest.raises(LeaseLost):
        lease.extend()
    assert lease.lost
    successor = client.lock(name).acquire(timeout=5)
    assert successor.fence > lease.fence
    successor.release()


def test_cancelled_acquire_leaves_lock_free(lh_backend: BackendHarness) -> None:
    name = lh_backend.unique()

    async def scenario() -> None:
        async with lh_backend.async_client() as client:
            holder = await client.lock(name).acquire(timeout=5)
            waiter = asyncio.ensure_future(client.lock(name).acquire())
            await asyncio.sleep(0.1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await holder.release()
            # Cancel many acquires at random points of their first round trip.
            for delay in (0.0, 0.0005, 0.001, 0.002, 0.005):
                task = asyncio.ensure_future(client.lock(name).acquire())
                await asyncio.sleep(delay)
                task.cancel()
                try:
                    lease = await task
                except asyncio.CancelledError:
                    pass
                else:
                    await lease.release()
            await asyncio.sleep(0.05)
            assert await client.holders(name) == []
            free = await client.lock(name).try_acquire()
            assert free is not None
            await free.release()

    asyncio.run(scenario())


def test_record_compare_and_set(lh_backend: BackendHarness) -> None:
    store = lh_backend.client().store
    key = lh_backend.unique("rec")
    absent = store.read_record(key)
    assert (absent.value, absent.version) == (None, 0)
    fence = lh_backend.client().lock(lh_backend.unique()).acquire(timeout=5).fence
    v1 = store.write_record(key, 0, b"one")
    assert v1 is not None and v1 > fence  # versions come from the fence sequence
    assert store.write_record(key, 0, b"again") is None  # already exists
    record = store.read_record(key)
    assert (record.value, record.version) == (b"one", v1)
    v2 = store.write_record(key, v1, b"two")
    assert v2 is not None and v2 > v1
    assert store.write_record(key, v1, b"stale") is None  # lost the race
    assert store.read_record(key).value == b"two"
    big = bytes(range(256)) * 1024  # binary-safe, 256 KiB
    v3 = store.write_record(key, v2, big)
    assert v3 is not None and store.read_record(key).value == big
    deleted = store.write_record(key, v3, None)
    assert deleted is not None and deleted > v3
    assert store.read_record(key).version == 0
    v4 = store.write_record(key, 0, b"reborn")
    assert v4 is not None and v4 > deleted  # never reused after deletion
    assert store.write_record(key, v4, None) is not None


def test_record_expiry_and_clock(lh_backend: BackendHarness) -> None:
    store = lh_backend.client().store
    key = lh_backend.unique("rec")
    ttl = lh_backend.short_ttl
    before = store.read_record(key).now
    version = store.write_record(key, 0, b"short-lived", ttl=ttl)
    assert version is not None
    assert store.read_record(key).value == b"short-lived"
    lh_backend.advance_past(ttl)
    after = store.read_record(key)
    assert (after.value, after.version) == (None, 0)
    assert after.now - before >= ttl  # the store's clock moved with time
    assert store.write_record(key, version, b"late") is None  # expired: version is 0
    assert store.write_record(key, 0, b"fresh") is not None


def test_record_concurrent_increments_lose_nothing(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    key = lh_backend.unique("counter")
    per_thread, threads = 25, 6

    def worker() -> None:
        store = lh_backend.client().store
        for _ in range(per_thread):
            while True:
                record = store.read_record(key)
                count = int(record.value or b"0")
                if store.write_record(key, record.version, str(count + 1).encode()) is not None:
                    break

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    assert client.store.read_record(key).value == str(per_thread * threads).encode()
