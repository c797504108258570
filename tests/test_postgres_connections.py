"""How many PostgreSQL connections a process opens, counted in pg_stat_activity.

The clients of one process share one store per URL: one operation connection
(?pool_max_size= raises it) and one LISTEN connection for wake-ups and
announcements alike. The counts are the ones docs/backends.md states.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import leasehold

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def app_url(postgres_server: Any) -> Iterator[str]:
    # A fresh application_name per test: pg_stat_activity counts only ours.
    yield postgres_server.url + f"?application_name=lh_{uuid.uuid4().hex[:10]}"


def connections(server: Any, url: str, expect: int | None = None) -> int:
    name = url.rsplit("application_name=", 1)[1]
    deadline = time.monotonic() + 5
    with psycopg.connect(server.url, autocommit=True) as admin:
        while True:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone()
            found = int(row[0]) if row else 0
            # Closed sessions leave pg_stat_activity a moment after the client
            # closes its socket: wait for the expected count, up to a bound.
            if expect is None or found == expect or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def test_one_client_a_waiter_and_an_observer_share_two_connections(
    postgres_server: Any, app_url: str
) -> None:
    first = leasehold.Client(app_url)
    second = leasehold.Client(app_url)
    third = leasehold.Client(app_url)
    try:
        lease = first.lock("conn:job", ttl=30).acquire(timeout=5)
        assert connections(postgres_server, app_url) <= 2
        one_client = connections(postgres_server, app_url)

        got: list[int] = []
        waiter = threading.Thread(
            target=lambda: got.append(second.lock("conn:job", ttl=30).acquire(timeout=20).fence)
        )
        waiter.start()
        time.sleep(0.5)
        with_waiter = connections(postgres_server, app_url)

        observed: list[Any] = []
        election = third.election("conn:beat", ttl=30)

        def observe() -> None:
            for leader in election.observe():
                observed.append(leader)
                if leader is not None:
                    return

        observer = threading.Thread(target=observe)
        observer.start()
        time.sleep(0.5)
        with_observer = connections(postgres_server, app_url)
        assert (one_client, with_waiter, with_observer) == (2, 2, 2)

        # Sharing keeps wake-ups working: the release wakes the waiter, the
        # campaign wakes the observer, both through the one LISTEN connection.
        started = time.monotonic()
        lease.release()
        waiter.join(20)
        assert got and got[0] > lease.fence
        assert time.monotonic() - started < 5
        leader_lease = first.election("conn:beat", ttl=30).campaign(timeout=5)
        observer.join(20)
        assert observed[-1] is not None and observed[-1].term == leader_lease.fence
    finally:
        for client in (first, second, third):
            client.close()
    assert connections(postgres_server, app_url, expect=0) == 0


def test_closing_one_client_keeps_the_shared_store_open(postgres_server: Any, app_url: str) -> None:
    first = leasehold.Client(app_url)
    second = leasehold.Client(app_url)
    assert first.store is second.store
    with first.lock("conn:a"):
        pass
    first.close()
    with second.lock("conn:b") as lease:
        assert lease.fence > 0
    second.close()
    third = leasehold.Client(app_url)  # the last close ended it: a new store
    try:
        assert third.store is not second.store
        with third.lock("conn:c"):
            pass
    finally:
        third.close()
    assert connections(postgres_server, app_url, expect=0) == 0


def test_pool_size_is_configurable(postgres_server: Any, app_url: str) -> None:
    url = app_url.replace("?", "?pool_min_size=3&pool_max_size=3&")
    with leasehold.Client(url) as client:
        with client.lock("conn:pool"):
            pass
        # Three operation connections, plus the one LISTEN connection.
        assert connections(postgres_server, url, expect=4) == 4


def test_async_clients_of_one_loop_share_too(postgres_server: Any, app_url: str) -> None:
    async def main() -> tuple[bool, int]:
        async with leasehold.AsyncClient(app_url) as a, leasehold.AsyncClient(app_url) as b:
            lease = await a.lock("conn:async", ttl=30).acquire(timeout=5)
            waiting = asyncio.ensure_future(b.lock("conn:async", ttl=30).acquire(timeout=20))
            await asyncio.sleep(0.5)
            count = await asyncio.to_thread(connections, postgres_server, app_url)
            await lease.release()
            await (await waiting).release()
            return a.store is b.store, count

    shared, count = asyncio.run(main())
    assert shared and count == 2


def test_control_unshared_stores_are_counted(postgres_server: Any, app_url: str) -> None:
    # The counter sees every connection: two stores built directly (not shared)
    # hold two operation connections and two listeners between them.
    from leasehold._core.url import parse
    from leasehold._sync.backends.postgres import PostgresStore

    stores = [PostgresStore(parse(app_url)) for _ in range(2)]
    clients = [leasehold.Client(store=store) for store in stores]
    try:
        leases = [c.lock(f"conn:ctl{i}").acquire(timeout=5) for i, c in enumerate(clients)]
        assert connections(postgres_server, app_url, expect=4) == 4
        for lease in leases:
            lease.release()
    finally:
        for client in clients:
            client.close()


def test_a_pool_of_one_serves_threads_that_call_at_once(postgres_server: Any, app_url: str) -> None:
    """Between calls the one operation connection waits in the store's spare slot,
    outside psycopg_pool; a call that finds it busy waits in the pool, so the
    connection must go back through the pool while anyone waits there, or that
    caller would starve until its PoolTimeout (StoreUnavailable)."""
    client = leasehold.Client(app_url)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for _ in range(40):
                client.lock(f"conn:spare:{index}", ttl=30).acquire(timeout=10).release()
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        store: Any = client.store
        assert store._pool_waiting == 0
        assert store._checked_out == 1  # the spare, idle again
        assert connections(postgres_server, app_url) <= 2  # and the LISTEN one
    finally:
        client.close()
