"""Redis: a contended acquisition queues and waits in one round trip
(backends/redis/contended.py): acquire.lua and the BLPOP for the hand-over,
pipelined, for a lock that waited last time and for every retry."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from leasehold import AcquireTimeout, AsyncClient, Client, Lease
from tests.servers.redis import RedisServer


@pytest.fixture(scope="module")
def redis_url(redis_server: Any) -> Iterator[str]:
    yield redis_server.url


def _name() -> str:
    return f"contended:{uuid.uuid4().hex[:10]}"


class Calls:
    """Counts the store calls a client makes (the store's own methods, wrapped)."""

    def __init__(self, client: Client) -> None:
        self.store = client._context.store
        self.counts = {"acquire": 0, "wait": 0, "acquire_and_wait": 0}
        for method in ("acquire", "wait", "acquire_and_wait"):
            self._wrap(method)

    def _wrap(self, method: str) -> None:
        original = getattr(self.store, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[method] += 1
            return original(*args, **kwargs)

        setattr(self.store, method, counted)


def _hold_then_release(lease: Lease, after: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after), lease.release()))
    thread.start()
    return thread


def _wait_once(holder: Client, waiter: Client, name: str) -> Lease:
    """``waiter`` acquires ``name`` while ``holder`` holds it, handed over on release."""
    held = holder.lock(name, ttl=30).acquire()
    releasing = _hold_then_release(held, 0.3)
    lease = waiter.lock(name, ttl=30).acquire(timeout=10)
    releasing.join()
    assert lease.fence > held.fence
    return lease


def test_a_lock_that_waited_queues_and_waits_in_one_call(redis_url: str) -> None:
    holder, waiter = Client(redis_url), Client(redis_url)
    try:
        name = _name()
        lock = waiter.lock(name, ttl=30)
        held = holder.lock(name, ttl=30).acquire()
        releasing = _hold_then_release(held, 0.3)
        lock.acquire(timeout=10).release()  # waited: the next acquisition pipelines
        releasing.join()
        calls = Calls(waiter)
        held = holder.lock(name, ttl=30).acquire()
        releasing = _hold_then_release(held, 0.15)
        lease = lock.acquire(timeout=10)
        releasing.join()
        assert lease.fence > held.fence
        # One acquire_and_wait: queued, blocked, handed over -- no separate acquire
        # or wait (the hand-over came within the BLPOP's 0.9 s).
        assert calls.counts == {"acquire": 0, "wait": 0, "acquire_and_wait": 1}
        lease.release()
    finally:
        holder.close()
        waiter.close()


def test_a_free_name_is_granted_at_once_by_the_pipelined_call(redis_url: str) -> None:
    holder, waiter = Client(redis_url), Client(redis_url)
    try:
        name = _name()
        lock = waiter.lock(name, ttl=30)
        held = holder.lock(name, ttl=30).acquire()
        releasing = _hold_then_release(held, 0.2)
        lock.acquire(timeout=10).release()
        releasing.join()
        calls = Calls(waiter)
        started = time.monotonic()
        lease = lock.acquire(timeout=10)  # free now: the script marks the BLPOP done
        assert time.monotonic() - started < 0.5  # not the BLPOP's 0.9 s
        assert calls.counts["acquire_and_wait"] == 1 and calls.counts["wait"] == 0
        lease.release()
        # Granted at once: the next acquisition takes the plain path again.
        lock.acquire(timeout=10).release()
        assert calls.counts["acquire"] == 1 and calls.counts["acquire_and_wait"] == 1
        store = waiter._context.store
        assert not store._connect().commands.keys(f"*:w:*{name}*")  # no marker left

    finally:
        holder.close()
        waiter.close()


def test_a_holder_expiring_sooner_than_the_blpop_is_waited_for_until_then(
    redis_url: str,
) -> None:
    holder, waiter = Client(redis_url), Client(redis_url)
    try:
        name = _name()
        lock = waiter.lock(name, ttl=30)
        _wait_once(holder, waiter, name).release()
        # A holder that never renews and never releases: its expiry (0.15 s) comes
        # before the pipelined BLPOP's 0.9 s would end.
        stuck = holder.lock(name, ttl=0.15, renew=False).acquire()
        started = time.monotonic()
        lease = lock.acquire(timeout=10)
        elapsed = time.monotonic() - started
        assert lease.fence > stuck.fence
        assert 0.1 < elapsed < 0.8, elapsed
        lease.release()
    finally:
        holder.close()
        waiter.close()


def test_script_flush_costs_one_blpop_slice_then_the_plain_path_serves(
    redis_url: str, redis_server: RedisServer
) -> None:
    holder, waiter = Client(redis_url), Client(redis_url)
    try:
        name = _name()
        lock = waiter.lock(name, ttl=30)
        _wait_once(holder, waiter, name).release()
        waiter._context.store._connect().commands.execute_command("SCRIPT", "FLUSH")
        started = time.monotonic()
        lease = lock.acquire(timeout=10)  # NOSCRIPT in the pipeline: BLPOP waits
        assert time.monotonic() - started < 2.0
        assert lease.fence > 0
        lease.release()
        _wait_once(holder, waiter, name).release()  # and it pipelines again
    finally:
        holder.close()
        waiter.close()


def test_timeouts_hold_and_leave_nothing_queued(redis_url: str) -> None:
    holder, waiter = Client(redis_url), Client(redis_url)
    try:
        name = _name()
        lock = waiter.lock(name, ttl=30)
        _wait_once(holder, waiter, name).release()
        held = holder.lock(name, ttl=30).acquire()
        started = time.monotonic()
        with pytest.raises(AcquireTimeout):
            lock.acquire(timeout=1.5)
        elapsed = time.monotonic() - started
        assert 1.4 < elapsed < 2.3, elapsed
        redis = holder._context.store._connect().commands
        queue = holder._context.store.keys.for_name(name).queue
        assert redis.zcard(queue) == 0  # the timed-out waiter left the queue
        held.release()
    finally:
        holder.close()
        waiter.close()


def test_asyncio_cancelled_while_pipelined_leaves_the_connection_clean(redis_url: str) -> None:
    async def main() -> None:
        holder, waiter = AsyncClient(redis_url), AsyncClient(redis_url)
        try:
            name = _name()
            lock = waiter.lock(name, ttl=30)
            held = await holder.lock(name, ttl=30).acquire()

            async def release_later() -> None:
                await asyncio.sleep(0.2)
                await held.release()

            later = asyncio.create_task(release_later())
            await (await lock.acquire(timeout=10)).release()  # waited
            await later
            held = await holder.lock(name, ttl=30).acquire()
            task = asyncio.create_task(lock.acquire(timeout=10))
            await asyncio.sleep(0.3)  # inside the pipelined BLPOP
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The cancelled waiter left the queue: a release hands over to nobody.
            await held.release()
            assert await holder.holders(name) == []
            # The waiter's connections still answer correctly.
            again = await lock.acquire(timeout=5)
            assert again.fence > held.fence
            await again.release()
        finally:
            await holder.aclose()
            await waiter.aclose()

    asyncio.run(main())
