"""Network-fault scenarios: real stores behind FaultProxy, clients recording a history.

Each scenario is ``async def scenario(run: Run) -> None``: it drives actors (see
actors.py) through one fault and records what they reported into ``run.history``;
the checker (history.py) judges the history afterwards. A scenario never decides
safety itself, except for facts only it can see (a false loss, an orphaned grant),
which it records as violations of their own kind.

Times are multiples of the lease TTL (``run.ttl``), so one scenario serves the CI
subset (short TTL, one trial) and the full run (more trials, both APIs).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import leasehold
from tests.faults.actors import HUNG, Actor, Ledger, call_bound, in_thread
from tests.faults.history import History
from tests.faults.targets import Route, Target


@dataclass
class Run:
    target: Target
    api: str
    history: History
    ledger: Ledger
    ttl: float = 1.0
    operation_timeout: float = 2.0
    actor_cls: type[Actor] = Actor
    actors: list[Actor] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    name: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:10]}")

    def actor(self, label: str, url: str) -> Actor:
        actor = self.actor_cls(
            label, self.api, url, self.history, operation_timeout=self.operation_timeout
        )
        self.actors.append(actor)
        return actor

    def route(self) -> Route:
        """A new client's route to the store, healed or closed when the trial ends."""
        route = self.target.new_path()
        self.routes.append(route)
        return route

    async def admin(self) -> Any:
        """A direct asyncio client (no proxy) for looking at the store."""
        return leasehold.AsyncClient(self.target.direct_url, identity="admin")

    async def close(self) -> None:
        actors, self.actors = self.actors, []
        for actor in actors:
            await actor.close()
        routes, self.routes = self.routes, []
        for route in routes:
            route.close()


Scenario = Callable[[Run], Awaitable[None]]


# How long a new holder works before its first fenced write: long enough for the old
# holder's writes in between to show (accepted until that first write, then refused).
NEW_HOLDER_WORK = 0.15


async def _write_while_held(actor: Actor, ledger: Ledger, lease: Any, until: float) -> None:
    """The holder's work: a fenced write every 50 ms while it believes it holds."""
    while time.monotonic() < until and lease.held:
        await actor.write(ledger, lease)
        await asyncio.sleep(0.05)


async def _handover(run: Run, fault: Callable[[Any], None], heal: Callable[[Any], None]) -> None:
    """A holds; ``fault`` cuts A off (or slows it) for 3 TTL while B waits for the
    name; A must report the loss before B is granted; A's release must stay bounded."""
    ttl = run.ttl
    route_a = run.route()
    route_b = run.route() if run.target.isolated else route_a
    a = run.actor("A", route_a.url)
    b = run.actor("B", route_b.url)
    lease = await a.acquire(run.name, ttl, timeout=5.0)
    if lease is None:
        run.history.violation("setup", "A could not acquire before the fault")
        return
    await a.write(run.ledger, lease)
    run.history.fault()
    fault(route_a)
    fault_ends = time.monotonic() + 3 * ttl
    waiter = None
    if run.target.isolated:
        waiter = asyncio.ensure_future(b.acquire(run.name, ttl, timeout=3 * ttl + 3.0))
    await _write_while_held(a, run.ledger, lease, fault_ends)
    if not await a.wait_lost(lease, max(0.0, fault_ends - time.monotonic())) and not a.naive:
        run.history.violation("no-loss", "A still reports the lease held after 3 TTL")
    # Releasing a lost lease through the fault is one more call that must stay bounded.
    await a.release(lease, record=not a.naive)
    await asyncio.sleep(max(0.0, fault_ends - time.monotonic()))
    heal(route_a)
    if waiter is None:
        b_lease = await b.acquire(run.name, ttl, timeout=2 * ttl + 3.0)
    else:
        b_lease = await waiter
    if b_lease is None:
        run.history.violation("liveness", "B never got the lease")
        return
    await b.write(run.ledger, b_lease)
    await a.write(run.ledger, lease)  # stale: must be refused (or skipped: not held)
    await b.release(b_lease)


async def partition(run: Run) -> None:
    """The holder's network goes silent (stalled both ways) for 3 TTL."""
    await _handover(run, lambda route: route.stall(), lambda route: route.pass_through())


async def slow_replies(run: Run) -> None:
    """Replies to the holder are delayed 1.5 TTL for 3 TTL (requests still arrive)."""
    await _handover(
        run,
        lambda route: route.delay(down=1.5 * run.ttl),
        lambda route: route.pass_through(),
    )


async def small_delays(run: Run) -> None:
    """Every message delayed 0.1 TTL each way (a round trip of 0.2 TTL): the holder
    keeps its lease (no false loss) and nobody else gets it meanwhile. The TTL is
    doubled here: the slack between renewals (0.45 TTL) must also absorb a loaded
    machine's scheduling pauses, which do not scale with the TTL."""
    ttl = 2 * run.ttl
    route_a = run.route()
    route_b = run.route() if run.target.isolated else route_a
    a = run.actor("A", route_a.url)
    b = run.actor("B", route_b.url)
    # Steady state, not start-up: a new connection's handshake costs several round
    # trips, each delayed too.
    await a.warm_up(run.name, ttl)
    await b.warm_up(run.name, ttl)
    for route in {id(route_a): route_a, id(route_b): route_b}.values():
        route.delay(up=0.1 * ttl, down=0.1 * ttl)
    lease = await a.acquire(run.name, ttl, timeout=5.0)
    if lease is None:
        run.history.violation("setup", "A could not acquire under small delays")
        return
    until = time.monotonic() + 2 * ttl
    while time.monotonic() < until:
        await a.write(run.ledger, lease)
        other = await b.try_acquire(run.name, ttl)
        if other is not None:
            await b.release(other)
        if not lease.held:
            break
        await asyncio.sleep(0.3 * ttl)
    if not lease.held:
        run.history.violation("false-loss", "A lost its lease to 0.2 TTL of round-trip delay")
    run.history.metrics["kept_lease"] = bool(lease.held)
    await a.release(lease)
    b_lease = await b.acquire(run.name, ttl, timeout=3.0)
    if b_lease is not None:
        await b.write(run.ledger, b_lease)
        await b.release(b_lease)


async def late_grant(run: Run) -> None:
    """Replies delayed 1.5 TTL from the start: every grant arrives after its safe
    deadline. acquire() must not return such a lease and no body may run under it."""
    ttl = run.ttl
    route = run.route()
    a = run.actor("A", route.url)
    await a.warm_up(run.name, ttl)
    route.delay(down=1.5 * ttl)
    run.history.fault()
    timeout = 2.5 * ttl
    lease = await a.acquire(run.name, ttl, timeout=timeout)
    if lease is not None:
        await a.release(lease)
    # The context manager waits without a timeout: heal after 3 TTL so that it can
    # finish with a timely grant; the body must only ever see a held lease.
    lock = a.lock(run.name, ttl)
    history = run.history

    if a.api == "async":

        async def body() -> None:
            # Retried on StoreUnavailable, as a worker loop would, until it ran once.
            for _attempt in range(20):
                try:
                    async with lock as held_lease:
                        history.entry("A", held_lease.held, held_lease.fence)
                        a._track(held_lease)
                    return
                except leasehold.LeaseLost:
                    return
                except leasehold.StoreUnavailable:
                    await asyncio.sleep(0.1)

        task: asyncio.Future[Any] = asyncio.ensure_future(body())
    else:

        def sync_body() -> None:
            for _attempt in range(20):
                try:
                    with lock as held_lease:
                        history.entry("A", held_lease.held, held_lease.fence)
                        a._track(held_lease)
                    return
                except leasehold.LeaseLost:
                    return
                except leasehold.StoreUnavailable:
                    time.sleep(0.1)

        task = in_thread(sync_body)
    done, _ = await asyncio.wait({task}, timeout=2 * ttl)
    route.pass_through()
    if not done:
        done, _ = await asyncio.wait({task}, timeout=3 * ttl + 5.0)
    if not done:
        run.history.violation("liveness", "the body never ran after the network healed")
        a.stragglers.append(task)
    elif task.exception() is not None:
        run.history.violation("error", f"the body's lock raised {task.exception()!r}")
    run.history.metrics["body_entries"] = len(run.history.entries)


async def lost_reply(run: Run) -> None:
    """The acquire commits, its reply is lost and the connection reset: the caller
    must get the grant made for it (same fence), or the grant must be released."""
    ttl_long = max(5.0, 5 * run.ttl)
    route = run.route()
    a = run.actor("A", route.url)
    admin = await run.admin()
    try:
        await admin.holders(run.name)  # connect before the fault
        # A's connection is up and its scripts loaded too, so the request itself goes
        # out during the stall (a handshake or a script load would wait for a reply).
        warm = await a.acquire(f"{run.name}-warm", ttl_long, timeout=1.0, record=False, track=False)
        if warm is not None:
            await a.release(warm, record=False)
        # Replies are held back 0.5 s, so every round trip before the grant (a run-id
        # read, a script load) still completes; the moment the grant shows in the
        # store, its reply is still in the proxy, and the reset throws it away.
        route.delay(down=0.5)
        run.history.fault()
        timeout = 3.0
        attempt = asyncio.ensure_future(a.acquire(run.name, ttl_long, timeout=timeout))
        granted: list[Any] = []
        deadline = time.monotonic() + 2.5
        while not granted and time.monotonic() < deadline:
            granted = await admin.holders(run.name)
            if not granted:
                await asyncio.sleep(0.01)
        route.reset()
        route.pass_through()
        if not granted:
            run.history.violation("setup", "the acquire never reached the store")
        lease = await attempt
        holders = await admin.holders(run.name)
        if lease is not None:
            run.history.metrics["outcome"] = "same grant"
            fences = sorted(h.fence for h in holders)
            if fences != [lease.fence]:
                run.history.violation(
                    "lost-reply", f"caller got fence {lease.fence}, the store holds {fences}"
                )
            await a.release(lease)
        else:
            # Gave up: its grant must not keep everyone out for the TTL.
            wait_until = time.monotonic() + call_bound(run.operation_timeout)
            while holders and time.monotonic() < wait_until:
                await asyncio.sleep(0.05)
                holders = await admin.holders(run.name)
            run.history.metrics["outcome"] = "released" if not holders else "orphaned"
            # The store answered again at once: a retry with the same token, within
            # the caller's timeout, would have returned the grant made for it.
            took = run.history.bounds[-1].took if run.history.bounds else None
            if took is not None and took < timeout - 0.5:
                run.history.violation(
                    "gave-up",
                    f"acquire(timeout={timeout:g}) raised after {took:.2f} s instead of "
                    "retrying with the same token",
                )
            if holders:
                run.history.violation(
                    "orphan-grant",
                    f"acquire gave up but its grant (fence {holders[0].fence}) stays "
                    f"for up to {ttl_long:g} s",
                )
    finally:
        await admin.aclose()


async def stalled_store(run: Run) -> None:
    """The store goes silent (the kernel still ACKs): every call keeps its bound."""
    ttl = run.ttl
    route = run.route()
    a = run.actor("A", route.url)
    other = f"{run.name}-held"
    lease = await a.acquire(other, 2 * ttl, timeout=5.0)
    if lease is None:
        run.history.violation("setup", "A could not acquire before the stall")
        return
    route.stall()
    run.history.fault()
    # All at once, as the calls of a busy process would be; each has its own bound.
    cap = a.op_bound + 6.0
    client = a.client
    election = client.election(f"{run.name}-election", ttl)
    await asyncio.gather(
        a.acquire(run.name, ttl, timeout=1.0, cap=cap),
        a.timed("try_acquire", a.op_bound, a.lock(run.name, ttl).try_acquire, cap=cap),
        a.timed("extend", a.op_bound, lease.extend, cap=cap),
        a.timed("holders", a.op_bound, lambda: client.holders(run.name), cap=cap),
        a.timed("leases", a.op_bound, lambda: client.leases(run.name), cap=cap),
        a.timed("campaign", call_bound(1.0), lambda: election.campaign(timeout=1.0), cap=cap),
        a.timed("leader", a.op_bound, election.leader, cap=cap),
        a.timed("members", a.op_bound, client.presence(run.name).members, cap=cap),
        a.timed("once.state", a.op_bound, client.once(run.name).state, cap=cap),
    )
    await a.timed("release", a.op_bound, lease.release, cap=cap)
    a.finish(lease)
    if lease.held and time.monotonic() > lease.deadline:
        run.history.violation("no-loss", "the lease reports held past its deadline")
    route.pass_through()
    route.reset()


async def reset_renewal(run: Run) -> None:
    """The holder's connections are reset every 0.3 TTL for 3 TTL, renewals included."""
    ttl = run.ttl
    route_a = run.route()
    route_b = run.route() if run.target.isolated else route_a
    a = run.actor("A", route_a.url)
    b = run.actor("B", route_b.url)
    lease = await a.acquire(run.name, ttl, timeout=5.0)
    if lease is None:
        run.history.violation("setup", "A could not acquire")
        return
    run.history.fault()
    until = time.monotonic() + 3 * ttl
    next_probe = time.monotonic()
    while time.monotonic() < until:
        route_a.reset()
        await a.write(run.ledger, lease)
        if time.monotonic() >= next_probe:
            other = await b.try_acquire(run.name, ttl, record=False)
            if other is not None:
                await b.write(run.ledger, other)
                await b.release(other, record=False)
            next_probe = time.monotonic() + 0.5 * ttl
        await asyncio.sleep(0.3 * ttl)
    run.history.metrics["kept_lease"] = bool(lease.held)
    await a.release(lease, record=False)
    b_lease = await b.acquire(run.name, ttl, timeout=2 * ttl + 3.0)
    if b_lease is not None:
        await b.write(run.ledger, b_lease)
        await b.release(b_lease)


async def clock_forward(run: Run) -> None:
    """The store's wall clock steps forward 3 TTL: the holder's grant expires in the
    store at once and B is granted while A still reports the lease held, until A's
    next renewal is refused. Fences still increase; the fenced ledger accepts A's
    writes only until B's first write. (The documented exception to "no overlap".)"""
    assert run.target.clock_step is not None
    ttl = run.ttl
    route_a = run.route()
    route_b = run.route()
    a = run.actor("A", route_a.url)
    b = run.actor("B", route_b.url)
    lease = await a.acquire(run.name, ttl, timeout=5.0)
    if lease is None:
        run.history.violation("setup", "A could not acquire")
        return
    writer = asyncio.ensure_future(
        _write_while_held(a, run.ledger, lease, time.monotonic() + 3 * ttl)
    )
    await asyncio.sleep(0.1)
    run.history.fault()
    run.target.clock_step(3 * ttl)
    try:
        b_lease = await b.acquire(run.name, ttl, timeout=2 * ttl)
        if b_lease is not None:
            await asyncio.sleep(NEW_HOLDER_WORK)
            await b.write(run.ledger, b_lease)
        await a.wait_lost(lease, 2 * ttl)
        await writer
        if b_lease is not None:
            await b.write(run.ledger, b_lease)
            await b.release(b_lease)
        await a.release(lease)
        _measure_overlap(run.history)
    finally:
        run.target.clock_step(-3 * ttl)


def _measure_overlap(history: History) -> None:
    """How long A and B both reported the lease held, and how many of A's fenced
    writes the ledger accepted after B was granted (all before B's first write)."""
    holds = {h.client: h for h in history.holds}
    first, second = holds.get("A"), holds.get("B")
    if first is None or second is None:
        return
    history.metrics["overlap_ms"] = round(max(0.0, first.end - second.start) * 1000, 1)
    b_first = min(
        (w.seq or 0 for w in history.writes if w.client == "B" and w.accepted), default=None
    )
    late = [w for w in history.writes if w.client == "A" and w.accepted and w.at >= second.start]
    history.metrics["stale_writes_accepted"] = len(late)
    history.metrics["stale_writes_rejected"] = sum(
        1 for w in history.writes if w.client == "A" and not w.accepted
    )
    history.metrics["stale_writes_after_next_write"] = sum(
        1 for w in late if b_first is not None and (w.seq or 0) > b_first
    )


async def clock_backward(run: Run) -> None:
    """The store's wall clock steps back 3 TTL. A renewing holder keeps its lease; a
    holder that stops renewing is replaced later than its TTL (liveness only: the
    grant outlives the TTL by the step); fences still increase."""
    assert run.target.clock_step is not None
    ttl = run.ttl
    route_a, route_c, route_d = (run.route() for _ in range(3))
    a = run.actor("A", route_a.url)
    c = run.actor("C", route_c.url)
    d = run.actor("D", route_d.url)
    renewing = await a.acquire(f"{run.name}-renewing", ttl, timeout=5.0)
    abandoned = await c.acquire(run.name, ttl, timeout=5.0, renew=False)
    if renewing is None or abandoned is None:
        run.history.violation("setup", "could not acquire before the step")
        return
    await c.write(run.ledger, abandoned)
    run.history.fault()
    run.target.clock_step(-3 * ttl)
    try:
        # C stops here, as if it crashed: no renewal, no release.
        d_lease = await d.acquire(run.name, ttl, timeout=4 * ttl + 5.0)
        if d_lease is None:
            run.history.violation("liveness", "D never got the abandoned name")
        else:
            await d.write(run.ledger, d_lease)
            await c.write(run.ledger, abandoned)  # stale, or skipped
            await d.release(d_lease)
        run.history.metrics["kept_lease"] = bool(renewing.held)
        if not renewing.held:
            run.history.violation("false-loss", "a renewing lease was lost to a clock step back")
        await a.release(renewing)
        c.finish(abandoned)
    finally:
        run.target.clock_step(3 * ttl)


SCENARIOS: dict[str, Scenario] = {
    "partition": partition,
    "slow_replies": slow_replies,
    "small_delays": small_delays,
    "late_grant": late_grant,
    "lost_reply": lost_reply,
    "stalled_store": stalled_store,
    "reset_renewal": reset_renewal,
}
CLOCK_SCENARIOS: dict[str, Scenario] = {
    "clock_forward": clock_forward,
    "clock_backward": clock_backward,
}
# Scenarios that cut one client off while another still reaches the store.
NEEDS_ISOLATION = {"lost_reply"}
# Violations a scenario documents rather than forbids (the table shows how often).
EXPECTED_KINDS: dict[str, set[str]] = {
    # The documented exception: a forward step of the store's clock expires a grant
    # early, so a second holder overlaps the first until its next renewal.
    "clock_forward": {"overlap"},
    # The other: a failover to a replica that had not received the grant (no overlap
    # when the old holder's renewal happens to reach the new primary first).
    "failover": {"overlap"},
}
# Of those, the ones every trial must show, or the scenario did not do what it says.
REQUIRED_KINDS: dict[str, set[str]] = {"clock_forward": {"overlap"}}


async def run_scenario(
    scenario: str,
    target: Target,
    api: str,
    workdir: Path,
    *,
    ttl: float = 1.0,
    operation_timeout: float = 2.0,
    actor_cls: type[Actor] = Actor,
) -> History:
    history = History(scenario=scenario, backend=target.name, api=api)
    ledger = Ledger(workdir / f"ledger-{uuid.uuid4().hex[:8]}.db", history)
    run = Run(
        target=target,
        api=api,
        history=history,
        ledger=ledger,
        ttl=ttl,
        operation_timeout=operation_timeout,
        actor_cls=actor_cls,
    )
    if scenario == "failover":
        from tests.faults.failover import failover

        fn: Scenario = failover
    else:
        fn = {**SCENARIOS, **CLOCK_SCENARIOS}[scenario]
    try:
        await fn(run)
    finally:
        await run.close()
    history.metrics["hung_calls"] = sum(1 for b in history.bounds if b.took is None)
    history.metrics["ledger_rows"] = len(ledger.committed())
    return history


__all__ = ["CLOCK_SCENARIOS", "HUNG", "SCENARIOS", "Run", "run_scenario"]
