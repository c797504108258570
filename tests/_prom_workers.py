"""Forked workers reporting to one PROMETHEUS_MULTIPROC_DIR (run by test_prometheus).

``python -m tests._prom_workers WORKERS MODE [URL]``: the parent instruments (as a
gunicorn master with preload, or a Celery prefork parent, does), forks WORKERS
children and lets each one acquire: MODE ``events`` emits the events directly,
``locks`` takes a real lock on URL. Worker 0 also wins an election. While every
worker still holds, the parent prints one scrape through a MultiProcessCollector;
then the workers exit, the parent marks them dead (gunicorn's child_exit hook) and
prints a second scrape. Scrapes are separated by a line "----".
"""

from __future__ import annotations

import os
import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

import leasehold
import leasehold.prometheus
from leasehold import events

SEPARATOR = "----"


def scrape() -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry).decode()


def work(index: int, mode: str, url: str, go: int, ready: int) -> None:
    def emit(
        kind: type[events.Event], name: str, primitive: str = "lock", **fields: object
    ) -> None:
        events.emit(kind(primitive=primitive, name=name, store="sqlite", client_id=1, **fields))  # type: ignore[arg-type]

    name = f"job:{index}"
    if mode == "events":
        for _ in range(index + 1):
            emit(events.AcquireStarted, name, blocking=True)
            emit(events.Acquired, name, fence=index + 1, wait=0.01)
            emit(events.Released, name, fence=index + 1, held=0.5)
        emit(events.AcquireStarted, name, blocking=True)
        emit(events.Acquired, name, fence=100 + index, wait=0.01)
        if index == 0:
            emit(events.ElectionWon, "beat", "election", term=1, identity="w0")
        os.write(ready, b"x")
        os.read(go, 1)
        return
    with leasehold.Client(url) as client:
        for _ in range(index + 1):
            with client.lock(name, ttl=30):
                pass
        lease = client.lock(name, ttl=30).acquire(timeout=30)
        election = client.election("beat", identity=f"w{index}") if index == 0 else None
        if election is not None:
            election.campaign(timeout=30)
        os.write(ready, b"x")
        os.read(go, 1)
        if election is not None:
            election.resign()
        lease.release()


def main() -> None:
    workers, mode = int(sys.argv[1]), sys.argv[2]
    url = sys.argv[3] if len(sys.argv) > 3 else ""
    leasehold.prometheus.instrument()
    pids = []
    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work(index, mode, url, go_read, ready_write)
            except BaseException as exc:
                print(f"worker {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    for _ in range(workers):
        if not os.read(ready_read, 1):
            raise SystemExit("a worker died before it was ready")
    print(scrape())
    print(SEPARATOR)
    os.write(go_write, b"x" * workers)
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
        mark_process_dead(pid)
    print(scrape())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
