"""Fencing where the data lives: the resource rejects a superseded lease holder.

A lease cannot stop its holder from pausing (GC, blocked event loop, SIGSTOP, VM
stall) past its TTL while a successor acquires. Every grant carries ``lease.fence``,
strictly increasing per name; these helpers make the resource remember the highest
fence it has seen for a name and refuse writes carrying a lower one, atomically
with the writes themselves:

    with conn:  # sqlite3: one transaction
        leasehold.fence.check(conn, lease.name, lease.fence)
        conn.execute("UPDATE report SET total = ?", (total,))

    leasehold.fence.redis_write(r, lease.name, lease.fence, [("SET", "report:total", total)])

Both raise :class:`leasehold.StaleFence` when a newer holder has already written,
so nothing of the stale holder's is committed. Only ``(name, fence)`` is needed,
so this works whichever backend issued the lease. See docs/fencing.md.
"""

from __future__ import annotations

from leasehold.fence import _sql
from leasehold.fence._check import check, check_async
from leasehold.fence._redis import (
    ALLOWED_COMMANDS,
    DEFAULT_KEY_PREFIX,
    redis_write,
    redis_write_async,
)
from leasehold.fence._sql import DEFAULT_TABLE, MAX_FENCE

__all__ = [
    "ALLOWED_COMMANDS",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_TABLE",
    "MAX_FENCE",
    "check",
    "check_async",
    "create_table_sql",
    "redis_write",
    "redis_write_async",
]


def create_table_sql(dialect: str, table: str = DEFAULT_TABLE) -> str:
    """The ``CREATE TABLE IF NOT EXISTS`` statement for the fence table.

    For teams that create tables in their own migrations. ``dialect`` is
    ``"sqlite"`` or ``"postgresql"`` (``"postgres"`` works too); ``table`` is a
    lowercase identifier, optionally ``schema.table``. :func:`check` creates the
    same table on first use if it is missing.
    """
    return _sql.create_table_sql(dialect, table)
