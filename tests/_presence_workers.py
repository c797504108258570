"""Worker processes for the presence tests: ``python -m tests._presence_workers CMD ...``.

Workers print one JSON line per result on stdout. Times are CLOCK_MONOTONIC
(``time.monotonic``), which every process of one host shares, so the test can
compare a deadline acknowledged in one process with a close returned in another.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import leasehold


def sleep_until(moment: float) -> None:
    while (left := moment - time.monotonic()) > 0:
        time.sleep(min(left, 0.05) if left > 0.002 else 0)


def concurrent_open(url: str, room: str, calls: str, threads: int, start: float) -> None:
    """``threads`` threads call ``open`` at ``start``; create() logs its call to ``calls``."""
    client = leasehold.Client(url)
    results: list[list[object]] = []
    guard = threading.Lock()

    def create(number: int) -> dict[str, str]:
        fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{number}\n".encode())
        finally:
            os.close(fd)
        time.sleep(0.2)  # long enough for every other caller to arrive meanwhile
        return {"meeting": f"m-{number}"}

    def opener() -> None:
        presence = client.presence(room)
        sleep_until(start)
        epoch = presence.open(create)
        with guard:
            results.append([epoch.number, epoch.payload["meeting"]])

    workers = [threading.Thread(target=opener) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for result in results:
        print(json.dumps(result))
    client.close()


def race(url: str, plan: str, side: str, start: float, period: float = 0.003) -> None:
    """Round i at ``start + i * period``: ``close_if_idle`` (side "close") or
    ``intend`` (side "intend") on room i's open epoch. Prints [room, closed,
    returned_at] or [room, acknowledged_deadline | None]."""
    client = leasehold.Client(url)
    epochs: dict[str, int] = json.loads(Path(plan).read_text())
    rooms = {room: client.presence(room, intent_ttl=30.0) for room in epochs}
    out = []
    for i, (room, number) in enumerate(epochs.items()):
        presence = rooms[room]
        sleep_until(start + i * period)
        if side == "close":
            closed = presence.close_if_idle(epoch=number)
            out.append([room, closed, time.monotonic()])
        else:
            try:
                out.append([room, presence.intend("u", epoch=number).deadline])
            except leasehold.StaleEpoch:
                out.append([room, None])
    for line in out:
        print(json.dumps(line))
    client.close()


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "open":
        url, room, calls, threads, start = args
        concurrent_open(url, room, calls, int(threads), float(start))
    elif command == "race":
        url, plan, side, start = args
        race(url, plan, side, float(start))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
