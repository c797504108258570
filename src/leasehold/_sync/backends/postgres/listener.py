"""The hand-written sync half of the PostgreSQL notification listener.

Its twin is ``_async/backends/postgres/listener.py``. A thread waits until the
connection's socket or a wake-up socket pair is readable: notifications are read
with libpq's non-blocking calls, and ``close()`` writes to the socket pair, so it
never waits for a timeout to expire (psycopg's blocking ``notifies()`` cannot be
interrupted from another thread). ``connect_within`` connects on a worker thread
so that the caller can stop waiting at its deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from leasehold import _deadline

# Outside any operation, libpq's connect_timeout alone bounds a connect.
_UNBOUNDED_CONNECT = 3600.0


class NotifyListener:
    """One dedicated connection that LISTENs on ``channels``.

    ``on_notify(channel, payload)`` runs for every notification; ``on_lost()`` runs once if
    the connection fails, because notifications sent meanwhile are gone and every
    waiter must re-check the store. Both run on the listener thread.
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
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._thread: threading.Thread | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._closing = False
        self._failed = False

    @property
    def alive(self) -> bool:
        # The thread ends only through _read's finally (which sets _failed unless
        # closing) or close(): the flags say what Thread.is_alive() would, without
        # its three Python calls on every queued acquire.
        return self._thread is not None and not self._closing and not self._failed

    def fileno(self) -> int | None:
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return conn.pgconn.socket

    def start(self) -> None:
        """Connect and LISTEN; when this returns, no notification can be missed."""
        # Within a store operation (a queued acquire), never past its deadline.
        conn = connect_within(
            self._conninfo, {"autocommit": True}, _deadline.remaining(_UNBOUNDED_CONNECT)
        )
        fd = conn.pgconn.socket
        _deadline.attach(fd)
        try:
            for channel in self._channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._wakeup = socket.socketpair()
        except BaseException:
            conn.close()
            raise
        finally:
            _deadline.detach(fd)
        self._conn = conn
        self._thread = threading.Thread(
            target=self._read, args=(conn,), name=f"leasehold-listen-{self._channel}", daemon=True
        )
        self._thread.start()

    def _read(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        assert self._wakeup is not None
        pgconn = conn.pgconn
        encoding = conn.info.encoding
        wake_fd = self._wakeup[0].fileno()
        readable = _poller([pgconn.socket, wake_fd])
        try:
            while not self._closing:
                if wake_fd in readable():
                    return
                # Raises OperationalError once the server has gone (EOF, reset).
                pgconn.consume_input()
                while (notify := pgconn.notifies()) is not None:
                    self._on_notify(notify.relname.decode(encoding), notify.extra.decode(encoding))
        except psycopg.Error:
            pass  # the connection failed: reported through on_lost below
        finally:
            if not self._closing:
                # Not alive from here on, so a waiter woken by on_lost() that asks
                # again at once gets a new LISTEN instead of this dead channel.
                self._failed = True
                self._on_lost()

    def close(self) -> None:
        """Stop reading and close the connection. Idempotent."""
        self._closing = True
        thread, self._thread = self._thread, None
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            if thread is not None:
                with contextlib.suppress(OSError):
                    wakeup[1].send(b"x")
                thread.join()
            for sock in wakeup:
                sock.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _poller(fds: list[int]) -> Callable[[], list[int]]:
    """A function that blocks until one of ``fds`` is readable and returns those.
    poll() (set up once, it runs for every notification) has no FD_SETSIZE limit;
    select() is the fallback where poll() does not exist (Windows)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return lambda: [fd for fd, _ in poller.poll()]
    return lambda: list(select.select(fds, [], [])[0])


_CONNECTS: concurrent.futures.ThreadPoolExecutor | None = None
_CONNECTS_PID = -1
_CONNECTS_GUARD = threading.Lock()


def _connects() -> concurrent.futures.ThreadPoolExecutor:
    global _CONNECTS, _CONNECTS_PID, _CONNECTS_GUARD
    if os.getpid() != _CONNECTS_PID:
        _CONNECTS_GUARD = threading.Lock()  # a lock held at fork time stays held
        _CONNECTS = None
    with _CONNECTS_GUARD:
        if _CONNECTS is None:
            _CONNECTS = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix="leasehold-pg-connect"
            )
            _CONNECTS_PID = os.getpid()
        return _CONNECTS


def _close_abandoned(future: concurrent.futures.Future[psycopg.Connection[Any]]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def connect_within(
    conninfo: str, kwargs: dict[str, Any], seconds: float
) -> psycopg.Connection[Any]:
    """Connect, giving up after ``seconds`` (libpq's own connect_timeout is 2 s at
    least, and a stalled server accepts the TCP connection, then never answers).
    The connect runs on a worker thread, which a thread cannot interrupt: when the
    caller gives up, it finishes there (within connect_timeout) and is closed."""
    future = _connects().submit(lambda: psycopg.Connection.connect(conninfo, **kwargs))
    done, _ = concurrent.futures.wait([future], timeout=max(0.0, seconds))
    if done:
        return future.result()
    future.add_done_callback(_close_abandoned)
    raise psycopg.OperationalError(
        f"connecting took more than {seconds:.3g} s (the server did not answer)"
    )
