"""Scenario 5: many live names.

Fill the store with N live leases (distinct names, a long TTL, written through the
store contract so that no client-side lease objects are kept), and measure:

* store memory per live lease: Redis INFO used_memory, PostgreSQL
  pg_total_relation_size of every table, the SQLite file (+ WAL), tracemalloc for
  the in-process memory store;
* acquire + release throughput on fresh names, before and after the fill.

redis-py's Lock is filled the same way (SET NX PX of a 32-character token, which
is exactly what its acquire writes) for comparison.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import isolated
from bench.subjects import leasehold_url

BACKENDS = ("sqlite", "memory", "redis", "postgres")
LONG_TTL = 3600.0


def fresh_store(backend: str, env: dict[str, Any]) -> dict[str, Any]:
    """An empty store, so that earlier scenarios' free space and expiring keys do
    not blur the memory delta: a new SQLite file, a new PostgreSQL database, an
    emptied Redis (our own throwaway server)."""
    if backend == "sqlite":
        return {**env, "dir": tempfile.mkdtemp(dir=env["dir"])}
    if backend == "postgres":
        import psycopg

        db = f"bench_scale_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(env["postgres"], autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {db}")
        return {**env, "postgres": env["postgres"].rsplit("/", 1)[0] + f"/{db}"}
    if backend == "redis":
        import redis

        r = redis.Redis.from_url(env["redis"])
        r.flushall()
        r.close()
    return env


def store_bytes(backend: str, env: dict[str, Any], store: Any = None) -> float:
    if backend in ("redis", "redis-py"):
        import redis

        r = redis.Redis.from_url(env["redis"])
        try:
            return float(r.info("memory")["used_memory"])
        finally:
            r.close()
    if backend == "postgres":
        import psycopg

        with psycopg.connect(env["postgres"], autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_stat_user_tables"
            ).fetchone()
            return float(row[0]) if row else float("nan")
    if backend == "sqlite":
        path = leasehold_url(env, "sqlite").removeprefix("sqlite:///")
        return float(sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p)))
    return float(tracemalloc.get_traced_memory()[0])


def _throughput(acquire_release: Any, seconds: float) -> float:
    for i in range(-50, 0):  # warm up: connections, scripts, prepared statements
        acquire_release(i)
    done = 0
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end:
        acquire_release(done)
        done += 1
    return done / (time.perf_counter() - started)


def _fill(put: Any, n: int, threads: int, budget: float) -> tuple[int, float]:
    deadline = time.perf_counter() + budget
    started = time.perf_counter()
    chunk = 1000

    def run(first: int) -> int:
        if time.perf_counter() > deadline:
            return 0
        return put(range(first, min(n, first + chunk)))

    with ThreadPoolExecutor(threads) as pool:
        filled = sum(pool.map(run, range(0, n, chunk)))
    return filled, time.perf_counter() - started


def measure_leasehold(backend: str, env: dict[str, Any], n: int, budget: float,
                      seconds: float) -> dict[str, Any]:  # fmt: skip
    import leasehold

    env = fresh_store(backend, env)
    prefix = f"bench-s5-{uuid.uuid4().hex[:8]}"
    client = leasehold.Client(leasehold_url(env, backend))
    store = client.store

    def cycle(i: int) -> None:
        client.lock(f"{prefix}-t-{i}", ttl=30).acquire().release()

    def put(indexes: range) -> int:
        for i in indexes:
            request = leasehold.AcquireRequest(
                name=f"{prefix}-{i}", token=secrets.token_urlsafe(24), holder=client.holder,
                ttl=LONG_TTL,
            )  # fmt: skip
            store.acquire(request)
        return len(indexes)

    before = _throughput(cycle, seconds)
    if backend == "memory":
        tracemalloc.start()
    mem0 = store_bytes(backend, env, store)
    filled, fill_s = _fill(put, n, 8 if backend in ("redis", "postgres") else 1, budget)
    mem1 = store_bytes(backend, env, store)
    if backend == "memory":
        tracemalloc.stop()
    after = _throughput(lambda i: cycle(i + 10**9), seconds)
    client.close()
    return _result(filled, n, fill_s, mem0, mem1, before, after)


def measure_redis_py(env: dict[str, Any], n: int, budget: float, seconds: float) -> dict[str, Any]:
    import redis

    fresh_store("redis", env)
    r = redis.Redis.from_url(env["redis"])
    prefix = f"bench-s5-{uuid.uuid4().hex[:8]}"

    def cycle(i: int) -> None:
        lock = r.lock(f"{prefix}-t-{i}", timeout=30)
        lock.acquire()
        lock.release()

    def put(indexes: range) -> int:
        pipe = r.pipeline(transaction=False)
        for i in indexes:
            pipe.set(f"{prefix}-{i}", secrets.token_hex(16), nx=True, px=int(LONG_TTL * 1000))
        pipe.execute()
        return len(indexes)

    before = _throughput(cycle, seconds)
    mem0 = store_bytes("redis-py", env)
    filled, fill_s = _fill(put, n, 4, budget)
    mem1 = store_bytes("redis-py", env)
    after = _throughput(lambda i: cycle(i + 10**9), seconds)
    r.close()
    return _result(filled, n, fill_s, mem0, mem1, before, after)


def _result(filled: int, n: int, fill_s: float, mem0: float, mem1: float, before: float,
            after: float) -> dict[str, Any]:  # fmt: skip
    return {
        "live": filled,
        "target": n,
        "fill_s": fill_s,
        "fill_per_s": filled / fill_s if fill_s else float("nan"),
        "bytes_per_lease": (mem1 - mem0) / filled if filled else float("nan"),
        "ops_per_s_empty": before,
        "ops_per_s_full": after,
        "slowdown": before / after if after else float("nan"),
    }


def run(ctx: Any) -> dict[str, Any]:
    cells = [b for b in BACKENDS if f"leasehold-{b}" in ctx.available]
    if "redis-py" in ctx.available:
        cells.append("redis-py")
    ctx.rng.shuffle(cells)
    summary: dict[str, Any] = {}
    timeout = ctx.s5_budget + 4 * ctx.s5_seconds + 120
    for cell in cells:
        args = (ctx.env, ctx.s5_names, ctx.s5_budget, ctx.s5_seconds)
        if cell == "redis-py":
            result = isolated(measure_redis_py, *args, timeout=timeout)
        else:
            result = isolated(measure_leasehold, cell, *args, timeout=timeout)
        ctx.log(f"s5 {cell}: {_fmt(result)}")
        summary[cell] = result
    order = (*BACKENDS, "redis-py")
    return {"summary": {c: summary[c] for c in sorted(summary, key=order.index)}}


def _fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error'][:200]}"
    return (
        f"{r['live']}/{r['target']} live in {r['fill_s']:.1f} s, "
        f"{r['bytes_per_lease']:.0f} B/lease, "
        f"{r['ops_per_s_empty']:.0f} -> {r['ops_per_s_full']:.0f} ops/s"
    )
