"""Connections of one PostgreSQL store: the pool, fork safety, schema installation,
query calls with retries and error translation, the announcement listener. The
store operations (store.py) subclass it.
"""

from __future__ import annotations

import abc
import os
import secrets
import select
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from leasehold import _deadline
from leasehold._async._concurrency import AsyncMutex, cancellations, resume_cancellation
from leasehold._async.backends.postgres.direct import DirectCall, run_direct
from leasehold._async.backends.postgres.listener import NotifyListener, connect_within
from leasehold._async.backends.postgres.options import _scrub, parse_options
from leasehold._async.backends.postgres.schema import (
    SCHEMA_VERSION,
    _direct_calls,
    _function_queries,
    _schema_sql,
)
from leasehold._async.backends.postgres.waiting import _AnnounceListener, _Waiter, announce_channel
from leasehold._async.store import (
    AsyncStore,
    ListenerSlot,
    TopicHub,
)
from leasehold._core.clock import SYSTEM_CLOCK, Clock
from leasehold._core.url import StoreURL
from leasehold._errors import StoreMisconfigured, StoreUnavailable

_POOL_WAIT = 1.0  # seconds to wait for a pooled connection before connecting directly
_QUICK_FAILURE = 1.0  # seconds: a call that failed faster than this may be retried
_LISTENER_RETRY = 5.0  # seconds before a failed LISTEN connection is tried again
_WAITER_GRACE = 5.0  # keep a wake-up registration this long past its queue expiry
# How many calls in a row one connection serves from the spare slot before it goes
# back through the pool once (which applies the pool's max_lifetime).
_SPARE_USES = 1000
_IDLE = psycopg.pq.TransactionStatus.IDLE
_OK = psycopg.pq.ConnStatus.OK

# Stores that found themselves in a forked child keep their parent's pool and
# listener here forever: letting them be collected would run finalizers that talk
# to (or close) sockets the parent still uses.
_ORPHANED: list[object] = []


def _looks_dead(conn: AsyncConnection[Any]) -> bool:
    """True if an idle pooled connection has something to read.

    Nothing is sent to an idle connection without LISTEN except the goodbye of a
    terminated backend (FATAL, then EOF). Checking costs no round trip, so a
    connection killed while idle in the pool is dropped before it fails a call.
    """
    if conn.pgconn.status != _OK:  # what closed and broken read, without their calls
        return True
    try:
        fd = conn.pgconn.socket
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    except (OSError, ValueError, psycopg.Error):
        return True


def _disown(fd: int | None) -> None:
    """Point ``fd`` at /dev/null in this (forked) process only.

    Whatever later closes or finalizes the inherited connection then writes its
    Terminate message to /dev/null instead of ending the parent's session.
    """
    if fd is None or fd < 0:
        return
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


# Answers that waiting cannot change (StoreMisconfigured, never retried): invalid
# authorization (28...), insufficient privilege, unknown database, a read-only
# server (a hot standby), an undefined schema.
_MISCONFIGURED_SQLSTATES = ("28", "42501", "3D000", "25006", "3F000")
# The same at connect time, where libpq gives text only.
_MISCONFIGURED_TEXT = (
    "password authentication failed",
    "authentication failed for user",
    "no pg_hba.conf entry",
    "password is required",
    "no password supplied",
    "does not exist",  # database "x" / role "x" does not exist
    "permission denied",
    "certificate verify failed",
    "root certificate file",
    "server does not support SSL",
    "read-only transaction",
)


def _misconfigured(sqlstate: str | None, detail: str) -> bool:
    if sqlstate is not None:
        return sqlstate.startswith(_MISCONFIGURED_SQLSTATES)
    return any(text in detail for text in _MISCONFIGURED_TEXT)


class _Retry(Exception):
    """A call failed because its connection died; safe to repeat once if idempotent."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class PostgresConnection(AsyncStore):
    """What every PostgreSQL store operation stands on (see the module docstring)."""

    def __init__(self, url: StoreURL, clock: Clock | None = None) -> None:
        self.url = url
        self._opts = parse_options(url)
        # Only local bookkeeping (listener retries, forgetting stale waiters) reads
        # this clock; every lease decision is made by the server's clock.
        self._clock = clock or SYSTEM_CLOCK
        self._pid = os.getpid()
        self._users = 1  # clients sharing this store (see sharing.py)
        self._share_key: tuple[Any, ...] | None = None
        # Pooled connections in use by calls: all of them busy means "wait for one";
        # fewer means the pool is failing to connect, and a call connects itself.
        self._checked_out = 0
        # One idle pooled connection kept out of the pool between calls: a
        # psycopg_pool getconn + putconn cost ~12 µs of CPU a call (a quarter of
        # the client's own time per acquire + release, measured), taking it from
        # this slot well under one. Still counted in _checked_out. Calls waiting
        # in the pool (all connections busy) get it back through the pool, so a
        # pool of one serves every caller as before (_getconn/_putconn).
        self._spare: AsyncConnection[tuple[Any, ...]] | None = None
        self._spare_guard = threading.Lock()
        self._spare_uses = 0
        self._pool_waiting = 0
        self._pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]] | None = None
        self._connections: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()
        self._schema_ready = False
        self._closed = False
        self._mutex = AsyncMutex()
        self._listener_mutex = AsyncMutex()
        self._listener: NotifyListener | None = None
        self._listener_retry_at = float("-inf")
        self._listener_error: str | None = None
        self._channel = f"leasehold_{secrets.token_hex(12)}"
        self._waiters_guard = threading.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._next_sweep = float("-inf")
        self._schema = sql.Identifier(self._opts.schema)
        self._queries = _function_queries(self._opts.schema, relaxed=self._opts.relaxed)
        self._direct = _direct_calls(self._opts.schema, relaxed=self._opts.relaxed)
        # Both session state, which a transaction-mode pooler does not keep.
        self._listens = self._opts.listen
        self._prepare = self._listens
        # Announcements: pg_notify on one channel per schema, the topic as payload;
        # subscribers share one more LISTEN connection, started on first subscribe.
        self._announce_channel = announce_channel(self._opts.schema)
        self._topics = TopicHub()
        self._announcements = ListenerSlot(
            self._announce_listener, retry=_LISTENER_RETRY, what=repr(self)
        )

    # -- connections --------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: abandon (never use, never close) the parent's sockets."""
        if os.getpid() == self._pid:
            return
        for conn in list(self._connections):
            if not conn.closed:
                _disown(conn.pgconn.socket)
        listener = self._listener
        if listener is not None:
            _disown(listener.fileno())
        announcing = self._announcements.listener
        if isinstance(announcing, _AnnounceListener):
            _disown(announcing.fileno())
        self._topics.after_fork_in_child()
        _ORPHANED.extend(x for x in (self._pool, listener) if x is not None)
        self._pool = None
        self._listener = None
        self._connections = weakref.WeakSet()
        self._checked_out = 0
        self._spare = None  # the parent's (disowned above)
        self._spare_guard = threading.Lock()
        self._spare_uses = 0
        self._pool_waiting = 0
        # Locks may have been held by threads that do not exist in the child.
        self._mutex = AsyncMutex()
        self._listener_mutex = AsyncMutex()
        self._waiters_guard = threading.Lock()
        self._waiters = {}
        self._channel = f"leasehold_{secrets.token_hex(12)}"
        self._pid = os.getpid()

    async def _configure(self, conn: AsyncConnection[Any]) -> None:
        self._connections.add(conn)

    async def _ready_pool(self) -> AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]:
        self._after_fork()
        pool = self._pool
        if pool is not None and self._schema_ready:
            return pool
        async with self._mutex:
            if self._closed:
                raise StoreUnavailable(f"{self!r} is closed")
            if self._pool is None:
                pool = AsyncConnectionPool(
                    self._opts.conninfo,
                    kwargs=self._connect_kwargs(),
                    min_size=self._opts.pool_min_size,
                    max_size=self._opts.pool_max_size,
                    open=False,
                    configure=self._configure,
                    timeout=self._opts.connect_timeout,
                    # Give up a reconnection series soon: the next call starts a new
                    # one at once instead of waiting out a long backoff delay.
                    reconnect_timeout=2 * self._opts.connect_timeout,
                    name=f"leasehold-{self._opts.schema}",
                )
                await pool.open(wait=False)
                self._pool = pool
            pool = self._pool
            if not self._schema_ready:
                await self._install(pool)
                self._schema_ready = True
        return pool

    async def _getconn(
        self, pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]
    ) -> tuple[AsyncConnection[tuple[Any, ...]], bool]:
        """A live connection, and whether it is the pool's (else a one-off, closed
        after use): the spare one if it is free, else one from the pool."""
        with self._spare_guard:
            conn, self._spare = self._spare, None
            # Counted under the same guard as _putconn's choice, so a connection
            # given back while we wait in the pool goes to the pool, not the slot.
            self._pool_waiting += conn is None
        if conn is not None:
            if not _looks_dead(conn):
                return conn, True
            await conn.close()  # the pool discards closed connections it gets back
            with self._spare_guard:
                self._pool_waiting += 1
            self._checked_out -= 1
            await pool.putconn(conn)
        try:
            return await self._getconn_from_pool(pool)
        finally:
            with self._spare_guard:
                self._pool_waiting -= 1

    async def _getconn_from_pool(
        self, pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]
    ) -> tuple[AsyncConnection[tuple[Any, ...]], bool]:
        waited = False
        for _ in range(self._opts.pool_max_size + 1):
            before = cancellations()
            try:
                # Never past the operation's deadline (a pool that cannot connect
                # to a stalled server would otherwise keep the caller waiting).
                conn = await pool.getconn(
                    timeout=max(
                        0.001,
                        _deadline.remaining(self._opts.connect_timeout if waited else _POOL_WAIT),
                    )
                )
            except PoolTimeout:
                if waited:
                    raise
                if self._checked_out >= self._opts.pool_max_size:
                    waited = True  # full and busy: wait for a connection like anyone
                    continue
                # The pool is failing to connect. Its reconnection backoff doubles
                # up to minutes, longer than a lease lives after an outage, so this
                # call connects by itself; that also makes an error name the real
                # cause (refused, authentication, DNS) instead of "timeout".
                return await self._connect(), False
            try:
                # A cancellation that arrived with the connection (the pool waits
                # with asyncio.wait_for, which drops it on Python 3.11).
                resume_cancellation(before)
            except BaseException:
                await pool.putconn(conn)
                raise
            if not _looks_dead(conn):
                self._checked_out += 1
                return conn, True
            await conn.close()  # the pool discards closed connections it gets back
            await pool.putconn(conn)
        return await self._connect(), False

    async def _putconn(
        self,
        pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]],
        conn: AsyncConnection[tuple[Any, ...]],
        pooled: bool,
    ) -> None:
        if pooled:
            # IDLE also means open and not broken: libpq answers UNKNOWN for a
            # connection that is not OK (psycopg's closed and broken read that status).
            if not self._closed and conn.pgconn.transaction_status == _IDLE:
                with self._spare_guard:
                    if self._spare is None and self._pool_waiting == 0:
                        self._spare_uses += 1
                        if self._spare_uses < _SPARE_USES:
                            self._spare = conn
                            return
                        self._spare_uses = 0
            self._checked_out -= 1
            await pool.putconn(conn)
        else:
            await conn.close()

    async def _connect(self) -> AsyncConnection[tuple[Any, ...]]:
        # libpq's connect_timeout (2 s at least) bounds a connect on its own; within
        # an operation, its deadline bounds it too.
        return await connect_within(
            self._opts.conninfo,
            self._connect_kwargs(),
            _deadline.remaining(self._opts.connect_timeout),
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            # Server-side prepared statements are session state, which a transaction
            # pooler does not keep: never prepare there.
            "prepare_threshold": None if self._opts.pooler == "transaction" else 5,
        }

    async def _install(self, pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]) -> None:
        """Create or upgrade the schema once per store; cheap when it is current."""
        conn, pooled = await self._getconn(pool)
        fd = conn.pgconn.socket
        _deadline.attach(fd)
        try:
            installed = 0
            try:
                cur = await conn.execute(sql.SQL("SELECT {}.schema_version()").format(self._schema))
                row = await cur.fetchone()
                installed = 0 if row is None else int(row[0])
            except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName):
                pass
            if installed >= SCHEMA_VERSION:
                return
            if not self._opts.create_schema:
                found = (
                    "has no leasehold tables"
                    if installed == 0
                    else f"holds leasehold schema version {installed}"
                )
                raise StoreMisconfigured(
                    f"{self!r}: schema {self._opts.schema!r} {found} "
                    f"(version {SCHEMA_VERSION} needed) and ?create_schema=false; apply "
                    "leasehold/_shared/postgres/schema.sql as a migration"
                )
            async with conn.transaction():
                # Serialises concurrent first use and upgrades: CREATE ... IF NOT
                # EXISTS alone can still fail with a unique violation when two
                # sessions race.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('leasehold'), hashtext('install'))"
                )
                # Look again under the lock: whoever held it may have installed this
                # version, or a newer one that this (older) file must not replace.
                # A lookup before the call, as an error would abort the transaction.
                # (Locking pg_namespace to read it also makes the session take in
                # catalog changes committed while it waited.)
                cur = await conn.execute(
                    "SELECT n.oid IS NOT NULL, to_regprocedure(%s) IS NOT NULL "
                    "FROM (SELECT 1) one LEFT JOIN pg_namespace n ON n.nspname = %s",
                    (
                        sql.Identifier(self._opts.schema).as_string(conn) + ".schema_version()",
                        self._opts.schema,
                    ),
                )
                row = await cur.fetchone()
                has_schema, has_version = (bool(row[0]), bool(row[1])) if row else (False, False)
                if has_version:
                    cur = await conn.execute(
                        sql.SQL("SELECT {}.schema_version()").format(self._schema)
                    )
                    row = await cur.fetchone()
                    if row is not None and int(row[0]) >= SCHEMA_VERSION:
                        return
                if not has_schema:
                    # Only when missing: CREATE SCHEMA IF NOT EXISTS needs the CREATE
                    # privilege on the database even when the schema exists.
                    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(self._schema))
                path = sql.Identifier(self._opts.schema).as_string(conn) + ", pg_temp"
                await conn.execute("SELECT set_config('search_path', %s, true)", (path,))
                await conn.execute(_schema_sql().encode())
        finally:
            _deadline.detach(fd)
            await self._putconn(pool, conn, pooled)

    async def _run(self, query: bytes | DirectCall, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        pool = self._pool
        if pool is None or not self._schema_ready or os.getpid() != self._pid:
            pool = await self._ready_pool()  # what it would answer, written out above
        conn, pooled = await self._getconn(pool)
        # A server that stops answering is noticed by the operation's deadline,
        # which shuts this socket down: the call fails, the pool drops the
        # connection (libpq would wait forever; statement_timeout needs a server
        # that still runs).
        fd = conn.pgconn.socket
        _deadline.attach(fd)
        try:
            if isinstance(query, DirectCall):
                return await run_direct(conn, query, params, prepare=self._prepare)
            cur = await conn.execute(query, params)
            return list(await cur.fetchall())
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                raise _Retry(exc) from exc
            raise
        finally:
            _deadline.detach(fd)
            await self._putconn(pool, conn, pooled)

    async def _call(
        self, what: str, function: str, params: Sequence[Any], *, idempotent: bool = True
    ) -> list[tuple[Any, ...]]:
        """Run ``SELECT * FROM schema.function(params)``; every driver error ends here."""
        query = self._direct.get(function) or self._queries[function]
        return await self._query(what, query, params, idempotent=idempotent)

    async def _query(
        self, what: str, query: bytes | DirectCall, params: Sequence[Any], *, idempotent: bool
    ) -> list[tuple[Any, ...]]:
        # A connection that dies under a call (backend terminated, server restarted)
        # is retried once on a fresh connection when repeating cannot change the
        # answer; release and break_lease report the failure instead. Only a quick
        # failure is retried: a slow one means a dead network path, where a second
        # attempt would only double the time until the caller hears of it.
        attempts = 2 if idempotent else 1
        started = self._clock.monotonic()
        for attempt in range(attempts):
            try:
                return await self._run(query, params)
            except _Retry as exc:
                quick = self._clock.monotonic() - started < _QUICK_FAILURE
                expired = (limit := _deadline.current()) is not None and limit.expired
                if attempt + 1 >= attempts or not quick or expired:
                    raise self._unavailable(what, exc.cause) from None
            except StoreUnavailable:
                raise
            except (psycopg.Error, OSError) as exc:
                raise self._unavailable(what, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        """The one place a driver error becomes StoreUnavailable, password removed."""
        detail = str(exc).strip() or type(exc).__name__
        if isinstance(exc, PoolTimeout):
            # Raised only when every one of pool_max_size connections stayed busy.
            detail = (
                f"all {self._opts.pool_max_size} pooled connections stayed busy for "
                f"{self._opts.connect_timeout + _POOL_WAIT:g} s (raise ?pool_max_size=)"
            )
        sqlstate = getattr(exc, "sqlstate", None)
        kind = type(exc).__name__ + (f" {sqlstate}" if sqlstate else "")
        message = f"{self!r}: {what} failed ({kind}): {detail}"
        if self._opts.listen and (
            sqlstate in ("42P05", "26000") or "unsupported startup parameter" in detail
        ):
            # What a transaction-mode pooler does to session state.
            message += " (behind a transaction-mode pooler? add ?pooler=transaction)"
        error = StoreMisconfigured if _misconfigured(sqlstate, detail) else StoreUnavailable
        return error(_scrub(message, self._opts.secrets))

    def _announce_listener(self) -> _AnnounceListener:
        return _AnnounceListener(self)

    @abc.abstractmethod
    async def _listening_channel(self) -> str | None:
        """The store's one LISTEN connection, started if need be; its wake-up
        channel, or None while it cannot listen (store.py)."""
