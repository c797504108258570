"""Worker processes for the multi-process tests (run with the spawn start method or
``python -m tests._workers``)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import leasehold


def counter_worker(url: str, name: str, rounds: int, counter: str, log: str, ttl: float) -> None:
    """Increment a counter file with a deliberately non-atomic read-modify-write,
    under the lock, and log (pid, fence, value read) in acquisition order."""
    client = leasehold.Client(url)
    lock = client.lock(name, ttl=ttl)
    counter_path, log_path = Path(counter), Path(log)
    waits = []
    for _ in range(rounds):
        started = time.monotonic()
        with lock as lease:
            waits.append(time.monotonic() - started)
            value = int(counter_path.read_text() or "0")
            time.sleep(0)  # let another process run here if it wrongly could
            counter_path.write_text(str(value + 1))
            with log_path.open("a") as fh:
                fh.write(json.dumps([os.getpid(), lease.fence, value]) + "\n")
    with Path(log + f".{os.getpid()}.waits").open("w") as fh:
        json.dump(waits, fh)
    client.close()


def redis_counter_worker(url: str, name: str, rounds: int, redis_url: str, log: str) -> None:
    """The same non-atomic read-modify-write, on a counter kept in Redis (GET, then SET)."""
    import redis

    data = redis.Redis.from_url(redis_url)
    client = leasehold.Client(url)
    lock = client.lock(name, ttl=10.0)
    with Path(log).open("a") as fh:
        for _ in range(rounds):
            with lock as lease:
                value = int(data.get(f"counter:{name}") or 0)
                time.sleep(0)
                data.set(f"counter:{name}", value + 1)
                fh.write(json.dumps([os.getpid(), lease.fence, value]) + "\n")
                fh.flush()
    data.close()
    client.close()


def hold_worker(url: str, name: str, ttl: float, ready: str, renew: bool = True) -> None:
    """Hold ``name`` inside a ``with`` block until the lease is lost or the process
    is killed. Reports through files next to ``ready``: the fence (``ready``), the
    on_lost callback (``.lost``), ``check()`` after resuming (``.checked``) and the
    exception the ``with`` block raised (``.exited``)."""

    def lost(lease: leasehold.Lease) -> None:
        Path(ready + ".lost").write_text(str(lease.fence))

    client = leasehold.Client(url)
    try:
        with client.lock(name, ttl=ttl, renew=renew, on_lost=lost) as lease:
            tmp = ready + ".tmp"
            Path(tmp).write_text(json.dumps({"fence": lease.fence, "pid": os.getpid()}))
            os.replace(tmp, ready)
            while not lease.lost:
                time.sleep(0.02)
            try:
                lease.check()
            except leasehold.LeaseLost as exc:
                Path(ready + ".checked").write_text(exc.reason)
    except leasehold.LeaseLost as exc:
        Path(ready + ".exited").write_text(type(exc).__name__ + ": " + exc.reason)
    time.sleep(3600)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "hold":
        url, name, ttl, ready, renew = args
        hold_worker(url, name, float(ttl), ready, renew == "1")
    else:
        raise SystemExit(f"unknown worker {command}")
