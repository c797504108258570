"""Where the PostgreSQL client's own time goes, layer by layer (a probe).

One uncontended acquire + release, the same two SQL functions each time, sent
four ways from this process, interleaved in rounds (so a drift of the host moves
every layer alike):

1. ``sql``: leasehold's direct path (``run_direct``, the statements the store
   prepares) on a bare psycopg connection: the least any Python client pays;
2. ``store, no deadline``: the store contract's ``acquire`` + ``release`` without
   the operation deadline that wraps every store call (``bounds.py``);
3. ``store``: the same calls as every primitive makes them, deadline included;
4. ``lock``: the whole client, ``Lock.acquire()`` + ``Lease.release()``: the
   lease object, the keeper, events and metrics.

Each layer prints its p50 and the CPU of the calling thread per pair (thread
time: the keeper, listener and pool threads are not in it). The differences are
what each layer adds to the targets' uncontended PostgreSQL rows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.subjects import RELAXED

ROUNDS = 9
PAIRS = 500
WARMUP = 200
# The relaxed durability in a schema of its own, as the benchmark's subjects use.
RELAXED_QUERY = f"?{RELAXED}"


def _measure(fn: Callable[[], Any]) -> tuple[float, float]:
    """(p50 µs, the calling thread's CPU µs) of ``fn`` over PAIRS calls."""
    samples = []
    cpu = time.thread_time()
    for _ in range(PAIRS):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    cpu = time.thread_time() - cpu
    samples.sort()
    return samples[PAIRS // 2] / 1000, cpu / PAIRS * 1e6


def layers(url: str) -> dict[str, tuple[float, float]]:
    """Median over ROUNDS of each layer's (p50 µs, CPU µs) per acquire + release."""
    import psycopg

    import leasehold
    from leasehold._core.records import AcquireRequest
    from leasehold._sync.backends.postgres.direct import run_direct
    from leasehold._sync.lock import new_token

    client = leasehold.Client(url)
    try:
        lock = client.lock("layers-lock", ttl=30)
        lock.acquire().release()  # schema, pool and LISTEN in place
        store: Any = client.store
        holder = client._context.holder
        acquire_call, release_call = store._direct["acquire"], store._direct["release"]
        channel = store._listening_channel()
        # What the store sends for a lock's first attempt: queue if busy, wake me.
        request = lock._request(new_token(), holder, queue=True)

        def _request(name: str, token: str) -> AcquireRequest:
            # As the lock builds its own (a dataclass call; dataclasses.replace would
            # cost microseconds of its own).
            return AcquireRequest(
                name=name,
                token=token,
                holder=holder,
                ttl=request.ttl,
                limit=request.limit,
                queue_ttl=request.queue_ttl,
            )

        acquire_unbounded = type(store).acquire.__wrapped__
        release_unbounded = type(store).release.__wrapped__
        prepare = store._prepare

        with psycopg.connect(store._opts.conninfo, autocommit=True) as conn:

            def sql() -> None:
                token = new_token()
                args = (
                    "layers-sql", token, holder.owner, holder.host, holder.pid,
                    float(request.ttl), request.limit, float(request.queue_ttl or 0),
                    channel, "k" * 32,
                )  # fmt: skip
                run_direct(conn, acquire_call, args, prepare=prepare)
                run_direct(conn, release_call, ("layers-sql", token), prepare=prepare)

            def unbounded() -> None:
                token = new_token()
                acquire_unbounded(store, _request("layers-raw", token))
                release_unbounded(store, "layers-raw", token)

            def bounded() -> None:
                token = new_token()
                store.acquire(_request("layers-store", token))
                store.release("layers-store", token)

            def whole() -> None:
                lock.acquire().release()

            subjects = {
                "sql": sql,
                "store, no deadline": unbounded,
                "store": bounded,
                "lock": whole,
            }
            for fn in subjects.values():
                for _ in range(WARMUP):
                    fn()
            found: dict[str, list[tuple[float, float]]] = {name: [] for name in subjects}
            for _ in range(ROUNDS):
                for name, fn in subjects.items():
                    found[name].append(_measure(fn))
    finally:
        client.close()
    return {
        name: (
            statistics.median(p50 for p50, _ in runs),
            statistics.median(cpu for _, cpu in runs),
        )
        for name, runs in found.items()
    }


def lines(url: str, *, relaxed: bool) -> list[str]:
    mode = "relaxed" if relaxed else "durable"
    found = layers(url)
    base_p50, base_cpu = found["sql"]
    shown = []
    for name, (p50, cpu) in found.items():
        extra = "" if name == "sql" else f" ({p50 - base_p50:+.0f}, {cpu - base_cpu:+.0f})"
        shown.append(f"{name} {p50:.0f} us, CPU {cpu:.0f} us{extra}")
    return [
        f"postgres ({mode}) one acquire+release by layer, p50 and the calling thread's CPU "
        f"(median of {ROUNDS} interleaved rounds of {PAIRS}; in brackets, more than sql): "
        + "; ".join(shown)
    ]


def both(url: str) -> list[str]:
    """The lines of both durabilities (relaxed in its own schema, as the subjects)."""
    return lines(url, relaxed=False) + lines(url + RELAXED_QUERY, relaxed=True)
