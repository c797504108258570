"""Would one round trip fewer per contended acquisition raise the 8-process Redis rows?

    python -m bench.probes redis-pipeline

Issue #16's idea: a waiter sends its queueing acquire and its blocking wait (BLPOP on
its signal list) together, instead of waiting for the acquire's "busy" before it
sends the BLPOP: two round trips per contended acquisition (acquire + BLPOP, then
release) instead of three. Before changing the client, this measures what the idea
is worth on this machine, with leasehold's own scripts (the prelude, acquire.lua,
release.lua) called over raw redis-py connections by 8 processes on one name, both
ways, interleaved:

- **3 round trips**: acquire; when busy (queued), BLPOP until the hand-over's
  signal; release. What leasehold's client does.
- **2 round trips**: acquire and BLPOP sent in one write. acquire.lua is changed
  here so that a grant made at once also pushes a wake onto the caller's signal
  list, which the BLPOP then pops at once; a queued caller's BLPOP waits for the
  hand-over as before.

Both ways use the same connection calls (pack, send, read each reply), so what
differs is only the round trip. Workers are subprocesses (``python -m bench.pipeline
--member ...``), as in hops.py: the breakdown runs probes in daemonic processes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
_LUA = _ROOT / "src" / "leasehold" / "_shared" / "redis"
PROCESSES = 8
SECONDS = 3.0
REPEATS = 5
_TAG = "bench-pipeline{1}"
_KEYS = [f"{_TAG}:n:x", f"{_TAG}:fence", f"{_TAG}:index", f"{_TAG}:qa:x", f"{_TAG}:qe:x",
         f"{_TAG}:qi:x"]  # fmt: skip
_SIGNAL = f"{_TAG}:w:x:"
_SELF_WAKE = (
    "redis.call('LPUSH', k.signal_prefix .. token, 'w') "
    "redis.call('PEXPIRE', k.signal_prefix .. token, 5000) "
)
MODES = {"three": "3 round trips", "two": "2 round trips (acquire + BLPOP pipelined)"}


def _scripts(mode: str) -> tuple[str, str]:
    prelude = (_LUA / "_prelude.lua").read_text()
    acquire = (_LUA / "acquire.lua").read_text()
    if mode == "two":
        grants = ("    return {1, h[3]}", "    return {1, fence}")
        for grant in grants:
            if acquire.count(grant) != 1:
                raise RuntimeError(f"acquire.lua changed: {grant.strip()!r} not found once")
            acquire = acquire.replace(grant, "    " + _SELF_WAKE + grant.strip())
    return prelude + acquire, prelude + (_LUA / "release.lua").read_text()


def _member(url: str, mode: str, start: float, seconds: float) -> int:
    """One worker: acquire, yield the CPU, release, until ``start + seconds``
    (wall clock, shared by the workers); returns its acquisitions."""
    import redis

    client = redis.Redis.from_url(url)
    acquire_text, release_text = _scripts(mode)
    acquire, release = client.script_load(acquire_text), client.script_load(release_text)
    conn: Any = client.connection_pool.get_connection()  # redis-py's are untyped
    done = 0
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < start + seconds:
        token = uuid.uuid4().hex
        args = ("x", _SIGNAL, token, 30_000_000, 1, 10_000_000, '["o","h",1]', "run")
        wait = ("BLPOP", _SIGNAL + token, 2)
        if mode == "two":
            conn.send_packed_command(conn.pack_commands([("EVALSHA", acquire, 6, *_KEYS, *args),
                                                         wait]))  # fmt: skip
            reply, popped = conn.read_response(), conn.read_response()
            held = reply[0] == 1 or (popped is not None and popped[1].startswith(b"h "))
        else:
            conn.send_command("EVALSHA", acquire, 6, *_KEYS, *args)
            reply = conn.read_response()
            held = reply[0] == 1
            if not held:
                conn.send_command(*wait)
                popped = conn.read_response()
                held = popped is not None and popped[1].startswith(b"h ")
        if held:
            os.sched_yield()  # as scenario 2's workers: let a waiter run
            done += 1
        conn.send_command("EVALSHA", release, 6, *_KEYS, "x", _SIGNAL, token, "run")
        conn.read_response()
    return done


def _round(url: str, mode: str) -> tuple[float, float]:
    start = time.time() + 1.5  # after every worker has connected and loaded its scripts
    command = [sys.executable, "-m", "bench.pipeline", "--member", url, mode, str(start),
               str(SECONDS)]  # fmt: skip
    members = [
        subprocess.Popen(command, cwd=_ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(PROCESSES)
    ]
    counts = []
    for member in members:
        out, _ = member.communicate(timeout=SECONDS + 60)
        if member.returncode != 0:
            raise RuntimeError(f"a worker failed (exit {member.returncode})")
        counts.append(int(json.loads(out)))
    return sum(counts) / SECONDS, min(counts) / max(counts)


def measure(url: str) -> list[str]:
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    fairness: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(REPEATS):
        order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
        for mode in order:
            rate, fair = _round(url, mode)
            rates[mode].append(rate)
            fairness[mode].append(fair)
    shown = {mode: statistics.median(values) for mode, values in rates.items()}
    each = "; ".join(
        f"{MODES[mode]}: {shown[mode]:,.0f} acquisitions/s (repeats "
        + ", ".join(f"{r:,.0f}" for r in rates[mode])
        + f"; fairness {statistics.median(fairness[mode]):.2f})"
        for mode in MODES
    )
    return [
        f"redis {PROCESSES} processes, one lock, leasehold's scripts over raw connections "
        f"(median of {REPEATS}, interleaved): {each}",
        f"redis one round trip fewer per contended acquisition: "
        f"{shown['two'] / shown['three']:.2f}x the throughput",
    ]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--member"]:
        url, mode, start, seconds = argv[1], argv[2], float(argv[3]), float(argv[4])
        print(json.dumps(_member(url, mode, start, seconds)))
        return 0
    from bench.servers import RedisServer

    server = RedisServer()
    try:
        print("\n".join(measure(server.url)))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
