"""Scenario 3: what keeping N leases alive costs, per renewal interval.

One sync ``Client`` holds N leases (renew=True) on a store wrapped in a counting
wrapper. After the population has settled, we count store calls, items per call,
the wall time of each renew call and the process CPU (the keeper thread, the
driver) over a window of several intervals. On Redis the server's own view is
added: script calls and commands it ran, and its CPU time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import count_warnings, isolated, spread
from bench.subjects import leasehold_url

BACKENDS = ("sqlite", "memory", "redis", "postgres")
POPULATE_BUDGET = 120.0  # seconds to acquire the N leases before giving up


def _counting_store(url: str) -> Any:
    from leasehold._core.clock import SYSTEM_CLOCK
    from leasehold._core.url import parse
    from leasehold._sync.backends import open_store
    from leasehold.testing import CountingStore

    class TimedStore(CountingStore):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            self.renew_seconds: list[float] = []

        def renew(self, items: Sequence[Any]) -> list[bool]:
            started = time.perf_counter()
            try:
                return super().renew(items)
            finally:
                self.renew_seconds.append(time.perf_counter() - started)

    return TimedStore(open_store(parse(url), SYSTEM_CLOCK))


def redis_counters(url: str | None) -> dict[str, float]:
    """Script calls, all commands (scripts' inner calls included) and CPU seconds."""
    if url is None:
        return {}
    import redis

    r = redis.Redis.from_url(url)
    try:
        commands = r.info("commandstats")
        cpu = r.info("cpu")
    finally:
        r.close()
    scripts = sum(v["calls"] for k, v in commands.items() if k.split("|")[0] in _SCRIPT_CMDS)
    return {
        "scripts": scripts,
        "commands": sum(v["calls"] for v in commands.values()),
        "cpu": cpu["used_cpu_sys"] + cpu["used_cpu_user"],
    }


_SCRIPT_CMDS = {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_eval_ro",
                "cmdstat_fcall", "cmdstat_fcall_ro"}  # fmt: skip


def _after_a_renewal(store: Any, ttl: float) -> None:
    """Return just after the keeper's next renew call ends (polled every 2 ms; the
    next call starts about an interval later), or after two intervals without one."""
    ended = len(store.renew_seconds)
    give_up = time.perf_counter() + ttl / 3 * 2
    while len(store.renew_seconds) == ended and time.perf_counter() < give_up:
        time.sleep(0.002)


def measure(backend: str, env: dict[str, Any], n: int, ttl: float, window: float) -> dict[str, Any]:
    import leasehold

    warnings = count_warnings()
    store = _counting_store(leasehold_url(env, backend))
    client = leasehold.Client(store=store)
    prefix = f"bench-s3-{uuid.uuid4().hex[:8]}-"
    leases: list[Any] = []
    t0 = time.perf_counter()
    deadline = t0 + POPULATE_BUDGET

    def take(i: int) -> Any:
        if time.perf_counter() > deadline:
            return None
        return client.lock(f"{prefix}{i}", ttl=ttl).acquire(timeout=10)

    # Remote stores take their acquires from a few threads at once; SQLite and
    # memory serialise them anyway.
    threads = 8 if backend in ("redis", "postgres") else 1
    with ThreadPoolExecutor(threads) as pool:
        leases = [lease for lease in pool.map(take, range(n)) if lease is not None]
    populate_s = time.perf_counter() - t0
    # Let one full round pass so that every lease renews in the same batch.
    settle_until = time.perf_counter() + ttl / 3 * 1.2
    while time.perf_counter() < settle_until:
        time.sleep(0.05)
    # The window opens and closes just after a renew call has ended: the client
    # counts a call when it starts and the server its scripts as they run, so a
    # call in flight at either end (10,000 leases take a while) would be counted
    # by one side only.
    _after_a_renewal(store, ttl)
    server0 = redis_counters(env.get("redis") if backend == "redis" else None)
    calls0, durations0 = dict(store.calls), len(store.renew_seconds)
    items0 = len(store.renew_items)
    cpu0, w0 = time.process_time(), time.perf_counter()
    time.sleep(window)
    _after_a_renewal(store, ttl)
    cpu1, elapsed = time.process_time(), time.perf_counter() - w0
    server1 = redis_counters(env.get("redis") if backend == "redis" else None)
    calls = {op: store.calls[op] - calls0.get(op, 0) for op in store.calls}
    calls = {op: c for op, c in calls.items() if c}
    renews = calls.get("renew", 0)
    batch = store.renew_items[items0:]
    durations = sorted(store.renew_seconds[durations0:])
    lost = sum(1 for lease in leases if lease.lost)
    held = len(leases)
    # No release: 10,000 sequential releases would take longer than the measurement.
    # The process exits and the leases expire in the store by themselves.
    interval = ttl / 3  # the keeper's nominal interval (minus up to 10 % jitter)
    intervals = elapsed / interval
    result: dict[str, Any] = {
        "leases": held,
        "populate_s": populate_s,
        "lost": lost,
        "warnings": warnings.count,
        "warning_kinds": warnings.kinds,
        "store_calls": calls,
        "renew_calls_per_interval": renews / intervals,
        "other_calls_per_interval": (sum(calls.values()) - renews) / intervals,
        "items_per_call": sum(batch) / len(batch) if batch else 0.0,
        "renew_call_ms": durations[len(durations) // 2] * 1000 if durations else float("nan"),
        "cpu_ms_per_interval": (cpu1 - cpu0) / intervals * 1000,
    }
    if server0:
        result["server_scripts_per_interval"] = (
            server1["scripts"] - server0["scripts"]
        ) / intervals
        result["server_commands_per_interval"] = (
            server1["commands"] - server0["commands"] - 2  # our own INFO calls
        ) / intervals
        result["server_cpu_ms_per_interval"] = (server1["cpu"] - server0["cpu"]) / intervals * 1000
    return result


METRICS = ("renew_calls_per_interval", "items_per_call", "renew_call_ms", "cpu_ms_per_interval",
           "server_scripts_per_interval", "server_cpu_ms_per_interval", "populate_s")  # fmt: skip


def run(ctx: Any) -> dict[str, Any]:
    backends = [b for b in BACKENDS if f"leasehold-{b}" in ctx.available]
    cells = [f"{b}@{n}" for b in backends for n in ctx.s3_sizes]
    # One repeat: the counts are deterministic and every cell already spans several
    # intervals; populating 10,000 leases is the slow part.
    ctx.rng.shuffle(cells)
    runs: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        backend, n = cell.split("@")
        timeout = POPULATE_BUDGET + ctx.s3_window + ctx.s3_ttl * 3 + 60
        result = isolated(
            measure, backend, ctx.env, int(n), ctx.s3_ttl, ctx.s3_window, timeout=timeout
        )
        ctx.log(f"s3 {cell}: {_fmt(result)}")
        runs[cell] = [result]
    summary: dict[str, Any] = {}
    for cell in sorted(runs, key=lambda c: (BACKENDS.index(c.split("@")[0]), int(c.split("@")[1]))):
        results = runs[cell]
        ok = [r for r in results if "error" not in r]
        if not ok:
            summary[cell] = {"error": results[0]["error"]}
            continue
        summary[cell] = {m: spread([r[m] for r in ok if m in r]) for m in METRICS}
        summary[cell]["leases"] = min(r["leases"] for r in ok)
        summary[cell]["lost"] = sum(r["lost"] for r in ok)
        summary[cell]["warnings"] = sum(r["warnings"] for r in ok)
        summary[cell]["store_calls"] = ok[0]["store_calls"]
    return {"runs": runs, "summary": summary, "ttl": ctx.s3_ttl, "window": ctx.s3_window}


def _fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error'][:200]}"
    return (
        f"{r['leases']} leases (populated in {r['populate_s']:.1f} s), "
        f"{r['renew_calls_per_interval']:.2f} renew calls/interval x {r['items_per_call']:.0f} "
        f"items, {r['renew_call_ms']:.1f} ms/call, cpu {r['cpu_ms_per_interval']:.1f} ms/interval, "
        f"calls {r['store_calls']}, lost {r['lost']}"
    )
