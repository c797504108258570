"""leasehold.fence: the resource itself rejects writes that carry a superseded fence.

Covers the SQL helpers on every supported connection type (sqlite3, psycopg sync
and async, SQLAlchemy Connection/Session/AsyncConnection/AsyncSession on SQLite and
PostgreSQL), the Redis script, bad input, the PostgreSQL lock-ordering races, and
many concurrent writers (threads and processes) checked against a ledger written
in the same transaction as each accepted write.

PostgreSQL and Redis come from the session fixtures ``postgres_server`` and
``redis_server``; LEASEHOLD_TEST_POSTGRES_URL / LEASEHOLD_TEST_REDIS_URL point the
tests at servers you run yourself instead.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

import leasehold
from leasehold import fence
from leasehold._errors import InvalidArgument, StaleFence

# -- servers and names ----------------------------------------------------------


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("LEASEHOLD_TEST_POSTGRES_URL")
    if url:
        return url
    return str(request.getfixturevalue("postgres_server").url)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("LEASEHOLD_TEST_REDIS_URL")
    if url:
        return url
    return str(request.getfixturevalue("redis_server").url)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def unique(prefix: str) -> str:
    """A fresh lowercase identifier, so tests sharing one server never collide."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


DATA_DDL = "CREATE TABLE IF NOT EXISTS {data} (k TEXT PRIMARY KEY, v TEXT NOT NULL)"
DATA_UPSERT = (
    "INSERT INTO {data} (k, v) VALUES (:k, :v) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
)


def pyformat(sql: str) -> str:
    return re.sub(r":(\w+)", r"%(\1)s", sql)


# -- one interface over every SQL connection type --------------------------------


@dataclass
class SqlTarget:
    """Runs "check the fence, then write k=v" in one transaction of one connection type."""

    label: str
    fenced_write: Callable[..., int]  # (name, fence, k, v, *, table) -> highest
    read: Callable[[str], str | None]
    data: str


def _sqlite_target(path: Path) -> SqlTarget:
    data = unique("data")
    with sqlite3.connect(path) as conn:
        conn.execute(DATA_DDL.format(data=data))
    conn.close()

    def fenced_write(name: str, f: int, k: str, v: str, *, table: str = fence.DEFAULT_TABLE) -> int:
        conn = sqlite3.connect(path, timeout=30)
        try:
            with conn:  # commits on success, rolls back on StaleFence
                highest = fence.check(conn, name, f, table=table)
                conn.execute(DATA_UPSERT.format(data=data), {"k": k, "v": v})
            return highest
        finally:
            conn.close()

    def read(k: str) -> str | None:
        conn = sqlite3.connect(path)
        try:
            row = conn.execute(f"SELECT v FROM {data} WHERE k = ?", (k,)).fetchone()
            return None if row is None else str(row[0])
        finally:
            conn.close()

    return SqlTarget("sqlite3", fenced_write, read, data)


def _pg_read(url: str, data: str) -> Callable[[str], str | None]:
    import psycopg

    def read(k: str) -> str | None:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(f"SELECT v FROM {data} WHERE k = %s", (k,)).fetchone()
            return None if row is None else str(row[0])

    return read


def _pg_data_table(url: str) -> str:
    import psycopg

    data = unique("data")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DATA_DDL.format(data=data))
    return data


def _psycopg_target(url: str) -> SqlTarget:
    import psycopg

    data = _pg_data_table(url)

    def fenced_write(name: str, f: int, k: str, v: str, *, table: str = fence.DEFAULT_TABLE) -> int:
        # psycopg's connection context commits on success and rolls back on error.
        with psycopg.connect(url) as conn:
            highest = fence.check(conn, name, f, table=table)
            conn.execute(pyformat(DATA_UPSERT.format(data=data)), {"k": k, "v": v})
            return highest

    return SqlTarget("psycopg", fenced_write, _pg_read(url, data), data)


def _psycopg_async_target(url: str) -> SqlTarget:
    import psycopg

    data = _pg_data_table(url)

    async def write(name: str, f: int, k: str, v: str, table: str) -> int:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            highest = await fence.check_async(conn, name, f, table=table)
            await conn.execute(pyformat(DATA_UPSERT.format(data=data)), {"k": k, "v": v})
            return highest

    def fenced_write(name: str, f: int, k: str, v: str, *, table: str = fence.DEFAULT_TABLE) -> int:
        return asyncio.run(write(name, f, k, v, table))

    return SqlTarget("psycopg-async", fenced_write, _pg_read(url, data), data)


def _sqlalchemy_target(url: str, style: str, cleanup: list[Callable[[], None]]) -> SqlTarget:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    engine = sa.create_engine(url)
    cleanup.append(engine.dispose)
    data = unique("data")
    with engine.begin() as conn:
        conn.execute(sa.text(DATA_DDL.format(data=data)))
    upsert = sa.text(DATA_UPSERT.format(data=data))

    def fenced_write(name: str, f: int, k: str, v: str, *, table: str = fence.DEFAULT_TABLE) -> int:
        if style == "connection":
            with engine.begin() as conn:
                highest = fence.check(conn, name, f, table=table)
                conn.execute(upsert, {"k": k, "v": v})
                return highest
        with Session(engine) as session, session.begin():
            highest = fence.check(session, name, f, table=table)
            session.execute(upsert, {"k": k, "v": v})
            return highest

    def read(k: str) -> str | None:
        with engine.connect() as conn:
            value = conn.execute(sa.text(f"SELECT v FROM {data} WHERE k = :k"), {"k": k}).scalar()
            return None if value is None else str(value)

    return SqlTarget(f"sqlalchemy-{style}", fenced_write, read, data)


def _sqlalchemy_async_target(
    url: str, sync_url: str, style: str, cleanup: list[Callable[[], None]]
) -> SqlTarget:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.pool import NullPool

    sync = _sqlalchemy_target(sync_url, "connection", cleanup)
    upsert = sa.text(DATA_UPSERT.format(data=sync.data))

    async def write(name: str, f: int, k: str, v: str, table: str) -> int:
        # A fresh engine per event loop: asyncio connections belong to their loop.
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            if style == "connection":
                async with engine.begin() as conn:
                    highest = await fence.check_async(conn, name, f, table=table)
                    await conn.execute(upsert, {"k": k, "v": v})
                    return highest
            async with AsyncSession(engine) as session, session.begin():
                highest = await fence.check_async(session, name, f, table=table)
                await session.execute(upsert, {"k": k, "v": v})
                return highest
        finally:
            await engine.dispose()

    def fenced_write(name: str, f: int, k: str, v: str, *, table: str = fence.DEFAULT_TABLE) -> int:
        return asyncio.run(write(name, f, k, v, table))

    return SqlTarget(f"sqlalchemy-async-{style}", fenced_write, sync.read, sync.data)


SQL_TARGETS = [
    "sqlite3",
    "sqlalchemy-connection-sqlite",
    "sqlalchemy-session-sqlite",
    "sqlalchemy-async-connection-sqlite",
    "sqlalchemy-async-session-sqlite",
    "psycopg",
    "psycopg-async",
    "sqlalchemy-connection-postgres",
    "sqlalchemy-session-postgres",
    "sqlalchemy-async-connection-postgres",
    "sqlalchemy-async-session-postgres",
]


@pytest.fixture(params=SQL_TARGETS)
def sql_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlTarget]:
    kind: str = request.param
    cleanup: list[Callable[[], None]] = []
    if kind.startswith("sqlalchemy"):
        pytest.importorskip("sqlalchemy")
    if "async" in kind and kind.startswith("sqlalchemy"):
        pytest.importorskip("greenlet")
    try:
        if kind.endswith("sqlite") or kind == "sqlite3":
            path = tmp_path / "fenced.db"
            if kind == "sqlite3":
                yield _sqlite_target(path)
                return
            if "async" in kind:
                pytest.importorskip("aiosqlite")
                style = kind.removeprefix("sqlalchemy-async-").removesuffix("-sqlite")
                yield _sqlalchemy_async_target(
                    f"sqlite+aiosqlite:///{path}", f"sqlite:///{path}", style, cleanup
                )
                return
            style = kind.removeprefix("sqlalchemy-").removesuffix("-sqlite")
            yield _sqlalchemy_target(f"sqlite:///{path}", style, cleanup)
            return
        url = request.getfixturevalue("pg_url")
        if kind == "psycopg":
            yield _psycopg_target(url)
        elif kind == "psycopg-async":
            yield _psycopg_async_target(url)
        else:
            sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
            if "async" in kind:
                style = kind.removeprefix("sqlalchemy-async-").removesuffix("-postgres")
                yield _sqlalchemy_async_target(sa_url, sa_url, style, cleanup)
            else:
                style = kind.removeprefix("sqlalchemy-").removesuffix("-postgres")
                yield _sqlalchemy_target(sa_url, style, cleanup)
    finally:
        for close in cleanup:
            close()


# -- the SQL contract, on every connection type -----------------------------------


def test_sql_accepts_equal_and_higher_fences_and_rejects_lower(sql_target: SqlTarget) -> None:
    name, table = unique("job"), unique("fences")
    assert sql_target.fenced_write(name, 5, "k", "A5", table=table) == 5
    # The same holder writes many times with the same fence.
    assert sql_target.fenced_write(name, 5, "k", "A5-again", table=table) == 5
    assert sql_target.fenced_write(name, 7, "k", "B7", table=table) == 7

    with pytest.raises(StaleFence) as caught:
        sql_target.fenced_write(name, 5, "k", "A5-stale", table=table)
    assert (caught.value.name, caught.value.fence, caught.value.highest) == (name, 5, 7)
    assert isinstance(caught.value, leasehold.LeaseholdError)
    # The stale holder's write was in the rolled-back transaction.
    assert sql_target.read("k") == "B7"


def test_sql_names_are_independent(sql_target: SqlTarget) -> None:
    table = unique("fences")
    first, second = unique("job"), unique("job")
    sql_target.fenced_write(first, 100, "a", "first", table=table)
    # A low fence on another name is fine: fences are only ordered per name.
    assert sql_target.fenced_write(second, 1, "b", "second", table=table) == 1


def test_sql_default_table(sql_target: SqlTarget) -> None:
    name = unique("job")
    assert sql_target.fenced_write(name, 3, "k", "x") == 3
    with pytest.raises(StaleFence):
        sql_target.fenced_write(name, 2, "k", "y")


def test_sql_fence_zero_and_maximum(sql_target: SqlTarget) -> None:
    name, table = unique("job"), unique("fences")
    assert sql_target.fenced_write(name, 0, "k", "zero", table=table) == 0
    highest = sql_target.fenced_write(name, fence.MAX_FENCE, "k", "max", table=table)
    assert highest == fence.MAX_FENCE
    with pytest.raises(StaleFence) as caught:
        sql_target.fenced_write(name, fence.MAX_FENCE - 1, "k", "lower", table=table)
    assert caught.value.highest == fence.MAX_FENCE


# -- sqlite3 specifics --------------------------------------------------------------


def test_sqlite_refuses_autocommit_outside_a_transaction(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    try:
        with pytest.raises(InvalidArgument, match="autocommit"):
            fence.check(conn, "job", 1)
        # An explicit transaction makes it fine.
        conn.execute("BEGIN IMMEDIATE")
        assert fence.check(conn, "job", 1) == 1
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_sqlite_check_leaves_the_transaction_open_for_the_callers_writes(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        fence.check(conn, "job", 4)
        assert conn.in_transaction
        conn.rollback()
        # Rolled back with the caller: a lower fence is accepted again afterwards.
        assert fence.check(conn, "job", 2) == 2
        conn.commit()
    finally:
        conn.close()


def test_sqlite_schema_qualified_table_and_reserved_word(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        with conn:
            fence.check(conn, "job", 1, table="main.fences")
            fence.check(conn, "job", 1, table="order")  # quoted, so reserved words work
        rows = conn.execute("SELECT name, fence FROM main.fences").fetchall()
        assert rows == [("job", 1)]
    finally:
        conn.close()


def test_sqlite_table_matches_create_table_sql(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        with conn:
            conn.execute(fence.create_table_sql("sqlite"))
            assert fence.check(conn, "job", 9) == 9
        assert conn.execute("SELECT fence FROM leasehold_fences").fetchall() == [(9,)]
        # The CHECK constraint guards against hand edits.
        with pytest.raises(sqlite3.IntegrityError), conn:
            conn.execute("INSERT INTO leasehold_fences VALUES ('x', -1)")
    finally:
        conn.close()


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (True, "fence must be an int, got bool"),
        (False, "fence must be an int, got bool"),
        (1.0, "fence must be an int, got float"),
        ("1", "fence must be an int, got str"),
        (None, "fence must be an int, got NoneType"),
        (-1, "fence must be >= 0"),
        (fence.MAX_FENCE + 1, "signed 64-bit"),
    ],
)
def test_bad_fences_are_rejected_before_any_io(bad: object, message: str, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            fence.check(conn, "job", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            asyncio.run(fence.check_async(object(), "job", bad))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            fence.redis_write(object(), "job", bad, [])  # type: ignore[arg-type]
        # Nothing was created: validation happens before any statement.
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    finally:
        conn.close()


@pytest.mark.parametrize("bad", ["", 3, None, "a\x00b", "x" * 513])
def test_bad_names_are_rejected(bad: object, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        with pytest.raises(InvalidArgument, match="name"):
            fence.check(conn, bad, 1)  # type: ignore[arg-type]
    finally:
        conn.close()


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Fences",
        "fences;drop table x",
        'fe"nces',
        "a.b.c",
        ".fences",
        "1fences",
        "fen ces",
        "x" * 64,
        "fénces",
        3,
    ],
)
def test_bad_table_names_are_rejected(bad: object, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        with pytest.raises(InvalidArgument, match="table"):
            fence.check(conn, "job", 1, table=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="table"):
            fence.create_table_sql("sqlite", bad)  # type: ignore[arg-type]
    finally:
        conn.close()


def test_good_table_names() -> None:
    for table in ("leasehold_fences", "_x", "s.t", "a" * 63, "order"):
        assert "CREATE TABLE IF NOT EXISTS" in fence.create_table_sql("postgresql", table)


@pytest.mark.parametrize(
    "conn",
    [object(), "sqlite:///x.db", 42, None],
    ids=["object", "url-string", "int", "none"],
)
def test_unknown_connection_types(conn: object) -> None:
    with pytest.raises(InvalidArgument, match=r"unsupported connection type .* supports"):
        fence.check(conn, "job", 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"unsupported connection type .* supports"):
        asyncio.run(fence.check_async(conn, "job", 1))  # type: ignore[arg-type]


def test_sqlite_cursor_and_async_misuse_are_explained(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        cursor = conn.cursor()
        with pytest.raises(InvalidArgument, match=r"sqlite3\.Cursor"):
            fence.check(cursor, "job", 1)  # type: ignore[arg-type]
        cursor.close()
        with pytest.raises(InvalidArgument, match=r"synchronous: use leasehold\.fence\.check"):
            asyncio.run(fence.check_async(conn, "job", 1))  # type: ignore[arg-type]
    finally:
        conn.close()


def test_sqlalchemy_engine_and_wrong_flavour_are_explained(tmp_path: Path) -> None:
    sa = pytest.importorskip("sqlalchemy")
    pytest.importorskip("greenlet")
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with pytest.raises(InvalidArgument, match="not the Engine"):
            fence.check(engine, "job", 1)
        with engine.connect() as conn, pytest.raises(InvalidArgument, match="check_async"):
            asyncio.run(fence.check_async(conn, "job", 1))  # type: ignore[arg-type]
    finally:
        engine.dispose()

    async def misuse() -> None:
        aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
        try:
            with pytest.raises(InvalidArgument, match="not the AsyncEngine"):
                await fence.check_async(aengine, "job", 1)  # type: ignore[arg-type]
            async with aengine.connect() as conn:
                with pytest.raises(InvalidArgument, match="needs `await"):
                    fence.check(conn, "job", 1)  # type: ignore[arg-type]
        finally:
            await aengine.dispose()

    asyncio.run(misuse())


def test_sqlalchemy_autocommit_is_refused(tmp_path: Path) -> None:
    sa = pytest.importorskip("sqlalchemy")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn, pytest.raises(InvalidArgument, match="autocommit"):
            fence.check(conn, "job", 1)
    finally:
        engine.dispose()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with engine.connect() as conn:
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            with pytest.raises(InvalidArgument, match="autocommit"):
                fence.check(auto, "job", 1)
    finally:
        engine.dispose()


def test_create_table_sql_per_dialect() -> None:
    sqlite_sql = fence.create_table_sql("sqlite")
    assert sqlite_sql.startswith('CREATE TABLE IF NOT EXISTS "leasehold_fences"')
    assert "INTEGER NOT NULL CHECK (fence >= 0)" in sqlite_sql
    pg_sql = fence.create_table_sql("postgresql", "app.fences")
    assert pg_sql.startswith('CREATE TABLE IF NOT EXISTS "app"."fences"')
    assert "BIGINT NOT NULL" in pg_sql
    assert fence.create_table_sql("postgres") == fence.create_table_sql("PostgreSQL")
    with pytest.raises(InvalidArgument, match="unsupported SQL dialect 'mysql'"):
        fence.create_table_sql("mysql")


def test_public_names() -> None:
    assert leasehold.StaleFence is StaleFence
    assert set(fence.__all__) == {
        "ALLOWED_COMMANDS",
        "DEFAULT_KEY_PREFIX",
        "DEFAULT_TABLE",
        "MAX_FENCE",
        "check",
        "check_async",
        "create_table_sql",
        "redis_write",
        "redis_write_async",
    }
    assert fence.DEFAULT_TABLE == "leasehold_fences"
    assert fence.DEFAULT_KEY_PREFIX == "leasehold:fence:"


def test_importing_fence_needs_no_driver() -> None:
    """The base install has neither psycopg, SQLAlchemy nor redis: nothing is imported."""
    code = (
        "import sys, leasehold\n"
        "drivers = ('psycopg', 'sqlalchemy', 'redis')\n"
        "before = {m for m in drivers if m in sys.modules}\n"
        "import leasehold.fence\n"
        "added = {m for m in drivers if m in sys.modules} - before\n"
        "assert not added, added\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- PostgreSQL: who waits for whom --------------------------------------------------


def _pg_setup(url: str) -> tuple[str, str]:
    import psycopg

    table, data = unique("fences"), unique("data")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(fence.create_table_sql("postgresql", table))
        conn.execute(DATA_DDL.format(data=data))
    return table, data


def _pg_value(url: str, data: str) -> str | None:
    return _pg_read(url, data)("k")


def test_pg_stale_writer_fails_even_if_its_transaction_started_first(pg_url: str) -> None:
    import psycopg

    table, data = _pg_setup(pg_url)
    upsert = pyformat(DATA_UPSERT.format(data=data))
    with psycopg.connect(pg_url) as old, psycopg.connect(pg_url) as new:
        old.execute("SELECT 1")  # the old holder's transaction is open (then it pauses)
        with new.transaction():
            fence.check(new, "job", 6, table=table)
            new.execute(upsert, {"k": "k", "v": "new"})
        with pytest.raises(StaleFence) as caught:
            fence.check(old, "job", 5, table=table)
        assert caught.value.highest == 6
        old.rollback()
    assert _pg_value(pg_url, data) == "new"


@pytest.mark.parametrize("again", [False, True], ids=["first-write", "same-fence-again"])
def test_pg_newer_holder_waits_for_the_older_holders_commit(pg_url: str, again: bool) -> None:
    import psycopg

    table, data = _pg_setup(pg_url)
    upsert = pyformat(DATA_UPSERT.format(data=data))
    with psycopg.connect(pg_url) as old, psycopg.connect(pg_url) as new:
        if again:
            # The holder already wrote once; an equal fence must lock the row just
            # the same, or the successor could slip in between check and write.
            with old.transaction():
                fence.check(old, "job", 5, table=table)
        fence.check(old, "job", 5, table=table)  # old's transaction holds the fence row

        def newer() -> None:
            with new.transaction():
                fence.check(new, "job", 6, table=table)
                new.execute(upsert, {"k": "k", "v": "new"})

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(newer)
            time.sleep(0.3)
            # The row lock holds the newer holder back until the older one commits,
            # so the older holder's writes can never land after the newer one's.
            assert not waiting.done()
            old.execute(upsert, {"k": "k", "v": "old"})
            old.commit()
            waiting.result(timeout=10)
    assert _pg_value(pg_url, data) == "new"


def test_pg_older_holder_waits_then_fails_when_the_newer_commits(pg_url: str) -> None:
    import psycopg

    table, _ = _pg_setup(pg_url)
    with psycopg.connect(pg_url) as old, psycopg.connect(pg_url) as new:
        new.execute("SELECT 1")
        fence.check(new, "job", 6, table=table)  # holds the row lock, not committed yet

        def older() -> int:
            with old.transaction():
                return fence.check(old, "job", 5, table=table)

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(older)
            time.sleep(0.3)
            assert not waiting.done()
            new.commit()
            with pytest.raises(StaleFence):
                waiting.result(timeout=10)


def test_pg_older_holder_proceeds_when_the_newer_rolls_back(pg_url: str) -> None:
    import psycopg

    table, _ = _pg_setup(pg_url)
    with psycopg.connect(pg_url) as old, psycopg.connect(pg_url) as new:
        new.execute("SELECT 1")
        fence.check(new, "job", 6, table=table)

        def older() -> int:
            with old.transaction():
                return fence.check(old, "job", 5, table=table)

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(older)
            time.sleep(0.3)
            assert not waiting.done()
            new.rollback()  # the newer holder wrote nothing, so 5 is still the highest
            assert waiting.result(timeout=10) == 5


def test_pg_repeatable_read_turns_a_race_into_a_serialization_failure(pg_url: str) -> None:
    import psycopg

    table, _ = _pg_setup(pg_url)
    with psycopg.connect(pg_url) as old, psycopg.connect(pg_url) as new:
        with new.transaction():
            fence.check(new, "job", 1, table=table)
        old.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        old.execute("SELECT 1")  # snapshot taken
        with new.transaction():
            fence.check(new, "job", 6, table=table)
        # Documented: under REPEATABLE READ the upsert refuses to touch a row changed
        # after its snapshot; the transaction fails either way and nothing commits.
        with pytest.raises(psycopg.errors.SerializationFailure):
            fence.check(old, "job", 5, table=table)
        old.rollback()


def test_pg_concurrent_first_use_creates_the_table_once(pg_url: str) -> None:
    import psycopg

    table = unique("fences")
    barrier = threading.Barrier(12)

    def first_use(i: int) -> int:
        with psycopg.connect(pg_url) as conn:
            barrier.wait()
            return fence.check(conn, f"job{i}", i, table=table)

    with ThreadPoolExecutor(12) as pool:
        assert sorted(pool.map(first_use, range(12))) == list(range(12))


def test_pg_autocommit_refused_and_explicit_transaction_accepted(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(InvalidArgument, match="autocommit"):
            fence.check(conn, unique("job"), 1)
        with conn.transaction():
            assert fence.check(conn, unique("job"), 1) == 1

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            with pytest.raises(InvalidArgument, match="check_async"):
                fence.check(conn, "job", 1)  # type: ignore[arg-type]
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            with pytest.raises(InvalidArgument, match="autocommit"):
                await fence.check_async(conn, unique("job"), 1)

    asyncio.run(run())


def test_pg_pipeline_mode(pg_url: str) -> None:
    import psycopg

    table = unique("fences")
    with psycopg.connect(pg_url) as conn, conn.pipeline():
        # Results arrive only when fetched in pipeline mode; the check must fetch
        # rather than read an unknown row count as "rejected" or "accepted".
        assert fence.check(conn, "job", 3, table=table) == 3
        assert fence.check(conn, "job", 3, table=table) == 3
        with pytest.raises(StaleFence):
            fence.check(conn, "job", 2, table=table)


def test_sqlalchemy_async_autocommit_is_refused(tmp_path: Path, pg_url: str) -> None:
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("greenlet")
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    urls = [
        f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
        pg_url.replace("postgresql://", "postgresql+psycopg://", 1),
    ]

    async def run() -> None:
        for url in urls:
            engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
            try:
                async with engine.connect() as conn:
                    with pytest.raises(InvalidArgument, match="autocommit"):
                        await fence.check_async(conn, unique("job"), 1)
            finally:
                await engine.dispose()

    asyncio.run(run())


def test_pg_recovers_when_the_table_is_dropped(pg_url: str) -> None:
    import psycopg

    table = unique("fences")
    with psycopg.connect(pg_url) as conn:
        with conn.transaction():
            fence.check(conn, "job", 1, table=table)
        with conn.transaction():
            fence.check(conn, "job", 2, table=table)  # the table is cached as known
        conn.execute(f"DROP TABLE {table}")
        conn.commit()
        with pytest.raises(psycopg.errors.UndefinedTable), conn.transaction():
            fence.check(conn, "job", 3, table=table)
        with conn.transaction():  # forgotten after the failure, so created again
            assert fence.check(conn, "job", 3, table=table) == 3


def test_pg_schema_qualified_table(pg_url: str) -> None:
    import psycopg

    schema = unique("app")
    with psycopg.connect(pg_url) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        with conn.transaction():
            fence.check(conn, "job", 3, table=f"{schema}.fences")
        assert conn.execute(f"SELECT name, fence FROM {schema}.fences").fetchall() == [("job", 3)]
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
        conn.commit()


# -- Redis ----------------------------------------------------------------------------


def test_redis_applies_writes_and_rejects_stale(redis_client: Any) -> None:
    name, key = unique("job"), unique("data")
    replies = fence.redis_write(
        redis_client,
        name,
        5,
        [
            ("SET", key, "A5"),
            ("HSET", key + ":h", "field", "1", "other", 2),
            ("INCRBY", key + ":n", 3),
            ("RPUSH", key + ":l", "a", "b"),
            ("EXPIRE", key, 100),
            ("LPOP", key + ":empty"),
            ("DEL", key + ":gone", key + ":gone2"),
        ],
    )
    assert replies == [b"OK", 2, 3, 2, 1, None, 0]
    assert fence.redis_write(redis_client, name, 5, [("SET", key, "A5b")]) == [b"OK"]
    assert fence.redis_write(redis_client, name, 8, [("SET", key, "B8")]) == [b"OK"]
    with pytest.raises(StaleFence) as caught:
        fence.redis_write(redis_client, name, 7, [("SET", key, "stale"), ("DEL", key + ":l")])
    assert (caught.value.name, caught.value.fence, caught.value.highest) == (name, 7, 8)
    assert redis_client.get(key) == b"B8"
    assert redis_client.exists(key + ":l") == 1  # nothing of the stale batch ran
    assert redis_client.get("leasehold:fence:" + name) == b"8"
    assert redis_client.ttl("leasehold:fence:" + name) == -1  # never expires


def test_redis_fences_beyond_double_precision(redis_client: Any) -> None:
    # 2**62 and 2**62 - 1 are the same double; the script compares decimal strings.
    name, key = unique("job"), unique("data")
    fence.redis_write(redis_client, name, 2**62, [("SET", key, "high")])
    with pytest.raises(StaleFence) as caught:
        fence.redis_write(redis_client, name, 2**62 - 1, [("SET", key, "low")])
    assert caught.value.highest == 2**62
    assert fence.redis_write(redis_client, name, fence.MAX_FENCE, []) == []
    with pytest.raises(StaleFence):
        fence.redis_write(redis_client, name, 999, [])


def test_redis_key_prefix_and_decoded_replies(redis_url: str) -> None:
    import redis

    name, key = unique("job"), unique("data")
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert fence.redis_write(client, name, 1, [("SET", key, "v")], key_prefix="app:f:") == [
            "OK"
        ]
        assert client.get("app:f:" + name) == "1"
        with pytest.raises(StaleFence) as caught:
            fence.redis_write(client, name, 0, [("SET", key, "w")], key_prefix="app:f:")
        assert caught.value.highest == 1


def test_redis_async(redis_url: str) -> None:
    import redis
    import redis.asyncio

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            name, key = unique("job"), unique("data")
            assert await fence.redis_write_async(client, name, 2, [("SET", key, "x")]) == [b"OK"]
            with pytest.raises(StaleFence):
                await fence.redis_write_async(client, name, 1, [("SET", key, "y")])
            assert await client.get(key) == b"x"
            with pytest.raises(InvalidArgument, match="redis_write_async"):
                fence.redis_write(client, name, 3, [])  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="not a pipeline"):
                await fence.redis_write_async(client.pipeline(), name, 3, [])
        finally:
            await client.aclose()

    asyncio.run(run())
    with redis.Redis.from_url(redis_url) as client:
        with pytest.raises(InvalidArgument, match=r"redis\.asyncio\.Redis"):
            asyncio.run(fence.redis_write_async(client, "job", 1, []))  # type: ignore[arg-type]
        with client.pipeline() as pipe, pytest.raises(InvalidArgument, match="not a pipeline"):
            fence.redis_write(pipe, "job", 1, [])


def test_redis_reloads_the_script_after_script_flush(redis_client: Any) -> None:
    name, key = unique("job"), unique("data")
    fence.redis_write(redis_client, name, 1, [("SET", key, "a")])
    redis_client.script_flush()
    assert fence.redis_write(redis_client, name, 2, [("SET", key, "b")]) == [b"OK"]


@pytest.mark.parametrize(
    ("commands", "message"),
    [
        ("SET k v", "list of command tuples"),
        ([("FLUSHALL",)], "command 'FLUSHALL' is not allowed"),
        ([("EVAL", "return 1", 0)], "command 'EVAL' is not allowed"),
        ([("GET", "k")], "command 'GET' is not allowed"),
        (["SET"], "non-empty tuple"),
        ([()], "non-empty tuple"),
        ([("SET", "k")], "SET takes at least 2 arguments, got 1"),
        ([("INCR", "k", 1)], "INCR takes 1 arguments, got 2"),
        ([("LPOP", "k", 1, 2)], "LPOP takes 1 to 2 arguments, got 3"),
        ([("HSET", "k", "f")], "HSET takes at least 3 arguments"),
        ([("HSET", "k", "f", "v", "g")], "field/value pairs"),
        ([("SET", "k", True)], "got bool"),
        ([("SET", "k", None)], "got NoneType"),
        ([("SET", "", "v")], "non-empty str or bytes"),
        ([("SET", 5, "v")], "non-empty str or bytes"),
        ([("DEL", "k", 3)], "non-empty str or bytes"),
        ([(b"SET", "k", "v")], "is not allowed"),
        ([("SET", "leasehold:fence:job", "999")], "may not write the fence key"),
    ],
)
def test_redis_bad_commands_are_rejected_before_any_io(commands: Any, message: str) -> None:
    import redis

    # An unconnected client: validation must fail before the first round trip.
    client = redis.Redis(host="127.0.0.1", port=1)
    try:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            fence.redis_write(client, "job", 1, commands)
    finally:
        client.close()


def test_redis_unknown_clients() -> None:
    with pytest.raises(InvalidArgument, match=r"unsupported Redis client builtins\.object"):
        fence.redis_write(object(), "job", 1, [])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="unsupported Redis client"):
        asyncio.run(fence.redis_write_async(object(), "job", 1, []))  # type: ignore[arg-type]


def test_redis_cluster_keys_must_share_a_slot() -> None:
    import redis.cluster

    from leasehold.fence import _redis

    class UnconnectedCluster(redis.cluster.RedisCluster):
        def __init__(self) -> None:  # no nodes to reach: only the type matters here
            pass

        def __del__(self) -> None:
            pass

    cluster = UnconnectedCluster()
    tagged = [("SET", "{order:42}:total", 1), ("HSET", "{order:42}:h", "f", "v")]
    keys, _ = _redis.encode("{order:42}", 1, tagged, fence.DEFAULT_KEY_PREFIX)
    _redis._check_slots(cluster, keys)  # one hash tag: one slot
    keys, _ = _redis.encode("order-42", 1, [("SET", "total", 1)], fence.DEFAULT_KEY_PREFIX)
    with pytest.raises(InvalidArgument, match="must share a hash slot"):
        _redis._check_slots(cluster, keys)
    with pytest.raises(InvalidArgument, match="must share a hash slot"):
        fence.redis_write(cluster, "order-42", 1, [("SET", "total", 1)])


def _raw_script(client: Any, keys: list[Any], args: list[Any]) -> Any:
    source = (
        resources.files("leasehold")
        .joinpath("_shared", "redis", "fenced_write.lua")
        .read_text(encoding="utf-8")
    )
    return client.eval(source, len(keys), *keys, *args)


def test_redis_script_checks_its_input_itself(redis_client: Any) -> None:
    """Defence in depth: the script refuses what the Python side would never send."""
    import redis

    fence_key, data = unique("fence"), unique("data")
    bad_calls = [
        ([fence_key, data], ["1", 1, "FLUSHALL", 0, 0]),  # not on the allow-list
        ([fence_key, data], ["1", 1, "SET", 1, 1]),  # ARGV too short for the command
        ([fence_key, data], ["1", 1, "SET", 1, 1, "v", "extra"]),  # leftovers
        ([fence_key, fence_key], ["1", 1, "SET", 1, 1, "v"]),  # writes the fence key
        ([fence_key, data], ["01", 1, "SET", 1, 1, "v"]),  # not a canonical fence
        ([fence_key, data], ["-1", 1, "SET", 1, 1, "v"]),
        ([fence_key, data], ["1.5", 1, "SET", 1, 1, "v"]),
    ]
    for keys, args in bad_calls:
        with pytest.raises(redis.ResponseError, match="leasehold fenced_write"):
            _raw_script(redis_client, keys, args)
    assert redis_client.exists(fence_key, data) == 0
    redis_client.set(fence_key, "not a number")
    with pytest.raises(redis.ResponseError, match="does not hold a fence"):
        _raw_script(redis_client, [fence_key, data], ["1", 1, "SET", 1, 1, "v"])
    assert redis_client.exists(data) == 0


def test_redis_failing_command_keeps_earlier_ones_applied(redis_client: Any) -> None:
    """Redis has no rollback (documented): only the fence check comes before writes."""
    import redis

    name, key = unique("job"), unique("data")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fence.redis_write(redis_client, name, 1, [("SET", key, "1"), ("HSET", key, "f", "v")])
    assert redis_client.get(key) == b"1"


def test_redis_script_header_and_allow_list_match_python() -> None:
    source = (
        resources.files("leasehold")
        .joinpath("_shared", "redis", "fenced_write.lua")
        .read_text(encoding="utf-8")
    )
    header = source.split("\n\n", 1)[0]
    for word in ("KEYS[1]", "ARGV[1]", "Returns"):
        assert word in header
    block = source.split("local allowed = {", 1)[1].split("}", 1)[0]
    in_lua = set(re.findall(r"([A-Z]+) = true", block))
    assert in_lua == set(fence.ALLOWED_COMMANDS)


# -- many concurrent writers, checked against a ledger --------------------------------

WRITERS = 8
FENCES = 800


@dataclass(frozen=True)
class LedgerStore:
    """Where one concurrency run writes: a kind and its location."""

    kind: str  # sqlite | postgres | redis
    location: str
    name: str
    table: str
    data: str
    ledger: str


def _make_ledger_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> LedgerStore:
    name, table, data, ledger = unique("job"), unique("fences"), unique("data"), unique("ledger")
    if kind == "sqlite":
        path = tmp_path / "ledger.db"
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(DATA_DDL.format(data=data))
            conn.execute(
                f"CREATE TABLE {ledger} (id INTEGER PRIMARY KEY AUTOINCREMENT, fence INTEGER)"
            )
        conn.close()
        return LedgerStore(kind, str(path), name, table, data, ledger)
    if kind == "postgres":
        import psycopg

        url = request.getfixturevalue("pg_url")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(DATA_DDL.format(data=data))
            conn.execute(f"CREATE TABLE {ledger} (id BIGSERIAL PRIMARY KEY, fence BIGINT)")
        return LedgerStore(kind, url, name, table, data, ledger)
    url = request.getfixturevalue("redis_url")
    return LedgerStore(kind, url, name, table, f"{name}:data", f"{name}:ledger")


Attempt = tuple[int, bool, int]  # (fence, accepted, highest reported)


def run_ledger_writer(store: LedgerStore, fences: list[int], seed: int) -> list[Attempt]:
    """One writer: for each fence, one transaction of check, then value and ledger row.

    Top-level so that spawned processes can run it too.
    """
    rng = random.Random(seed)
    attempts: list[Attempt] = []
    if store.kind == "redis":
        import redis

        with redis.Redis.from_url(store.location) as client:
            for f in fences:
                try:
                    fence.redis_write(
                        client,
                        store.name,
                        f,
                        [("SET", store.data, str(f)), ("RPUSH", store.ledger, f)],
                    )
                    attempts.append((f, True, f))
                except StaleFence as exc:
                    attempts.append((f, False, exc.highest))
        return attempts

    if store.kind == "sqlite":
        conn: Any = sqlite3.connect(store.location, timeout=60)
        upsert, insert = DATA_UPSERT, f"INSERT INTO {store.ledger} (fence) VALUES (:f)"
    else:
        import psycopg

        conn = psycopg.connect(store.location)
        upsert = pyformat(DATA_UPSERT)
        insert = f"INSERT INTO {store.ledger} (fence) VALUES (%(f)s)"
    try:
        for f in fences:
            try:
                fence.check(conn, store.name, f, table=store.table)
                # Widen the window between the check and the writes, where a
                # broken implementation would let a newer holder slip in.
                time.sleep(rng.uniform(0, 0.002))
                conn.execute(upsert.format(data=store.data), {"k": "k", "v": str(f)})
                conn.execute(insert, {"f": f})
                conn.commit()
                attempts.append((f, True, f))
            except StaleFence as exc:
                conn.rollback()
                attempts.append((f, False, exc.highest))
    finally:
        conn.close()
    return attempts


def _ledger_and_value(store: LedgerStore) -> tuple[list[int], str | None]:
    if store.kind == "redis":
        import redis

        with redis.Redis.from_url(store.location) as client:
            ledger = [int(x) for x in client.lrange(store.ledger, 0, -1)]
            value = client.get(store.data)
            return ledger, None if value is None else value.decode()
    if store.kind == "sqlite":
        conn = sqlite3.connect(store.location)
        try:
            ledger = [r[0] for r in conn.execute(f"SELECT fence FROM {store.ledger} ORDER BY id")]
            row = conn.execute(f"SELECT v FROM {store.data} WHERE k = 'k'").fetchone()
        finally:
            conn.close()
        return ledger, None if row is None else str(row[0])
    import psycopg

    with psycopg.connect(store.location) as pg:
        ledger = [r[0] for r in pg.execute(f"SELECT fence FROM {store.ledger} ORDER BY id")]
        row = pg.execute(f"SELECT v FROM {store.data} WHERE k = 'k'").fetchone()
    return ledger, None if row is None else str(row[0])


@pytest.mark.parametrize("mode", ["threads", "processes"])
@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis"])
def test_concurrent_writers_never_let_a_lower_fence_follow_a_higher(
    kind: str, mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = _make_ledger_store(kind, request, tmp_path)
    rng = random.Random(f"{kind}-{mode}")
    # Writers climb together through 1..FENCES, each slice shuffled only locally:
    # concurrent attempts then carry close fences in both orders, which is where a
    # check-then-write race would let a lower fence commit after a higher one.
    # (A global shuffle would make most attempts hopelessly stale at once.)
    slices = []
    for i in range(WRITERS):
        mine = list(range(i + 1, FENCES + 1, WRITERS))
        for start in range(0, len(mine), 4):
            chunk = mine[start : start + 4]
            rng.shuffle(chunk)
            mine[start : start + 4] = chunk
        slices.append(mine)
    if mode == "threads":
        with ThreadPoolExecutor(WRITERS) as pool:
            results = list(pool.map(run_ledger_writer, [store] * WRITERS, slices, range(WRITERS)))
    else:
        with ProcessPoolExecutor(WRITERS, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_ledger_writer, [store] * WRITERS, slices, range(WRITERS)))
    attempts = [a for r in results for a in r]
    ledger, value = _ledger_and_value(store)

    accepted = sorted(f for f, ok, _ in attempts if ok)
    rejected = [(f, highest) for f, ok, highest in attempts if not ok]
    assert len(attempts) == FENCES
    # The ledger is written in the same transaction/script as the value, in commit
    # order: a lower fence after a higher one would be a stale write that got in.
    violations = [(a, b) for a, b in itertools.pairwise(ledger) if b < a]
    assert violations == []
    assert sorted(ledger) == accepted  # exactly the accepted writes committed
    assert all(highest > f for f, highest in rejected)
    # Nobody can be above the highest fence, so its write is the one that stays.
    assert value == str(FENCES)
    assert ledger[-1] == FENCES
    assert rejected, "the interleaving produced no stale writer; the test proved nothing"
