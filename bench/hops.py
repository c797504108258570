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
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import FORK, now_ns
from bench.servers import PostgresServer

PROCESSES = 8
WARMUP = 1.5  # seconds before measuring: connections, LISTEN, prepared statements
WINDOW = 3.0  # seconds measured
SETUP = 60.0  # seconds for every worker to connect

# Which shared slot holds what: the latest release's start, and who made it.
RELEASE_START, RELEASER = range(2)


def _hz() -> int:
    return os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int:
    """utime + stime of a process, all its threads, in clock ticks (0 once gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _machine() -> tuple[int, int]:
    """(idle + iowait, all) ticks of every CPU since boot."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


def _worker(url: str, me: int, shared: Any, ready: Any, go: Any, out: Any) -> None:
    import leasehold

    try:
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
        ready.wait(SETUP)
        go.wait(SETUP)
        chains: list[tuple[int, int, int, int]] = []
        calls: list[int] = []
        count = 0
        end = time.monotonic() + WARMUP + WINDOW
        start = end - WINDOW
        while time.monotonic() < end:
            marks.clear()
            lease = lock.acquire()
            got = now_ns()
            released, by = shared[RELEASE_START], shared[RELEASER]
            measured = time.monotonic() >= start
            if measured:
                count += 1
            if measured and by not in (0, me) and "heard" in marks and "woken" in marks:
                chains.append(
                    (marks["heard"] - released, marks["woken"] - marks["heard"],
                     got - marks["woken"], got - released)
                )  # fmt: skip
            os.sched_yield()
            began = now_ns()
            shared[RELEASER], shared[RELEASE_START] = me, began
            lease.release()
            if measured:
                calls.append(now_ns() - began)
        client.close()
        out.send({"chains": chains, "calls": calls, "count": count})
    except BaseException as exc:
        ready.abort()
        go.abort()
        out.send({"fatal": repr(exc)[:300]})
    out.close()


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
    shared = FORK.RawArray("q", 2)
    ready, go = FORK.Barrier(PROCESSES + 1), FORK.Barrier(PROCESSES + 1)
    workers, pipes = [], []
    for me in range(1, PROCESSES + 1):
        here, there = FORK.Pipe(duplex=False)
        process = FORK.Process(
            target=_worker, args=(url, me, shared, ready, go, there), daemon=True
        )
        process.start()
        there.close()
        workers.append(process)
        pipes.append(here)
    try:
        ready.wait(SETUP)
        with psycopg.connect(server.url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pid, query LIKE 'LISTEN%%' FROM pg_stat_activity "
                "WHERE application_name = %s",
                (tag,),
            ).fetchall()
        backends = {int(pid): bool(listening) for pid, listening in rows}
        go.wait(SETUP)
        time.sleep(WARMUP)
        clients = [process.pid for process in workers if process.pid is not None]
        before = {pid: _ticks(pid) for pid in [*clients, *backends]}
        machine = _machine()
        time.sleep(WINDOW)
        spent = {pid: _ticks(pid) - ticks for pid, ticks in before.items()}
        idle, total = (b - a for a, b in zip(machine, _machine(), strict=True))
        results = [pipe.recv() for pipe in pipes]
    finally:
        for process in workers:
            process.join(WARMUP + WINDOW + 30)
            if process.is_alive():
                process.kill()
    fatal = [r["fatal"] for r in results if "fatal" in r]
    if fatal:
        raise RuntimeError(f"a worker failed: {fatal[0]}")
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
