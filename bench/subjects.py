"""Everything that gets measured: leasehold, the libraries users pick instead, and floors.

A subject builds a ``Handle`` (acquire, release, close) for one lock name inside the
process that uses it. Async subjects' three callables are coroutine functions.
Competitors run with their defaults; where a default makes no sense for a lock
benchmark (a lock that never expires) the setting is stated in ``settings``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

# Compare-and-delete: the standard safe release of a SET NX lock (the floor's Lua).
CAD = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
TTL = 30  # seconds, every lock that has a TTL gets this one


class Handle(NamedTuple):
    acquire: Callable[[], Any]
    release: Callable[[], Any]
    close: Callable[[], Any]


@dataclass(frozen=True)
class Subject:
    key: str  # stable id used in results
    label: str  # what the tables show
    group: str  # redis | postgres | local
    kind: str  # floor | competitor | leasehold
    mode: str  # sync | async
    package: str | None  # distribution whose version is reported
    settings: str
    make: Callable[[dict[str, Any], str], Handle]
    prepare: Callable[[dict[str, Any], str], None] | None = None
    multiprocess: bool = True  # usable from several processes on one lock
    # An environment variable naming another Python interpreter to measure this
    # subject in (its own virtual environment: a library whose pins clash with
    # the others'); unset, the subject runs here like the rest.
    python: str | None = None

    def interpreter(self) -> str | None:
        return os.environ.get(self.python) if self.python else None

    @property
    def is_async(self) -> bool:
        return self.mode == "async"


def _noop() -> None:
    return None


async def _anoop() -> None:
    return None


def version(package: str | None) -> str | None:
    if package is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def advisory_key(name: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


def _redis(env: dict[str, Any]) -> Any:
    import redis

    return redis.Redis.from_url(env["redis"])


def _aredis(env: dict[str, Any]) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(env["redis"])


# -- leasehold ------------------------------------------------------------------


# ?durability=relaxed gets a schema of its own: its max_ttl and epoch never touch
# the durable rows' schema.
RELAXED = "schema=leasehold_relaxed&durability=relaxed"


def leasehold_url(env: dict[str, Any], backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{env['dir']}/leasehold.db"
    if backend == "memory":
        return "memory://"
    if backend == "postgres-relaxed":
        return f"{env['postgres']}?{RELAXED}"
    return env[backend]


def _leasehold_sync(backend: str) -> Callable[[dict[str, Any], str], Handle]:
    def make(env: dict[str, Any], name: str) -> Handle:
        import leasehold

        client = leasehold.Client(leasehold_url(env, backend))
        lock = client.lock(name, ttl=TTL)
        held: list[Any] = []
        return Handle(
            acquire=lambda: held.append(lock.acquire()),
            release=lambda: held.pop().release(),
            close=client.close,
        )

    return make


def _leasehold_async(backend: str) -> Callable[[dict[str, Any], str], Handle]:
    def make(env: dict[str, Any], name: str) -> Handle:
        import leasehold

        client = leasehold.AsyncClient(leasehold_url(env, backend))
        lock = client.lock(name, ttl=TTL)
        held: list[Any] = []

        async def acquire() -> None:
            held.append(await lock.acquire())

        async def release() -> None:
            await held.pop().release()

        return Handle(acquire, release, client.aclose)

    return make


# -- Redis ------------------------------------------------------------------------


def _ping(env: dict[str, Any], name: str) -> Handle:
    r = _redis(env)
    return Handle(r.ping, r.ping, r.close)


def _aping(env: dict[str, Any], name: str) -> Handle:
    r = _aredis(env)
    return Handle(r.ping, r.ping, r.aclose)


def _setnx(env: dict[str, Any], name: str) -> Handle:
    r = _redis(env)
    cad = r.register_script(CAD)
    token = secrets.token_hex(16)

    def acquire() -> None:
        while not r.set(name, token, nx=True, px=TTL * 1000):
            pass  # only ever measured uncontended

    return Handle(acquire, lambda: cad(keys=[name], args=[token]), r.close)


def _blpop_prepare(env: dict[str, Any], name: str) -> None:
    r = _redis(env)
    r.delete(name)
    r.rpush(name, "token")
    r.close()


def _blpop(env: dict[str, Any], name: str) -> Handle:
    r = _redis(env)
    return Handle(lambda: r.blpop([name], 0), lambda: r.rpush(name, "token"), r.close)


def _redis_py(env: dict[str, Any], name: str) -> Handle:
    r = _redis(env)
    lock = r.lock(name, timeout=TTL)
    return Handle(lock.acquire, lock.release, r.close)


def _redis_py_async(env: dict[str, Any], name: str) -> Handle:
    r = _aredis(env)
    lock = r.lock(name, timeout=TTL)
    return Handle(lock.acquire, lock.release, r.aclose)


def _python_redis_lock(env: dict[str, Any], name: str) -> Handle:
    import redis_lock

    r = _redis(env)
    lock = redis_lock.Lock(r, name, expire=TTL)
    return Handle(lock.acquire, lock.release, r.close)


def _pottery(env: dict[str, Any], name: str) -> Handle:
    from pottery import Redlock

    r = _redis(env)
    lock = Redlock(key=name, masters={r})
    return Handle(lock.acquire, lock.release, r.close)


def _pottery_async(env: dict[str, Any], name: str) -> Handle:
    from pottery import AIORedlock

    r = _aredis(env)
    lock = AIORedlock(key=name, masters={r})
    return Handle(lock.acquire, lock.release, r.aclose)


def _mithril(renew: bool) -> Callable[[dict[str, Any], str], Handle]:
    def make(env: dict[str, Any], name: str) -> Handle:
        import logging

        import mithril
        import structlog
        from mithril.backends import RedisBackend

        # mithril logs every acquire and release at info through structlog, which
        # prints to stdout by default: warnings and above only, as for every peer.
        mithril.configure_logging(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
        )
        r = _redis(env)
        backend = RedisBackend(r)
        held: list[Any] = []

        def acquire() -> None:
            # A mithril Lock is single-use: one per acquisition, as it documents.
            lock = mithril.Lock(name, backend=backend, ttl=TTL, auto_renewal=renew)
            lock.acquire()
            held.append(lock)

        return Handle(acquire, lambda: held.pop().release(), r.close)

    return make


def _sherlock(env: dict[str, Any], name: str) -> Handle:
    import sherlock

    r = _redis(env)
    lock = sherlock.RedisLock(name, client=r)
    return Handle(lock.acquire, lock.release, r.close)


def _tooz(url_key: str) -> Callable[[dict[str, Any], str], Handle]:
    def make(env: dict[str, Any], name: str) -> Handle:
        from tooz import coordination

        coordinator = coordination.get_coordinator(env[url_key], secrets.token_hex(8).encode())
        coordinator.start()
        lock = coordinator.get_lock(name.encode())
        return Handle(lock.acquire, lock.release, coordinator.stop)

    return make


# -- PostgreSQL -------------------------------------------------------------------


def _advisory(env: dict[str, Any], name: str) -> Handle:
    import psycopg

    conn = psycopg.connect(env["postgres"], autocommit=True)
    key = advisory_key(name)
    return Handle(
        lambda: conn.execute("SELECT pg_advisory_lock(%s)", (key,)),
        lambda: conn.execute("SELECT pg_advisory_unlock(%s)", (key,)),
        conn.close,
    )


def _pg_table(relaxed: bool) -> Callable[[dict[str, Any], str], Handle]:
    """The least a lease kept in a table costs: one row inserted to take the name and
    deleted (by name and token) to give it back, each its own transaction; no fence,
    no expiry check, no queue. Relaxed: the session commits with synchronous_commit=off."""

    def make(env: dict[str, Any], name: str) -> Handle:
        import psycopg

        conn = psycopg.connect(env["postgres"], autocommit=True)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_table_floor "
            "(name text PRIMARY KEY, token text NOT NULL)"
        )
        if relaxed:
            conn.execute("SET synchronous_commit = off")
        token = secrets.token_hex(16)
        return Handle(
            lambda: conn.execute("INSERT INTO bench_table_floor VALUES (%s, %s)", (name, token)),
            lambda: conn.execute(
                "DELETE FROM bench_table_floor WHERE name = %s AND token = %s", (name, token)
            ),
            conn.close,
        )

    return make


def _advisory_async(env: dict[str, Any], name: str) -> Handle:
    import psycopg

    key = advisory_key(name)
    box: list[Any] = []

    async def conn() -> Any:
        if not box:
            box.append(await psycopg.AsyncConnection.connect(env["postgres"], autocommit=True))
        return box[0]

    async def acquire() -> None:
        await (await conn()).execute("SELECT pg_advisory_lock(%s)", (key,))

    async def release() -> None:
        await (await conn()).execute("SELECT pg_advisory_unlock(%s)", (key,))

    async def close() -> None:
        if box:
            await box[0].close()

    return Handle(acquire, release, close)


def _sqlalchemy_dlock(env: dict[str, Any], name: str) -> Handle:
    from sqlalchemy import create_engine
    from sqlalchemy_dlock import create_sadlock

    url = env["postgres"].replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url)
    conn = engine.connect()
    lock = create_sadlock(conn, name)

    def close() -> None:
        conn.close()
        engine.dispose()

    return Handle(lock.acquire, lock.release, close)


# -- etcd (the v3 JSON gateway, through httpx like the backend) ---------------------


def _etcd_base(env: dict[str, Any]) -> str:
    return "http://" + env["etcd"].split("://", 1)[1]


def _b64(data: str) -> str:
    import base64

    return base64.b64encode(data.encode()).decode()


def _etcd_putdel(env: dict[str, Any], name: str) -> Handle:
    import httpx

    http = httpx.Client(base_url=_etcd_base(env))
    key = {"key": _b64(f"bench/{name}")}
    return Handle(
        lambda: http.post("/v3/kv/put", json={**key, "value": _b64("x")}).raise_for_status(),
        lambda: http.post("/v3/kv/deleterange", json=key).raise_for_status(),
        http.close,
    )


def _etcd_putdel_async(env: dict[str, Any], name: str) -> Handle:
    import httpx

    http = httpx.AsyncClient(base_url=_etcd_base(env))
    key = {"key": _b64(f"bench/{name}")}

    async def acquire() -> None:
        (await http.post("/v3/kv/put", json={**key, "value": _b64("x")})).raise_for_status()

    async def release() -> None:
        (await http.post("/v3/kv/deleterange", json=key)).raise_for_status()

    return Handle(acquire, release, http.aclose)


def _etcd_v3lock(env: dict[str, Any], name: str) -> Handle:
    """etcd's own lock service: Lock blocks in the server until the caller's key is
    the oldest under the name (FIFO by revision), Unlock deletes it."""
    import httpx

    http = httpx.Client(base_url=_etcd_base(env), timeout=None)
    lease = http.post("/v3/lease/grant", json={"TTL": TTL}).json()["ID"]
    held: list[str] = []

    def acquire() -> None:
        answer = http.post("/v3/lock/lock", json={"name": _b64(f"bench/{name}"), "lease": lease})
        answer.raise_for_status()
        held.append(answer.json()["key"])

    def release() -> None:
        http.post("/v3/lock/unlock", json={"key": held.pop()}).raise_for_status()

    def close() -> None:
        http.post("/v3/lease/revoke", json={"ID": lease})
        http.close()

    return Handle(acquire, release, close)


# -- local files --------------------------------------------------------------------


def _path(env: dict[str, Any], name: str) -> str:
    return os.path.join(env["dir"], f"{name}.lock")


def _flock(env: dict[str, Any], name: str) -> Handle:
    fd = os.open(_path(env, name), os.O_RDWR | os.O_CREAT, 0o644)
    return Handle(
        lambda: fcntl.flock(fd, fcntl.LOCK_EX),
        lambda: fcntl.flock(fd, fcntl.LOCK_UN),
        lambda: os.close(fd),
    )


def _filelock(env: dict[str, Any], name: str) -> Handle:
    import filelock

    lock = filelock.FileLock(_path(env, name))
    return Handle(lock.acquire, lock.release, _noop)


def _filelock_async(env: dict[str, Any], name: str) -> Handle:
    import filelock

    lock = filelock.AsyncFileLock(_path(env, name))

    async def acquire() -> None:
        await lock.acquire()

    async def release() -> None:
        await lock.release()

    return Handle(acquire, release, _anoop)


def _portalocker(env: dict[str, Any], name: str) -> Handle:
    import portalocker

    lock = portalocker.Lock(_path(env, name))
    return Handle(lock.acquire, lock.release, _noop)


def _s(*args: Any, **kw: Any) -> Subject:
    return Subject(*args, **kw)


LH = "leasehold"
# mithril-locks requires redis-py < 8: it runs in a virtual environment of its own.
MITHRIL_PYTHON = "LEASEHOLD_BENCH_MITHRIL_PYTHON"
SUBJECTS: list[Subject] = [
    # Redis
    _s("redis-ping", "2xPING", "redis", "floor", "sync", "redis",
       "two round trips, no lock at all", _ping),
    _s("redis-setnx", "SET NX + Lua CAD", "redis", "floor", "sync", "redis",
       "SET NX PX, compare-and-delete script", _setnx, multiprocess=False),
    _s("redis-blpop", "BLPOP/RPUSH", "redis", "floor", "sync", "redis",
       "one token in a list; BLPOP blocks in the server, FIFO", _blpop, prepare=_blpop_prepare),
    _s("redis-py", "redis-py Lock", "redis", "competitor", "sync", "redis",
       f"timeout={TTL} (default None: never expires); sleep=0.1 default", _redis_py),
    _s("python-redis-lock", "python-redis-lock", "redis", "competitor", "sync",
       "python-redis-lock", f"expire={TTL} (default None); auto_renewal=False default",
       _python_redis_lock),
    _s("pottery", "pottery Redlock", "redis", "competitor", "sync", "pottery",
       "defaults: auto_release_time=10, one master", _pottery),
    _s("mithril", "mithril-locks", "redis", "competitor", "sync", "mithril-locks",
       f"ttl={TTL}, auto_renewal=False (default), timeout=10, retry_interval=0.1; "
       "structlog info logging silenced; own venv (redis<8)", _mithril(False),
       python=MITHRIL_PYTHON),
    _s("mithril-renew", "mithril-locks (renewal)", "redis", "competitor", "sync",
       "mithril-locks", f"ttl={TTL}, auto_renewal=True; structlog info logging silenced; "
       "own venv (redis<8)", _mithril(True), python=MITHRIL_PYTHON),
    _s("sherlock", "sherlock RedisLock", "redis", "competitor", "sync", "sherlock",
       "defaults: expire=60, timeout=10, retry_interval=0.1", _sherlock),
    _s("tooz-redis", "tooz (redis)", "redis", "competitor", "sync", "tooz",
       "defaults: lock timeout 30 s (redis-py Lock inside)", _tooz("redis")),
    _s("leasehold-redis", "leasehold", "redis", LH, "sync", LH, f"ttl={TTL}, renew=True (default)",
       _leasehold_sync("redis")),
    _s("redis-ping-async", "2xPING (asyncio)", "redis", "floor", "async", "redis",
       "two round trips, no lock at all", _aping),
    _s("redis-py-async", "redis-py asyncio Lock", "redis", "competitor", "async", "redis",
       f"timeout={TTL}; sleep=0.1 default", _redis_py_async),
    _s("pottery-async", "pottery AIORedlock", "redis", "competitor", "async", "pottery",
       "defaults: auto_release_time=10, one master", _pottery_async),
    _s("leasehold-redis-async", "leasehold (asyncio)", "redis", LH, "async", LH,
       f"ttl={TTL}, renew=True", _leasehold_async("redis")),
    # PostgreSQL
    _s("pg-advisory", "pg_advisory_lock pair", "postgres", "floor", "sync", "psycopg",
       "pg_advisory_lock/unlock on one persistent autocommit connection", _advisory),
    _s("pg-table", "one-row INSERT + DELETE", "postgres", "floor", "sync", "psycopg",
       "a row per held name, each its own durable transaction: the least a table-kept "
       "lease costs (no fence, no expiry, no queue)", _pg_table(False), multiprocess=False),
    _s("pg-table-relaxed", "one-row INSERT + DELETE (relaxed)", "postgres", "floor", "sync",
       "psycopg", "the same with synchronous_commit=off", _pg_table(True), multiprocess=False),
    _s("tooz-postgres", "tooz (postgresql)", "postgres", "competitor", "sync", "tooz",
       "defaults: advisory lock, new psycopg2 connection per acquire", _tooz("postgres")),
    _s("sqlalchemy-dlock", "sqlalchemy-dlock", "postgres", "competitor", "sync",
       "sqlalchemy-dlock", "defaults: pg_advisory_lock on one SQLAlchemy connection (psycopg 3)",
       _sqlalchemy_dlock),
    _s("leasehold-postgres", "leasehold", "postgres", LH, "sync", LH, f"ttl={TTL}, renew=True",
       _leasehold_sync("postgres")),
    _s("leasehold-postgres-relaxed", "leasehold (relaxed)", "postgres", LH, "sync", LH,
       f"ttl={TTL}, renew=True, ?durability=relaxed", _leasehold_sync("postgres-relaxed")),
    _s("pg-advisory-async", "pg_advisory_lock pair (asyncio)", "postgres", "floor", "async",
       "psycopg", "psycopg AsyncConnection, autocommit", _advisory_async),
    _s("leasehold-postgres-async", "leasehold (asyncio)", "postgres", LH, "async", LH,
       f"ttl={TTL}, renew=True", _leasehold_async("postgres")),
    _s("leasehold-postgres-relaxed-async", "leasehold (relaxed, asyncio)", "postgres", LH,
       "async", LH, f"ttl={TTL}, renew=True, ?durability=relaxed",
       _leasehold_async("postgres-relaxed")),
    # etcd
    _s("etcd-putdel", "put + delete", "etcd", "floor", "sync", "httpx",
       "two gateway calls on one key, no lock at all", _etcd_putdel, multiprocess=False),
    _s("etcd-v3lock", "etcd v3lock (Lock/Unlock)", "etcd", "competitor", "sync", "httpx",
       f"/v3/lock/lock + /v3/lock/unlock through the gateway; one lease (TTL {TTL}) per client, "
       "not kept alive", _etcd_v3lock),
    _s("leasehold-etcd", "leasehold", "etcd", LH, "sync", LH, f"ttl={TTL}, renew=True",
       _leasehold_sync("etcd")),
    _s("etcd-putdel-async", "put + delete (asyncio)", "etcd", "floor", "async", "httpx",
       "two gateway calls on one key, no lock at all", _etcd_putdel_async, multiprocess=False),
    _s("leasehold-etcd-async", "leasehold (asyncio)", "etcd", LH, "async", LH,
       f"ttl={TTL}, renew=True", _leasehold_async("etcd")),
    # one host: files and SQLite
    _s("flock", "fcntl.flock", "local", "floor", "sync", None,
       "flock(LOCK_EX)/flock(LOCK_UN) on one open file", _flock),
    _s("filelock", "filelock", "local", "competitor", "sync", "filelock",
       "defaults: FileLock, poll_interval=0.05", _filelock),
    _s("portalocker", "portalocker", "local", "competitor", "sync", "portalocker",
       "defaults: Lock, timeout=5, check_interval=0.25", _portalocker),
    _s("leasehold-sqlite", "leasehold (SQLite)", "local", LH, "sync", LH,
       f"ttl={TTL}, renew=True", _leasehold_sync("sqlite")),
    _s("leasehold-memory", "leasehold (memory)", "local", LH, "sync", LH,
       f"ttl={TTL}, one process only", _leasehold_sync("memory"), multiprocess=False),
    _s("filelock-async", "filelock AsyncFileLock", "local", "competitor", "async", "filelock",
       "defaults", _filelock_async),
    _s("leasehold-sqlite-async", "leasehold (SQLite, asyncio)", "local", LH, "async", LH,
       f"ttl={TTL}, renew=True", _leasehold_async("sqlite")),
    _s("leasehold-memory-async", "leasehold (memory, asyncio)", "local", LH, "async", LH,
       f"ttl={TTL}, one process only", _leasehold_async("memory"), multiprocess=False),
]  # fmt: skip

BY_KEY = {s.key: s for s in SUBJECTS}


def needs(subject: Subject) -> str | None:
    """The server a subject needs, if any."""
    if subject.group in ("redis", "postgres", "etcd"):
        return subject.group
    return None
