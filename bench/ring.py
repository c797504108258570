"""The ceiling of any hand-over that LISTEN/NOTIFY wakes, next to the advisory floor.

A lock that hands its place over and tells the next holder by NOTIFY cannot hand
over faster than a token passed around a ring of processes by NOTIFY alone: each
process LISTENs on its own channel (one LISTEN connection, as a leasehold process
has) and, woken, sends ``pg_notify`` to the next one from its other connection.
No table, no lock, no fence: one NOTIFY transaction per hop. The durable ring also
updates one row in that transaction, so every hop waits for a WAL flush, as a
durable grant does. PostgreSQL 15 signals every listening backend at every NOTIFY,
so the ring pays the same fan-out as a fleet of waiting processes.

Beside it, the advisory floor: the same processes looping
``pg_advisory_lock`` / ``pg_advisory_unlock`` on one key (what the contention
scenario's pg-advisory subject does, without its counter).

    python -m bench.ring URL               # prints one line per process count
    python -m bench.ring --member ...      # one process of a ring (internal)

Members are subprocesses, not multiprocessing children: the breakdown runs its
probes in daemonic processes, which may not have children of their own.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent  # where ``-m bench.ring`` imports from

SECONDS = 2.0  # the measured window of one run
SETUP = 30.0  # seconds for every member to connect before the window opens
REPEATS = 3
COUNTS = (2, 8)
KINDS = ("ring", "durable ring", "advisory")


def _member(url: str, kind: str, k: int, i: int, start_at: float) -> int:
    """One process: the hops (or advisory acquisitions) it made inside the window."""
    import psycopg

    op = psycopg.connect(url, autocommit=True)
    if kind == "advisory":
        while time.time() < start_at:
            time.sleep(0.001)
        end, count = time.monotonic() + SECONDS, 0
        while time.monotonic() < end:
            op.execute("SELECT pg_advisory_lock(7411)")
            op.execute("SELECT pg_advisory_unlock(7411)")
            count += 1
        return count
    listen = psycopg.connect(url, autocommit=True)
    listen.execute(f"LISTEN bench_ring_{i}")
    send = (
        "WITH u AS (UPDATE bench_ring SET hops = hops + 1 RETURNING hops) "
        "SELECT pg_notify(%s, '') FROM u"
        if kind == "durable ring"
        else "SELECT pg_notify(%s, '')"
    )
    following = (f"bench_ring_{(i + 1) % k}",)
    while time.time() < start_at:
        time.sleep(0.001)
    end, count = time.monotonic() + SECONDS, 0
    if i == 0:
        op.execute(send, following)
    while (left := end - time.monotonic()) > 0:
        woken = False
        for _ in listen.notifies(timeout=left, stop_after=1):
            woken = True
        if not woken:
            break
        count += 1
        op.execute(send, following)
    return count


def _run(url: str, kind: str, k: int) -> float:
    """Hops (acquisitions) per second of k member processes in one window."""
    start_at = time.time() + min(SETUP, 2.0 + 0.3 * k)
    members = []
    for i in range(k):
        command = [sys.executable, "-m", "bench.ring", "--member", url, kind, str(k), str(i)]
        members.append(
            subprocess.Popen(
                [*command, repr(start_at)], stdout=subprocess.PIPE, text=True, cwd=_ROOT
            )
        )
    total = 0
    try:
        for member in members:
            out, _ = member.communicate(timeout=SETUP + SECONDS + 10)
            total += int(out.strip().splitlines()[-1])
    finally:
        for member in members:
            if member.poll() is None:
                member.kill()
                member.wait(10)
    return total / SECONDS


def measure(url: str) -> dict[str, Any]:
    """Medians of REPEATS interleaved runs of every kind at every process count."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_ring (hops bigint NOT NULL)")
        conn.execute("TRUNCATE bench_ring")
        conn.execute("INSERT INTO bench_ring VALUES (0)")
    found: dict[str, Any] = {}
    for k in COUNTS:
        rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(REPEATS):
            for kind in KINDS:
                rates[kind].append(_run(url, kind, k))
        found[str(k)] = {kind: statistics.median(values) for kind, values in rates.items()}
    return found


def lines(found: dict[str, Any]) -> list[str]:
    out = []
    for k, rates in found.items():
        advisory = rates["advisory"] or float("nan")
        out.append(
            f"postgres NOTIFY ring, {k} processes (median of {REPEATS}): "
            f"{rates['ring']:.0f} hops/s = {rates['ring'] / advisory:.2f}x the advisory floor, "
            f"durable ring (a WAL flush per hop) {rates['durable ring']:.0f} hops/s = "
            f"{rates['durable ring'] / advisory:.2f}x; advisory floor "
            f"{rates['advisory']:.0f} acquisitions/s"
        )
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--member":
        url, kind, k, i, start_at = argv[1:6]
        print(_member(url, kind, int(k), int(i), float(start_at)))
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    found = measure(argv[0])
    print(json.dumps(found))
    for line in lines(found):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
