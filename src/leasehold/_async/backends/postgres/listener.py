"""The hand-written async half of the PostgreSQL notification listener.

Its twin is ``_sync/backends/postgres/listener.py``. Reading notifications is the one
place where asyncio and threads genuinely differ for this backend: here a task
awaits ``notifies()`` and is cancelled on close; the sync twin runs a thread that
polls the socket and a wake-up socket pair, so closing never waits for a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
from psycopg import sql


class NotifyListener:
    """One dedicated connection that LISTENs on ``channels``.

    ``on_notify(channel, payload)`` runs for every notification; ``on_lost()`` runs once if
    the connection fails, because notifications sent meanwhile are gone and every
    waiter must re-check the store.
    """

    def __init__(
        self,
        conninfo: str,
        channels: str | tuple[str, ...],
        on_notify: Callable[[str, str], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._conninfo = conninfo
        # One connection for every channel of its store (wake-ups and announcements).
        self._channels = (channels,) if isinstance(channels, str) else tuple(channels)
        self._channel = self._channels[0]
        self._on_notify = on_notify
        self._on_lost = on_lost
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failed = False

    @property
    def alive(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and not self._closing
            and not self._failed
        )

    def fileno(self) -> int | None:
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return conn.pgconn.socket

    async def start(self) -> None:
        """Connect and LISTEN; when this returns, no notification can be missed."""
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            for channel in self._channels:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._task = asyncio.get_running_loop().create_task(
            self._read(conn), name=f"leasehold-listen-{self._channel}"
        )

    async def _read(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        try:
            async for notify in conn.notifies():
                self._on_notify(notify.channel, notify.payload)
        except psycopg.Error:
            pass  # the connection failed: reported through on_lost below
        finally:
            if not self._closing:
                # Not alive from here on, so a waiter woken by on_lost() that asks
                # again at once gets a new LISTEN instead of this dead channel.
                self._failed = True
                self._on_lost()

    async def aclose(self) -> None:
        """Stop reading and close the connection. Idempotent."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait() does not re-raise the reader's CancelledError, so a
            # cancellation of *our* caller is never swallowed here.
            await asyncio.wait([task])
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
