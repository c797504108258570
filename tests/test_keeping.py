"""Leases that keep themselves, and loss that is never silent (real processes).

Timing bounds are generous (TTL 1 s); speed is measured in bench/, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import leasehold
from leasehold._async import _concurrency as concurrency
from leasehold._async.backends.memory import AsyncMemoryStore
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.records import RenewItem
from leasehold._core.url import parse
from leasehold._sync._concurrency import Event
from leasehold._sync.backends import open_store
from leasehold._sync.keeper import Keeper
from leasehold._sync.store import Store
from leasehold.testing import BackendHarness, CountingStore, FaultyStore

ROOT = Path(__file__).resolve().parent.parent
TTL = 1.0
BOUND = 1.5  # seconds beyond the TTL that re-acquisition may take on a busy 2-core CI box


def start_holder(
    url: str, name: str, ready: Path, *, renew: bool = True
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests._workers",
            "hold",
            url,
            name,
            str(TTL),
            str(ready),
            "1" if renew else "0",
        ],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, "holder died before acquiring"
        assert time.monotonic() < deadline, "holder never acquired"
        time.sleep(0.01)
    return proc


def wait_for(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)
    return path.read_text()


def wait_for_renewal(client: leasehold.Client, name: str, timeout: float = 5.0) -> None:
    """Return as soon as the holder's expiry in the store has moved on."""
    deadline = time.monotonic() + timeout

    def expiry() -> float:
        [info] = client.holders(name)
        return time.monotonic() + info.expires_in

    first = expiry()
    while expiry() < first + 0.05:
        assert time.monotonic() < deadline, "the holder never renewed"
        time.sleep(0.005)


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
def test_paused_holder_is_replaced_and_learns_it(
    shared_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    client = leasehold.Client(shared_url)
    delays = []
    for trial in range(3):
        name = f"paused:{trial}:{os.getpid()}"
        ready = tmp_path / f"ready{trial}"
        proc = start_holder(shared_url, name, ready)
        procs.append(proc)
        fence = json.loads(ready.read_text())["fence"]
        # Stop it just after a renewal committed, so the pause falls between its
        # store calls: frozen *inside* one, it would hold SQLite's write lock.
        wait_for_renewal(client, name)
        proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        lease = client.lock(name, ttl=TTL).acquire(timeout=TTL + BOUND + 5)
        delays.append(time.monotonic() - stopped)
        assert lease.fence > fence
        time.sleep(max(0.0, 3 * TTL - (time.monotonic() - stopped)))
        proc.send_signal(signal.SIGCONT)
        reason = wait_for(Path(f"{ready}.exited"), 10)
        assert reason.startswith("LeaseLost")
        assert Path(f"{ready}.lost").exists()
        assert Path(f"{ready}.checked").exists()
        assert lease.held  # the successor is untouched by the resumed holder
        lease.release()
    client.close()
    assert max(delays) < TTL + BOUND, delays
    print(
        f"\nre-acquire after SIGSTOP: median {statistics.median(delays):.3f} s, max {max(delays):.3f} s"
    )


@pytest.mark.slow
def test_killed_holder_is_replaced_within_ttl(
    shared_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    client = leasehold.Client(shared_url)
    delays = []
    for trial in range(5):
        name = f"killed:{trial}:{os.getpid()}"
        ready = tmp_path / f"ready{trial}"
        proc = start_holder(shared_url, name, ready)
        procs.append(proc)
        fence = json.loads(ready.read_text())["fence"]
        time.sleep(0.2)
        proc.kill()
        killed = time.monotonic()
        lease = client.lock(name, ttl=TTL).acquire(timeout=TTL + BOUND + 5)
        delays.append(time.monotonic() - killed)
        assert lease.fence > fence
        lease.release()
    client.close()
    assert max(delays) < TTL + BOUND, delays
    print(
        f"\nre-acquire after SIGKILL: median {statistics.median(delays):.3f} s, max {max(delays):.3f} s"
    )


def test_blocked_event_loop_cancels_body(lh_backend: BackendHarness) -> None:
    url = lh_backend.fresh_url()
    name = lh_backend.unique()
    reached_after_block = False

    async def scenario() -> None:
        nonlocal reached_after_block
        async with leasehold.AsyncClient(url) as client:
            with pytest.raises(leasehold.LeaseLost):
                async with client.lock(name, ttl=TTL) as lease:
                    time.sleep(TTL * 1.5)  # blocks the loop: the keeper cannot renew
                    await asyncio.sleep(2)  # cancelled here once the loop resumes
                    reached_after_block = True
            assert lease.lost and not lease.held
            await asyncio.sleep(TTL)
            assert lease.lost and not lease.held  # never reported held again
            assert client.statistics().lost == 1

    asyncio.run(scenario())
    assert not reached_after_block


def test_caller_cancellation_is_not_turned_into_lease_lost(lh_backend: BackendHarness) -> None:
    url = lh_backend.fresh_url()

    async def scenario() -> None:
        async with leasehold.AsyncClient(url) as client:

            async def body() -> None:
                async with client.lock(lh_backend.unique(), ttl=TTL):
                    await asyncio.sleep(10)

            task = asyncio.ensure_future(body())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1), client.lock(lh_backend.unique(), ttl=TTL):
                    await asyncio.sleep(10)
            assert [i for i in await client.leases() if i.owner == client.holder.owner] == []

    asyncio.run(scenario())


def test_long_job_with_renewal_is_never_lost(lh_backend: BackendHarness) -> None:
    client = leasehold.Client(lh_backend.fresh_url())
    ttl = 0.5
    with client.lock(lh_backend.unique(), ttl=ttl) as lease:
        fence = lease.fence
        end = time.monotonic() + 10 * ttl
        while time.monotonic() < end:
            lease.check()
            time.sleep(0.05)
        assert lease.fence == fence and lease.held
        assert [h.fence for h in client.holders(lease.name)] == [fence]
    stats = client.statistics()
    assert stats.lost == 0 and stats.renewed >= 15
    client.close()


def _faulty_client(url: str) -> tuple[leasehold.Client, FaultyStore]:
    store = FaultyStore(open_store(parse(url), SYSTEM_CLOCK))
    return leasehold.Client(store=store), store


def test_transient_renewal_errors_are_not_loss(lh_backend: BackendHarness) -> None:
    client, store = _faulty_client(lh_backend.fresh_url())
    lease = client.lock(lh_backend.unique(), ttl=1.5).acquire(timeout=5)
    store.fail("renew", times=2)
    time.sleep(2.5)  # two failed rounds, then success: well past the first deadline
    assert store.failures["renew"] == 2
    assert lease.held
    assert client.statistics().renewal_failures == 2
    lease.release()
    client.close()


def test_persistent_renewal_errors_are_reported_at_the_deadline(
    lh_backend: BackendHarness,
) -> None:
    client, store = _faulty_client(lh_backend.fresh_url())
    lost_at: list[float] = []
    lease = client.lock(
        lh_backend.unique(), ttl=1.0, on_lost=lambda _: lost_at.append(time.monotonic())
    ).acquire(timeout=5)
    store.fail("renew", times=None)
    assert lease.wait_lost(timeout=5)
    assert lost_at, "on_lost was not called"
    deadline = lease.deadline
    assert lost_at[0] >= deadline - 0.01  # not before: a transient error is not loss
    assert lost_at[0] <= deadline + 0.25  # and promptly at the safe deadline
    with pytest.raises(leasehold.LeaseLost):
        lease.check()
    store.heal()
    client.close()


def test_hanging_renewal_does_not_delay_the_news_of_loss(lh_backend: BackendHarness) -> None:
    client, store = _faulty_client(lh_backend.fresh_url())
    lost_at: list[float] = []
    lease = client.lock(
        lh_backend.unique(), ttl=1.0, on_lost=lambda _: lost_at.append(time.monotonic())
    ).acquire(timeout=5)
    store.hang("renew", 4.0)  # a dead network path: the call neither answers nor fails
    assert lease.wait_lost(timeout=3)
    assert lost_at and lost_at[0] <= lease.deadline + 0.25
    store.heal()
    client.close()


def test_renewal_refused_is_loss_at_once(lh_backend: BackendHarness) -> None:
    client = leasehold.Client(lh_backend.fresh_url())
    lease = client.lock(lh_backend.unique(), ttl=1.0).acquire(timeout=5)
    client.break_lease(lease.name)
    started = time.monotonic()
    assert lease.wait_lost(timeout=3)
    assert time.monotonic() - started < 0.6  # the next renewal (ttl/3) finds out
    with pytest.raises(leasehold.LeaseLost, match="no longer held"):
        lease.check()
    client.close()


def test_lease_can_be_handed_to_another_thread(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    lease = client.lock(lh_backend.unique()).acquire(timeout=5)
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(lease.release()))
    thread.start()
    thread.join()
    assert results == [True]
    assert client.holders(lease.name) == []


@pytest.mark.slow
def test_fork_child_never_touches_parent_lease(shared_url: str, tmp_path: Path) -> None:
    client = leasehold.Client(shared_url)
    lease = client.lock(f"fork:{os.getpid()}", ttl=TTL).acquire(timeout=5)
    report = tmp_path / "child.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # child
        try:
            outcome = {"held": lease.held, "lost": lease.lost, "release": lease.release()}
            try:
                lease.extend()
                outcome["extend"] = "ok"
            except leasehold.LeaseLost:
                outcome["extend"] = "LeaseLost"
            time.sleep(0.2)
            outcome["renewing_threads"] = sum(
                t.name == "leasehold-keeper" for t in threading.enumerate()
            )
            report.write_text(json.dumps(outcome))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    outcome = json.loads(report.read_text())
    assert outcome == {
        "held": False,
        "lost": True,
        "release": False,
        "extend": "LeaseLost",
        "renewing_threads": 0,
    }
    time.sleep(3 * TTL)  # the parent keeps renewing
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, leasehold; c = leasehold.Client(sys.argv[1]); "
            "print(c.lock(sys.argv[2]).try_acquire() is None, [h.fence for h in c.holders(sys.argv[2])])",
            shared_url,
            lease.name,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert check.stdout.strip() == f"True [{lease.fence}]"
    assert lease.held
    lease.release()
    client.close()


def test_cancelled_release_still_releases(lh_backend: BackendHarness) -> None:
    url = lh_backend.fresh_url()

    async def scenario() -> None:
        async with leasehold.AsyncClient(url) as client:
            for delay in (0.0, 0.0005, 0.002):
                lease = await client.lock(lh_backend.unique()).acquire(timeout=5)
                task = asyncio.ensure_future(lease.release())
                await asyncio.sleep(delay)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.sleep(0.05)
                assert await client.holders(lease.name) == []

    asyncio.run(scenario())


class _StallingFirstRelease(AsyncMemoryStore):
    """Its first release never reaches the store: it waits until cancelled."""

    stalls = 1

    async def release(self, name: str, token: str) -> bool:
        if self.stalls:
            self.stalls -= 1
            await asyncio.sleep(3600)
        return await super().release(name, token)


@pytest.mark.parametrize("restarts", [True, False], ids=["restarted", "control-not-restarted"])
def test_a_release_cancelled_before_the_store_saw_it_runs_again(
    monkeypatch: pytest.MonkeyPatch, restarts: bool
) -> None:
    """A store whose calls cancel cleanly runs a release in the caller's task (no
    task of its own): cancelled there, the release starts again in the background.
    The control drops that restart, and the name stays held."""
    assert AsyncMemoryStore.capabilities.cancels_cleanly
    if not restarts:
        monkeypatch.setattr(concurrency, "in_background", lambda fn: None)

    async def scenario() -> list[object]:
        store = _StallingFirstRelease(parse("memory://"), SYSTEM_CLOCK)
        async with leasehold.AsyncClient(store=store) as client:
            lease = await client.lock("stalled-release").acquire(timeout=5)
            task = asyncio.ensure_future(lease.release())
            await asyncio.sleep(0.01)
            assert not task.done()  # waiting inside the store's release
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            return list(await client.holders("stalled-release"))

    holders = asyncio.run(scenario())
    assert (holders == []) is restarts, holders


def _keeper_wakeups_under_a_long_lease(monkeypatch: pytest.MonkeyPatch) -> tuple[int, float]:
    """How often the keeper was woken (its sleep ended early) while 50 short locks
    were taken and released, one every 2 ms, beside one long lease (as a leader's
    beside its jobs' locks), and the seconds that took."""
    woken = 0
    original = Event.wait

    def counted(self: Event, timeout: float | None = None) -> bool:
        nonlocal woken
        early = original(self, timeout)
        woken += early
        return early

    with leasehold.Client("memory://keeper-wakeups") as client:
        long = client.lock("long", ttl=60).acquire()
        time.sleep(0.05)  # the keeper's first round, then asleep
        # Only the keeper's event: other events (a lease's) are not counted.
        monkeypatch.setattr(
            client._context.keeper._wakeup, "wait", counted.__get__(client._context.keeper._wakeup)
        )
        started = time.monotonic()
        for i in range(50):
            client.lock(f"short-{i}", ttl=3).acquire().release()
            time.sleep(0.002)
        during, elapsed = woken, time.monotonic() - started
        long.release()
    return during, elapsed


def test_short_locks_beside_a_long_lease_do_not_wake_the_keeper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The keeper sleeps no longer than the shortest lead time (grant to first
    renewal) it has seen, so a short lock granted while a long lease is held is due
    after the keeper's next look: only the first short lock wakes it."""
    woken, elapsed = _keeper_wakeups_under_a_long_lease(monkeypatch)
    assert woken <= 2, (woken, elapsed)


def test_keeper_wakeup_check_fires_when_every_lease_wakes_the_keeper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control: a keeper woken at every track() (as before the lead-time cap, when
    a long lease let it sleep past every short lock's first renewal) is counted."""
    track = Keeper.track

    def waking(self: Keeper, lease: Any) -> None:
        track(self, lease)
        self._wakeup.set()

    monkeypatch.setattr(Keeper, "track", waking)
    woken, elapsed = _keeper_wakeups_under_a_long_lease(monkeypatch)
    assert woken >= 25, (woken, elapsed)


def test_a_keeper_woken_with_nothing_due_looks_at_no_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """10,000 leases held and one short lease seen once: the keeper then looks
    every 0.3 s (the short lease's lead time), and each look before anything is
    due costs no pass over the leases (no round)."""
    rounds = 0
    original = Keeper._round

    def counted(self: Keeper) -> float:
        nonlocal rounds
        rounds += 1
        return original(self)

    monkeypatch.setattr(Keeper, "_round", counted)
    with leasehold.Client("memory://keeper-rounds") as client:
        leases = [client.lock(f"many:{i}", ttl=30).acquire() for i in range(10_000)]
        client.lock("short", ttl=1).acquire().release()
        time.sleep(0.5)  # the round the short lease asked for
        before = rounds
        time.sleep(2.0)  # about 6 looks at the 0.3 s lead time; no renewal due (9 s)
        assert rounds == before, (before, rounds)
        for lease in leases:
            lease.release()


def _extended_shorter(name: str) -> tuple[bool, list[float]]:
    """A 30 s lease extended to a 1 s TTL: whether it is still held 1.5 s later
    (the keeper renews it every third of a second from then), and when (seconds
    after the extend) its on_lost callback ran, if it did."""
    lost: list[float] = []
    with leasehold.Client(f"memory://{name}") as client:
        lease = client.lock(
            "shortened", ttl=30, on_lost=lambda _: lost.append(time.monotonic())
        ).acquire()
        time.sleep(0.1)  # the keeper's round, then asleep until about 9 s from now
        extended = time.monotonic()
        lease.extend(ttl=1.0)
        time.sleep(1.5)
        held = lease.held
        lease.release()
    return held, [at - extended for at in lost]


def test_a_lease_extended_to_a_shorter_ttl_is_renewed_on_time() -> None:
    """extend(ttl=...) with a shorter TTL brings the next renewal forward; the
    keeper hears of it (it would otherwise sleep past the new safe deadline: the
    lease expired unrenewed and its loss was reported only at the keeper's next
    round, seconds later)."""
    held, lost = _extended_shorter("extend-shorter")
    assert held and not lost, lost


def test_extend_check_fires_when_the_keeper_is_not_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: without reschedule() the lease is lost, and the check above fails."""
    monkeypatch.setattr(Keeper, "reschedule", lambda self, lease: None)
    held, _ = _extended_shorter("extend-shorter-control")
    assert not held


@pytest.mark.slow
def test_ten_thousand_leases_cost_one_renewal_call_per_interval(
    local_backend: BackendHarness,
) -> None:
    inner = open_store(parse(local_backend.fresh_url()), SYSTEM_CLOCK)
    store = CountingStore(inner)
    client = leasehold.Client(store=store)
    ttl = 3.0
    leases = [client.lock(f"many:{i}", ttl=ttl).acquire(timeout=5) for i in range(10_000)]
    # Count from a round that began after the last grant: on a loaded machine the
    # keeper may take its list while grants are still being made, and send it
    # after they end (a parallel run counted a first round of 9,435).
    deadline = time.monotonic() + 3 * ttl
    while 10_000 not in store.renew_items:
        assert time.monotonic() < deadline, store.renew_items
        time.sleep(0.02)
    store.calls.clear()
    store.renew_items.clear()
    time.sleep(ttl)  # about three renewal intervals
    assert 2 <= store.calls["renew"] <= 5, store.calls
    assert all(n == 10_000 for n in store.renew_items), store.renew_items
    assert all(lease.held for lease in leases)
    client.close()


class _PartlyAnswering(CountingStore):
    """Answers None (unknown, as a Redis Cluster does for a node that is down) for
    the renewal of every name in ``silent``."""

    def __init__(self, inner: Store, silent: set[str]) -> None:
        super().__init__(inner)
        self.silent = silent

    def renew(self, items: Sequence[RenewItem]) -> Sequence[bool | None]:
        answers = list(super().renew([item for item in items if item.name not in self.silent]))
        return [None if item.name in self.silent else answers.pop(0) for item in items]


def test_an_unanswered_renewal_is_retried_and_costs_only_its_own_lease() -> None:
    store = _PartlyAnswering(open_store(parse("memory://"), SYSTEM_CLOCK), {"silent"})
    client = leasehold.Client(store=store)
    try:
        kept = client.lock("answered", ttl=1.0).acquire(timeout=5)
        doomed = client.lock("silent", ttl=1.0).acquire(timeout=5)
        time.sleep(0.55)  # a renewal round or two, each partly unanswered
        assert doomed.held, "no answer is not a no: held until its safe deadline"
        time.sleep(1.05)  # past the ttl
        assert kept.held and not kept.lost
        assert doomed.lost
        stats = client.statistics()
        assert stats.lost == 1 and stats.renewal_failures >= 2
        # Unanswered items are retried sooner than the next regular round.
        assert store.calls["renew"] >= 4, store.calls
    finally:
        client.close()
