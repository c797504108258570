"""Scenario 4: a herd of waiters (asyncio tasks) on one lock.

The main task holds the lock while W tasks queue for it. Once they have all asked,
it releases, and the waiters pass the lock down the line: each one stamps the
time, releases, and the next one's acquire return ends a handoff. We count store
operations per handoff (a counting wrapper around the store; on Redis also the
commands the server ran) and the handoff latency. The same chain runs with
redis-py's asyncio Lock for comparison (server-side counts only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import count_warnings, isolated, now_ns, percentile
from bench.renewal import redis_counters
from bench.subjects import leasehold_url

BACKENDS = ("memory", "sqlite", "redis", "postgres")
QUEUE_BUDGET = 60.0  # seconds for all waiters to enqueue
CANCEL_BUDGET = 5.0  # seconds for cancelled waiters to finish
SETTLE = 1.0  # seconds of steady waiting before the first release (idle cost measured)


def _counting(inner: Any) -> Any:
    """``inner`` wrapped so that every store operation is counted (``.calls``).

    Built from the contract's abstract methods, so it keeps up when the contract
    grows an operation.
    """
    import leasehold

    calls: Counter[str] = Counter()

    def forward(op: str) -> Any:
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[op] += 1
            return await getattr(inner, op)(*args, **kwargs)

        return method

    ops = sorted(leasehold.AsyncStore.__abstractmethods__)
    namespace = {op: forward(op) for op in ops}
    namespace["aclose"] = lambda self: inner.aclose()
    cls = type("CountingAsyncStore", (leasehold.AsyncStore,), namespace)
    store = cls()
    store.url = inner.url
    store.capabilities = inner.capabilities
    store.calls = calls
    return store


class Chain:
    """Waiters pass the lock down the line; records handoffs until ``target``."""

    def __init__(self, target: int, snapshot: Callable[[], Any]) -> None:
        self.target = target
        self.snapshot = snapshot
        self.last_release = 0
        self.latencies: list[int] = []
        self.at_target: Any = None
        self.done = asyncio.Event()
        self.asking = 0  # waiters that have called acquire

    async def waiter(self, acquire: Callable[[], Awaitable[Any]],
                     release: Callable[[Any], Awaitable[Any]]) -> None:  # fmt: skip
        self.asking += 1
        held = await acquire()
        self.latencies.append(now_ns() - self.last_release)
        if len(self.latencies) == self.target:
            self.at_target = self.snapshot()
            self.done.set()
            return  # keep holding: the rest of the herd stays queued until cancelled
        self.last_release = now_ns()
        await release(held)


async def _herd(
    acquire: Callable[[], Awaitable[Any]],
    release: Callable[[Any], Awaitable[Any]],
    calls: Callable[[], Counter[str]],
    waiters: int,
    handoffs: int,
    budget: float,
) -> dict[str, Any]:
    first = await acquire()
    chain = Chain(handoffs, calls)
    tasks = [asyncio.create_task(chain.waiter(acquire, release)) for _ in range(waiters)]
    # Every waiter has asked once it called acquire and the store saw a waiter
    # (leasehold queues a client's waiters locally: only the first asks the store).
    queued_by = time.monotonic() + QUEUE_BUDGET
    while (chain.asking < waiters or calls()["acquire"] < 2) and time.monotonic() < queued_by:
        await asyncio.sleep(0.05)
    queued_after = QUEUE_BUDGET - (queued_by - time.monotonic())
    idle0 = calls()
    await asyncio.sleep(SETTLE)
    idle1 = calls()
    before = calls()
    t0 = time.perf_counter()
    chain.last_release = now_ns()
    await release(first)
    with contextlib.suppress(TimeoutError):  # report the handoffs that did happen
        await asyncio.wait_for(chain.done.wait(), budget)
    elapsed = time.perf_counter() - t0
    after = chain.at_target if chain.at_target is not None else calls()
    for task in tasks:
        task.cancel()
    # Cancelled waiters clean up (leasehold releases their queue places); bounded.
    _, stuck = await asyncio.wait(tasks, timeout=CANCEL_BUDGET)
    done = len(chain.latencies)
    latencies = sorted(chain.latencies)
    # Keys starting with "server_" are what the Redis server counted, not store calls.
    store = {k: (after[k] - before[k]) / done for k in after if not k.startswith("server_")}
    server = {k: (after[k] - before[k]) / done for k in after if k.startswith("server_")}
    return {
        "waiters": waiters,
        "handoffs": done,
        "complete": done >= handoffs,
        "queued_after_s": queued_after,
        "idle_ops_per_s": _ops(idle1, idle0, store=True) / SETTLE,
        "idle_server_commands_per_s": _ops(idle1, idle0, store=False) / SETTLE,
        "ops_per_handoff": sum(store.values()) if done else float("nan"),
        "ops_by_kind_per_handoff": {k: v for k, v in store.items() if v} if done else {},
        "server_per_handoff": server if done else {},
        "handoffs_per_s": done / elapsed,
        "handoff_p50_us": percentile(latencies, 50) / 1000,
        "handoff_p99_us": percentile(latencies, 99) / 1000,
        "stuck_after_cancel": len(stuck),
    }


def _ops(after: Counter[str], before: Counter[str], *, store: bool) -> float:
    if store:
        return float(sum(v - before[k] for k, v in after.items() if not k.startswith("server_")))
    return float(after["server_commands"] - before["server_commands"])


def _server(url: str) -> Callable[[], Counter[str]]:
    """The Redis server's own counters, as ``server_scripts`` and ``server_commands``."""

    def snapshot() -> Counter[str]:
        counts = redis_counters(url)
        return Counter({f"server_{k}": int(counts[k]) for k in ("scripts", "commands")})

    return snapshot


def measure_leasehold(backend: str, env: dict[str, Any], waiters: int, handoffs: int,
                      budget: float) -> dict[str, Any]:  # fmt: skip
    import leasehold
    from leasehold._async.backends import open_store
    from leasehold._core.clock import SYSTEM_CLOCK
    from leasehold._core.url import parse

    warnings = count_warnings()
    server = _server(env["redis"]) if backend == "redis" else None

    async def main() -> dict[str, Any]:
        store = _counting(open_store(parse(leasehold_url(env, backend)), SYSTEM_CLOCK))
        client = leasehold.AsyncClient(store=store)
        lock = client.lock(f"bench-s4-{uuid.uuid4().hex[:8]}", ttl=60)

        def calls() -> Counter[str]:
            snapshot = Counter(store.calls)
            if server is not None:
                snapshot.update(server())
            return snapshot

        async def release(lease: Any) -> None:
            await lease.release()

        try:
            return await _herd(lock.acquire, release, calls, waiters, handoffs, budget)
        finally:
            await client.aclose()

    result = asyncio.run(main())
    result["warnings"] = warnings.count
    return result


def measure_redis_py(
    env: dict[str, Any], waiters: int, handoffs: int, budget: float
) -> dict[str, Any]:
    import redis.asyncio

    server = _server(env["redis"])

    async def main() -> dict[str, Any]:
        r = redis.asyncio.Redis.from_url(env["redis"])
        name = f"bench-s4-{uuid.uuid4().hex[:8]}"
        asked: Counter[str] = Counter()

        async def acquire() -> Any:
            asked["acquire"] += 1
            lock = r.lock(name, timeout=60)
            await lock.acquire()
            return lock

        async def release(lock: Any) -> None:
            await lock.release()

        def calls() -> Counter[str]:
            # "acquire" only tells _herd when every waiter has asked; redis-py has no
            # store layer to count, so only the server's counters are reported.
            return Counter({"acquire": asked["acquire"]}) + server()

        try:
            result = await _herd(acquire, release, calls, waiters, handoffs, budget)
        finally:
            await r.aclose()
        result.update(ops_per_handoff=float("nan"), ops_by_kind_per_handoff={})
        result["idle_ops_per_s"] = float("nan")
        return result

    return asyncio.run(main())


def run(ctx: Any) -> dict[str, Any]:
    cells = [b for b in BACKENDS if f"leasehold-{b}-async" in ctx.available]
    if "redis-py-async" in ctx.available:
        cells.append("redis-py")
    ctx.rng.shuffle(cells)
    budget = 30.0 if ctx.repeats > 1 else 10.0
    summary: dict[str, Any] = {}
    for cell in cells:
        args = (ctx.env, ctx.s4_waiters, ctx.s4_handoffs, budget)
        if cell == "redis-py":
            result = isolated(measure_redis_py, *args, timeout=budget + QUEUE_BUDGET + 60)
        else:
            result = isolated(measure_leasehold, cell, *args, timeout=budget + QUEUE_BUDGET + 60)
        ctx.log(f"s4 {cell}: {_fmt(result)}")
        summary[cell] = result
    order = (*BACKENDS, "redis-py")
    return {"summary": {c: summary[c] for c in sorted(summary, key=order.index)}}


def _fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error'][:200]}"
    return (
        f"{r['handoffs']} handoffs among {r['waiters']} waiters: "
        f"{r['ops_per_handoff']:.2f} store ops/handoff {r.get('ops_by_kind_per_handoff', '')} "
        f"server {r.get('server_per_handoff', '')} "
        f"p50 {r['handoff_p50_us']:.0f} us p99 {r['handoff_p99_us']:.0f} us, "
        f"idle {r['idle_ops_per_s']:.0f} ops/s "
        f"({r['idle_server_commands_per_s']:.0f} Redis commands/s), "
        f"queued in {r['queued_after_s']:.1f} s, "
        f"{r['stuck_after_cancel']} still running {CANCEL_BUDGET:g} s after cancel()"
    )
