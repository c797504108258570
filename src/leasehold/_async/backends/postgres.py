"""``postgresql://`` and ``postgres://``: PostgreSQL through psycopg 3 and psycopg_pool.

Lease state lives in ordinary tables of one schema (``?schema=``, default
``leasehold``), created idempotently on first use from ``_scripts/postgres/schema.sql``.
Every operation is one call of a PL/pgSQL function from that file: one round trip,
one short transaction, expiry decided by the server's ``clock_timestamp()``.
Fences come from one WAL-logged sequence, issued in the granting transaction;
record versions (compare-and-set values) come from the same sequence.

Nothing depends on session state (no session advisory locks, temp tables or
prepared statements), so the store is correct behind a transaction-mode pooler
(``?pooler=transaction``). A release hands the place over: the first waiter becomes
the holder in the releasing transaction (schema version 4), and is told its fence by
a NOTIFY on a dedicated LISTEN connection per store when a direct session is
available; otherwise waiters poll, and their next acquire confirms the grant.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import select
import threading
import urllib.parse
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

import psycopg
import psycopg.errors
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from leasehold import _deadline
from leasehold._async import _concurrency
from leasehold._async._concurrency import AsyncEvent, AsyncMutex
from leasehold._async.backends._postgres_io import NotifyListener, connect_within
from leasehold._async.store import (
    AsyncStore,
    AsyncSubscription,
    HubSubscription,
    ListenerSlot,
    TopicHub,
)
from leasehold._core import validate
from leasehold._core.clock import SYSTEM_CLOCK, Clock
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Capabilities,
    Granted,
    HandedOver,
    HolderInfo,
    Record,
    RenewItem,
    WaitResult,
)
from leasehold._core.url import StoreURL
from leasehold._errors import InvalidArgument, StoreMisconfigured, StoreUnavailable

__all__ = ["AsyncPooledPostgresStore", "AsyncPostgresStore", "from_url"]

log = logging.getLogger("leasehold.postgres")

# What schema_version() in schema.sql returns. Bump both together whenever the file
# changes; a store that finds an older version re-runs the (idempotent) file.
SCHEMA_VERSION = 5

# The functions of schema.sql the store calls, and how many arguments each takes.
_FUNCTIONS = {
    "acquire": 10,
    "renew": 3,
    "release": 2,
    "holders_of": 1,
    "leases": 1,
    "break_lease": 1,
    "read_record": 1,
    "write_record": 4,
}
# The most items one renew() call sends; larger batches take one call per this many
# (the function itself works through 1,000 items at a time). Bounds how long one
# statement runs, well inside statement_timeout.
_RENEW_CALL_ITEMS = 20_000

# URL query parameters that are leasehold's, not libpq's: removed before the rest
# of the URL reaches libpq (which rejects parameters it does not know).
OWN_OPTIONS = frozenset(
    {"schema", "pooler", "pool_min_size", "pool_max_size", "create_schema", "statement_timeout"}
)

# libpq settings leasehold supplies when the URL (or the matching PG* environment
# variable) does not. They bound how long a dead server or network path can go
# unnoticed -- about 10 s -- which must stay well inside a lease's safe deadline.
LIBPQ_DEFAULTS: dict[str, tuple[str, str | None]] = {
    "connect_timeout": ("5", "PGCONNECT_TIMEOUT"),
    "keepalives": ("1", None),
    "keepalives_idle": ("4", None),
    "keepalives_interval": ("2", None),
    "keepalives_count": ("2", None),
    "tcp_user_timeout": ("9000", None),  # ms: unacknowledged data fails the socket
    "application_name": ("leasehold", "PGAPPNAME"),
}
_INT_PARAMS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_POOLERS = ("none", "session", "transaction")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_STATEMENT_TIMEOUT_DEFAULT = 5.0
_POOL_WAIT = 1.0  # seconds to wait for a pooled connection before connecting directly
_QUICK_FAILURE = 1.0  # seconds: a call that failed faster than this may be retried
_LISTENER_RETRY = 5.0  # seconds before a failed LISTEN connection is tried again
_WAITER_GRACE = 5.0  # keep a wake-up registration this long past its queue expiry

# Stores that found themselves in a forked child keep their parent's pool and
# listener here forever: letting them be collected would run finalizers that talk
# to (or close) sockets the parent still uses.
_ORPHANED: list[object] = []


@dataclass(frozen=True)
class PostgresOptions:
    """Everything the URL says, validated before any I/O."""

    conninfo: str = ""
    schema: str = "leasehold"
    pooler: str = "none"
    pool_min_size: int = 1
    pool_max_size: int = 10
    create_schema: bool = True
    statement_timeout: float = _STATEMENT_TIMEOUT_DEFAULT
    connect_timeout: float = 5.0
    secrets: tuple[str, ...] = ()

    @property
    def listen(self) -> bool:
        return self.pooler != "transaction"

    def __repr__(self) -> str:  # never show the conninfo: it holds the password
        return (
            f"PostgresOptions(schema={self.schema!r}, pooler={self.pooler!r}, "
            f"pool={self.pool_min_size}..{self.pool_max_size})"
        )


def _scrub(text: str, hidden: Sequence[str]) -> str:
    for secret in hidden:
        if secret:
            text = text.replace(secret, "***")
    return text


def _seconds(key: str, value: str, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number >= 0 if allow_zero else number > 0) or number == float("inf"):
        raise InvalidArgument(f"?{key}= must be a positive number of seconds, got {value!r}")
    return number


def _count(key: str, value: str, lowest: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"?{key}= must be an integer, got {value!r}") from None
    if number < lowest:
        raise InvalidArgument(f"?{key}= must be at least {lowest}, got {number}")
    return number


def parse_options(url: StoreURL) -> PostgresOptions:
    """Split leasehold's options from libpq's and validate both; no I/O."""
    parts = urllib.parse.urlsplit(url.raw)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    hidden = [p for p in (parts.password, urllib.parse.unquote(parts.password or "")) if p]
    hidden += [v for k, v in pairs if k.lower() in ("password", "sslpassword") and v]
    own: dict[str, str] = {}
    passthrough: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in OWN_OPTIONS:
            if key in own:
                raise InvalidArgument(f"?{key}= is given twice in {url.redacted!r}")
            own[key] = value
        else:
            passthrough.append((key, value))

    schema = own.get("schema", "leasehold")
    if not _SCHEMA_RE.fullmatch(schema):
        raise InvalidArgument(
            f"?schema={schema!r} is not a plain identifier: use letters, digits and "
            "underscores, at most 63 characters, not starting with a digit"
        )
    pooler = own.get("pooler", "none").lower() or "none"
    if pooler == "statement":
        raise InvalidArgument(
            "?pooler=statement is not supported: installing the schema needs a "
            "multi-statement transaction; use transaction pooling"
        )
    if pooler not in _POOLERS:
        raise InvalidArgument(f"?pooler= must be one of {', '.join(_POOLERS)}, got {pooler!r}")
    create = own.get("create_schema", "true").lower()
    if create not in _TRUE + _FALSE:
        raise InvalidArgument(f"?create_schema= must be true or false, got {create!r}")
    pool_min = _count("pool_min_size", own.get("pool_min_size", "1"), 0)
    pool_max = _count("pool_max_size", own.get("pool_max_size", str(max(10, pool_min))), 1)
    if pool_max < pool_min:
        raise InvalidArgument(
            f"?pool_max_size={pool_max} is smaller than ?pool_min_size={pool_min}"
        )
    statement_timeout = _seconds(
        "statement_timeout",
        own.get("statement_timeout", str(_STATEMENT_TIMEOUT_DEFAULT)),
        allow_zero=True,
    )

    # Rebuild the URL without our parameters, then let libpq's own parser (no I/O)
    # check the rest: unknown parameters and malformed URLs fail here, not later.
    libpq_url = urllib.parse.urlunsplit(
        (
            parts.scheme,
            parts.netloc,
            parts.path,
            urllib.parse.urlencode(passthrough, quote_via=urllib.parse.quote),
            parts.fragment,
        )
    )
    try:
        given = conninfo_to_dict(libpq_url)
    except psycopg.Error as exc:
        raise InvalidArgument(
            f"invalid PostgreSQL url {url.redacted!r}: {_scrub(str(exc), hidden)}"
        ) from None
    for key in _INT_PARAMS:
        setting = given.get(key)
        if setting is not None and not re.fullmatch(r"-?\d+", str(setting)):
            raise InvalidArgument(f"?{key}= must be an integer, got {setting!r}")
    for port in str(given.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise InvalidArgument(f"invalid port {port!r} in {url.redacted!r}")
    sslmode = given.get("sslmode")
    if sslmode is not None and str(sslmode) not in _SSLMODES:
        raise InvalidArgument(f"?sslmode= must be one of {', '.join(_SSLMODES)}, got {sslmode!r}")

    extra: dict[str, Any] = {}
    for key, (default, env) in LIBPQ_DEFAULTS.items():
        if key not in given and not (env and os.environ.get(env)):
            extra[key] = default
    if statement_timeout > 0 and pooler != "transaction":
        # A startup option: transaction poolers (pgbouncer) reject unknown startup
        # parameters, so behind them only the functions' own lock_timeout applies.
        setting = f"-c statement_timeout={int(statement_timeout * 1000)}"
        current = str(given.get("options") or os.environ.get("PGOPTIONS") or "")
        if "statement_timeout" not in current:
            extra["options"] = f"{current} {setting}".strip()
    connect_timeout = float(given.get("connect_timeout") or extra.get("connect_timeout") or 5)
    return PostgresOptions(
        conninfo=make_conninfo(libpq_url, **extra),
        schema=schema,
        pooler=pooler,
        pool_min_size=pool_min,
        pool_max_size=pool_max,
        create_schema=create in _TRUE,
        statement_timeout=statement_timeout,
        # libpq treats values below 2 s as 2 s; the pool waits a little longer.
        connect_timeout=max(2.0, connect_timeout) + 1.0,
        secrets=tuple(hidden),
    )


def _schema_sql() -> str:
    """The body of schema.sql: everything between its markers (the file's first
    statements pick the schema; the store does that itself for ``?schema=``)."""
    text = resources.files("leasehold._scripts").joinpath("postgres/schema.sql").read_text()
    start = text.index("-- leasehold:body")
    end = text.index("-- leasehold:end")
    return text[text.index("\n", start) + 1 : end]


def _function_queries(schema: str) -> dict[str, bytes]:
    """``SELECT * FROM "schema".function(%s, ...)`` for every function, built once per
    store: the per-call path only looks one up. ``schema`` matched ``_SCHEMA_RE``
    (letters, digits, underscores), so double quotes make it a safe identifier."""
    return {
        function: (f'SELECT * FROM "{schema}".{function}({", ".join(["%s"] * arity)})').encode()
        for function, arity in _FUNCTIONS.items()
    }


def wake_key(name: str, token: str) -> str:
    """What a NOTIFY carries to wake (name, token): a hash, so tokens stay secret.
    A hand-over sends ``"<wake_key> <fence>"``."""
    return hashlib.sha256(f"{len(name)}:{name}{token}".encode()).hexdigest()[:32]


class _Waiter:
    """A token this store listens for: ``notified`` when a notification arrived,
    ``fence`` when it was a hand-over (the token is a holder now). The event is made
    only by a ``wait`` that has to block: most acquires are granted at once, and
    never need one."""

    __slots__ = ("event", "fence", "notified", "until")

    def __init__(self, until: float) -> None:
        self.until = until
        self.notified = False
        self.fence: int | None = None
        self.event: AsyncEvent | None = None


def announce_channel(schema: str) -> str:
    """The NOTIFY channel of a schema's announcements: fixed per schema, so every
    store on it meets there; hashed, so any schema name makes a short identifier."""
    return "leasehold_announce_" + hashlib.sha256(schema.encode()).hexdigest()[:16]


def _looks_dead(conn: AsyncConnection[Any]) -> bool:
    """True if an idle pooled connection has something to read.

    Nothing is sent to an idle connection without LISTEN except the goodbye of a
    terminated backend (FATAL, then EOF). Checking costs no round trip, so a
    connection killed while idle in the pool is dropped before it fails a call.
    """
    if conn.closed or conn.broken:
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


class AsyncPostgresStore(AsyncStore):
    capabilities = Capabilities(
        server_clock=True,
        durable=True,
        cross_host=True,
        notifications=True,
        fence_survives_data_loss=True,
        hand_over=True,
        notes=(
            "expiry on the server's clock (clock_timestamp())",
            "fences from one WAL-logged sequence: never reused, even after a crash",
            "a release hands the place to the first waiter in the same transaction; "
            "LISTEN/NOTIFY tells it its fence, on a dedicated connection per store",
            "correct behind transaction-mode poolers with ?pooler=transaction (polling)",
            "fences survive failover only with synchronous replication",
        ),
        announcements=True,
    )

    def __new__(cls, url: StoreURL, clock: Clock | None = None) -> AsyncPostgresStore:
        # Behind a transaction pooler the same store has different capabilities;
        # capabilities are class data, so that mode is a subclass.
        target = cls
        if cls is AsyncPostgresStore and not parse_options(url).listen:
            target = AsyncPooledPostgresStore
        instance: AsyncPostgresStore = super().__new__(target)
        return instance

    def __init__(self, url: StoreURL, clock: Clock | None = None) -> None:
        self.url = url
        self._opts = parse_options(url)
        # Only local bookkeeping (listener retries, forgetting stale waiters) reads
        # this clock; every lease decision is made by the server's clock.
        self._clock = clock or SYSTEM_CLOCK
        self._pid = os.getpid()
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
        self._queries = _function_queries(self._opts.schema)
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
        after use)."""
        waited = False
        for _ in range(self._opts.pool_max_size + 1):
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
                if pool.get_stats().get("pool_size", 0) >= self._opts.pool_max_size:
                    waited = True  # full and busy: wait for a connection like anyone
                    continue
                # The pool is failing to connect. Its reconnection backoff doubles
                # up to minutes, longer than a lease lives after an outage, so this
                # call connects by itself; that also makes an error name the real
                # cause (refused, authentication, DNS) instead of "timeout".
                return await self._connect(), False
            if not _looks_dead(conn):
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
                    "leasehold/_scripts/postgres/schema.sql as a migration"
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

    async def _run(self, query: bytes, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        pool = await self._ready_pool()
        conn, pooled = await self._getconn(pool)
        # A server that stops answering is noticed by the operation's deadline,
        # which shuts this socket down: the call fails, the pool drops the
        # connection (libpq would wait forever; statement_timeout needs a server
        # that still runs).
        fd = conn.pgconn.socket
        _deadline.attach(fd)
        try:
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
        return await self._query(what, self._queries[function], params, idempotent=idempotent)

    async def _query(
        self, what: str, query: bytes, params: Sequence[Any], *, idempotent: bool
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

    # -- wake-ups -----------------------------------------------------------------

    async def _listening_channel(self) -> str | None:
        """The channel to be woken on, LISTEN already in place; None means poll."""
        if not self._opts.listen or self._closed:
            return None
        listener = self._listener
        if listener is not None and listener.alive:
            return self._channel
        async with self._listener_mutex:
            listener = self._listener
            if listener is not None and listener.alive:
                return self._channel
            now = self._clock.monotonic()
            if now < self._listener_retry_at:
                return None
            if listener is not None:
                self._listener = None
                await listener.aclose()
            listener = NotifyListener(
                self._opts.conninfo, self._channel, self._on_notify, self._on_listener_lost
            )
            try:
                await listener.start()
            except (psycopg.Error, OSError) as exc:
                await listener.aclose()
                self._listener_retry_at = now + _LISTENER_RETRY
                self._listener_error = _scrub(str(exc), self._opts.secrets)
                log.warning(
                    "%r: cannot LISTEN (%s); waiters poll for %.0f s",
                    self,
                    self._listener_error,
                    _LISTENER_RETRY,
                )
                return None
            self._listener = listener
            self._listener_error = None
            return self._channel

    def _on_notify(self, payload: str) -> None:
        key, _, fence = payload.partition(" ")
        with self._waiters_guard:
            entry = self._waiters.get(key)
            if entry is None:
                return
            entry.notified = True
            if fence.isascii() and fence.isdigit():  # anything else only wakes it
                entry.fence = int(fence)
            event = entry.event
        if event is not None:
            event.set()

    def _on_listener_lost(self) -> None:
        # Notifications sent while nobody listens are lost: wake every waiter, whose
        # next acquire re-establishes LISTEN before it queues again.
        with self._waiters_guard:
            events = []
            for entry in self._waiters.values():
                entry.notified = True
                if entry.event is not None:
                    events.append(entry.event)
        for event in events:
            event.set()

    def _arm(self, key: str, queue_ttl: float) -> None:
        """Register (or re-arm) a waiter *before* the acquire that queues it is sent."""
        now = self._clock.monotonic()
        with self._waiters_guard:
            if now >= self._next_sweep:
                self._next_sweep = now + 10.0
                for stale in [k for k, entry in self._waiters.items() if entry.until < now]:
                    del self._waiters[stale]
            entry = self._waiters.get(key)
            if entry is None:
                self._waiters[key] = _Waiter(now + queue_ttl + _WAITER_GRACE)
            else:
                # A hand-over noted before this attempt is what the attempt confirms.
                entry.notified = False
                entry.fence = None
                if entry.event is not None:
                    entry.event.clear()
                entry.until = now + queue_ttl + _WAITER_GRACE

    def _disarm(self, name: str, token: str, key: str | None = None) -> None:
        if self._waiters:
            with self._waiters_guard:
                self._waiters.pop(key or wake_key(name, token), None)

    # -- the store contract ---------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        self._after_fork()
        channel: str | None = None
        key: str | None = None
        if request.queue_ttl is not None:
            channel = await self._listening_channel()
            if channel is not None:
                key = wake_key(request.name, request.token)
                self._arm(key, request.queue_ttl)
        holder = request.holder
        rows = await self._call(
            "acquire",
            "acquire",
            (
                request.name,
                request.token,
                holder.owner,
                holder.host,
                holder.pid,
                float(request.ttl),
                request.limit,
                None if request.queue_ttl is None else float(request.queue_ttl),
                channel,
                key,
            ),
        )
        granted, fence, retry_after, position = rows[0]
        if granted:
            self._disarm(request.name, request.token, key)
            return Granted(int(fence))
        return Busy(
            retry_after=None if retry_after is None else max(0.0, float(retry_after)),
            position=None if position is None else int(position),
        )

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        # One call (one round trip, one transaction) per _RENEW_CALL_ITEMS items.
        answers: list[bool] = []
        for start in range(0, len(items), _RENEW_CALL_ITEMS):
            chunk = items[start : start + _RENEW_CALL_ITEMS]
            rows = await self._call(
                "renew",
                "renew",
                (
                    [item.name for item in chunk],
                    [item.token for item in chunk],
                    [float(item.ttl) for item in chunk],
                ),
            )
            answers.extend(bool(answer) for answer in rows[0][0])
        return answers

    async def release(self, name: str, token: str) -> bool:
        self._after_fork()  # before _disarm: its lock may be stale in a forked child
        self._disarm(name, token)
        rows = await self._call("release", "release", (name, token), idempotent=False)
        return bool(rows[0][0])

    async def holders(self, name: str) -> list[HolderInfo]:
        return self._infos(await self._call("holders", "holders_of", (name,)))

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        return self._infos(await self._call("leases", "leases", (prefix,)))

    @staticmethod
    def _infos(rows: list[tuple[Any, ...]]) -> list[HolderInfo]:
        return [
            HolderInfo(
                name=name,
                owner=owner,
                host=host,
                pid=int(pid),
                fence=int(fence),
                limit=int(limit),
                held_for=max(0.0, float(held_for)),
                expires_in=max(0.0, float(expires_in)),
            )
            for name, owner, host, pid, fence, limit, held_for, expires_in in rows
        ]

    async def break_lease(self, name: str) -> int:
        rows = await self._call("break_lease", "break_lease", (name,), idempotent=False)
        return int(rows[0][0])

    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        self._after_fork()
        key = wake_key(name, token)
        with self._waiters_guard:
            entry = self._waiters.get(key)
        if entry is None:
            # Not queued through this store's listener (polling mode, no queue_ttl,
            # or LISTEN unavailable): nothing will wake us. A hand-over made
            # meanwhile is confirmed by the next acquire.
            await _concurrency.sleep(timeout)
            return False
        with self._waiters_guard:
            event = entry.event
            if event is None and not entry.notified:
                event = entry.event = AsyncEvent()
        if not entry.notified and not (event is not None and await event.wait(timeout)):
            return False
        with self._waiters_guard:
            entry.notified = False
            if entry.event is not None:
                entry.event.clear()
            fence = entry.fence
            if fence is not None and self._waiters.get(key) is entry:
                del self._waiters[key]  # a holder now: nothing more to wake it for
        return True if fence is None else HandedOver(fence)

    async def read_record(self, key: str) -> Record:
        rows = await self._call("read_record", "read_record", (key,))
        value, version, now = rows[0]
        return Record(
            key=key,
            value=None if value is None else bytes(value),
            version=int(version),
            now=float(now),
        )

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        # Not retried: if a first attempt committed before its connection died, a
        # second would find its own version and wrongly answer "lost the race".
        rows = await self._call(
            "write_record",
            "write_record",
            (
                key,
                int(expected_version),
                None if value is None else bytes(value),
                None if ttl is None else float(ttl),
            ),
            idempotent=False,
        )
        version = rows[0][0]
        return None if version is None else int(version)

    async def ping(self) -> None:
        await self._query("ping", b"SELECT 1", (), idempotent=True)

    async def server_time(self) -> float | None:
        rows = await self._query(
            "server_time",
            b"SELECT extract(epoch FROM clock_timestamp())::double precision",
            (),
            idempotent=True,
        )
        return float(rows[0][0])

    async def aclose(self) -> None:
        self._closed = True
        if os.getpid() != self._pid:
            self._after_fork()  # a child never closes what its parent still uses
            return
        listener, self._listener = self._listener, None
        pool, self._pool = self._pool, None
        if listener is not None:
            await listener.aclose()
        await self._announcements.aclose()
        if pool is not None:
            await pool.close()

    # -- announcements --------------------------------------------------------------

    async def announce(self, topic: str) -> None:
        # The topic travels as a parameter (the payload), never as SQL or a channel.
        await self._query(
            "announce",
            b"SELECT pg_notify(%s, %s)",
            (self._announce_channel, validate.topic(topic)),
            idempotent=True,  # a second NOTIFY only wakes subscribers twice
        )

    def subscribe(self, topic: str) -> AsyncSubscription:
        topic = validate.topic(topic)
        if not self._opts.listen:
            return AsyncSubscription(topic)  # no LISTEN behind a transaction pooler
        return HubSubscription(topic, self._topics, self._announcements)

    def _announce_listener(self) -> _AnnounceListener:
        listener = NotifyListener(
            self._opts.conninfo,
            self._announce_channel,
            self._topics.wake,
            self._topics.wake_all,
        )
        return _AnnounceListener(listener, repr(self), self._opts.secrets)

    def warnings(self) -> list[str]:
        found: list[str] = []
        if not self._opts.listen:
            found.append(
                f"{self.url.redacted}: ?pooler=transaction: no LISTEN/NOTIFY, waiters poll"
            )
        if self._listener_error is not None:
            found.append(
                f"{self.url.redacted}: LISTEN failed ({self._listener_error}); waiters poll"
            )
        if self._announcements.error is not None:
            found.append(
                f"{self.url.redacted}: LISTEN for announcements failed "
                f"({self._announcements.error}); observers poll"
            )
        if self._opts.statement_timeout == 0:
            found.append(f"{self.url.redacted}: statement_timeout disabled")
        settings = conninfo_to_dict(self._opts.conninfo)
        host = str(settings.get("host") or "")
        local = all(
            h in ("", "localhost", "127.0.0.1", "::1") or h.startswith("/") for h in host.split(",")
        )
        if not local and settings.get("sslmode") not in ("require", "verify-ca", "verify-full"):
            found.append(
                f"{self.url.redacted}: sslmode is not require/verify-full for a remote host"
            )
        if str(settings.get("keepalives", "1")) == "0":
            found.append(f"{self.url.redacted}: keepalives=0: a dead network path goes unnoticed")
        return found

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted!r})"


class _AnnounceListener:
    """The ``NotifyListener`` on a schema's announcement channel, as the
    ``Listener`` a ``ListenerSlot`` keeps: its failures are StoreUnavailable,
    password removed."""

    def __init__(self, listener: NotifyListener, what: str, hidden: Sequence[str]) -> None:
        self._listener = listener
        self._what = what
        self._hidden = hidden

    @property
    def alive(self) -> bool:
        return self._listener.alive

    def fileno(self) -> int | None:
        return self._listener.fileno()

    async def start(self) -> None:
        try:
            await self._listener.start()
        except (psycopg.Error, OSError) as exc:
            message = f"{self._what}: LISTEN failed: {str(exc).strip() or type(exc).__name__}"
            raise StoreUnavailable(_scrub(message, self._hidden)) from None

    async def aclose(self) -> None:
        await self._listener.aclose()


class AsyncPooledPostgresStore(AsyncPostgresStore):
    """The same store behind a transaction-mode pooler (``?pooler=transaction``):
    no LISTEN (a pooler does not keep a session), so waiters poll."""

    capabilities = replace(
        AsyncPostgresStore.capabilities,
        notifications=False,
        announcements=False,
        hand_over=False,
        notes=(
            "expiry on the server's clock (clock_timestamp())",
            "fences from one WAL-logged sequence: never reused, even after a crash",
            "transaction-mode pooler: no session state used, no prepared statements",
            "no notifications behind the pooler: waiters poll with jitter (a place "
            "handed over to a waiter is confirmed by its next acquire)",
            "fences survive failover only with synchronous replication",
        ),
    )


def from_url(url: StoreURL, clock: Clock) -> AsyncPostgresStore:
    """Validate the URL and build the store; connects lazily on first use."""
    return AsyncPostgresStore(url, clock)
