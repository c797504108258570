"""Shared plumbing: isolated measurement processes, percentiles, machine facts."""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

FORK = multiprocessing.get_context("fork")


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:
        lines = traceback.format_exception_only(exc)
        conn.send(("error", "".join(lines).strip()[-600:]))
    conn.close()
    # Libraries leave non-daemon threads (renewers, heartbeats) behind; the
    # measurement is over, so do not wait for them.
    os._exit(0)


def isolated(fn: Callable[..., Any], *args: Any, timeout: float) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child, bounded by ``timeout`` seconds.

    Returns the child's result, or ``{"error": ...}`` if it raised, hung or died. A
    broken or hanging library can cost at most ``timeout``, never the whole run.
    A measurement of a subject with an interpreter of its own (``Subject.python``,
    first argument its key) runs in that interpreter instead.
    """
    from bench.subjects import BY_KEY

    subject = BY_KEY.get(args[0]) if args and isinstance(args[0], str) else None
    python = subject.interpreter() if subject is not None else None
    if python is not None:
        from bench import external

        try:
            value = external.call(python, fn.__module__, fn.__name__, list(args), timeout)
        except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
            return {"error": str(exc)[-600:]}
        return dict(value)
    here, there = FORK.Pipe(duplex=False)
    process = FORK.Process(target=_child, args=(there, fn, args), daemon=True)
    process.start()
    there.close()
    try:
        if here.poll(timeout):
            status, value = here.recv()
        else:
            status, value = "error", f"timed out after {timeout:g} s"
    except EOFError:
        status, value = "error", "the measuring process died"
    finally:
        here.close()
        if process.is_alive():
            process.kill()
        process.join(10)
    if status == "error":
        return {"error": value}
    result: dict[str, Any] = value
    return result


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.kinds: dict[str, int] = {}  # message start -> count, for the report

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        message = record.getMessage()
        kind = message.split("(", 1)[0][:60] if message.startswith("renewing") else message[:300]
        if kind in self.kinds or len(self.kinds) < 5:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1


def count_warnings() -> _Counter:
    """Count leasehold's WARNING lines (lost leases, store errors) instead of printing
    thousands of them; the count goes into the results."""
    handler = _Counter()
    logger = logging.getLogger("leasehold")
    logger.addHandler(handler)
    logger.propagate = False
    return handler


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and min/max of one metric over the repeats."""
    clean = [v for v in values if v == v]  # drop NaN
    if not clean:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "n": len(clean),
    }


def paired_order(
    items: Sequence[str], rng: Any, group_of: Callable[[str], str | None]
) -> list[str]:
    """``items`` in a random order in which the items of one group run one after
    another (in a random order of their own): a target compares leasehold with its
    reference, and side by side the two meet the same load on this shared machine,
    which drifts over the minutes a repeat takes. ``group_of`` gives an item's
    group, or None for an item compared with nothing."""
    units: dict[str, list[str]] = {}
    for item in items:
        units.setdefault(group_of(item) or f"alone:{item}", []).append(item)
    ordered = list(units.values())
    rng.shuffle(ordered)
    for unit in ordered:
        rng.shuffle(unit)
    return [item for unit in ordered for item in unit]


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def now_ns() -> int:
    # CLOCK_MONOTONIC is system-wide on Linux: comparable between processes on a host.
    return time.monotonic_ns()


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git_commit": commit,
    }
