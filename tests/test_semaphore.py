"""Semaphores (``client.semaphore(name, limit)``): the lock interface, N holders.

Conformance on every backend, a Hypothesis state machine on the fake-clock
backends, and ten real processes with SIGKILLs measured through a fenced ledger.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

import leasehold
from leasehold.testing import BackendHarness

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- conformance: every backend ------------------------------------------------------


def test_limit_is_never_exceeded_and_fences_increase(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    name = lh_backend.unique("sem")
    sem = client.semaphore(name, 3)
    assert sem.limit == 3 and "semaphore" in repr(sem)
    leases = [sem.try_acquire() for _ in range(3)]
    assert all(lease is not None for lease in leases)
    assert sem.try_acquire() is None
    with pytest.raises(leasehold.AcquireTimeout):
        sem.acquire(timeout=0)
    held = [lease for lease in leases if lease is not None]
    fences = [lease.fence for lease in held]
    assert fences == sorted(set(fences))
    infos = client.holders(name)
    assert [i.fence for i in infos] == fences and {i.limit for i in infos} == {3}
    assert all(lease.limit == 3 for lease in held)
    held[1].release()
    replacement = sem.try_acquire()
    assert replacement is not None and replacement.fence > max(fences)
    assert sem.try_acquire() is None
    for lease in [held[0], held[2], replacement]:
        assert lease.release() is True
    assert client.holders(name) == []


def test_dead_holders_permit_returns_after_ttl(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    name = lh_backend.unique("sem")
    ttl = lh_backend.short_ttl
    # renew=False is a holder that died: nobody renews it, nobody releases it.
    dead = [client.semaphore(name, 2, ttl=ttl, renew=False).acquire(timeout=5) for _ in range(2)]
    sem = client.semaphore(name, 2, ttl=ttl)
    assert sem.try_acquire() is None
    lh_backend.advance(ttl * 0.5)
    assert sem.try_acquire() is None  # not before the TTL
    lh_backend.advance_past(ttl * 0.5)
    assert all(lease.lost for lease in dead)
    fresh = [sem.try_acquire() for _ in range(2)]
    assert all(lease is not None for lease in fresh)
    assert min(lease.fence for lease in fresh if lease) > max(lease.fence for lease in dead)
    assert sem.try_acquire() is None
    for lease in dead:
        assert lease.release() is False  # a dead holder cannot free a successor's permit
    assert len(client.holders(name)) == 2
    for lease in fresh:
        lease.release()  # type: ignore[union-attr]


def test_waiters_are_woken_in_arrival_order(lh_backend: BackendHarness) -> None:
    client = lh_backend.real_client()
    name = lh_backend.unique("sem")
    sem = client.semaphore(name, 2, ttl=5)
    first, second = sem.acquire(timeout=5), sem.acquire(timeout=5)
    granted: list[tuple[int, leasehold.Lease, float]] = []
    guard = threading.Lock()

    def waiter(index: int) -> None:
        lease = client.semaphore(name, 2, ttl=5).acquire(timeout=20)
        with guard:
            granted.append((index, lease, time.monotonic()))

    threads = []
    for index in range(4):
        thread = threading.Thread(target=waiter, args=(index,))
        thread.start()
        threads.append(thread)
        time.sleep(0.1)  # each waiter is queued before the next arrives
    assert granted == []
    # Free one permit at a time; exactly the head of the queue gets it, promptly.
    handoffs = []
    to_release = [first, second]
    for expected in range(4):
        released_at = time.monotonic()
        to_release.pop(0).release()
        wait_until(lambda n=expected: len(granted) > n, 10, f"waiter {expected}")
        index, lease, at = granted[expected]
        assert index == expected, [g[0] for g in granted]
        handoffs.append(at - released_at)
        time.sleep(0.05)
        assert len(granted) == expected + 1  # one release wakes one waiter
        to_release.append(lease)
    for thread in threads:
        thread.join(5)
    for lease in to_release:
        lease.release()
    assert max(handoffs) < 1.0, handoffs  # woken, not found by a slow poll


def test_try_acquire_cannot_barge_past_a_waiter(lh_backend: BackendHarness) -> None:
    client = lh_backend.real_client()
    name = lh_backend.unique("sem")
    sem = client.semaphore(name, 2, ttl=5)
    held = [sem.acquire(timeout=5), sem.acquire(timeout=5)]
    got: list[leasehold.Lease] = []
    thread = threading.Thread(target=lambda: got.append(sem.acquire(timeout=10)))
    thread.start()
    time.sleep(0.2)  # queued
    held[0].release()
    # The freed permit belongs to the queued waiter, not to whoever asks first.
    assert sem.try_acquire() is None
    thread.join(10)
    assert got
    assert sem.try_acquire() is None
    got[0].release()
    held[1].release()


def test_changing_limit_between_callers(lh_backend: BackendHarness) -> None:
    """Each acquire compares its *own* limit with the live holder count."""
    client = lh_backend.client()
    name = lh_backend.unique("sem")
    three = [client.semaphore(name, 3).try_acquire() for _ in range(3)]
    assert all(three)
    # A caller with a larger limit is admitted: 4 live holders now.
    wide = client.semaphore(name, 5).try_acquire()
    assert wide is not None
    assert sorted(i.limit for i in client.holders(name)) == [3, 3, 3, 5]
    # Callers with the old or a smaller limit wait until the count is below theirs.
    assert client.semaphore(name, 3).try_acquire() is None
    assert client.semaphore(name, 2).try_acquire() is None
    for lease in [*three[:2], wide]:
        lease.release()  # type: ignore[union-attr]
    narrow = client.semaphore(name, 2).try_acquire()  # 1 live < 2
    assert narrow is not None
    assert client.semaphore(name, 2).try_acquire() is None  # 2 live, not < 2
    three[2].release()  # type: ignore[union-attr]
    narrow.release()


def test_semaphore_has_the_lock_interface(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    name = lh_backend.unique("sem")
    sem = client.semaphore(name, 2, ttl=30)
    with sem as one, sem as two:  # one handle, two permits
        assert one.held and two.held and one.fence < two.fence
        assert len(client.holders(name)) == 2
        assert sem.try_acquire() is None
    assert client.holders(name) == []
    # Loss: breaking the name takes every permit away, and leaving says so.
    with pytest.raises(leasehold.LeaseLost), sem as lease:
        client.break_lease(name)
        with pytest.raises(leasehold.LeaseLost):
            lease.extend()
    assert client.holders(name) == []


def test_async_semaphore_body_is_cancelled_on_loss(lh_backend: BackendHarness) -> None:
    url = lh_backend.fresh_url()
    name = lh_backend.unique("sem")
    reached = False

    async def scenario() -> None:
        nonlocal reached
        async with leasehold.AsyncClient(url) as client:
            sem = client.semaphore(name, 2, ttl=0.6)
            other = await sem.acquire(timeout=5)
            with pytest.raises(leasehold.LeaseLost):
                async with sem as lease:
                    assert lease.limit == 2
                    await client.break_lease(name)
                    await asyncio.sleep(5)  # cancelled at the next renewal (~ttl/3)
                    reached = True
            assert other.lost or await other.wait_lost(2)
            again = await sem.try_acquire()
            assert again is not None and again.fence > lease.fence
            await again.release()

    asyncio.run(scenario())
    assert not reached


async def finish_cancelled(task: asyncio.Future[leasehold.AsyncLease], delay: float) -> None:
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, f"an acquire cancelled after {delay} s kept running (cancellation swallowed)"
    with pytest.raises(asyncio.CancelledError):
        task.result()


def test_cancelled_acquire_leaks_no_permit(lh_backend: BackendHarness) -> None:
    url = lh_backend.fresh_url()
    name = lh_backend.unique("sem")

    async def scenario() -> None:
        async with leasehold.AsyncClient(url) as client:
            sem = client.semaphore(name, 2, ttl=5)
            held = [await sem.acquire(timeout=5), await sem.acquire(timeout=5)]
            for delay in (0.0, 0.0005, 0.002, 0.01, 0.05):
                task = asyncio.ensure_future(sem.acquire())
                await asyncio.sleep(delay)
                task.cancel()
                await finish_cancelled(task, delay)
            # Free a permit while a waiter is being cancelled: it either got the
            # permit before the cancellation landed (and returns it), or gives it back.
            for delay in (0.0, 0.001, 0.005):
                task = asyncio.ensure_future(sem.acquire())
                await asyncio.sleep(0.02)
                await held.pop().release()
                await asyncio.sleep(delay)
                task.cancel()
                try:
                    held.append(await task)
                except asyncio.CancelledError:
                    held.append(await sem.acquire(timeout=5))
            await asyncio.sleep(0.05)
            fences = sorted(i.fence for i in await client.holders(name))
            assert fences == sorted(lease.fence for lease in held)
            for lease in held:
                await lease.release()
            both = [await sem.try_acquire(), await sem.try_acquire()]
            assert all(both)
            for lease in both:
                await lease.release()  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_threads_never_exceed_the_limit(lh_backend: BackendHarness) -> None:
    client = lh_backend.real_client()
    name = lh_backend.unique("sem")
    limit, workers, rounds = 3, 8, 6
    inside = 0
    peak = 0
    store_peak = 0
    guard = threading.Lock()
    full = threading.Event()  # `limit` holders were inside at once

    def worker() -> None:
        nonlocal inside, peak, store_peak
        sem = client.semaphore(name, limit, ttl=5)
        for _ in range(rounds):
            with sem:
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                    if inside >= limit:
                        full.set()
                store_peak = max(store_peak, len(client.holders(name)))
                # Until the limit has been reached once, each holder stays (a bounded
                # time) for the others: however slow a hand-off (etcd on a loaded
                # machine), a semaphore that admits `limit` holders reaches it.
                full.wait(2)
                time.sleep(random.uniform(0.005, 0.03))
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert peak == limit and store_peak <= limit, (peak, store_peak)
    assert client.holders(name) == []
    assert client.statistics().acquired == workers * rounds


# -- state machine: fake-clock backends -----------------------------------------------

TTL = 10.0
MARGIN = 0.5


@dataclass
class Permit:
    lease: leasehold.Lease
    limit: int
    store_expiry: float
    client_deadline: float
    released: bool = False


def run_semaphore_machine(harness: BackendHarness, examples: int) -> None:
    clients = [harness.client() for _ in range(3)]
    clock = harness.clock
    assert clock is not None

    class SemaphoreMachine(RuleBasedStateMachine):
        permits = Bundle("permits")

        def __init__(self) -> None:
            super().__init__()
            self.name = harness.unique("semsm")
            self.now = clock.monotonic()
            self.grants: list[Permit] = []
            self.last_fence = 0

        def live(self) -> list[Permit]:
            return [p for p in self.grants if not p.released and self.now < p.store_expiry]

        @rule(target=permits, owner=st.integers(0, 2), limit=st.sampled_from([1, 2, 3, 3, 4]))
        def try_acquire(self, owner: int, limit: int) -> Permit | None:
            sem = clients[owner].semaphore(self.name, limit, ttl=TTL, renew=False, margin=MARGIN)
            lease = sem.try_acquire()
            live = len(self.live())
            if live >= limit:
                assert lease is None, f"granted with {live} live holders and limit {limit}"
                return None
            assert lease is not None, f"refused with {live} live holders and limit {limit}"
            assert lease.fence > self.last_fence, "fence did not increase"
            self.last_fence = lease.fence
            permit = Permit(lease, limit, self.now + TTL, self.now + TTL - MARGIN)
            self.grants.append(permit)
            return permit

        @rule(permit=consumes(permits))
        def release(self, permit: Permit | None) -> None:
            if permit is None:
                return
            live = permit in self.live()
            result = permit.lease.release()
            if live and self.now < permit.client_deadline:
                assert result is True
            elif not live:
                assert result is False
            permit.released = True

        @rule(permit=permits)
        def extend(self, permit: Permit | None) -> None:
            if permit is None:
                return
            if permit in self.live() and self.now < permit.client_deadline:
                permit.lease.extend()
                permit.store_expiry = self.now + TTL
                permit.client_deadline = self.now + TTL - MARGIN
            else:
                with pytest.raises(leasehold.LeaseLost):
                    permit.lease.extend()

        @rule(seconds=st.sampled_from([0.25, 3.0, 9.5, 9.75, 10.0, 25.0]))
        def advance(self, seconds: float) -> None:
            harness.advance(seconds)
            self.now = clock.monotonic()

        @invariant()
        def store_agrees_with_the_model(self) -> None:
            holders = clients[0].holders(self.name)
            live = self.live()
            assert [h.fence for h in holders] == [p.lease.fence for p in live]
            # Never more holders than the largest limit any live holder was granted with.
            assert len(holders) <= max((p.limit for p in live), default=0)
            for permit in self.grants:
                assert permit.lease.held == (
                    permit in live and self.now < permit.client_deadline
                ), "lease.held disagrees with the model"

    run_state_machine_as_test(
        SemaphoreMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_semaphore_state_machine(local_backend: BackendHarness) -> None:
    run_semaphore_machine(local_backend, {"memory": 120, "sqlite": 40}[local_backend.name])


# -- ten real processes, limit 3, random SIGKILLs ----------------------------------------

PROCESSES = 10
LIMIT = 3
PROC_TTL = 1.0
BOUND = 1.5  # beyond the TTL, for re-acquisition on a busy 2-core CI box
KILLS = 3


def start_permit_worker(
    url: str, name: str, ledger: Path, stop: Path, seed: int
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests._election_workers",
            "permit",
            url,
            name,
            str(LIMIT),
            str(PROC_TTL),
            str(ledger),
            str(stop),
            str(seed),
        ],
        cwd=ROOT,
    )


def read_ledger(ledger: Path) -> list[list[object]]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]


def open_holds(ledger: Path) -> dict[int, list[object]]:
    """pid -> its last 'start' record, for pids whose last record is a start."""
    last: dict[int, list[object]] = {}
    for record in read_ledger(ledger):
        last[record[2]] = record  # type: ignore[index]
    return {pid: rec for pid, rec in last.items() if rec[0] == "start"}


Hold = tuple[float, float, int, int]  # start, end, fence, pid


def max_overlap(holds: list[Hold]) -> tuple[list[Hold], list[tuple[float, int]]]:
    """The largest set of holds covering one instant, and the step function."""
    points = [(h[0], 1, h) for h in holds] + [(h[1], -1, h) for h in holds]
    # Ends sort before starts at the same instant: touching intervals do not overlap.
    points.sort(key=lambda p: (p[0], p[1]))
    active: set[Hold] = set()
    widest: list[Hold] = []
    steps = []
    for at, delta, hold in points:
        if delta > 0:
            active.add(hold)
        else:
            active.discard(hold)
        if len(active) > len(widest):
            widest = sorted(active)
        steps.append((at, len(active)))
    return widest, steps


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


@pytest.mark.slow
def test_ten_processes_limit_three_with_kills(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    name = "permits"
    ledger, stop = tmp_path / "ledger.jsonl", tmp_path / "stop"
    rng = random.Random(8)
    for seed in range(PROCESSES):
        procs.append(start_permit_worker(url, name, ledger, stop, seed))

    # The store's own view, polled all along: never more than LIMIT live grants,
    # dead holders included.
    monitor = leasehold.Client(url)
    store_counts: list[int] = []
    watching = True

    def watch() -> None:
        while watching:
            store_counts.append(len(monitor.holders(name)))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_until(lambda: len({r[2] for r in read_ledger(ledger)}) >= PROCESSES, 60, "all workers")
        kills: list[tuple[int, float]] = []  # holders killed while holding
        killed: dict[int, float] = {}  # every kill
        attempts = 0
        while len(kills) < KILLS:
            attempts += 1
            assert attempts < 20, "could not catch a holder to kill"
            time.sleep(0.3)
            alive = {p.pid for p in procs if p.poll() is None}
            # Only live workers: a worker killed earlier keeps its open 'start' forever.
            holding = {pid: rec for pid, rec in open_holds(ledger).items() if pid in alive}
            if not holding:
                continue
            victim = rng.choice(sorted(holding))
            proc = next(p for p in procs if p.pid == victim)
            proc.kill()
            killed_at = time.monotonic()
            proc.wait()
            killed[victim] = killed_at
            procs.append(start_permit_worker(url, name, ledger, stop, 100 + len(killed)))
            if open_holds(ledger).get(victim) != holding[victim]:
                continue  # it moved on just before the signal: not the hold we aimed at
            kills.append((victim, killed_at))
            time.sleep(PROC_TTL + BOUND)
        stop.write_text("stop")
        for proc in procs:
            if proc.returncode is None:
                proc.wait(30)
    finally:
        watching = False
        watcher.join(5)
        monitor.close()

    records = read_ledger(ledger)
    starts: dict[tuple[int, int], float] = {}
    holds: list[Hold] = []
    lost = 0
    for kind, fence, pid, at in records:  # type: ignore[misc]
        if kind == "start":
            starts[(pid, fence)] = at
        elif kind == "end":
            holds.append((starts.pop((pid, fence)), at, fence, pid))
        elif kind == "lost":
            starts.pop((pid, fence))
            lost += 1
    for (pid, fence), started in starts.items():
        assert pid in killed, f"worker {pid} left a hold open without being killed"
        holds.append((started, killed[pid], fence, pid))  # held until it was killed
    widest, steps = max_overlap(holds)
    peak = len(widest)
    assert max(store_counts) <= LIMIT, f"the store had {max(store_counts)} live grants"
    assert peak <= LIMIT, f"{peak} holders at once: {widest}; kills {killed}"
    assert peak == LIMIT  # the limit was also used fully
    assert lost == 0
    fences = [r[1] for r in records if r[0] == "start"]
    assert len(fences) == len(set(fences)), "a fence was issued twice"

    # A dead holder's permit comes back after its TTL: LIMIT holders at once again.
    reclaims = []
    for _pid, killed_at in kills:
        back = next((at for at, level in steps if at > killed_at and level == LIMIT), None)
        assert back is not None, "the dead holder's permit never came back"
        reclaims.append(back - killed_at)
    assert max(reclaims) < PROC_TTL + BOUND, reclaims
    print(
        f"\n{len(holds)} holds, peak {peak} (store peak {max(store_counts)}), "
        f"permits back after kill in {', '.join(f'{r:.2f}' for r in reclaims)} s"
    )
