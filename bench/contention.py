"""Scenario 2: N processes on one lock around a non-atomic counter.

Each worker loops: acquire, read the shared counter, yield the CPU, write it back
plus one, stamp the time, release. The counter lives in shared memory without any
lock of its own, so two holders at once lose updates. Timestamps come from
CLOCK_MONOTONIC, which is system-wide on Linux, so a release stamped in one process
and an acquire return seen in another are comparable.

* throughput: acquisitions that returned inside the window, per second
* handoff: release called by one holder -> acquire returned in the *next* holder
  (a process re-acquiring its own release is not a handoff)
* wait: acquire called -> acquire returned
* fairness: min / max acquisitions per process (1.0 = perfectly even)
* lost updates: increments made - counter value; anything but 0 is a broken lock
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from typing import Any

from bench import external
from bench.common import FORK, now_ns, paired_order, percentile, spread
from bench.subjects import BY_KEY, Handle
from bench.targets import side_by_side

COUNTER, LAST_RELEASE, LAST_HOLDER, START, END = range(5)
GRACE = 15.0  # seconds after the window before a stuck worker is killed
SETUP = 60.0  # seconds for every worker to build its client and connect


class _Loop:
    """The bookkeeping of one worker, shared by the sync and async loops."""

    def __init__(self, shared: Any, me: int) -> None:
        self.shared = shared
        self.me = me
        self.in_window = 0
        self.increments = 0
        self.errors = 0
        self.waits: list[int] = []
        self.handoffs: list[int] = []
        self.last_error = ""

    def got(self, asked: int) -> None:
        shared = self.shared
        got = now_ns()
        # The critical section: a read-modify-write that races unless the lock works.
        value = shared[COUNTER]
        os.sched_yield()
        shared[COUNTER] = value + 1
        self.increments += 1
        if got < shared[END]:
            self.in_window += 1
            self.waits.append(got - asked)
            if shared[LAST_HOLDER] not in (0, self.me) and shared[LAST_RELEASE]:
                self.handoffs.append(got - shared[LAST_RELEASE])
        shared[LAST_HOLDER] = self.me
        shared[LAST_RELEASE] = now_ns()

    def failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = repr(exc)[:300]

    def result(self) -> dict[str, Any]:
        return {
            "acquisitions": self.in_window,
            "increments": self.increments,
            "errors": self.errors,
            "last_error": self.last_error,
            "waits": self.waits,
            "handoffs": self.handoffs,
        }


def _sync_loop(handle: Handle, loop: _Loop) -> None:
    shared = loop.shared
    while now_ns() < shared[END]:
        asked = now_ns()
        try:
            handle.acquire()
        except Exception as exc:  # e.g. sherlock's LockTimeoutException
            loop.failed(exc)
            continue
        loop.got(asked)
        handle.release()


async def _async_loop(handle: Handle, loop: _Loop) -> None:
    shared = loop.shared
    try:
        while now_ns() < shared[END]:
            asked = now_ns()
            try:
                await handle.acquire()
            except Exception as exc:
                loop.failed(exc)
                continue
            loop.got(asked)
            await handle.release()
    finally:
        await handle.close()


def _worker(key: str, env: dict[str, Any], name: str, me: int, shared: Any,
            ready: Any, go: Any, conn: Any) -> None:  # fmt: skip
    subject = BY_KEY[key]
    try:
        handle = subject.make(env, name)
        loop = _Loop(shared, me)
        ready.wait(SETUP)
        go.wait(SETUP)
        if subject.is_async:
            asyncio.run(_async_loop(handle, loop))
        else:
            _sync_loop(handle, loop)
            handle.close()
        conn.send(loop.result())
    except BaseException as exc:
        ready.abort()  # the parent (and every sibling) stops waiting at once
        go.abort()
        conn.send({"fatal": repr(exc)[:500]})
    conn.close()
    os._exit(0)


def measure(key: str, env: dict[str, Any], procs: int, seconds: float) -> dict[str, Any]:
    subject = BY_KEY[key]
    name = f"bench-s2-{key}-{procs}-{uuid.uuid4().hex[:8]}"
    if subject.prepare is not None:
        subject.prepare(env, name)
    shared = FORK.RawArray("q", 5)
    ready, go = FORK.Barrier(procs + 1), FORK.Barrier(procs + 1)
    workers, pipes = [], []
    for me in range(1, procs + 1):
        here, there = FORK.Pipe(duplex=False)
        process = FORK.Process(
            target=_worker, args=(key, env, name, me, shared, ready, go, there), daemon=True
        )
        process.start()
        there.close()
        workers.append(process)
        pipes.append(here)
    try:
        ready.wait(SETUP)
        start = now_ns() + 50_000_000
        shared[START], shared[END] = start, start + int(seconds * 1e9)
        go.wait(SETUP)
        deadline = seconds + GRACE + 0.05
        results = [pipe.recv() if pipe.poll(deadline) else {"fatal": "stuck"} for pipe in pipes]
    except Exception as exc:  # a worker could not even start: broken barrier
        results = [{"fatal": f"setup failed: {exc!r}"}]
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
            process.join(10)
    fatal = [r["fatal"] for r in results if "fatal" in r]
    if fatal:
        return {"error": f"{len(fatal)} of {procs} workers failed: {fatal[0]}"}
    waits = sorted(w for r in results for w in r["waits"])
    handoffs = sorted(h for r in results for h in r["handoffs"])
    counts = [r["acquisitions"] for r in results]
    return {
        "throughput": sum(counts) / seconds,
        "handoff_p50_us": percentile(handoffs, 50) / 1000,
        "handoff_p99_us": percentile(handoffs, 99) / 1000,
        "wait_p99_us": percentile(waits, 99) / 1000,
        "fairness": min(counts) / max(counts) if max(counts) else 0.0,
        "per_process": counts,
        "lost_updates": sum(r["increments"] for r in results) - shared[COUNTER],
        "errors": sum(r["errors"] for r in results),
        "last_error": next((r["last_error"] for r in results if r["last_error"]), ""),
        "handoffs": len(handoffs),
        # A thinned-out sample of handoff latencies for the CDF plots.
        "handoff_sample_us": [
            round(h / 1000, 1) for h in handoffs[:: max(1, len(handoffs) // 400)]
        ],
    }


def _measure(key: str, env: dict[str, Any], procs: int, seconds: float) -> dict[str, Any]:
    """``measure``, in the subject's own interpreter if it has one (Subject.python)."""
    python = BY_KEY[key].interpreter()
    if python is None:
        return measure(key, env, procs, seconds)
    try:
        result = external.call(
            python, __name__, "measure", [key, env, procs, seconds], seconds + SETUP + 60
        )
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
        return {"error": str(exc)[-600:]}
    return dict(result)


# Floors that are locks at all, and competitors' sync flavour (their asyncio twins
# wait the same way); every multi-process leasehold flavour is added to these.
CONTENDERS = ("redis-blpop", "redis-py", "python-redis-lock", "pottery", "sherlock", "tooz-redis",
              "mithril", "mithril-renew", "pg-advisory", "tooz-postgres", "sqlalchemy-dlock",
              "flock", "filelock", "portalocker", "etcd-v3lock")  # fmt: skip
METRICS = ("throughput", "handoff_p50_us", "handoff_p99_us", "wait_p99_us", "fairness")


# The subjects each contention target compares run side by side, per process count.
TARGET_GROUPS = side_by_side("contention")


def _target_group(cell: str) -> str | None:
    key, procs = cell.split("@")
    group = TARGET_GROUPS.get(key)
    return None if group is None else f"{group}@{procs}"


def run(ctx: Any) -> dict[str, Any]:
    keys = [
        k
        for k in ctx.available
        if k in CONTENDERS or (BY_KEY[k].kind == "leasehold" and BY_KEY[k].multiprocess)
    ]
    runs: dict[str, list[dict[str, Any]]] = {f"{k}@{n}": [] for k in keys for n in ctx.s2_procs}
    for repeat in range(ctx.repeats):
        for cell in paired_order(list(runs), ctx.rng, _target_group):
            key, procs = cell.split("@")
            result = _measure(key, ctx.env, int(procs), ctx.s2_seconds)
            ctx.log(f"s2 r{repeat} {cell}: {_fmt(result)}")
            runs[cell].append(result)
    summary: dict[str, Any] = {}
    for cell, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            summary[cell] = {"error": results[0]["error"]}
            continue
        summary[cell] = {m: spread([r[m] for r in ok]) for m in METRICS}
        summary[cell]["lost_updates"] = sum(r["lost_updates"] for r in ok)
        summary[cell]["errors"] = sum(r["errors"] for r in ok)
        summary[cell]["last_error"] = next((r["last_error"] for r in ok if r["last_error"]), "")
        summary[cell]["per_process"] = [r["per_process"] for r in ok]
        merged = sorted(h for r in ok for h in r["handoff_sample_us"])
        summary[cell]["handoff_sample_us"] = merged[:: max(1, len(merged) // 400)]
    for results in runs.values():
        for r in results:
            r.pop("handoff_sample_us", None)
    return {"runs": runs, "summary": summary}


def _fmt(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"ERROR {result['error'][:200]}"
    return (
        f"{result['throughput']:.0f}/s handoff p50 {result['handoff_p50_us']:.0f} us "
        f"p99 {result['handoff_p99_us']:.0f} us fair {result['fairness']:.2f} "
        f"lost {result['lost_updates']} errors {result['errors']}"
    )
