"""Worker processes for ``leasehold demo`` (``python -m leasehold.cli._demo_worker``).

    count URL COUNTER ROUNDS lock|nolock   increment a counter file ROUNDS times
    stale URL DATABASE NAME TTL            hold NAME, then (when told) write fenced

Both print ``ready`` (``stale``: ``ready FENCE``) and wait for a line on stdin, so
that the demo can start them all at once or freeze one at a chosen moment.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

from leasehold._errors import StaleFence
from leasehold._sync.client import Client

WORK = 0.001  # seconds of "work" between reading and writing the counter


def read_counter(path: Path) -> int:
    return int(path.read_text() or "0")


def write_counter(path: Path, value: int) -> None:
    # Write-then-rename: a reader sees the old or the new number, never half of
    # one. The read-modify-write as a whole stays racy, which is the point.
    scratch = path.with_name(f"{path.name}.{os.getpid()}")
    scratch.write_text(str(value))
    os.replace(scratch, path)


def increment(path: Path) -> None:
    value = read_counter(path)
    time.sleep(WORK)
    write_counter(path, value + 1)


def count(url: str, counter: str, rounds: int, locked: bool) -> None:
    path = Path(counter)
    with Client(url) as client:
        lock = client.lock("demo/counter", ttl=10.0)
        print("ready", flush=True)
        sys.stdin.readline()
        for _ in range(rounds):
            if locked:
                with lock:
                    increment(path)
            else:
                increment(path)


def fenced_write(database: str, name: str, fence: int, body: str) -> str:
    """One transaction: the fence check, then the write. "written" or "rejected N"."""
    from leasehold import fence as fencing

    conn = sqlite3.connect(database, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            fencing.check(conn, name, fence)
            conn.execute("UPDATE report SET body = ?, fence = ?", (body, fence))
        except StaleFence as exc:
            conn.execute("ROLLBACK")
            return f"rejected {exc.highest}"
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return "written"
    finally:
        conn.close()


def stale(url: str, database: str, name: str, ttl: float) -> None:
    with Client(url) as client:
        lease = client.lock(name, ttl=ttl).acquire(timeout=30)
        print(f"ready {lease.fence}", flush=True)
        # The demo freezes this process here (SIGSTOP) until long after the TTL.
        sys.stdin.readline()
        # Resumed: this holder checked its lease just before freezing and writes
        # now, as real code paused between "am I still the holder?" and the write
        # would. Only the fence can stop it.
        print(fenced_write(database, name, lease.fence, "written by A"), flush=True)


def main(argv: list[str]) -> int:
    # The demo narrates what happens; the library's own warnings (A's renewals
    # fail after it is resumed) would only clutter that.
    logging.getLogger("leasehold").addHandler(logging.NullHandler())
    logging.getLogger("leasehold").propagate = False
    role, *args = argv
    if role == "count":
        url, counter, rounds, mode = args
        count(url, counter, int(rounds), mode == "lock")
    elif role == "stale":
        url, database, name, ttl = args
        stale(url, database, name, float(ttl))
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
