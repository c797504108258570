"""The hot calls (acquire, release) sent through psycopg's libpq layer
(backends/postgres/direct.py): prepared once per session, prepared again when the
session lost them, values that round-trip exactly, psycopg's cancellation."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("psycopg_pool")

from leasehold._async.backends.postgres import direct as adirect  # noqa: E402
from leasehold._async.backends.postgres import store as apg  # noqa: E402
from leasehold._core.clock import SYSTEM_CLOCK  # noqa: E402
from leasehold._core.records import AcquireRequest, Busy, Granted, Holder  # noqa: E402
from leasehold._core.url import parse  # noqa: E402
from leasehold._sync.backends.postgres import direct as sdirect  # noqa: E402
from leasehold._sync.backends.postgres import store as spg  # noqa: E402

HOLDER = Holder(owner="pg-direct", host="test-host", pid=4242)


def unique(stem: str = "direct") -> str:
    return f"{stem}:{uuid.uuid4().hex[:10]}"


def req(name: str, token: str, ttl: float = 30.0, **kw: Any) -> AcquireRequest:
    return AcquireRequest(name=name, token=token, holder=kw.pop("holder", HOLDER), ttl=ttl, **kw)


def prepared_here(conn: Any) -> dict[str, str]:
    """The statements prepared in ``conn``'s own session (pg_prepared_statements
    shows only those), by name: ours only."""
    rows = conn.execute(
        "SELECT name, statement FROM pg_prepared_statements WHERE name LIKE 'leasehold%%'"
    ).fetchall()
    return {name: statement for name, statement in rows}


def spare_after_one_call(store: spg.PostgresStore) -> Any:
    conn = store._spare
    assert conn is not None, "an idle store keeps one connection out of its pool"
    return conn


@pytest.mark.parametrize("durability", ["durable", "relaxed"])
def test_hot_calls_are_prepared_once_per_session(postgres_server: Any, durability: str) -> None:
    url = postgres_server.url + ("?durability=relaxed" if durability == "relaxed" else "")
    store = spg.from_url(parse(url), SYSTEM_CLOCK)
    try:
        name = unique()
        for _ in range(5):
            token = secrets.token_hex(8)
            assert isinstance(store.acquire(req(name, token)), Granted)
            assert store.release(name, token) is True
        conn = spare_after_one_call(store)
        statements = prepared_here(conn)
        suffix = "_relaxed" if durability == "relaxed" else ""
        assert sorted(statements) == sorted(
            [
                store._direct["acquire"].name.decode(),
                store._direct["release"].name.decode(),
            ]
        )
        texts = " ".join(statements.values())
        assert f".acquire{suffix}($1::text" in texts and f".release{suffix}($1::text" in texts
        for _ in range(5):
            token = secrets.token_hex(8)
            store.acquire(req(name, token))
            store.release(name, token)
        assert prepared_here(conn) == statements
    finally:
        store.close()


def test_a_session_that_lost_its_statements_prepares_them_again(postgres_server: Any) -> None:
    store = spg.from_url(parse(postgres_server.url), SYSTEM_CLOCK)
    try:
        name, token = unique(), secrets.token_hex(8)
        first = store.acquire(req(name, token))
        assert isinstance(first, Granted)
        conn = spare_after_one_call(store)
        acquire_name = store._direct["acquire"].name.decode()
        conn.execute("DEALLOCATE ALL")
        # The control: the session really lost them (the retry below is needed).
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute(
                f'EXECUTE "{acquire_name}"(NULL, NULL, NULL, NULL, 0, 1, 1, NULL, NULL, NULL)'
            )
        assert store.release(name, token) is True
        again = store.acquire(req(name, token))
        assert isinstance(again, Granted) and again.fence > first.fence
        assert store._spare is conn, "the same session served every call"
        assert acquire_name in prepared_here(conn)
        assert store.release(name, token) is True
    finally:
        store.close()


def test_a_statement_already_prepared_under_its_name_is_used(postgres_server: Any) -> None:
    """A session that has the statement while the store's record of it is gone
    (the name is the text's hash, so it is the same statement)."""
    store = spg.from_url(parse(postgres_server.url), SYSTEM_CLOCK)
    try:
        name, token = unique(), secrets.token_hex(8)
        store.acquire(req(name, token))
        conn = spare_after_one_call(store)
        before = prepared_here(conn)
        assert len(before) == 1  # acquire only, so far
        sdirect._PREPARED.pop(conn)
        assert store.release(name, token) is True
        assert isinstance(store.acquire(req(name, token)), Granted)
        assert store.release(name, token) is True
        assert prepared_here(conn).keys() == {
            store._direct["acquire"].name.decode(),
            store._direct["release"].name.decode(),
        }
    finally:
        store.close()


@pytest.mark.parametrize("pooler", ["none", "transaction"])
def test_values_round_trip_exactly(postgres_server: Any, pooler: str) -> None:
    """Text out, text in: names, owners and hosts in any script and with quotes,
    fractional ttls, every answer column (fence, retry_after, position) typed."""
    store = spg.from_url(parse(f"{postgres_server.url}?pooler={pooler}"), SYSTEM_CLOCK)
    try:
        name = unique("jöb ☃ 'quote\" \\back")
        holder = Holder(owner="öwner-名前", host="hôst;--", pid=2**31 - 1)
        first = store.acquire(req(name, "a" * 32, ttl=7.25, holder=holder))
        assert isinstance(first, Granted) and isinstance(first.fence, int)
        [info] = store.holders(name)
        assert (info.name, info.owner, info.host, info.pid) == (
            name,
            holder.owner,
            holder.host,
            holder.pid,
        )
        assert 7.0 < info.expires_in <= 7.25
        busy = store.acquire(req(name, "b" * 32, limit=1, queue_ttl=2.5))
        assert isinstance(busy, Busy) and busy.position == 0
        assert isinstance(busy.retry_after, float) and 6.5 < busy.retry_after <= 7.25
        later = store.acquire(req(name, "c" * 32, limit=1, queue_ttl=2.5))
        assert isinstance(later, Busy) and later.position == 1
        assert store.release(name, "nobody") is False
        assert store.release(name, "a" * 32) is True
        store.release(name, "b" * 32)
        store.release(name, "c" * 32)
    finally:
        store.close()


def test_a_cancelled_async_call_leaves_its_session_usable(postgres_server: Any) -> None:
    """psycopg's cancellation, as for execute: the query is cancelled on the server
    and the connection serves the next call."""

    async def main() -> None:
        store = apg.from_url(parse(postgres_server.url), SYSTEM_CLOCK)
        admin = await psycopg.AsyncConnection.connect(postgres_server.url)
        try:
            name, token = unique(), secrets.token_hex(8)
            assert isinstance(await store.acquire(req(name, token)), Granted)
            await store.release(name, token)
            conn = store._spare
            assert conn is not None
            # Block every grant: the table lock is held until admin's rollback.
            await admin.execute("LOCK TABLE leasehold.holders IN ACCESS EXCLUSIVE MODE")
            call = asyncio.ensure_future(store.acquire(req(name, token)))
            await asyncio.sleep(0.5)
            assert not call.done(), "the acquire should wait for the table lock"
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            await admin.rollback()
            granted = await asyncio.wait_for(store.acquire(req(name, token)), 5)
            assert isinstance(granted, Granted)
            assert store._spare is conn
            await store.release(name, token)
            assert adirect._PREPARED.get(conn) is not None
        finally:
            await admin.close()
            await store.aclose()

    asyncio.run(main())
