"""Worker processes for the election and semaphore multi-process tests.

Run as ``python -m tests._election_workers <command> ...``. Workers report through
append-only JSON-lines files: each record is one ``os.write`` on an ``O_APPEND``
descriptor, so concurrent writers never interleave within a line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import leasehold


def append(path: str, record: list[object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def candidate(url: str, name: str, ttl: float, identity: str, mode: str, events: str) -> None:
    """Run ``election.run(body)`` forever. Records, as [identity, pid, event, term, t]:
    ``lead`` when a term starts; ``cancelled`` (async) or ``check-raised`` (sync)
    when the body learns the term is over; ``lost`` (with a reason) when a term
    ends without a resignation, or its grant came too late to start one."""
    pid = os.getpid()

    def log(event: str, term: int, *detail: object) -> None:
        append(events, [identity, pid, event, term, time.monotonic(), *detail])

    def on_event(event: leasehold.events.Event) -> None:
        # Why a term ended without this process resigning: "deadline" or "unreachable"
        # when its own renewals came too late (a stalled process or disk), "refused"
        # when the store says another took the name.
        if isinstance(event, leasehold.events.Lost):
            log("lost", event.fence, event.reason)

    leasehold.events.subscribe(on_event)

    class LateGrants(logging.Handler):
        # A grant answered past its safe deadline never becomes a lease (no body
        # runs, no Lost event): the store still listed the term for a moment, so
        # it is recorded as lost by this process's own lateness, from the
        # documented log record (docs/events.md).
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "leasehold_event", None) == "late_grant":
                log("lost", int(getattr(record, "leasehold_fence", 0)), "late_grant")

    logging.getLogger("leasehold").addHandler(LateGrants(logging.WARNING))

    if mode == "sync":
        client = leasehold.Client(url)
        election = client.election(name, ttl=ttl, identity=identity)

        def body(lease: leasehold.Lease) -> None:
            log("lead", lease.fence)
            try:
                while True:
                    lease.check()  # before every step the lease protects
                    time.sleep(0.01)
            except leasehold.LeaseLost:
                log("check-raised", lease.fence)
                raise

        election.run(body)
        return

    async def main() -> None:
        async with leasehold.AsyncClient(url) as client:
            election = client.election(name, ttl=ttl, identity=identity)

            async def body(lease: leasehold.AsyncLease) -> None:
                log("lead", lease.fence)
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    log("cancelled", lease.fence)
                    raise

            await election.run(body)

    asyncio.run(main())


def permit(url: str, name: str, limit: int, ttl: float, ledger: str, stop: str, seed: int) -> None:
    """Take a permit, hold it a random while, give it back; until ``stop`` exists.

    Ledger records are [kind, fence, pid, t] with t on CLOCK_MONOTONIC, which all
    processes of one host share. A hold is claimed ('start', then 'end') only after
    ``lease.check()`` says it is still held, so a claimed interval lies inside the
    store's grant; a hold found lost at its end is recorded as 'lost' instead.
    """
    rng = random.Random(seed)
    pid = os.getpid()
    client = leasehold.Client(url)
    sem = client.semaphore(name, limit, ttl=ttl)
    while not Path(stop).exists():
        lease = sem.acquire(timeout=60)
        try:
            started = time.monotonic()
            lease.check()
            append(ledger, ["start", lease.fence, pid, started])
            # Some holds outlast a renewal interval (ttl / 3): renewal is exercised too.
            time.sleep(rng.uniform(0.05, 0.7))
            ended = time.monotonic()
            try:
                lease.check()
            except leasehold.LeaseLost:
                append(ledger, ["lost", lease.fence, pid, ended])
            else:
                append(ledger, ["end", lease.fence, pid, ended])
        finally:
            lease.release()
    client.close()


def flip(url: str, name: str, ttl: float, identity: str, events: str, rounds: int) -> None:
    """Lead and resign ``rounds`` times, pausing between, then break a lease on the
    name and exit. Records [event, term, t] with t on CLOCK_MONOTONIC, taken right
    after each change was made (and announced) in the store."""
    with leasehold.Client(url) as client:
        election = client.election(name, ttl=ttl, identity=identity)
        for _ in range(rounds):
            term = election.campaign(timeout=30).fence
            append(events, ["lead", term, time.monotonic()])
            time.sleep(0.4)
            election.resign()
            append(events, ["resigned", term, time.monotonic()])
            time.sleep(0.4)
        # Ended by break_lease through the client: announced too.
        term = election.campaign(timeout=30).fence
        append(events, ["lead", term, time.monotonic()])
        time.sleep(0.4)
        client.break_lease(name)
        append(events, ["resigned", term, time.monotonic()])


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "candidate":
        url, name, ttl, identity, mode, events = args
        candidate(url, name, float(ttl), identity, mode, events)
    elif command == "flip":
        url, name, ttl, identity, events, rounds = args
        flip(url, name, float(ttl), identity, events, int(rounds))
    elif command == "permit":
        url, name, limit, ttl, ledger, stop, seed = args
        permit(url, name, int(limit), float(ttl), ledger, stop, int(seed))
    else:
        raise SystemExit(f"unknown worker {command}")
