"""Run the fence check (see ``_sql``) on each supported connection type.

Driver modules are never imported here unless the caller already imported them:
an object can only be a ``psycopg.Connection`` if ``psycopg`` is in ``sys.modules``,
so the base install needs neither psycopg nor SQLAlchemy.
"""

from __future__ import annotations

import re
import sqlite3
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterator, MutableSet
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeAlias

from leasehold._core import validate
from leasehold._errors import InvalidArgument, StaleFence
from leasehold.fence import _sql
from leasehold.fence._sql import Dialect, Outcome, Reply, Step

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    SyncConnection: TypeAlias = (
        sqlite3.Connection | psycopg.Connection[Any] | SAConnection | Session
    )
    AsyncConnection: TypeAlias = psycopg.AsyncConnection[Any] | SAAsyncConnection | AsyncSession

_SUPPORTED_SYNC = (
    "sqlite3.Connection, psycopg.Connection, psycopg2 connection, a Django connection "
    "(django.db.connection, connections[alias]), sqlalchemy Connection or Session"
)
_SUPPORTED_ASYNC = "psycopg.AsyncConnection, sqlalchemy AsyncConnection or AsyncSession"

# Tables already seen to exist, per psycopg connection, so that the existence query
# runs once per connection instead of once per check. sqlite3 connections cannot be
# weakly referenced, and their existence query is a local read, so they skip this.
_psycopg_known: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()
# The same for SQLAlchemy, kept in Connection.info, which lives as long as the
# pooled DB-API connection underneath.
_SA_INFO_KEY = "leasehold.fence.tables"

_NAMED_PARAM = re.compile(r":(\w+)")


@lru_cache(maxsize=64)
def _pyformat(sql: str) -> str:
    """``:name`` to psycopg's ``%(name)s``; our SQL contains no other colons."""
    return _NAMED_PARAM.sub(r"%(\1)s", sql)


def _describe(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _validated(name: str, fence: int, table: str) -> tuple[str, int, str]:
    _sql.table_name(table)
    return validate.name(name), _sql.fence(fence), table


_TRANSACTION_HINTS = {
    "sqlite3": "run `conn.execute('BEGIN IMMEDIATE')` first, or leave isolation_level at "
    "its default and use `with conn:`",
    "psycopg": "use `with conn.transaction():` (or connect without autocommit=True)",
    "SQLAlchemy": "use `with engine.begin() as conn:` or `with session.begin():` on an "
    "engine without isolation_level='AUTOCOMMIT'",
}


def _not_in_transaction(driver: str) -> InvalidArgument:
    return InvalidArgument(
        f"the {driver} connection is in autocommit mode with no transaction open: the "
        "fence check and your writes must commit together, so run both in one "
        f"transaction: {_TRANSACTION_HINTS[driver]}"
    )


# -- running a plan -------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    kind: Dialect
    table: str
    name: str
    fence: int

    def steps(self, known: MutableSet[str]) -> Generator[Step, Reply, Outcome]:
        stmts = _sql.statements(self.kind, self.table)
        return _sql.plan(stmts, self.name, self.fence, table_known=self.table in known)


@contextmanager
def _remembering(known: MutableSet[str], table: str) -> Iterator[None]:
    try:
        yield
    except StaleFence:
        known.add(table)  # a rejection proves the table exists
        raise
    except BaseException:
        # Perhaps the table was dropped, or created by a transaction that rolled
        # back: look again next time rather than fail forever.
        known.discard(table)
        raise


def _run(known: MutableSet[str], job: _Job, execute: Callable[[Step], Reply]) -> int:
    steps = job.steps(known)
    with _remembering(known, job.table):
        step = next(steps)
        while True:
            reply = execute(step)
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                outcome: Outcome = stop.value
                break
    if outcome.table_was_there:
        known.add(job.table)
    return outcome.highest


async def _run_async(
    known: MutableSet[str], job: _Job, execute: Callable[[Step], Awaitable[Reply]]
) -> int:
    steps = job.steps(known)
    with _remembering(known, job.table):
        step = next(steps)
        while True:
            reply = await execute(step)
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                outcome: Outcome = stop.value
                break
    if outcome.table_was_there:
        known.add(job.table)
    return outcome.highest


# -- sqlite3 --------------------------------------------------------------------


def _sqlite_autocommits(conn: sqlite3.Connection) -> bool:
    if conn.in_transaction:
        return False
    # Python 3.12 added Connection.autocommit; -1 (LEGACY_TRANSACTION_CONTROL) means
    # isolation_level decides, as in every earlier version.
    autocommit = getattr(conn, "autocommit", -1)
    if autocommit is True:
        return True
    if autocommit is False:
        return False
    return conn.isolation_level is None


def _check_sqlite3(conn: sqlite3.Connection, name: str, fence: int, table: str) -> int:
    if _sqlite_autocommits(conn):
        raise _not_in_transaction("sqlite3")

    def execute(step: Step) -> Reply:
        cursor = conn.execute(step.sql, dict(step.params))
        try:
            return Reply(cursor.rowcount, cursor.fetchall() if step.returns_rows else [])
        finally:
            cursor.close()

    highest = _run(set(), _Job("sqlite", table, name, fence), execute)
    if not conn.in_transaction:
        # Unreachable with the transaction modes checked above; kept because
        # accepting a fence outside a transaction would silently protect nothing.
        raise _not_in_transaction("sqlite3")
    return highest


# -- psycopg --------------------------------------------------------------------


def _psycopg_autocommits(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    from psycopg.pq import TransactionStatus

    return conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE


def _check_psycopg(conn: psycopg.Connection[Any], name: str, fence: int, table: str) -> int:
    if _psycopg_autocommits(conn):
        raise _not_in_transaction("psycopg")

    def execute(step: Step) -> Reply:
        with conn.cursor() as cursor:
            cursor.execute(_pyformat(step.sql), step.params)
            rows = cursor.fetchall() if step.returns_rows else []
            return Reply(cursor.rowcount, rows)

    known = _psycopg_known.setdefault(conn, set())
    return _run(known, _Job("postgresql", table, name, fence), execute)


async def _check_psycopg_async(
    conn: psycopg.AsyncConnection[Any], name: str, fence: int, table: str
) -> int:
    if _psycopg_autocommits(conn):
        raise _not_in_transaction("psycopg")

    async def execute(step: Step) -> Reply:
        async with conn.cursor() as cursor:
            await cursor.execute(_pyformat(step.sql), step.params)
            rows = await cursor.fetchall() if step.returns_rows else []
            return Reply(cursor.rowcount, rows)

    known = _psycopg_known.setdefault(conn, set())
    return await _run_async(known, _Job("postgresql", table, name, fence), execute)


# -- SQLAlchemy -----------------------------------------------------------------


def _sa_dialect(name: str) -> Dialect:
    if name in ("sqlite", "postgresql"):
        return "sqlite" if name == "sqlite" else "postgresql"
    raise InvalidArgument(
        f"SQLAlchemy dialect {name!r} is not supported by leasehold.fence; "
        "supported: sqlite, postgresql"
    )


def _sa_autocommits(conn: SAConnection) -> bool:
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return True
    # An engine created with isolation_level="AUTOCOMMIT" shows only on the DB-API
    # connection underneath.
    dbapi: object = conn.connection.dbapi_connection
    if isinstance(dbapi, sqlite3.Connection):
        return _sqlite_autocommits(dbapi)
    if conn.dialect.name == "sqlite":  # aiosqlite behind SQLAlchemy's adapter
        return getattr(dbapi, "isolation_level", "") is None and not getattr(
            dbapi, "in_transaction", False
        )
    if getattr(dbapi, "autocommit", False) is not True:
        return False
    status = getattr(getattr(dbapi, "info", None), "transaction_status", None)
    # 0 is IDLE in both psycopg and psycopg2; a driver that does not say is
    # treated as autocommitting, because guessing wrong would protect nothing.
    return status is None or int(status) == 0


def _sa_reply(result: Any, step: Step) -> Reply:
    rows = [tuple(row) for row in result.fetchall()] if step.returns_rows else []
    return Reply(result.rowcount, rows)


def _check_sqlalchemy(conn: SAConnection, name: str, fence: int, table: str) -> int:
    from sqlalchemy import text

    kind = _sa_dialect(conn.dialect.name)
    if _sa_autocommits(conn):
        raise _not_in_transaction("SQLAlchemy")

    def execute(step: Step) -> Reply:
        return _sa_reply(conn.execute(text(step.sql), dict(step.params)), step)

    known: set[str] = conn.info.setdefault(_SA_INFO_KEY, set())
    return _run(known, _Job(kind, table, name, fence), execute)


async def _check_sqlalchemy_async(
    conn: SAAsyncConnection, name: str, fence: int, table: str
) -> int:
    from sqlalchemy import text

    sync_conn = conn.sync_connection
    if sync_conn is None:
        # Not started yet: start it, which checks a connection out of the pool.
        await conn.start()
        sync_conn = conn.sync_connection
        assert sync_conn is not None
    kind = _sa_dialect(sync_conn.dialect.name)
    if _sa_autocommits(sync_conn):
        raise _not_in_transaction("SQLAlchemy")

    async def execute(step: Step) -> Reply:
        return _sa_reply(await conn.execute(text(step.sql), dict(step.params)), step)

    known: set[str] = sync_conn.info.setdefault(_SA_INFO_KEY, set())
    return await _run_async(known, _Job(kind, table, name, fence), execute)
