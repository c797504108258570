"""A crowd of waiters in one process costs the store O(1) per handoff."""

from __future__ import annotations

import asyncio
import threading
import time

import leasehold
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.url import parse
from leasehold._sync.backends import open_store
from leasehold.testing import BackendHarness, CountingStore


def test_thread_herd_costs_constant_store_calls_per_handoff(lh_backend: BackendHarness) -> None:
    store = CountingStore(open_store(parse(lh_backend.fresh_url()), SYSTEM_CLOCK))
    client = leasehold.Client(store=store)
    name = lh_backend.unique("herd")
    waiters = 40
    holder = client.lock(name).acquire(timeout=5)
    order: list[int] = []

    def waiter(i: int) -> None:
        with client.lock(name).acquire(timeout=60) as lease:
            order.append(i)
            lease.check()

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(waiters)]
    for i, thread in enumerate(threads):
        thread.start()
        deadline = time.monotonic() + 10
        while client._context.gates.waiting((name, 1)) < i + 1:  # arrive in a known order
            assert time.monotonic() < deadline
            time.sleep(0.001)
    time.sleep(0.2)  # the head is queued in the store
    store.calls.clear()
    holder.release()
    for thread in threads:
        thread.join(60)
    assert sorted(order) == list(range(waiters))
    assert order == list(range(waiters)), "waiters of one client are served in arrival order"
    per_handoff = (store.calls["acquire"] + store.calls["release"]) / waiters
    # One grant, one queue entry for the next local head, one release: about 3.
    assert per_handoff <= 6, store.calls
    client.close()


def test_task_herd_all_served_and_cancellation_passes_the_turn(
    lh_backend: BackendHarness,
) -> None:
    url = lh_backend.fresh_url()
    name = lh_backend.unique("herd")

    async def scenario() -> None:
        async with leasehold.AsyncClient(url) as client:
            holder = await client.lock(name).acquire(timeout=5)
            served: list[int] = []

            async def waiter(i: int) -> None:
                async with client.lock(name) as lease:
                    served.append(i)
                    lease.check()

            tasks = [asyncio.ensure_future(waiter(i)) for i in range(200)]
            await asyncio.sleep(0.2)
            for task in tasks[:50:2]:  # cancel some waiters, the head among them
                task.cancel()
            await holder.release()
            results = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), timeout=60
            )
            cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
            assert cancelled == 25
            assert len(served) == 175
            assert await client.holders(name) == []

    asyncio.run(scenario())
