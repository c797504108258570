"""The public entry points of the SQL fence check: recognise the caller's
connection and run the check with its driver (``_sqldrivers``), or with a wrapper's
(Django and psycopg2: ``_django``). Both are imported from here, so neither imports
the other's dispatcher."""

from __future__ import annotations

import sqlite3
import sys
from typing import TYPE_CHECKING

from leasehold._errors import InvalidArgument
from leasehold.fence import _django
from leasehold.fence._sql import DEFAULT_TABLE
from leasehold.fence._sqldrivers import (
    _SUPPORTED_ASYNC,
    _SUPPORTED_SYNC,
    _check_psycopg,
    _check_psycopg_async,
    _check_sqlalchemy,
    _check_sqlalchemy_async,
    _check_sqlite3,
    _describe,
    _validated,
)

if TYPE_CHECKING:
    from leasehold.fence._sqldrivers import AsyncConnection, SyncConnection

# -- public entry points --------------------------------------------------------


def check(conn: SyncConnection, name: str, fence: int, *, table: str = DEFAULT_TABLE) -> int:
    """Record ``fence`` for ``name`` inside the caller's open transaction, or refuse.

    Call it in the same transaction as the writes it protects, before them, then
    commit as usual. The fence row stays locked until that transaction ends, so the
    writes of an older holder always commit before a newer holder's.

    Returns the highest fence now recorded for ``name`` (``fence`` itself).

    Raises:
        StaleFence: a higher fence was recorded: a newer holder took over. Roll
            back; nothing this holder writes may commit.
        InvalidArgument: unsupported connection type or SQL dialect, connection in
            autocommit mode outside a transaction, bad ``name``, ``fence`` (not an
            int, a bool, negative, over 2**63-1) or ``table``.

    Supported: ``sqlite3.Connection``, ``psycopg.Connection`` (psycopg 3), psycopg2
    connections, Django connections (``django.db.connection``, ``connections[alias]``,
    inside ``transaction.atomic()``; a ``StaleFence`` marks it for rollback),
    SQLAlchemy ``Connection`` and ``Session`` on SQLite or PostgreSQL. The table
    (default ``leasehold_fences``) is created with ``CREATE TABLE IF NOT EXISTS``
    on first use; see :func:`create_table_sql` to create it in a migration instead.
    """
    name, fence, table = _validated(name, fence, table)
    obj: object = conn
    if isinstance(obj, sqlite3.Connection):
        return _check_sqlite3(obj, name, fence, table)
    if "django.db" in sys.modules or "psycopg2" in sys.modules:
        wrapper = _django.django_wrapper(obj)
        if wrapper is not None:
            return _django.check_django(wrapper, name, fence, table)
        if _django.is_psycopg2(obj):
            return _django.check_psycopg2(obj, name, fence, table)
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(obj, psycopg.Connection):
            return _check_psycopg(obj, name, fence, table)
        if isinstance(obj, psycopg.AsyncConnection):
            raise InvalidArgument(
                "psycopg.AsyncConnection needs `await leasehold.fence.check_async(...)`"
            )
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.engine import Connection, Engine
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(obj, scoped_session):
            obj = obj()
        if isinstance(obj, Session):
            # Begins the session's transaction if none is open yet, and binds it.
            obj = obj.connection()
        if isinstance(obj, Connection):
            return _check_sqlalchemy(obj, name, fence, table)
        if isinstance(obj, Engine):
            raise InvalidArgument(
                "pass a Connection or Session from inside your transaction "
                "(`with engine.begin() as conn:`), not the Engine"
            )
    if "sqlalchemy.ext.asyncio" in sys.modules:
        from sqlalchemy.ext import asyncio as sa_asyncio

        if isinstance(obj, (sa_asyncio.AsyncConnection, sa_asyncio.AsyncSession)):
            raise InvalidArgument(
                f"{type(obj).__name__} needs `await leasehold.fence.check_async(...)`"
            )
    raise InvalidArgument(
        f"unsupported connection type {_describe(obj)}; leasehold.fence.check supports "
        f"{_SUPPORTED_SYNC}"
    )


async def check_async(
    conn: AsyncConnection, name: str, fence: int, *, table: str = DEFAULT_TABLE
) -> int:
    """The async twin of :func:`check`, with the same contract.

    Supported: ``psycopg.AsyncConnection`` and SQLAlchemy ``AsyncConnection`` and
    ``AsyncSession`` on SQLite or PostgreSQL.
    """
    name, fence, table = _validated(name, fence, table)
    obj: object = conn
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(obj, psycopg.AsyncConnection):
            return await _check_psycopg_async(obj, name, fence, table)
    if "sqlalchemy.ext.asyncio" in sys.modules:
        from sqlalchemy.ext import asyncio as sa_asyncio

        if isinstance(obj, sa_asyncio.async_scoped_session):
            obj = obj()
        if isinstance(obj, sa_asyncio.AsyncSession):
            obj = await obj.connection()
        if isinstance(obj, sa_asyncio.AsyncConnection):
            return await _check_sqlalchemy_async(obj, name, fence, table)
        if isinstance(obj, sa_asyncio.AsyncEngine):
            raise InvalidArgument(
                "pass an AsyncConnection or AsyncSession from inside your transaction "
                "(`async with engine.begin() as conn:`), not the AsyncEngine"
            )
    if isinstance(obj, sqlite3.Connection):
        raise InvalidArgument("sqlite3.Connection is synchronous: use leasehold.fence.check")
    raise InvalidArgument(
        f"unsupported connection type {_describe(obj)}; leasehold.fence.check_async "
        f"supports {_SUPPORTED_ASYNC} (use leasehold.fence.check for sync connections)"
    )
