"""client.statistics(): one test per counter, with the reproductions of issue #19."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import leasehold
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.url import parse
from leasehold._sync.backends import open_store
from leasehold.testing.wrappers import FaultyStore


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


def faulty_client() -> tuple[leasehold.Client, FaultyStore]:
    store = FaultyStore(open_store(parse(memory_url()), SYSTEM_CLOCK))
    return leasehold.Client(store=store), store


def wait_until(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_lost_lease_is_not_released_and_its_hold_time_ends_at_the_loss() -> None:
    # The reproduction: lost=1, released=1, hold_time=2.49 before.
    c = leasehold.Client(memory_url())
    with pytest.raises(leasehold.LeaseLost), c.lock("x", ttl=1, renew=False):
        time.sleep(1.5)
    stats = c.statistics()
    c.close()
    assert (stats.lost, stats.released) == (1, 0)
    assert stats.hold_time == pytest.approx(1.0, abs=0.1)


def test_the_same_on_the_async_client() -> None:
    async def main() -> leasehold.Statistics:
        async with leasehold.AsyncClient(memory_url()) as c:
            with pytest.raises(leasehold.LeaseLost):
                async with c.lock("x", ttl=0.5, renew=False):
                    await asyncio.sleep(0.8)
            return c.statistics()

    stats = asyncio.run(main())
    assert (stats.lost, stats.released) == (1, 0)
    assert stats.hold_time == pytest.approx(0.5, abs=0.1)


def test_hold_time_ends_at_the_loss_in_an_outage() -> None:
    # Renewals fail (an outage): the loss is at the safe deadline, and the block
    # that goes on afterwards adds nothing to the hold time.
    c, store = faulty_client()
    lease = c.lock("o", ttl=0.6).acquire()
    store.fail("renew", times=None)
    wait_until(lambda: lease.lost)
    time.sleep(0.6)
    lease.release()
    stats = c.statistics()
    c.close()
    assert (stats.lost, stats.released) == (1, 0)
    assert stats.hold_time == pytest.approx(0.6, abs=0.15)
    assert stats.renewal_failures >= 2


def test_released_and_hold_time_of_a_release() -> None:
    c = leasehold.Client(memory_url())
    lease = c.lock("r").acquire()
    time.sleep(0.2)
    assert lease.release()
    assert not lease.release()  # idempotent: counted once
    stats = c.statistics()
    c.close()
    assert (stats.released, stats.lost) == (1, 0)
    assert stats.hold_time == pytest.approx(0.2, abs=0.1)


def test_a_refused_renewal_is_not_counted_as_renewed() -> None:
    c = leasehold.Client(memory_url())
    lease = c.lock("f", ttl=0.6).acquire()
    c.break_lease("f")
    wait_until(lambda: lease.lost)
    stats = c.statistics()
    c.close()
    assert (stats.renewed, stats.lost) == (0, 1)


def test_renewed_counts_confirmed_renewals_per_lease() -> None:
    c = leasehold.Client(memory_url())
    a = c.lock("a", ttl=0.3).acquire()
    b = c.lock("b", ttl=0.3).acquire()
    wait_until(lambda: c.statistics().renewed >= 2)
    a.release()
    b.release()
    renewed = c.statistics().renewed
    c.close()
    assert renewed % 2 == 0  # both leases ride in every call


def test_renewal_failures_count_per_lease_and_attempt() -> None:
    c, store = faulty_client()
    a = c.lock("a", ttl=1).acquire()
    b = c.lock("b", ttl=1).acquire()
    store.fail("renew", times=1)
    wait_until(lambda: c.statistics().renewed >= 2)
    a.release()
    b.release()
    stats = c.statistics()
    c.close()
    assert stats.renewal_failures == 2  # one failed call carrying two leases
    assert stats.lost == 0


def test_acquired_skipped_timed_out_and_wait_time() -> None:
    c = leasehold.Client(memory_url())
    held = c.lock("w").acquire()
    assert c.lock("w").try_acquire() is None
    with pytest.raises(leasehold.AcquireTimeout):
        c.lock("w").acquire(timeout=0)  # an acquire, so a timeout (not a skip)
    with pytest.raises(leasehold.AcquireTimeout):
        c.lock("w").acquire(timeout=0.2)
    held.release()
    stats = c.statistics()
    c.close()
    assert (stats.acquired, stats.skipped, stats.timed_out) == (1, 1, 2)
    assert 0.2 <= stats.wait_time < 2


def test_a_cancelled_acquire_is_not_a_timeout() -> None:
    async def main() -> leasehold.Statistics:
        async with leasehold.AsyncClient(memory_url()) as c:
            held = await c.lock("c").acquire()
            waiter = asyncio.ensure_future(c.lock("c").acquire())
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await held.release()
            return c.statistics()

    stats = asyncio.run(main())
    assert (stats.acquired, stats.timed_out, stats.skipped) == (1, 0, 0)


def test_sync_election_campaign_slices_are_not_timeouts() -> None:
    c = leasehold.Client(memory_url())
    leader = c.election("el", ttl=5).campaign()
    follower = c.election("el", ttl=5)
    import threading

    runner = threading.Thread(target=follower.run, args=(lambda lease: None,))
    runner.start()
    time.sleep(1.2)  # two campaign slices of 0.5 s
    follower.stop()
    runner.join(10)
    leader.release()
    stats = c.statistics()
    c.close()
    assert stats.timed_out == 0
