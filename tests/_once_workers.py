"""Processes for the once-only tests: ``python -m tests._once_workers <command> ...``.

Every worker reports through files, written atomically (write + rename), so the
test never reads half a report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import leasehold


def write_atomically(path: str | Path, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def append_line(path: str | Path, line: str) -> None:
    # O_APPEND writes of one short line from many processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def wait_for_file(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.002)


def caller(url: str, key: str, ttl: str, ready: str, go: str, runs: str, out: str) -> None:
    """One of many concurrent callers: announce readiness, wait for the start
    signal, then run the shared function (which logs every real run)."""
    client = leasehold.Client(url)
    once = client.once(key, ttl=float(ttl))

    def work() -> dict[str, Any]:
        append_line(runs, f"process {os.getpid()}")
        time.sleep(0.5)
        return {"answer": 42, "by": f"process {os.getpid()}"}

    write_atomically(ready, "ready")
    wait_for_file(go)
    result = outcome(lambda: once.run(work))
    write_atomically(out, json.dumps(result))
    client.close()


def runner(url: str, key: str, ttl: str, started: str, sleep: str, value: str, out: str) -> None:
    """Run a slow function under once: report when it starts, then (unless killed
    or stopped on the way) report what run() returned or raised."""
    client = leasehold.Client(url)
    once = client.once(key, ttl=float(ttl))

    def work() -> str:
        write_atomically(started, json.dumps({"pid": os.getpid()}))
        time.sleep(float(sleep))
        return value

    write_atomically(out, json.dumps(outcome(lambda: once.run(work))))
    client.close()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "caller":
        caller(*args)
    elif command == "runner":
        runner(*args)
    else:
        raise SystemExit(f"unknown worker {command}")
