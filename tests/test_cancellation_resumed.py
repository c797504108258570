"""A cancellation that an await dropped is raised again (leasehold._async._concurrency).

Python 3.11's asyncio.wait_for returns its result when that arrives in the same pass
of the event loop as a cancellation, and the task runs on (CPython gh-86296, fixed in
3.12). psycopg_pool waits for connections with it; a lease lost while its body's
store call waited for a connection once let the body run on (the semaphore loss test,
under a parallel run). The PostgreSQL store reads ``cancellations()`` before it asks
the pool and calls ``resume_cancellation`` after.
"""

from __future__ import annotations

import asyncio
import sys

from leasehold._async._concurrency import cancellations, resume_cancellation


async def _race(*, resume: bool) -> list[str]:
    """A body waits with wait_for; its result and a cancellation arrive together."""
    arrived: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def body() -> None:
        before = cancellations()
        await asyncio.wait_for(arrived, 5)
        seen.append("returned")
        if resume:
            resume_cancellation(before)
        await asyncio.sleep(0.05)
        seen.append("ran on")

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)  # the body waits now
    arrived.set_result("connection")
    task.cancel()  # in the same pass: what a keeper does after giving a connection back
    try:
        await task
    except asyncio.CancelledError:
        seen.append("cancelled")
    return seen


def test_a_dropped_cancellation_is_raised_again() -> None:
    seen = asyncio.run(_race(resume=True))
    assert seen[-1] == "cancelled" and "ran on" not in seen


def test_control_wait_for_drops_it_on_python_3_11() -> None:
    # Without resume_cancellation the body runs on where wait_for drops the
    # cancellation (3.11); from 3.12 wait_for raises it itself.
    seen = asyncio.run(_race(resume=False))
    if sys.version_info < (3, 12):
        assert seen == ["returned", "ran on"]
    else:
        assert seen == ["cancelled"]


def test_nothing_is_raised_without_a_new_cancellation() -> None:
    async def scenario() -> str:
        before = cancellations()
        await asyncio.sleep(0)
        resume_cancellation(before)
        return "ran"

    assert asyncio.run(scenario()) == "ran"
