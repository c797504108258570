"""The fence check on Django database connections and psycopg2 connections.

Django: ``django.db.connection`` (a proxy), ``connections[alias]``, on
PostgreSQL or SQLite, inside ``transaction.atomic()``. The check runs on the
driver connection underneath, in Django's open transaction; a ``StaleFence`` also
marks the atomic block for rollback, so even code that catches it cannot commit
the stale holder's ORM writes.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import Any

from leasehold._errors import InvalidArgument, StaleFence
from leasehold.fence import _sqldrivers
from leasehold.fence._sql import Reply, Step
from leasehold.fence._sqldrivers import _Job, _psycopg_known, _pyformat, _run

ATOMIC_HINT = (
    "the fence check and your ORM writes must commit together: call it inside "
    "`with transaction.atomic():` (with `using=` the same alias)"
)


def django_wrapper(obj: object) -> Any | None:
    """The ``BaseDatabaseWrapper`` behind ``obj``, if it is a Django connection."""
    if "django.db" not in sys.modules:
        return None
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.utils.connection import ConnectionProxy

    if isinstance(obj, ConnectionProxy):
        from django.db import connections

        return connections[obj._alias]
    return obj if isinstance(obj, BaseDatabaseWrapper) else None


def check_django(wrapper: Any, name: str, fence: int, table: str) -> int:
    if not wrapper.in_atomic_block:
        raise InvalidArgument(
            f"the Django connection {wrapper.alias!r} is not inside transaction.atomic(): "
            + ATOMIC_HINT
        )
    vendor = wrapper.vendor
    if vendor not in ("postgresql", "sqlite"):
        raise InvalidArgument(
            f"Django database {wrapper.alias!r} is {vendor}; leasehold.fence supports "
            "PostgreSQL and SQLite"
        )
    wrapper.ensure_connection()
    raw: object = wrapper.connection
    try:
        if isinstance(raw, sqlite3.Connection):
            return _sqldrivers._check_sqlite3(raw, name, fence, table)
        if is_psycopg2(raw):
            return check_psycopg2(raw, name, fence, table)
        return _sqldrivers._check_psycopg(raw, name, fence, table)  # type: ignore[arg-type]
    except StaleFence:
        # Caught or not, this transaction must not commit.
        wrapper.set_rollback(True)
        raise


def is_psycopg2(obj: object) -> bool:
    if "psycopg2" not in sys.modules:
        return False
    import psycopg2.extensions

    return isinstance(obj, psycopg2.extensions.connection)


def check_psycopg2(conn: Any, name: str, fence: int, table: str) -> int:
    import psycopg2.extensions

    status = conn.info.transaction_status
    if conn.autocommit and status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        raise InvalidArgument(
            "the psycopg2 connection is in autocommit mode with no transaction open: the "
            "fence check and your writes must commit together, so run both in one "
            "transaction: set `conn.autocommit = False` and use `with conn:`"
        )

    def execute(step: Step) -> Reply:
        with conn.cursor() as cursor:
            cursor.execute(_pyformat(step.sql), step.params)
            rows = cursor.fetchall() if step.returns_rows else []
            return Reply(cursor.rowcount, [tuple(row) for row in rows])

    known = _psycopg_known.setdefault(conn, set())
    return _run(known, _Job("postgresql", table, name, fence), execute)
