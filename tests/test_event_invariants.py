"""The event stream's promises, checked on recorded histories of random work.

Exporters build gauges on them ("waiting" = started - ended, "held" = acquired -
released - lost), so a stream that breaks them makes every dashboard drift. The
checker is tested against corrupted histories first, so it is known to fire.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leasehold
from leasehold import events

ENDS = (events.Acquired, events.Busy, events.TimedOut, events.AcquireFailed)


def problems(history: list[events.Event]) -> list[str]:
    """What is wrong with ``history`` (one client's events, in order)."""
    found: list[str] = []
    waiting: Counter[str] = Counter()
    held: dict[tuple[str, int], bool] = {}  # (name, fence) -> still held
    for event in history:
        key = event.name
        if isinstance(event, events.AcquireStarted):
            waiting[key] += 1
        elif isinstance(event, ENDS):
            if waiting[key] == 0:
                found.append(f"{type(event).__name__} without AcquireStarted for {key}")
            else:
                waiting[key] -= 1
        if isinstance(event, events.Acquired):
            if (key, event.fence) in held:
                found.append(f"fence {event.fence} of {key} granted twice")
            held[(key, event.fence)] = True
        elif isinstance(event, events.Released | events.Lost):
            if not held.get((key, event.fence)):
                found.append(f"{type(event).__name__} of {key}/{event.fence} not held")
            held[(key, event.fence)] = False
            if event.held < 0:
                found.append(f"negative hold time for {key}/{event.fence}")
        elif isinstance(event, events.Renewed | events.RenewalFailed) and not held.get(
            (key, event.fence)
        ):
            found.append(f"{type(event).__name__} of {key}/{event.fence} not held")
    found += [f"{n} acquire(s) of {k} never ended" for k, n in waiting.items() if n]
    found += [f"{k[0]}/{k[1]} neither released nor lost" for k, h in held.items() if h]
    return found


def _acquired(name: str, fence: int) -> events.Acquired:
    return events.Acquired(
        primitive="lock", name=name, store="memory", client_id=1, fence=fence, wait=0.0
    )


def _started(name: str) -> events.AcquireStarted:
    return events.AcquireStarted(
        primitive="lock", name=name, store="memory", client_id=1, blocking=True
    )


def _released(name: str, fence: int) -> events.Released:
    return events.Released(
        primitive="lock", name=name, store="memory", client_id=1, fence=fence, held=0.1
    )


def _lost(name: str, fence: int) -> events.Lost:
    return events.Lost(
        primitive="lock",
        name=name,
        store="memory",
        client_id=1,
        fence=fence,
        reason="refused",
        detail="",
        held=0.1,
    )


def test_the_checker_fires() -> None:
    good = [_started("a"), _acquired("a", 1), _released("a", 1)]
    assert problems(good) == []
    assert problems([_started("a")]) == ["1 acquire(s) of a never ended"]
    assert problems([_started("a"), _acquired("a", 1)]) == ["a/1 neither released nor lost"]
    assert problems([*good, _released("a", 1)]) == ["Released of a/1 not held"]
    lost_then_released = [_started("a"), _acquired("a", 1), _lost("a", 1), _released("a", 1)]
    assert problems(lost_then_released) == ["Released of a/1 not held"]
    assert problems([_acquired("a", 1), _released("a", 1)]) == [
        "Acquired without AcquireStarted for a"
    ]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "try", "timeout", "cancel", "break", "short"]),
        st.sampled_from(["x", "y"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_random_work_keeps_the_promises(ops: list[tuple[str, str]]) -> None:
    async def main() -> list[events.Event]:
        async with leasehold.AsyncClient(f"memory://{uuid.uuid4().hex}") as client:
            seen: list[events.Event] = []
            with events.subscribe(seen.append, client=client):
                leases: list[leasehold.AsyncLease] = []
                tasks: list[asyncio.Task[object]] = []
                for op, name in ops:
                    lock = client.lock(name, ttl=0.3)
                    if op == "acquire":
                        tasks.append(asyncio.ensure_future(lock.acquire(timeout=0.2)))
                    elif op == "try":
                        lease = await lock.try_acquire()
                        if lease is not None:
                            leases.append(lease)
                    elif op == "timeout":
                        tasks.append(asyncio.ensure_future(lock.acquire(timeout=0)))
                    elif op == "cancel":
                        task = asyncio.ensure_future(lock.acquire())
                        await asyncio.sleep(0.01)
                        task.cancel()
                        tasks.append(task)
                    elif op == "break":
                        await client.break_lease(name)
                    else:
                        short = client.lock(name, ttl=0.2, renew=False)
                        lease = await short.try_acquire()
                        if lease is not None:
                            leases.append(lease)
                    await asyncio.sleep(0.01)
                for result in await asyncio.gather(*tasks, return_exceptions=True):
                    if isinstance(result, leasehold.AsyncLease):
                        leases.append(result)
                await asyncio.sleep(0.35)  # renewals, losses of the short ones
                for lease in leases:
                    await lease.release()
            return seen

    history = asyncio.run(main())
    assert problems(history) == [], [type(e).__name__ for e in history]
