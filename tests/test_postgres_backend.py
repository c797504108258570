"""The PostgreSQL backend against real servers started by the tests.

Most tests share one private server (module scope) and use fresh names; tests that
restart, crash or terminate connections get a server of their own. The generated
sync store runs a few of the same checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import pytest

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("psycopg_pool")

from leasehold import Client  # noqa: E402
from leasehold._async.backends.postgres import connection as pg_connection  # noqa: E402
from leasehold._async.backends.postgres import options as pg_options  # noqa: E402
from leasehold._async.backends.postgres import schema as pg_schema  # noqa: E402
from leasehold._async.backends.postgres import store as apg  # noqa: E402
from leasehold._async.backends.postgres import waiting as pg_waiting  # noqa: E402
from leasehold._core.clock import SYSTEM_CLOCK  # noqa: E402
from leasehold._core.records import (  # noqa: E402
    AcquireRequest,
    Busy,
    Granted,
    HandedOver,
    Holder,
    RenewItem,
)
from leasehold._core.url import parse  # noqa: E402
from leasehold._errors import InvalidArgument, StoreUnavailable  # noqa: E402
from leasehold._sync.backends.postgres import store as spg  # noqa: E402
from tests.servers.postgres import (  # noqa: E402
    PgBouncer,
    PostgresServer,
    pgbouncer_binary,
    postgres_bindir,
)

T = TypeVar("T")
HOLDER = Holder(owner="pg-test", host="test-host", pid=4242)
REQUIRE_SERVERS = os.environ.get("LEASEHOLD_REQUIRE_SERVERS") == "1"


def _need_binaries() -> None:
    if postgres_bindir() is None:
        reason = "PostgreSQL binaries not found (apt-get install postgresql)"
        if REQUIRE_SERVERS:
            pytest.fail(f"{reason} (LEASEHOLD_REQUIRE_SERVERS=1 forbids skipping)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    _need_binaries()
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A server of the test's own, free to be restarted, crashed or emptied."""
    _need_binaries()
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _url(server: PostgresServer, **query: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in query.items())
    return server.url + (f"?{extra}" if extra else "")


def astore(url: str) -> apg.AsyncPostgresStore:
    return apg.from_url(parse(url), SYSTEM_CLOCK)


def sstore(url: str) -> spg.PostgresStore:
    return spg.from_url(parse(url), SYSTEM_CLOCK)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await fn()

    return asyncio.run(main())


def req(name: str, token: str, ttl: float = 30.0, **kw: Any) -> AcquireRequest:
    return AcquireRequest(name=name, token=token, holder=HOLDER, ttl=ttl, **kw)


def unique(stem: str = "n") -> str:
    return f"{stem}:{uuid.uuid4().hex[:10]}"


def tok() -> str:
    return secrets.token_hex(8)


class CountingRuns:
    """Counts round trips: every operation goes through exactly one ``_run``."""

    def __init__(self, store: Any) -> None:
        self.count = 0
        original = store._run

        if asyncio.iscoroutinefunction(original):

            async def counted(*args: Any) -> Any:
                self.count += 1
                return await original(*args)

        else:

            def counted(*args: Any) -> Any:
                self.count += 1
                return original(*args)

        store._run = counted


# -- URL parsing: every error before any I/O ------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u@h/db?schema=bad-name", "schema"),
        ("postgresql://u@h/db?schema=1abc", "schema"),
        ("postgresql://u@h/db?schema=" + "x" * 64, "schema"),
        ("postgresql://u@h/db?pooler=statement", "statement"),
        ("postgresql://u@h/db?pooler=sometimes", "pooler"),
        ("postgresql://u@h/db?pool_min_size=-1", "pool_min_size"),
        ("postgresql://u@h/db?pool_max_size=0", "pool_max_size"),
        ("postgresql://u@h/db?pool_min_size=5&pool_max_size=2", "smaller"),
        ("postgresql://u@h/db?create_schema=maybe", "create_schema"),
        ("postgresql://u@h/db?statement_timeout=soon", "statement_timeout"),
        ("postgresql://u@h/db?schema=a&schema=b", "twice"),
        ("postgresql://u@h/db?no_such_libpq_option=1", "no_such_libpq_option"),
        ("postgresql://u@h:99999/db", "port"),
        ("postgresql://u@h:abc/db", "port"),
        ("postgresql://u@h/db?connect_timeout=ten", "connect_timeout"),
        ("postgresql://u@h/db?sslmode=sometimes", "sslmode"),
    ],
)
def test_bad_urls_fail_before_io(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        apg.from_url(parse(url), SYSTEM_CLOCK)
    with pytest.raises(InvalidArgument, match=message):
        spg.from_url(parse(url), SYSTEM_CLOCK)


def test_construction_does_no_io() -> None:
    # Port 1 on loopback: nothing listens, so any I/O would fail.
    store = astore("postgresql://u:pw@127.0.0.1:1/db?schema=x&pooler=transaction")
    assert isinstance(store, apg.AsyncPooledPostgresStore)
    assert store._pool is None and store._listener is None
    run(store.aclose)
    sync = sstore("postgresql://u:pw@127.0.0.1:1/db")
    assert type(sync) is spg.PostgresStore
    assert sync._pool is None
    sync.close()


def test_options_are_stripped_and_defaults_added() -> None:
    opts = pg_options.parse_options(
        parse(
            "postgres://u:pw@h:5433/db?schema=s1&pooler=transaction&sslmode=require"
            "&pool_max_size=3&keepalives_idle=30"
        )
    )
    assert (opts.schema, opts.pooler, opts.pool_max_size) == ("s1", "transaction", 3)
    settings = psycopg.conninfo.conninfo_to_dict(opts.conninfo)
    assert "schema" not in settings and "pooler" not in settings
    assert settings["sslmode"] == "require"
    assert settings["keepalives_idle"] == "30"  # the URL wins over our defaults
    assert settings["tcp_user_timeout"] == pg_options.LIBPQ_DEFAULTS["tcp_user_timeout"][0]
    assert "options" not in settings  # no startup options behind a transaction pooler
    direct = pg_options.parse_options(parse("postgresql://u@h/db?statement_timeout=2.5"))
    assert "statement_timeout=2500" in psycopg.conninfo.conninfo_to_dict(direct.conninfo)["options"]
    assert "pw" not in repr(opts)


def test_warnings_name_risky_settings() -> None:
    remote = sstore("postgresql://u:pw@db.example.com/app?keepalives=0&statement_timeout=0")
    found = " ".join(remote.warnings())
    assert "sslmode" in found and "keepalives=0" in found and "statement_timeout" in found
    assert "pw" not in found
    local = sstore("postgresql://u@127.0.0.1/app")
    assert local.warnings() == []
    remote.close()
    local.close()


def test_error_text_never_contains_the_password() -> None:
    secret = "s3cr3t-Pa55"
    for url in (
        f"postgresql://user:{secret}@127.0.0.1:1/db?connect_timeout=2",
        f"postgresql://user@127.0.0.1:1/db?password={secret}&connect_timeout=2",
    ):
        store = astore(url)
        assert secret not in repr(store)

        async def ping_and_close(store: apg.AsyncPostgresStore = store) -> None:
            try:
                await store.ping()
            finally:
                await store.aclose()

        with pytest.raises(StoreUnavailable) as info:
            run(ping_and_close)
        assert secret not in str(info.value)
        # The driver's exception is not chained into tracebacks (its text is part
        # of ours, scrubbed), and the real reason is named.
        assert info.value.__cause__ is None and info.value.__suppress_context__
        assert "refused" in str(info.value)
        with pytest.raises(InvalidArgument) as bad:
            astore(url + "&bogus=1")
        assert secret not in str(bad.value)
    sync = sstore(f"postgresql://user:{secret}@127.0.0.1:1/db?connect_timeout=2")
    with pytest.raises(StoreUnavailable) as info:
        sync.renew([RenewItem("x", "y", 1.0)])
    assert secret not in str(info.value)
    sync.close()


# -- the contract, directly on the async store --------------------------------------


def test_grant_fence_busy_limit_and_idempotent_retry(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            name = unique()
            a, b = tok(), tok()
            first = await store.acquire(req(name, a, ttl=5))
            assert isinstance(first, Granted)
            assert await store.acquire(req(name, a, ttl=5)) == first  # answer lost: retry
            busy = await store.acquire(req(name, b))
            assert isinstance(busy, Busy) and busy.position is None
            assert busy.retry_after is not None and 4.0 < busy.retry_after <= 5.0
            assert await store.release(name, a) is True
            assert await store.release(name, a) is False
            second = await store.acquire(req(name, b))
            assert isinstance(second, Granted) and second.fence > first.fence
            await store.release(name, b)

            sem = unique("sem")
            tokens = [tok() for _ in range(4)]
            results = [await store.acquire(req(sem, t, limit=3)) for t in tokens]
            fences = [r.fence for r in results if isinstance(r, Granted)]
            assert len(fences) == 3 and fences == sorted(fences)
            assert isinstance(results[3], Busy)
            assert [h.limit for h in await store.holders(sem)] == [3, 3, 3]
        finally:
            await store.aclose()

    run(main)


def test_queue_order_and_positions(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            name = unique()
            holder, w1, w2, w3 = tok(), tok(), tok(), tok()
            assert isinstance(await store.acquire(req(name, holder)), Granted)
            positions = [
                (await store.acquire(req(name, w, queue_ttl=10))).position  # type: ignore[union-attr]
                for w in (w1, w2, w3)
            ]
            assert positions == [0, 1, 2]
            # Re-asking keeps the place; a token that is not queued is behind all.
            assert (await store.acquire(req(name, w2, queue_ttl=10))).position == 1  # type: ignore[union-attr]
            assert (await store.acquire(req(name, tok()))).position is None  # type: ignore[union-attr]
            await store.release(name, holder)
            # Free place, but w1 is ahead: w2 must not jump the queue.
            assert isinstance(await store.acquire(req(name, w2, queue_ttl=10)), Busy)
            assert isinstance(await store.acquire(req(name, w1, queue_ttl=10)), Granted)
            await store.release(name, w1)
            assert isinstance(await store.acquire(req(name, w2, queue_ttl=10)), Granted)
            await store.release(name, w2)
            # A queued token that gives up (release) leaves the queue.
            await store.release(name, w3)
            assert await store.holders(name) == []
        finally:
            await store.aclose()

    run(main)


def test_expired_queue_entries_do_not_block(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            name = unique()
            holder, ghost, late = tok(), tok(), tok()
            await store.acquire(req(name, holder, ttl=0.3))
            await store.acquire(req(name, ghost, queue_ttl=0.2))
            await asyncio.sleep(0.4)
            assert isinstance(await store.acquire(req(name, late)), Granted)
        finally:
            await store.aclose()

    run(main)


def test_release_wakes_only_the_head_waiter(pg: PostgresServer) -> None:
    async def main() -> None:
        # Three stores: each waiter listens on its own channel, so the release's
        # NOTIFY reaches the head's store only.
        stores = [astore(pg.url) for _ in range(3)]
        try:
            holder_store, head_store, tail_store = stores
            name = unique()
            holder, head, tail = tok(), tok(), tok()
            first = await holder_store.acquire(req(name, holder))
            assert isinstance(first, Granted)
            assert (await head_store.acquire(req(name, head, queue_ttl=10))).position == 0  # type: ignore[union-attr]
            assert (await tail_store.acquire(req(name, tail, queue_ttl=10))).position == 1  # type: ignore[union-attr]
            tail_wait = asyncio.ensure_future(tail_store.wait(name, tail, 0.5))
            started = time.monotonic()
            await holder_store.release(name, holder)
            handed = await head_store.wait(name, head, 5.0)
            assert isinstance(handed, HandedOver) and handed.fence > first.fence
            assert time.monotonic() - started < 1.0
            assert await tail_wait is False
            # An acquire after the hand-over (the waiter cannot know) confirms it.
            again = await head_store.acquire(req(name, head, queue_ttl=10))
            assert again == Granted(handed.fence)
        finally:
            for store in stores:
                await store.aclose()

    run(main)


def test_wake_sent_before_wait_is_not_missed(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            name = unique()
            holder, waiter = tok(), tok()
            await store.acquire(req(name, holder))
            assert isinstance(await store.acquire(req(name, waiter, queue_ttl=10)), Busy)
            listener = store._listener
            await store.release(name, holder)
            await asyncio.sleep(0.3)  # the notification arrives while nobody waits
            assert isinstance(await store.wait(name, waiter, 0.01), HandedOver)
            # One listening connection per store, reused by every waiter.
            assert isinstance(await store.acquire(req(unique(), tok(), queue_ttl=5)), Granted)
            await store.acquire(req(name, tok(), queue_ttl=5))
            assert store._listener is listener
        finally:
            await store.aclose()

    run(main)


def test_hand_over_makes_the_head_waiter_a_full_holder(pg: PostgresServer) -> None:
    async def main() -> None:
        store, other = astore(pg.url), astore(pg.url)
        waiter_holder = Holder(owner="the-waiter", host="waiter-host", pid=7)
        try:
            name = unique()
            a, b = tok(), tok()
            first = await store.acquire(req(name, a))
            assert isinstance(first, Granted)
            queued = AcquireRequest(name, b, waiter_holder, ttl=20.0, queue_ttl=10.0)
            assert isinstance(await other.acquire(queued), Busy)
            assert await store.release(name, a) is True
            handed = await other.wait(name, b, 5.0)
            assert isinstance(handed, HandedOver) and handed.fence > first.fence
            # A full holder: listed with its own request's identity, counted toward
            # the limit, renewable, releasable.
            (info,) = await store.holders(name)
            assert (info.fence, info.owner, info.host, info.pid) == (
                handed.fence,
                "the-waiter",
                "waiter-host",
                7,
            )
            assert info.expires_in <= 10.0  # min(queue expiry, now + ttl)
            assert isinstance(await store.acquire(req(name, tok())), Busy)
            assert await other.renew([RenewItem(name, b, 20.0)]) == [True]
            (info,) = await store.holders(name)
            assert 10.0 < info.expires_in <= 20.0
            assert await other.release(name, b) is True
            assert await store.holders(name) == []
            third = await store.acquire(req(name, tok()))
            assert isinstance(third, Granted) and third.fence > handed.fence
        finally:
            await store.aclose()
            await other.aclose()

    run(main)


def test_hand_over_fills_only_the_free_places_of_a_semaphore(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            name = unique("sem")
            h1, h2, w1, w2, w3 = (tok() for _ in range(5))
            for token in (h1, h2):
                assert isinstance(await store.acquire(req(name, token, limit=2)), Granted)
            for token in (w1, w2, w3):
                assert isinstance(
                    await store.acquire(req(name, token, limit=2, queue_ttl=10)), Busy
                )
            await store.release(name, h1)  # one place: the head only
            assert isinstance(await store.wait(name, w1, 5.0), HandedOver)
            assert await store.wait(name, w2, 0.2) is False
            assert len(await store.holders(name)) == 2
            assert await store.break_lease(name) == 2  # two places: the next two
            fences = [await store.wait(name, w, 5.0) for w in (w2, w3)]
            assert all(isinstance(f, HandedOver) for f in fences)
            assert sorted(h.fence for h in await store.holders(name)) == sorted(
                f.fence for f in fences if isinstance(f, HandedOver)
            )
        finally:
            await store.aclose()

    run(main)


def test_a_waiter_that_died_blocks_the_name_at_most_its_queue_ttl(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            name = unique()
            holder, dead, alive = tok(), tok(), tok()
            await store.acquire(req(name, holder, ttl=30))
            # Queued, then gone without a word: a 0.5 s queue place, a 30 s ttl.
            assert isinstance(await store.acquire(req(name, dead, ttl=30, queue_ttl=0.5)), Busy)
            assert isinstance(await store.acquire(req(name, alive, queue_ttl=10)), Busy)
            started = time.monotonic()
            await store.release(name, holder)  # hands over to the dead waiter
            (info,) = await store.holders(name)
            assert info.expires_in <= 0.5
            while not isinstance(await store.acquire(req(name, alive, queue_ttl=10)), Granted):
                assert time.monotonic() - started < 5.0
                await asyncio.sleep(0.05)
            assert time.monotonic() - started < 2.0
        finally:
            await store.aclose()

    run(main)


def test_a_hand_over_commits_durably(pg: PostgresServer) -> None:
    store = sstore(pg.url)
    try:
        name, holder, waiter = unique(), tok(), tok()
        store.acquire(req(name, holder))
        assert isinstance(store.acquire(req(name, waiter, queue_ttl=10)), Busy)
    finally:
        store.close()
    with psycopg.connect(pg.url) as conn:  # not autocommit: look inside the transaction
        assert conn.execute(
            "SELECT * FROM leasehold.release(%s, %s)", (name, holder)
        ).fetchone() == (True,)
        # It granted (a fence to the waiter): its commit must flush, unlike a release.
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        fence, queued = conn.execute(
            "SELECT h.fence, (SELECT count(*) FROM leasehold.waiters w WHERE w.name = h.name) "
            "FROM leasehold.holders h WHERE h.name = %s AND h.token = %s",
            (name, waiter),
        ).fetchone() or (None, None)
        assert fence is not None and queued == 0  # a holder now, out of the queue
        conn.rollback()


def test_pooler_mode_hand_over_is_confirmed_by_the_next_acquire(pg: PostgresServer) -> None:
    async def main() -> None:
        pooled = astore(_url(pg, pooler="transaction"))
        try:
            assert pooled.capabilities.hand_over is False
            name = unique()
            holder, waiter = tok(), tok()
            first = await pooled.acquire(req(name, holder))
            assert isinstance(first, Granted)
            assert isinstance(await pooled.acquire(req(name, waiter, queue_ttl=10)), Busy)
            await pooled.release(name, holder)
            assert await pooled.wait(name, waiter, 0.05) is False  # polls: no notification
            (info,) = await pooled.holders(name)
            again = await pooled.acquire(req(name, waiter, queue_ttl=10))
            assert again == Granted(info.fence) and info.fence > first.fence
        finally:
            await pooled.aclose()

    run(main)


def test_break_lease_wakes_and_bumps_fence(pg: PostgresServer) -> None:
    async def main() -> None:
        store, other = astore(pg.url), astore(pg.url)
        try:
            name = unique()
            a, b = tok(), tok()
            first = await store.acquire(req(name, a))
            assert isinstance(first, Granted)
            assert isinstance(await other.acquire(req(name, b, queue_ttl=10)), Busy)
            assert await store.break_lease(name) == 1
            handed = await other.wait(name, b, 5.0)  # break_lease hands over too
            assert isinstance(handed, HandedOver) and handed.fence > first.fence
            assert await store.renew([RenewItem(name, a, 30)]) == [False]
            assert await other.acquire(req(name, b, queue_ttl=10)) == Granted(handed.fence)
            assert await store.break_lease(unique()) == 0
        finally:
            await store.aclose()
            await other.aclose()

    run(main)


def test_renew_batch_of_10000_in_one_round_trip(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            await store.ping()  # installs the schema
            prefix = unique("batch") + ":"
            # Setting up 10,000 grants through acquire would take 10,000 round trips;
            # insert most of them directly and acquire a few for real.
            pg.execute(
                "INSERT INTO leasehold.holders SELECT %s || i, 'tok' || i, 'o', 'h', 1, "
                "nextval('leasehold.fence_seq'), 1, now(), now() + interval '1 minute' "
                "FROM generate_series(0, 9989) i",
                (prefix,),
            )
            real = [(f"{prefix}real{i}", tok()) for i in range(10)]
            for name, token in real:
                assert isinstance(await store.acquire(req(name, token, ttl=60)), Granted)
            items = [RenewItem(f"{prefix}{i}", f"tok{i}", 120.0) for i in range(9990)]
            items += [RenewItem(name, token, 120.0) for name, token in real]
            items[5] = RenewItem(f"{prefix}5", "not-the-owner", 120.0)
            items[7] = RenewItem(f"{prefix}missing", "tok7", 120.0)
            assert len(items) == 10_000
            counter = CountingRuns(store)
            answers = await store.renew(items)
            assert counter.count == 1
            expected = [True] * 10_000
            expected[5] = expected[7] = False
            assert answers == expected
            (info,) = await store.holders(f"{prefix}real3")
            assert 110 < info.expires_in <= 120  # replaced, not added
            assert await store.renew([]) == []
        finally:
            await store.aclose()

    run(main)


def test_renew_10000_after_analyze_is_linear(pg: PostgresServer) -> None:
    # Regression: version 2 answered with EXISTS over the updated rows (a CTE); after
    # ANALYZE the planner estimated one row for it and rescanned it once per item,
    # seconds for 10,000 items, past statement_timeout: every renewal of the batch
    # failed and all its leases were lost.
    async def main() -> None:
        store = astore(pg.url)
        try:
            await store.ping()
            prefix = unique("analyzed") + ":"
            pg.execute(
                "INSERT INTO leasehold.holders SELECT %s || i, 'tok' || i, 'o', 'h', 1, "
                "nextval('leasehold.fence_seq'), 1, now(), now() + interval '1 minute' "
                "FROM generate_series(0, 9999) i",
                (prefix,),
            )
            pg.execute("ANALYZE leasehold.holders")
            pg.execute("ANALYZE leasehold.waiters")
            items = [RenewItem(f"{prefix}{i}", f"tok{i}", 120.0) for i in range(10_000)]
            for _ in range(2):  # the second call may use a cached (generic) plan
                counter = CountingRuns(store)
                started = time.monotonic()
                answers = await store.renew(items)
                assert time.monotonic() - started < 10
                assert counter.count == 1
                assert answers == [True] * 10_000
        finally:
            await store.aclose()

    run(main)


def test_renew_answers_duplicates_and_chunk_edges(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            held = [(unique("dup"), tok()) for _ in range(3)]
            for name, token in held:
                assert isinstance(await store.acquire(req(name, token)), Granted)
            (a, ta), (b, tb), (c, _) = held
            # 2,500 items: three chunks inside the function, duplicates within one
            # chunk and across chunks, misses at the chunk edges.
            items = [RenewItem(unique("absent"), tok(), 60.0) for _ in range(2500)]
            items[0] = items[999] = items[1000] = RenewItem(a, ta, 60.0)
            items[1] = RenewItem(a, ta, 90.0)
            items[1999] = RenewItem(b, tb, 60.0)
            items[2499] = RenewItem(c, "someone-else", 60.0)
            answers = await store.renew(items)
            expected = [False] * 2500
            for i in (0, 1, 999, 1000, 1999):
                expected[i] = True
            assert answers == expected
            (info,) = await store.holders(a)
            assert 50 < info.expires_in <= 90  # renewed once per chunk it is in
        finally:
            await store.aclose()

    run(main)


def test_renew_batches_beyond_one_call_are_split(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apg, "_RENEW_CALL_ITEMS", 3)

    async def main() -> None:
        store = astore(pg.url)
        try:
            held = [(unique("split"), tok()) for _ in range(4)]
            for name, token in held:
                assert isinstance(await store.acquire(req(name, token)), Granted)
            items = [RenewItem(name, token, 60.0) for name, token in held]
            items.insert(2, RenewItem(unique(), tok(), 60.0))
            counter = CountingRuns(store)
            assert await store.renew(items) == [True, True, False, True, True]
            assert counter.count == 2
        finally:
            await store.aclose()

    run(main)


def test_functions_ignore_the_callers_search_path(pg: PostgresServer) -> None:
    # No function sets search_path (a save, a path recomputation and a restore per
    # call); every table, sequence and function of ours is qualified instead, so
    # look-alike tables earlier on the caller's search_path (or in pg_temp) change
    # nothing. Only the functions that look rows up by name have SET clauses:
    # lock_timeout and the planner settings that keep them on index scans; acquire
    # also keeps its plans (schema version 8: its general path, which every queued
    # acquire takes, was otherwise planned anew on every call).
    store = sstore(pg.url)
    try:
        store.ping()
    finally:
        store.close()
    rows = pg.execute(
        "SELECT p.proname, p.proconfig FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'leasehold' AND p.proconfig IS NOT NULL ORDER BY 1"
    )
    settings = ["lock_timeout=10s", "enable_seqscan=off", "enable_bitmapscan=off"]
    generic = [*settings, "plan_cache_mode=force_generic_plan"]
    with_set = ("acquire", "acquire_relaxed", "break_lease", "release", "release_relaxed")
    assert rows == [(f, generic if f.startswith("acquire") else settings) for f in with_set]
    decoy = "decoy_" + uuid.uuid4().hex[:8]
    name, token = unique(), tok()
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {decoy}")
        for table in ("holders", "waiters", "records"):
            conn.execute(f"CREATE TABLE {decoy}.{table} (LIKE leasehold.{table})")
            conn.execute(f"CREATE TEMP TABLE {table} (LIKE leasehold.{table})")
        conn.execute(f"CREATE SEQUENCE {decoy}.fence_seq START 1")
        conn.execute(f"SET search_path = {decoy}, public")
        granted, fence, _, _ = conn.execute(
            "SELECT * FROM leasehold.acquire(%s, %s, 'o', 'h', 1, 60, 1, NULL, NULL, NULL)",
            (name, token),
        ).fetchone() or (None, None, None, None)
        assert granted is True
        assert conn.execute(
            "SELECT leasehold.renew(%s, %s, %s)", ([name], [token], [60.0])
        ).fetchone() == ([True],)
        assert (
            conn.execute(
                "SELECT * FROM leasehold.write_record(%s, 0, 'v', NULL)", (unique("rec"),)
            ).fetchone()
            is not None
        )
        assert conn.execute(f"SELECT count(*) FROM {decoy}.holders").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_temp.holders").fetchone() == (0,)
        assert conn.execute(
            "SELECT * FROM leasehold.release(%s, %s)", (name, token)
        ).fetchone() == (True,)
    assert pg.execute(f"SELECT last_value FROM {decoy}.fence_seq") == [(1,)]  # never drawn
    assert fence is not None and fence > 1
    pg.execute(f"DROP SCHEMA {decoy} CASCADE")


def test_release_commits_asynchronously_only_on_its_own(pg: PostgresServer) -> None:
    store = sstore(pg.url)
    try:
        name, token = unique(), tok()
        assert isinstance(store.acquire(req(name, token)), Granted)
    finally:
        store.close()
    with psycopg.connect(pg.url) as conn:  # not autocommit: look inside the transaction
        conn.execute("SELECT * FROM leasehold.release(%s, %s)", (name, token))
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        conn.rollback()
        # A transaction that wrote before the release keeps its durability.
        conn.execute("SELECT txid_current()")  # what any write does first
        conn.execute("SELECT * FROM leasehold.release(%s, %s)", (name, token))
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        conn.rollback()
        # acquire after a release in one transaction is durable again.
        conn.execute("SELECT * FROM leasehold.release(%s, %s)", (name, token))
        conn.execute(
            "SELECT * FROM leasehold.acquire(%s, %s, 'o', 'h', 1, 60, 1, NULL, NULL, NULL)",
            (unique(), tok()),
        )
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        conn.rollback()


def test_only_an_acquire_that_grants_waits_for_its_flush(pg: PostgresServer) -> None:
    # Schema version 5: a busy answer (queued or not) commits asynchronously, a grant
    # durably, and a caller's own earlier writes keep their durability.
    store = sstore(pg.url)
    try:
        name, holder = unique(), tok()
        assert isinstance(store.acquire(req(name, holder)), Granted)
    finally:
        store.close()
    call = "SELECT granted FROM leasehold.acquire(%s, %s, 'o', 'h', 1, 60, 1, %s, NULL, NULL)"
    with psycopg.connect(pg.url) as conn:  # not autocommit: look inside the transaction
        for queue_ttl in (None, 10.0):
            assert conn.execute(call, (name, tok(), queue_ttl)).fetchone() == (False,)
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
            conn.rollback()
        conn.execute("SELECT txid_current()")  # what any write does first
        assert conn.execute(call, (name, tok(), 10.0)).fetchone() == (False,)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        conn.rollback()
        # The session asks for asynchronous commits; a grant flushes all the same.
        conn.execute("SET synchronous_commit = off")
        assert conn.execute(call, (unique(), tok(), None)).fetchone() == (True,)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        # ... and so does the holder's own acquire again (same fence, new expiry).
        assert conn.execute(call, (name, holder, None)).fetchone() == (True,)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        conn.rollback()


def test_leases_prefix_treats_wildcards_literally(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            base = unique("wild")
            names = [
                f"{base}:50%_off",
                f"{base}:50%Xoff",
                f"{base}:5_",
                f"{base}:5a",
                f"{base}:\\x",
            ]
            for name in names:
                assert isinstance(await store.acquire(req(name, tok())), Granted)
            assert [h.name for h in await store.leases(f"{base}:50%_")] == [f"{base}:50%_off"]
            assert [h.name for h in await store.leases(f"{base}:5_")] == [f"{base}:5_"]
            assert [h.name for h in await store.leases(f"{base}:\\")] == [f"{base}:\\x"]
            every = await store.leases(base)
            assert [h.name for h in every] == sorted(names)
            info = every[0]
            assert (info.owner, info.host, info.pid) == (HOLDER.owner, HOLDER.host, HOLDER.pid)
            assert 0 <= info.held_for < 5 and 25 < info.expires_in <= 30
            assert any(h.name.startswith(base) for h in await store.leases(""))
        finally:
            await store.aclose()

    run(main)


def test_expiry_and_times_come_from_the_server_clock(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            now = await store.server_time()
            assert now is not None and abs(now - time.time()) < 5
            name = unique()
            a = tok()
            await store.acquire(req(name, a, ttl=0.3))
            await asyncio.sleep(0.5)
            assert await store.holders(name) == []
            assert await store.renew([RenewItem(name, a, 30)]) == [False]
            assert isinstance(await store.acquire(req(name, tok())), Granted)
        finally:
            await store.aclose()

    run(main)


def test_concurrent_first_use_installs_once(pg: PostgresServer) -> None:
    schema = "race_" + uuid.uuid4().hex[:8]
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        store = sstore(_url(pg, schema=schema))
        try:
            barrier.wait()
            store.ping()
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pg.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(1,)]


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrent_contenders_respect_the_limit(pg: PostgresServer, limit: int) -> None:
    name = unique("stress")
    guard = threading.Lock()
    inside = 0
    most = 0
    fences: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal inside, most
        store = sstore(pg.url)
        try:
            for _ in range(15):
                token = tok()
                while True:
                    result = store.acquire(req(name, token, ttl=10, limit=limit, queue_ttl=5))
                    if isinstance(result, Granted):
                        break
                    store.wait(name, token, 1.0)
                with guard:
                    inside += 1
                    most = max(most, inside)
                    fences.append(result.fence)
                time.sleep(0.002)
                with guard:
                    inside -= 1
                assert store.release(name, token) is True
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert most <= limit
    assert len(fences) == 90 and len(set(fences)) == 90
    if limit == 1:
        assert fences == sorted(fences)  # grant order is fence order


# -- schema option and migrations ------------------------------------------------------


def test_schema_option_keeps_state_apart(pg: PostgresServer) -> None:
    async def main() -> None:
        schema = "custom_" + uuid.uuid4().hex[:8]
        custom, default = astore(_url(pg, schema=schema)), astore(pg.url)
        try:
            name = unique()
            assert isinstance(await custom.acquire(req(name, tok())), Granted)
            assert isinstance(await default.acquire(req(name, tok())), Granted)
            assert len(await custom.holders(name)) == 1
            rows = pg.execute(f"SELECT count(*) FROM {schema}.holders WHERE name = %s", (name,))
            assert rows == [(1,)]
        finally:
            await custom.aclose()
            await default.aclose()

    run(main)


def test_create_schema_false_needs_the_migration(pg: PostgresServer) -> None:
    schema = "migrated_" + uuid.uuid4().hex[:8]
    store = sstore(_url(pg, schema=schema, create_schema="false"))
    try:
        with pytest.raises(StoreUnavailable, match=r"schema\.sql"):
            store.ping()
        # Apply the shipped file the way a migration tool would: one transaction,
        # with the schema name replaced in the two marked lines only.
        text = resources.files("leasehold._shared").joinpath("postgres/schema.sql").read_text()
        marked = [line for line in text.splitlines() if line.rstrip().endswith("-- (*)")]
        assert len(marked) == 2
        for line in marked:
            text = text.replace(line, line.replace("leasehold", schema))
        with psycopg.connect(pg.url) as conn:  # not autocommit: one transaction
            conn.execute(text.encode())
            path_after = conn.execute("SHOW search_path").fetchone()
        assert path_after == ('"$user", public',)  # the file puts search_path back
        assert store.ping() is None
        assert isinstance(store.acquire(req(unique(), tok())), Granted)
    finally:
        store.close()


# Version 1 of schema.sql, as first shipped: the starting point of upgrade tests.
V1_SCHEMA_COMMIT = "b9b8456fa3bd04470b93a5044c6d5cc62eb1ab48"
# Where schema.sql lived in those commits (it moved to leasehold/_shared/ later).
SCHEMA_FILE = "src/leasehold/_scripts/postgres/schema.sql"
# Where it is since schema version 6.
MOVED_SCHEMA_FILE = "src/leasehold/_shared/postgres/schema.sql"


def _v1_schema_sql() -> str:
    return _schema_sql_at(V1_SCHEMA_COMMIT, "AS $$ SELECT 1 $$")


def _schema_sql_at(commit: str, version_marker: str) -> str:
    git = shutil.which("git")
    root = Path(__file__).resolve().parent.parent
    if git is None or not (root / ".git").exists():
        pytest.skip("needs git and the repository history for older schemas")
    for path in (SCHEMA_FILE, MOVED_SCHEMA_FILE):
        proc = subprocess.run(
            [git, "show", f"{commit}:{path}"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            break
    if proc.returncode != 0:
        pytest.skip(f"schema of {commit} not in this checkout: {proc.stderr.strip()}")
    assert version_marker in proc.stdout  # what schema_version() returns there
    return proc.stdout


def _current_schema_sql() -> str:
    return resources.files("leasehold._shared").joinpath("postgres/schema.sql").read_text()


def _for_schema(text: str, schema: str) -> bytes:
    """schema.sql with the schema name replaced in the two marked lines only."""
    marked = [line for line in text.splitlines() if line.rstrip().endswith("-- (*)")]
    assert len(marked) == 2
    for line in marked:
        text = text.replace(line, line.replace("leasehold", schema))
    return text.encode()


def _proc_xmin(pg: PostgresServer, schema: str) -> str:
    """The transaction that last wrote schema_version(): changes on every install."""
    rows = pg.execute(
        "SELECT xmin::text FROM pg_proc WHERE oid = to_regprocedure(%s)",
        (f"{schema}.schema_version()",),
    )
    return str(rows[0][0])


def test_upgrade_from_schema_version_1_keeps_leases(pg: PostgresServer) -> None:
    schema = "upgrade_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.url) as conn:  # one transaction, like psql --single-transaction
        conn.execute(_for_schema(_v1_schema_sql(), schema))
    assert pg.execute(f"SELECT {schema}.schema_version()") == [(1,)]
    assert pg.execute("SELECT to_regclass(%s)", (f"{schema}.records",)) == [(None,)]
    # A grant made through version 1's own function, as the previous release would.
    name, token = unique(), tok()
    ((granted, old_fence),) = pg.execute(
        f"SELECT granted, fence FROM {schema}.acquire(%s, %s, 'old', 'h', 1, 60, 1, "
        "NULL, NULL, NULL)",
        (name, token),
    )
    assert granted is True

    strict = sstore(_url(pg, schema=schema, create_schema="false"))
    try:
        with pytest.raises(
            StoreUnavailable, match=rf"version 1 \(version {pg_schema.SCHEMA_VERSION} needed\)"
        ):
            strict.read_record("k")
    finally:
        strict.close()

    store = sstore(_url(pg, schema=schema))
    try:
        key = unique("rec")
        version = store.write_record(key, 0, b"after upgrade")
        assert version is not None and version > old_fence  # the same sequence
        assert pg.execute(f"SELECT {schema}.schema_version()") == [(pg_schema.SCHEMA_VERSION,)]
        # The old grant survived the upgrade and is served by the new functions.
        (info,) = store.holders(name)
        assert (info.fence, info.owner) == (old_fence, "old")
        assert store.renew([RenewItem(name, token, 60)]) == [True]
        after = store.acquire(req(unique(), tok()))
        assert isinstance(after, Granted) and after.fence > version
        assert store.read_record(key).value == b"after upgrade"
    finally:
        store.close()
    # Current now: a new store checks the version and runs no DDL.
    installed = _proc_xmin(pg, schema)
    again = sstore(_url(pg, schema=schema))
    try:
        assert again.read_record(key).version == version
    finally:
        again.close()
    assert _proc_xmin(pg, schema) == installed
    # Running the file again by hand (a migration tool) is harmless too.
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_current_schema_sql(), schema))
    assert pg.execute(f"SELECT {schema}.schema_version()") == [(pg_schema.SCHEMA_VERSION,)]


# Version 2 of schema.sql (records added): the starting point of the version 3 upgrade.
V2_SCHEMA_COMMIT = "dd182a5ca93ae6c51793cc3494ab3051140a7501"


def test_upgrade_from_schema_version_2_adds_indexes_and_keeps_leases(pg: PostgresServer) -> None:
    schema = "upgrade2_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_schema_sql_at(V2_SCHEMA_COMMIT, "AS $$ SELECT 2 $$"), schema))
    assert pg.execute(f"SELECT {schema}.schema_version()") == [(2,)]
    name, token = unique(), tok()
    ((granted, old_fence),) = pg.execute(
        f"SELECT granted, fence FROM {schema}.acquire(%s, %s, 'old', 'h', 1, 60, 1, "
        "NULL, NULL, NULL)",
        (name, token),
    )
    assert granted is True
    key = unique("rec")
    (old_version,) = pg.execute(f"SELECT {schema}.write_record(%s, 0, 'v2', 600)", (key,))[0]

    def indexes() -> set[str]:
        rows = pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))
        return {str(row[0]) for row in rows}

    assert "holders_expires_at" not in indexes()
    store = sstore(_url(pg, schema=schema))
    try:
        assert store.renew([RenewItem(name, token, 60)]) == [True]
        assert pg.execute(f"SELECT {schema}.schema_version()") == [(pg_schema.SCHEMA_VERSION,)]
        assert {"holders_expires_at", "waiters_expires_at", "records_expires_at"} <= indexes()
        assert pg.execute("SELECT to_regprocedure(%s)", (f"{schema}.lock_name(text)",)) == [(None,)]
        (info,) = store.holders(name)
        assert (info.fence, info.owner) == (old_fence, "old")
        assert store.read_record(key).version == old_version
        assert store.release(name, token) is True
        after = store.acquire(req(name, tok()))
        assert isinstance(after, Granted) and after.fence > old_version
    finally:
        store.close()
    # Idempotent: running the file again changes nothing and fails nothing.
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_current_schema_sql(), schema))
    assert pg.execute(f"SELECT {schema}.schema_version()") == [(pg_schema.SCHEMA_VERSION,)]


# Version 3 of schema.sql (expires_at indexes): the starting point of the version 4
# upgrade (hand-over).
V3_SCHEMA_COMMIT = "1f54317c507a7d42b9e1bc6df9a34dfd5068e8eb"


def test_upgrade_from_schema_version_3_hands_over_to_old_queue_entries(
    pg: PostgresServer,
) -> None:
    schema = "upgrade3_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_schema_sql_at(V3_SCHEMA_COMMIT, "AS $$ SELECT 3 $$"), schema))
    assert pg.execute(f"SELECT {schema}.schema_version()") == [(3,)]
    name, holder, waiter = unique(), tok(), tok()
    call = f"SELECT granted, fence FROM {schema}.acquire(%s, %s, 'old', 'h', 1, 60, 1, %s, %s, %s)"
    ((granted, old_fence),) = pg.execute(call, (name, holder, None, None, None))
    assert granted is True
    # Queued by version 3: no owner or ttl in its queue entry, woken on its channel.
    ((granted, _),) = pg.execute(call, (name, waiter, 30.0, "old_channel", "old_key"))
    assert granted is False

    store = sstore(_url(pg, schema=schema))
    try:
        assert store.renew([RenewItem(name, holder, 60)]) == [True]  # installs version 4
        assert pg.execute(f"SELECT {schema}.schema_version()") == [(pg_schema.SCHEMA_VERSION,)]
        columns = pg.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'waiters'",
            (schema,),
        )
        assert {"owner", "host", "pid", "ttl"} <= {str(c[0]) for c in columns}
        assert pg.execute(
            "SELECT to_regprocedure(%s)", (f"{schema}.wake(text,timestamptz,integer)",)
        ) == [(None,)]
        # The old queue entry is handed over: for as long as its queue place lasts.
        assert store.release(name, holder) is True
        (info,) = store.holders(name)
        assert info.fence > old_fence and info.owner == "" and info.expires_in <= 30.0
        confirmed = store.acquire(req(name, waiter, queue_ttl=10))
        assert confirmed == Granted(info.fence)
        (info,) = store.holders(name)
        assert info.expires_in > 29.0  # confirmed: a full ttl
        assert store.release(name, waiter) is True
    finally:
        store.close()
    # Idempotent: running the file again changes nothing and fails nothing.
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_current_schema_sql(), schema))
    assert pg.execute(f"SELECT {schema}.schema_version()") == [(pg_schema.SCHEMA_VERSION,)]


def test_concurrent_upgrade_rechecks_under_the_install_lock(pg: PostgresServer) -> None:
    schema = "upgrade_race_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_v1_schema_sql(), schema))
    # Four separate stores (from_url would share one within this process).
    stores = [spg.PostgresStore(parse(_url(pg, schema=schema))) for _ in range(4)]
    errors: list[BaseException] = []
    versions: list[int | None] = []

    def worker(store: spg.PostgresStore) -> None:
        try:
            versions.append(store.write_record(unique("rec"), 0, b"x"))
        except BaseException as exc:
            errors.append(exc)

    # Hold the install lock while the stores find version 1 and queue behind it, then
    # upgrade in that transaction: every store must see the new version under the
    # lock (catalog caches refreshed) and run nothing.
    with psycopg.connect(pg.url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(hashtext('leasehold'), hashtext('install'))")
        threads = [threading.Thread(target=worker, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        waiting = 0
        while waiting < len(stores) and time.monotonic() < deadline:
            time.sleep(0.02)
            waiting = int(
                pg.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )[0][0]
            )
        assert waiting == len(stores)
        holder.execute(_for_schema(_current_schema_sql(), schema))
        (ours,) = holder.execute(
            "SELECT xmin::text FROM pg_proc WHERE oid = to_regprocedure(%s)",
            (f"{schema}.schema_version()",),
        ).fetchone() or (None,)
    for thread in threads:
        thread.join(30)
    for store in stores:
        store.close()
    assert errors == []
    assert len(versions) == 4 and all(v is not None for v in versions)
    assert _proc_xmin(pg, schema) == ours  # nobody ran the file after us


def test_a_newer_schema_is_never_replaced(pg: PostgresServer) -> None:
    schema = "newer_" + uuid.uuid4().hex[:8]
    newer_version = pg_schema.SCHEMA_VERSION + 1
    store = sstore(_url(pg, schema=schema))
    try:
        store.ping()
        pg.execute(
            f"CREATE OR REPLACE FUNCTION {schema}.schema_version() RETURNS integer "
            f"LANGUAGE sql IMMUTABLE AS $$ SELECT {newer_version} $$"
        )
    finally:
        store.close()
    newer = _proc_xmin(pg, schema)
    store = sstore(_url(pg, schema=schema))
    try:
        assert store.write_record(unique("rec"), 0, b"x") is not None
    finally:
        store.close()
    assert pg.execute(f"SELECT {schema}.schema_version()") == [(newer_version,)]
    assert _proc_xmin(pg, schema) == newer


# -- records ----------------------------------------------------------------------------


def test_record_operations_are_one_round_trip_each(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            await store.ping()  # installs the schema
            counter = CountingRuns(store)
            key = unique("rec")
            assert (await store.read_record(key)).version == 0
            v1 = await store.write_record(key, 0, b"a", ttl=30)
            assert v1 is not None
            assert await store.write_record(key, 0, b"b") is None
            assert await store.write_record(key, v1, None) is not None
            assert counter.count == 4
        finally:
            await store.aclose()

    run(main)


def test_record_clock_and_expiry_are_the_servers(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(pg.url)
        try:
            key = unique("rec")
            server = await store.server_time()
            record = await store.read_record(key)
            assert record.key == key and (record.value, record.version) == (None, 0)
            # Unix seconds from clock_timestamp(): server_time()'s time base.
            assert server is not None and 0 <= record.now - server < 2
            assert abs(record.now - time.time()) < 5
            version = await store.write_record(key, 0, b"v", ttl=60)
            assert version is not None
            ((expires,),) = pg.execute(
                "SELECT extract(epoch FROM expires_at)::float8 FROM leasehold.records "
                "WHERE key = %s",
                (key,),
            )
            assert 0 <= expires - (record.now + 60) < 2  # written on the same clock
            forever = unique("rec")
            assert await store.write_record(forever, 0, b"v") is not None
            assert pg.execute(
                "SELECT expires_at FROM leasehold.records WHERE key = %s", (forever,)
            ) == [(None,)]

            short = unique("rec")
            old = await store.write_record(short, 0, b"short", ttl=0.3)
            assert old is not None
            await asyncio.sleep(0.5)
            gone = await store.read_record(short)
            assert (gone.value, gone.version) == (None, 0)
            assert await store.write_record(short, old, b"late") is None
            reborn = await store.write_record(short, 0, b"again")
            assert reborn is not None and reborn > old

            # Empty values are values, not deletions; keys are byte-exact.
            empty = unique("rec")
            assert await store.write_record(empty, 0, b"") is not None
            assert (await store.read_record(empty)).value == b""
            assert (await store.read_record(empty.upper())).version == 0
        finally:
            await store.aclose()

    run(main)


def test_purge_drops_long_expired_records(pg: PostgresServer) -> None:
    store = sstore(pg.url)
    try:
        store.ping()
        stem = unique("purge")
        pg.execute(
            "INSERT INTO leasehold.records SELECT %s || i, 'x', nextval('leasehold.fence_seq'), "
            "now() - interval '2 minutes' FROM generate_series(1, 20) i",
            (stem,),
        )
        live = store.write_record(f"{stem}live", 0, b"live")
        assert store.read_record(f"{stem}1").version == 0  # expired: absent already
        pg.execute("SELECT leasehold.purge(clock_timestamp())")
        rows = pg.execute("SELECT key FROM leasehold.records WHERE starts_with(key, %s)", (stem,))
        assert rows == [(f"{stem}live",)]
        assert store.read_record(f"{stem}live").version == live
    finally:
        store.close()


def _race_writes(
    stores: list[spg.PostgresStore], key: str, expected: int, delete: bool
) -> list[int | None]:
    """Every store writes ``key`` expecting ``expected``, all released at once."""
    barrier = threading.Barrier(len(stores))
    results: list[int | None] = [None] * len(stores)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].write_record(key, expected, None if delete else b"%d" % i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_record_cas_races_across_connections(pg: PostgresServer) -> None:
    stores = [sstore(pg.url) for _ in range(8)]
    try:
        key = unique("cas")
        # Everyone writes with the same expected version at once: exactly one wins.
        # Round 0 creates the absent key (no row to lock yet), the last deletes it.
        for round_ in range(6):
            delete = round_ == 5
            expected = stores[0].read_record(key).version
            results = _race_writes(stores, key, expected, delete)
            winners = [i for i, r in enumerate(results) if r is not None]
            assert len(winners) == 1, results
            record = stores[0].read_record(key)
            if delete:
                assert (record.value, record.version) == (None, 0)
            else:
                assert record.version == results[winners[0]]
                assert record.version > expected
                assert record.value == b"%d" % winners[0]
    finally:
        for store in stores:
            store.close()


def test_record_increments_and_grants_share_one_sequence(pg: PostgresServer) -> None:
    counter_key = unique("counter")
    guard = threading.Lock()
    issued: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        store = sstore(pg.url)
        mine: list[int] = []
        try:
            for _ in range(20):
                while True:
                    record = store.read_record(counter_key)
                    count = int(record.value or b"0")
                    version = store.write_record(counter_key, record.version, b"%d" % (count + 1))
                    if version is not None:
                        break
                mine.append(version)
                granted = store.acquire(req(unique(), tok()))
                assert isinstance(granted, Granted)
                mine.append(granted.fence)
            assert mine == sorted(mine)  # one sequence, seen from one connection
            with guard:
                issued.extend(mine)
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    check = sstore(pg.url)
    try:
        assert check.read_record(counter_key).value == b"120"
    finally:
        check.close()
    assert len(issued) == 240 and len(set(issued)) == 240  # versions and fences never meet


def test_async_record_creates_race_from_several_stores(pg: PostgresServer) -> None:
    async def main() -> None:
        stores = [astore(pg.url) for _ in range(4)]
        try:
            key = unique("rec")
            results = await asyncio.gather(
                *(stores[i % 4].write_record(key, 0, b"%d" % i) for i in range(20))
            )
            winners = [i for i, r in enumerate(results) if r is not None]
            assert len(winners) == 1
            record = await stores[1].read_record(key)
            assert record.value == b"%d" % winners[0]
        finally:
            for store in stores:
                await store.aclose()

    run(main)


def test_write_record_is_not_retried_on_a_dead_connection(own_pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(own_pg.url)
        try:
            key = unique("rec")
            version = await store.write_record(key, 0, b"v")
            assert version is not None
            own_pg.terminate_backends()
            await asyncio.sleep(0.1)
            original = pg_connection._looks_dead
            calls: list[object] = []

            def first_check_misses(conn: Any) -> bool:
                calls.append(conn)
                return False if len(calls) == 1 else original(conn)

            pg_connection._looks_dead = first_check_misses
            try:
                # Its answer would be wrong if repeated after a lost commit, so the
                # failure is reported (as StoreUnavailable), not retried...
                with pytest.raises(StoreUnavailable, match="write_record"):
                    await store.write_record(key, version, b"w")
                # ...whereas a read is retried once on a fresh connection.
                calls.clear()
                own_pg.terminate_backends()
                await asyncio.sleep(0.1)
                record = await store.read_record(key)
            finally:
                pg_connection._looks_dead = original
            assert (record.value, record.version) == (b"v", version)
            assert await store.write_record(key, version, b"w") is not None
        finally:
            await store.aclose()

    run(main)


def test_records_survive_a_crash_and_versions_keep_increasing(own_pg: PostgresServer) -> None:
    store = sstore(own_pg.url)
    try:
        key = unique("rec")
        versions = [store.write_record(key, 0, b"0")]
        for i in range(1, 40):  # move the sequence past its WAL-logged batch
            last = versions[-1]
            assert last is not None
            versions.append(store.write_record(key, last, b"%d" % i))
        own_pg.kill()
        own_pg.start()
        record = store.read_record(key)
        assert (record.value, record.version) == (b"39", versions[-1])
        newer = store.write_record(key, record.version, b"after")
        assert newer is not None and newer > max(v or 0 for v in versions)
    finally:
        store.close()


def test_records_errors_are_store_unavailable() -> None:
    secret = "s3cr3t-Pa55"
    store = sstore(f"postgresql://user:{secret}@127.0.0.1:1/db?connect_timeout=2")
    try:
        for call in (lambda: store.read_record("k"), lambda: store.write_record("k", 0, b"v")):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert secret not in str(info.value)
            assert info.value.__cause__ is None
    finally:
        store.close()


@contextlib.asynccontextmanager
async def _operation_connection(store: Any) -> AsyncIterator[Any]:
    """The connection the store's next call would use, taken the way its calls take
    it (its spare one, kept out of the pool between calls, else the pool's)."""
    conn, pooled = await store._getconn(store._pool)
    try:
        yield conn
    finally:
        await store._putconn(store._pool, conn, pooled)


def test_records_in_pooler_mode(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(_url(pg, pooler="transaction"))
        try:
            assert isinstance(store, apg.AsyncPooledPostgresStore)
            key = unique("rec")
            version = 0
            for i in range(12):  # well past psycopg's prepare threshold
                record = await store.read_record(key)
                assert record.version == version
                new = await store.write_record(key, version, b"%d" % i, ttl=30)
                assert new is not None and new > version
                version = new
            assert store._listener is None
            assert store._pool is not None
            async with _operation_connection(store) as conn:
                assert conn.prepare_threshold is None
        finally:
            await store.aclose()

    run(main)


def test_records_behind_pgbouncer(pg: PostgresServer, bouncer: PgBouncer) -> None:
    # Two server sessions shared by every client: the advisory lock of a write must
    # be transaction-scoped, or increments would be lost or sessions left locked.
    url = bouncer.url + "?pooler=transaction&schema=bounced_rec_" + uuid.uuid4().hex[:6]
    key = unique("bounced")
    errors: list[BaseException] = []

    def worker() -> None:
        store = sstore(url)
        try:
            for _ in range(10):
                while True:
                    record = store.read_record(key)
                    count = int(record.value or b"0")
                    if store.write_record(key, record.version, b"%d" % (count + 1)) is not None:
                        break
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    store = sstore(url)
    try:
        assert store.read_record(key).value == b"50"
    finally:
        store.close()


# -- connections dying under the store -------------------------------------------------


def test_terminated_connections_reconnect_on_next_renew(own_pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(own_pg.url)
        try:
            name = unique()
            a = tok()
            assert isinstance(await store.acquire(req(name, a)), Granted)
            assert own_pg.terminate_backends() >= 1
            await asyncio.sleep(0.1)
            assert await store.renew([RenewItem(name, a, 30)]) == [True]
            # A connection that dies while in use is retried once as well.
            own_pg.terminate_backends()
            await asyncio.sleep(0.1)
            original = pg_connection._looks_dead
            calls: list[object] = []

            def first_check_misses(conn: Any) -> bool:
                # Hand out one dead connection anyway, as if it died in flight.
                calls.append(conn)
                return False if len(calls) == 1 else original(conn)

            pg_connection._looks_dead = first_check_misses
            try:
                assert await store.renew([RenewItem(name, a, 30)]) == [True]
            finally:
                pg_connection._looks_dead = original
        finally:
            await store.aclose()

    run(main)


def test_terminated_listener_wakes_waiters_and_listens_again(own_pg: PostgresServer) -> None:
    async def main() -> None:
        store, waiter_store = astore(own_pg.url), astore(own_pg.url)
        try:
            name = unique()
            holder, waiter = tok(), tok()
            await store.acquire(req(name, holder))
            assert isinstance(await waiter_store.acquire(req(name, waiter, queue_ttl=10)), Busy)
            first_listener = waiter_store._listener
            assert first_listener is not None and first_listener.alive
            own_pg.terminate_backends()
            # The lost listener wakes the waiter (notifications may have been lost)...
            assert await waiter_store.wait(name, waiter, 5.0) is True
            # ...whose next attempt listens again before it queues.
            assert isinstance(await waiter_store.acquire(req(name, waiter, queue_ttl=10)), Busy)
            assert waiter_store._listener is not first_listener
            await store.release(name, holder)
            handed = await waiter_store.wait(name, waiter, 5.0)
            assert isinstance(handed, HandedOver)
            assert await waiter_store.acquire(req(name, waiter, queue_ttl=10)) == Granted(
                handed.fence
            )
        finally:
            await store.aclose()
            await waiter_store.aclose()

    run(main)


def test_lost_announcement_listener_wakes_subscribers_and_listens_again(
    own_pg: PostgresServer,
) -> None:
    async def main() -> None:
        store, listening = astore(own_pg.url), astore(own_pg.url)
        try:
            async with listening.subscribe("election:x") as subscription:
                assert await subscription.wait(0.05) is False
                own_pg.terminate_backends()
                # Announcements may have been lost with the listener: every subscriber
                # is woken, and the next wait listens anew first (and says so).
                assert await subscription.wait(5.0) is True
                assert await subscription.wait(5.0) is True
                await store.announce("election:x")
                assert await subscription.wait(5.0) is True
                assert await subscription.wait(0.1) is False
        finally:
            await store.aclose()
            await listening.aclose()

    run(main)


def test_announcements_stay_in_their_schema(pg: PostgresServer) -> None:
    assert pg_waiting.announce_channel("leasehold") != pg_waiting.announce_channel("other")

    async def main() -> None:
        mine, theirs = astore(pg.url), astore(_url(pg, schema="lh_announce_other"))
        try:
            async with mine.subscribe("t") as subscription:
                await theirs.announce("t")  # another schema: another store
                assert await subscription.wait(0.3) is False
                await mine.announce("t")
                assert await subscription.wait(5.0) is True
        finally:
            await mine.aclose()
            await theirs.aclose()

    run(main)


@pytest.mark.parametrize("how", ["fast", "immediate", "kill"])
def test_restart_keeps_holders_and_fences_increase(own_pg: PostgresServer, how: str) -> None:
    async def main() -> None:
        store = astore(own_pg.url)
        try:
            name = unique()
            a = tok()
            granted = await store.acquire(req(name, a, ttl=120))
            assert isinstance(granted, Granted)
            fences = [granted.fence]
            for _ in range(40):  # move the sequence past its WAL-logged batch
                other = unique()
                result = await store.acquire(req(other, tok()))
                assert isinstance(result, Granted)
                fences.append(result.fence)
            if how == "kill":
                own_pg.kill()
                own_pg.start()
            else:
                own_pg.restart(how)  # type: ignore[arg-type]
            (info,) = await store.holders(name)  # durable: the grant survived
            assert info.fence == granted.fence
            assert await store.renew([RenewItem(name, a, 120)]) == [True]
            after = await store.acquire(req(unique(), tok()))
            assert isinstance(after, Granted) and after.fence > max(fences)
            busy = await store.acquire(req(name, tok()))
            assert isinstance(busy, Busy)
        finally:
            await store.aclose()

    run(main)


def test_store_errors_while_server_is_down(own_pg: PostgresServer) -> None:
    store = sstore(_url(own_pg, connect_timeout="2"))
    try:
        name = unique()
        a = tok()
        assert isinstance(store.acquire(req(name, a, ttl=60)), Granted)
        own_pg.shutdown("fast")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.renew([RenewItem(name, a, 60)])
        assert time.monotonic() - started < 10
        own_pg.start()
        assert store.renew([RenewItem(name, a, 60)]) == [True]
    finally:
        store.close()


# -- transaction-mode pooler -------------------------------------------------------------


def test_pooler_mode_polls_without_session_state(pg: PostgresServer) -> None:
    async def main() -> None:
        store = astore(_url(pg, pooler="transaction"))
        try:
            assert isinstance(store, apg.AsyncPooledPostgresStore)
            assert store.capabilities.notifications is False
            assert any("pooler=transaction" in w for w in store.warnings())
            name = unique()
            holder, waiter = tok(), tok()
            await store.acquire(req(name, holder))
            busy = await store.acquire(req(name, waiter, queue_ttl=10))
            assert isinstance(busy, Busy) and busy.position == 0
            assert store._listener is None  # no LISTEN behind a pooler
            await store.release(name, holder)
            started = time.monotonic()
            assert await store.wait(name, waiter, 0.2) is False  # polling: sleeps
            assert time.monotonic() - started >= 0.19
            assert isinstance(await store.acquire(req(name, waiter, queue_ttl=10)), Granted)
            assert store._pool is not None
            async with _operation_connection(store) as conn:
                assert conn.prepare_threshold is None
                options = (await (await conn.execute("SHOW statement_timeout")).fetchone())[0]
                assert options == "0"  # no startup options behind a pooler
        finally:
            await store.aclose()

    run(main)


def test_pooler_mode_lock_handoff_through_client(pg: PostgresServer) -> None:
    url = _url(pg, pooler="transaction")
    name = unique()
    order: list[str] = []
    with Client(url) as first, Client(url) as second:
        lease = first.lock(name, ttl=10).acquire(timeout=5)

        def contender() -> None:
            got = second.lock(name, ttl=10).acquire(timeout=10)
            order.append("second")
            got.release()

        thread = threading.Thread(target=contender)
        thread.start()
        time.sleep(0.3)
        order.append("first")
        lease.release()
        thread.join()
    assert order == ["first", "second"]


@pytest.fixture(scope="module")
def bouncer(pg: PostgresServer) -> Iterator[PgBouncer]:
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (optional: apt-get install pgbouncer)")
    with PgBouncer(pg, pool_mode="transaction", pool_size=2) as proxy:
        yield proxy


def test_behind_pgbouncer_in_transaction_mode(pg: PostgresServer, bouncer: PgBouncer) -> None:
    # Two server sessions shared by every client: consecutive calls of one store
    # land on different sessions, so any reliance on session state would show.
    url = bouncer.url + "?pooler=transaction&schema=bounced_" + uuid.uuid4().hex[:6]
    name = unique("bounced")
    guard = threading.Lock()
    inside = most = 0
    fences: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal inside, most
        store = sstore(url)
        try:
            for _ in range(10):
                token = tok()
                while not isinstance(
                    result := store.acquire(req(name, token, ttl=10, queue_ttl=5)), Granted
                ):
                    store.wait(name, token, 0.005)
                with guard:
                    inside += 1
                    most = max(most, inside)
                    fences.append(result.fence)
                assert store.renew([RenewItem(name, token, 10)]) == [True]
                with guard:
                    inside -= 1
                assert store.release(name, token) is True
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert most == 1
    assert fences == sorted(fences) and len(set(fences)) == 50

    async def main() -> None:
        store = astore(url)
        try:
            items = []
            for i in range(20):  # well past psycopg's prepare threshold
                token = tok()
                assert isinstance(await store.acquire(req(f"{name}:{i}", token)), Granted)
                items.append(RenewItem(f"{name}:{i}", token, 30))
            assert await store.renew(items) == [True] * 20
            assert len(await store.leases(f"{name}:")) == 20
        finally:
            await store.aclose()

    run(main)


# -- the generated sync store -----------------------------------------------------------


def test_sync_store_contract(pg: PostgresServer) -> None:
    store, other = sstore(pg.url), sstore(pg.url)
    try:
        assert type(store).capabilities.notifications is True
        name = unique()
        a, b = tok(), tok()
        first = store.acquire(req(name, a))
        assert isinstance(first, Granted)
        busy = other.acquire(req(name, b, queue_ttl=10))
        assert isinstance(busy, Busy) and busy.position == 0
        threading.Timer(0.2, lambda: store.release(name, a)).start()
        started = time.monotonic()
        handed = other.wait(name, b, 5.0)
        assert isinstance(handed, HandedOver) and handed.fence > first.fence
        assert time.monotonic() - started < 2.0
        second = other.acquire(req(name, b, queue_ttl=10))
        assert second == Granted(handed.fence)
        assert store.renew([RenewItem(name, a, 5), RenewItem(name, b, 5)]) == [False, True]
        assert [h.fence for h in store.holders(name)] == [second.fence]
        assert store.break_lease(name) == 1
        server_now = store.server_time()
        assert server_now is not None and abs(server_now - time.time()) < 5
    finally:
        store.close()
        other.close()


def test_sync_wake_before_wait_and_pooler_mode(pg: PostgresServer) -> None:
    store = sstore(pg.url)
    pooled = sstore(_url(pg, pooler="transaction"))
    try:
        name = unique()
        holder, waiter = tok(), tok()
        store.acquire(req(name, holder))
        assert isinstance(store.acquire(req(name, waiter, queue_ttl=10)), Busy)
        store.release(name, holder)
        time.sleep(0.3)
        assert isinstance(store.wait(name, waiter, 0.01), HandedOver)
        assert isinstance(pooled, spg.PooledPostgresStore)
        assert pooled.capabilities.notifications is False
        assert pooled.capabilities.hand_over is False
        other = unique()
        pooled.acquire(req(other, holder))
        assert isinstance(pooled.acquire(req(other, waiter, queue_ttl=10)), Busy)
        assert pooled._listener is None
    finally:
        store.close()
        pooled.close()


def test_sync_terminated_connections_reconnect(own_pg: PostgresServer) -> None:
    store = sstore(own_pg.url)
    try:
        name = unique()
        a = tok()
        store.acquire(req(name, a))
        assert isinstance(store.acquire(req(name, tok(), queue_ttl=5)), Busy)  # + listener
        own_pg.terminate_backends()
        time.sleep(0.1)
        assert store.renew([RenewItem(name, a, 30)]) == [True]
        own_pg.restart("immediate")
        assert store.renew([RenewItem(name, a, 30)]) == [True]
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_never_uses_the_parents_connections(pg: PostgresServer) -> None:
    store = sstore(pg.url)
    try:
        name = unique()
        a = tok()
        store.acquire(req(name, a))
        assert isinstance(store.acquire(req(name, tok(), queue_ttl=5)), Busy)  # + listener
        before = {
            row[0]
            for row in pg.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'leasehold'"
            )
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                # The child may use the store: it gets connections of its own...
                result = store.acquire(req(unique(), tok()))
                # ...and must not be able to renew its parent's lease by accident
                # through the parent's sockets (it renews by token, which works
                # on a fresh connection -- the point is that nothing is shared).
                code = 0 if isinstance(result, Granted) else 2
                store.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's sessions survived the child's use and close of the store.
        after = {
            row[0]
            for row in pg.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'leasehold'"
            )
        }
        assert before <= after
        assert store.renew([RenewItem(name, a, 30)]) == [True]
        assert store._listener is not None and store._listener.alive
    finally:
        store.close()
