"""Worker processes for the etcd failover tests (started with the spawn method).

``ledger_worker`` contends for one lock until a wall-clock stop time. Holding it,
it makes fenced writes to a SQLite ledger that rejects fences lower than the
highest it has seen (a resource with the S2 check), checking the lease before each
write. Every holding is logged as one JSON line: fence, the monotonic time the
grant returned, the time of the last check that passed (the end of the window the
holder acted in), and the ledger's verdicts. CLOCK_MONOTONIC is one clock for every
process of the host, so the windows of different processes can be compared.
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


def ledger_worker(url: str, name: str, ledger: str, log: str, stop_at: float, ttl: float) -> None:
    client = leasehold.Client(url)
    lock = client.lock(name, ttl=ttl)
    db = sqlite3.connect(ledger, timeout=30, isolation_level=None)
    rng = random.Random(os.getpid())
    with Path(log).open("a") as out:
        while time.time() < stop_at:
            try:
                lease = lock.acquire(timeout=max(0.1, stop_at - time.time()))
            except leasehold.AcquireTimeout:
                break
            except leasehold.StoreUnavailable:
                time.sleep(0.05)
                continue
            start = time.monotonic()
            last_ok = start
            accepted = rejected = 0
            lost = None
            for _step in range(rng.randint(3, 8)):
                try:
                    lease.check()
                except leasehold.LeaseLost as exc:
                    lost = exc.reason
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
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            time.sleep(rng.uniform(0, 0.02))
    db.close()
    client.close()
