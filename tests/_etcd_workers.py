"""Worker processes for the etcd failover tests (started with the spawn method).

``ledger_worker`` contends for one lock until a wall-clock stop time. Holding it,
it makes fenced writes to a SQLite ledger that rejects fences lower than the
highest it has seen (a resource with the S2 check), checking the lease before each
write. Every holding is logged as one JSON line: fence, the monotonic time the
grant returned, the time of the last check that passed (the end of the window the
holder acted in), and the ledger's verdicts. CLOCK_MONOTONIC is one clock for every
process of the host, so the windows of different processes can be compared.

The partition tests (tests/test_etcd_partition.py) also pass a ``tag`` (which
member(s) the worker's URL names), a range of steps per holding (long holds for the
workers whose holder the test partitions), a ``holding`` file the worker rewrites
at each grant (so the test can cut the member that serves the current holder) and
a ``stop_file`` that ends the run early. A holding that ends in a failed check also
logs when the check failed and the safe deadline (``Lease.deadline``) that passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import time
from pathlib import Path

import leasehold


def fenced_write(db: sqlite3.Connection, fence: int, pid: int) -> bool:
    """The resource: accept a write only with a fence >= the highest seen."""
    db.execute("BEGIN IMMEDIATE")
    try:
        (highest,) = db.execute("SELECT highest FROM fence").fetchone()
        if fence < highest:
            db.execute("COMMIT")
            return False
        db.execute("UPDATE fence SET highest = ?", (fence,))
        db.execute("INSERT INTO writes VALUES (?, ?, ?)", (fence, pid, time.monotonic()))
        db.execute("COMMIT")
        return True
    except BaseException:
        db.execute("ROLLBACK")
        raise


def init_ledger(path: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS fence (highest INTEGER NOT NULL)")
    db.execute("INSERT INTO fence VALUES (0)")
    db.execute("CREATE TABLE IF NOT EXISTS writes (fence INTEGER, pid INTEGER, at REAL)")
    db.close()


def ledger_worker(
    url: str,
    name: str,
    ledger: str,
    log: str,
    stop_at: float,
    ttl: float,
    tag: str = "",
    steps: tuple[int, int] = (3, 8),
    holding: str | None = None,
    stop_file: str | None = None,
) -> None:
    client = leasehold.Client(url)
    lock = client.lock(name, ttl=ttl)
    db = sqlite3.connect(ledger, timeout=30, isolation_level=None)
    rng = random.Random(os.getpid())

    def stopping() -> bool:
        return time.time() >= stop_at or (stop_file is not None and Path(stop_file).exists())

    with Path(log).open("a") as out:
        while not stopping():
            try:
                # Short waits, so a stop file is seen within a couple of seconds.
                lease = lock.acquire(timeout=max(0.1, min(2.0, stop_at - time.time())))
            except leasehold.AcquireTimeout:
                continue
            except leasehold.StoreUnavailable:
                time.sleep(0.05)
                continue
            start = time.monotonic()
            if holding is not None:
                status = f"{holding}.{os.getpid()}"
                Path(status).write_text(json.dumps([tag, os.getpid(), lease.fence, start]))
                os.replace(status, holding)
            last_ok = start
            accepted = rejected = 0
            lost = None
            lost_at = deadline = None
            for _step in range(rng.randint(*steps)):
                try:
                    lease.check()
                except leasehold.LeaseLost as exc:
                    lost = exc.reason
                    lost_at = time.monotonic()
                    deadline = lease.deadline
                    break
                last_ok = time.monotonic()
                if fenced_write(db, lease.fence, os.getpid()):
                    accepted += 1
                else:
                    rejected += 1
                time.sleep(0.03)
            with contextlib.suppress(leasehold.StoreUnavailable):
                lease.release()  # else it expires by itself
            record = {
                "pid": os.getpid(),
                "fence": lease.fence,
                "start": start,
                "end": last_ok,
                "accepted": accepted,
                "rejected": rejected,
                "lost": lost,
                "lost_at": lost_at,
                "deadline": deadline,
                "tag": tag,
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            time.sleep(rng.uniform(0, 0.02))
    db.close()
    client.close()
