"""A worker for the PostgreSQL ?durability=relaxed crash tests (spawned processes):
take one lock over and over, write to a fenced ledger under it (tests/_ledger.py),
and ride out the server's crash and restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import leasehold


def ledger_worker(
    url: str, name: str, ttl: float, hold: float, directory: str, stop: str, limit: float
) -> None:
    """Until ``stop`` exists (or ``limit`` seconds pass): acquire ``name``, write to
    the ledger every 10 ms for ``hold`` seconds while ``lease.check()`` passes,
    release. Store errors (the server is down) are waited out."""
    client = leasehold.Client(url)
    lock = client.lock(name, ttl=ttl)
    stop_path = Path(stop)
    ends = time.monotonic() + limit
    n = 0
    with Path(directory, f"ledger.{os.getpid()}.jsonl").open("a") as ledger:

        def note(kind: str, fence: int, at: float) -> None:
            ledger.write(json.dumps([kind, os.getpid(), n, fence, at]) + "\n")
            ledger.flush()

        while not stop_path.exists() and time.monotonic() < ends:
            try:
                lease = lock.acquire(timeout=1.0)
            except leasehold.AcquireTimeout:
                continue
            except leasehold.StoreUnavailable:
                time.sleep(0.05)
                continue
            n += 1
            note("grant", lease.fence, time.monotonic())
            until = time.monotonic() + hold
            try:
                while time.monotonic() < until:
                    at = time.monotonic()  # read before the check: the write's time
                    lease.check()
                    note("write", lease.fence, at)
                    time.sleep(0.01)
            except leasehold.LeaseLost:
                pass
            lease.release()
    client.close()
