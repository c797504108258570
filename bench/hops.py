"""Where a hand-over's time goes when 8 processes contend for one PostgreSQL lock.

    python -m bench.probes postgres-hops

The 8-process PostgreSQL rows are bound by one chain, repeated for every
acquisition: the holder's release call (which makes the head waiter the holder and
NOTIFYs it, in one transaction), the notification reaching that waiter's LISTEN
thread, that thread waking the waiting one, and its acquire returning. Each worker
loops like a worker of scenario 2 (acquire, yield the CPU, release) and stamps
each link on CLOCK_MONOTONIC, which processes on one host share. Beside the chain:
how much of the machine stood idle (a chain bound by latency leaves CPUs idle),
and the CPU per acquisition in the clients, in the backends running their calls
and in their LISTEN backends (PostgreSQL 15 signals every listening backend of
the database at every NOTIFY).

Workers are subprocesses (``python -m bench.hops --member ...``), not
multiprocessing children: the breakdown runs its probes in daemonic processes,
which may not have children of their own. They share the latest release's stamp
through a small memory-mapped file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_ticks, now_ns
from bench.servers import PostgresServer

_ROOT = Path(__file__).resolve().parent.parent  # where ``-m bench.hops`` imports from

PROCESSES = 8
WARMUP = 1.5  # seconds before measuring: connections, LISTEN, prepared statements
WINDOW = 3.0  # seconds measured
SETUP = 30.0  # seconds for every worker to start and connect

# The shared file: the latest release's start (CLOCK_MONOTONIC ns) and who made it.
_STAMP = struct.Struct("qq")


def _hz() -> int:
    return os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[int, int]:
    """(idle + iowait, all) ticks of every CPU since boot."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


def _member(url: str, me: int, stamp_path: str, start_at: float) -> dict[str, Any]:
    """One worker: its acquisitions in the window and the hand-overs it received."""
    import leasehold

    with open(stamp_path, "r+b") as file:
        shared = mmap.mmap(file.fileno(), _STAMP.size)
    client = leasehold.Client(url)
    lock = client.lock("bench-hops", ttl=30)
    lock.acquire().release()
    store: Any = client._context.store  # the probe wraps two private hooks, no more
    marks: dict[str, int] = {}
    heard = store._dispatch

    def dispatch(channel: str, payload: str) -> None:
        marks["heard"] = now_ns()
        heard(channel, payload)

    # The LISTEN connection, made by the first acquire that queues, takes the
    # store's dispatch as it is then; one made already is told directly.
    store._dispatch = dispatch
    if store._listener is not None:
        store._listener._on_notify = dispatch
    wait = store.wait

    def waited(*args: Any) -> Any:
        result = wait(*args)
        marks["woken"] = now_ns()
        return result

    store.wait = waited
    while time.time() < start_at:
        time.sleep(0.001)
    chains: list[tuple[int, int, int, int]] = []
    calls: list[int] = []
    count = 0
    measure_from = time.monotonic() + WARMUP
    end = measure_from + WINDOW
    while (now := time.monotonic()) < end:
        marks.clear()
        lease = lock.acquire()
        got = now_ns()
        released, by = _STAMP.unpack_from(shared)
        measured = now >= measure_from
        if measured:
            count += 1
        if measured and by not in (0, me) and "heard" in marks and "woken" in marks:
            chains.append(
                (marks["heard"] - released, marks["woken"] - marks["heard"],
                 got - marks["woken"], got - released)
            )  # fmt: skip
        os.sched_yield()
        began = now_ns()
        _STAMP.pack_into(shared, 0, began, me)
        lease.release()
        if measured:
            calls.append(now_ns() - began)
    client.close()
    return {"chains": chains, "calls": calls, "count": count}


def _p50(values: list[int]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] / 1000 if ordered else float("nan")


def measure(server: PostgresServer, *, relaxed: bool = False) -> list[str]:
    import psycopg

    mode = "relaxed" if relaxed else "durable"
    tag = f"hops_{os.getpid()}_{mode}"
    url = f"{server.url}?application_name={tag}" + (
        "&schema=leasehold_relaxed&durability=relaxed" if relaxed else ""
    )
    fd, stamp_path = tempfile.mkstemp(prefix="leasehold-hops-")
    os.write(fd, bytes(_STAMP.size))
    os.close(fd)
    start_at = time.time() + min(SETUP, 2.0 + 0.3 * PROCESSES)
    command = [sys.executable, "-m", "bench.hops", "--member", url]
    workers = [
        subprocess.Popen(
            [*command, str(me), stamp_path, repr(start_at)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=_ROOT,
        )
        for me in range(1, PROCESSES + 1)
    ]
    try:
        time.sleep(max(0.0, start_at + WARMUP / 2 - time.time()))
        with psycopg.connect(server.url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pid, query LIKE 'LISTEN%%' FROM pg_stat_activity "
                "WHERE application_name = %s",
                (tag,),
            ).fetchall()
        backends = {int(pid): bool(listening) for pid, listening in rows}
        time.sleep(max(0.0, start_at + WARMUP - time.time()))
        clients = [worker.pid for worker in workers]
        before = {pid: cpu_ticks(pid) for pid in [*clients, *backends]}
        machine = _machine()
        time.sleep(WINDOW)
        spent = {pid: cpu_ticks(pid) - ticks for pid, ticks in before.items()}
        idle, total = (b - a for a, b in zip(machine, _machine(), strict=True))
        results = []
        for worker in workers:
            out, _ = worker.communicate(timeout=SETUP + WARMUP + WINDOW + 10)
            if worker.returncode != 0:
                raise RuntimeError(f"a worker exited with {worker.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
        os.unlink(stamp_path)
    acquisitions = sum(r["count"] for r in results)
    chains = [chain for r in results for chain in r["chains"]]
    calls = [call for r in results for call in r["calls"]]

    def cpu(pids: list[int]) -> float:
        return float(sum(spent[pid] for pid in pids) / _hz() * 1e6 / acquisitions)

    operation = [pid for pid, listening in backends.items() if not listening]
    listening = [pid for pid, listening in backends.items() if listening]
    links = [_p50([chain[i] for chain in chains]) for i in range(4)]
    return [
        f"postgres ({mode}) {PROCESSES} processes, one lock: {acquisitions / WINDOW:.0f} "
        f"acquisitions/s; the CPUs stood idle {idle / total:.0%} of the time",
        f"postgres ({mode}) one hand-over ({len(chains)}): p50 {links[3]:.0f} us from the "
        f"holder's release call to the next holder's acquire returning; link by link "
        f"(p50 of each): {links[0]:.0f} us until the notification reached the waiter's "
        f"LISTEN thread (the release call alone: {_p50(calls):.0f} us), {links[1]:.0f} us "
        f"until that thread woke the waiting one, {links[2]:.0f} us until its acquire "
        f"returned",
        f"postgres ({mode}) CPU per acquisition: {cpu(clients):.0f} us in the clients (all "
        f"threads), {cpu(operation):.0f} us in their {len(operation)} operation backends, "
        f"{cpu(listening):.0f} us in their {len(listening)} LISTEN backends",
    ]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--member"] and len(argv) == 5:
        url, me, stamp_path, start_at = argv[1:]
        print(json.dumps(_member(url, int(me), stamp_path, float(start_at))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
