"""Scenario 1: uncontended acquire + release, one process, one lock.

Every subject is measured in its own forked process for a fixed time; the order of
subjects is shuffled on every repeat so drift (CPU heat, server caches) is spread
evenly instead of always hitting the same library, and the two sides of a target
(TARGET_GROUPS) run next to each other, so they meet the same load.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from bench.common import isolated, paired_order, percentile, spread
from bench.subjects import BY_KEY, Handle
from bench.targets import side_by_side

WARMUP = 0.2  # seconds: connections, prepared statements, script loads

# The subjects each uncontended target compares run side by side.
TARGET_GROUPS = side_by_side("uncontended")


def _summary(samples: list[int], elapsed: float, cpu: float) -> dict[str, Any]:
    samples.sort()
    return {
        "n": len(samples),
        "p50_us": percentile(samples, 50) / 1000,
        "p99_us": percentile(samples, 99) / 1000,
        "ops_per_s": len(samples) / elapsed,
        "cpu_us_per_op": cpu / len(samples) * 1e6,
    }


def _sync(handle: Handle, seconds: float) -> dict[str, Any]:
    acquire, release = handle.acquire, handle.release
    end = time.perf_counter() + WARMUP
    while time.perf_counter() < end:
        acquire()
        release()
    samples: list[int] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    end = t0 + seconds
    clock = time.perf_counter_ns
    while time.perf_counter() < end:
        start = clock()
        acquire()
        release()
        samples.append(clock() - start)
    return _summary(samples, time.perf_counter() - t0, time.process_time() - cpu0)


async def _async(handle: Handle, seconds: float) -> dict[str, Any]:
    acquire, release = handle.acquire, handle.release
    try:
        end = time.perf_counter() + WARMUP
        while time.perf_counter() < end:
            await acquire()
            await release()
        samples: list[int] = []
        cpu0, t0 = time.process_time(), time.perf_counter()
        end = t0 + seconds
        clock = time.perf_counter_ns
        while time.perf_counter() < end:
            start = clock()
            await acquire()
            await release()
            samples.append(clock() - start)
        return _summary(samples, time.perf_counter() - t0, time.process_time() - cpu0)
    finally:
        await handle.close()


def measure(key: str, env: dict[str, Any], seconds: float) -> dict[str, Any]:
    subject = BY_KEY[key]
    name = f"bench-s1-{key}-{uuid.uuid4().hex[:8]}"
    if subject.prepare is not None:
        subject.prepare(env, name)
    if subject.is_async:

        async def main() -> dict[str, Any]:
            return await _async(subject.make(env, name), seconds)

        return asyncio.run(main())
    handle = subject.make(env, name)
    try:
        return _sync(handle, seconds)
    finally:
        handle.close()


def run(ctx: Any) -> dict[str, Any]:
    keys = list(ctx.available)
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    for repeat in range(ctx.repeats):
        for key in paired_order(keys, ctx.rng, TARGET_GROUPS.get):
            result = isolated(measure, key, ctx.env, ctx.s1_seconds, timeout=ctx.s1_seconds + 60)
            ctx.log(f"s1 r{repeat} {key}: {_fmt(result)}")
            runs[key].append(result)
    summary = {}
    for key, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            summary[key] = {"error": results[0]["error"]}
            continue
        summary[key] = {
            metric: spread([r[metric] for r in ok])
            for metric in ("p50_us", "p99_us", "ops_per_s", "cpu_us_per_op")
        }
    return {"runs": runs, "summary": summary}


def _fmt(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"ERROR {result['error'][:200]}"
    return (
        f"p50 {result['p50_us']:.0f} us  p99 {result['p99_us']:.0f} us  "
        f"{result['ops_per_s']:.0f} ops/s"
    )
