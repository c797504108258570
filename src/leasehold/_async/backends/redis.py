"""``redis://``, ``rediss://`` (TLS), ``unix://`` and, for a Redis Cluster,
``redis+cluster://`` and ``rediss+cluster://``: Redis 7.0+ through redis-py.

Every store operation is one Lua script call: one round trip, atomic on the server,
with expiry decided by the server's clock (``TIME`` inside the script). The scripts
live in ``leasehold/_scripts/redis``; each states its KEYS, ARGV and reply.

Layout (see ``KeyLayout``; docs/backends.md (Redis) has the whole story):

* A name hashes to one of ``BUCKETS`` buckets. Every key of the name, and its
  bucket's fence floor and name index, carry the bucket as their hash tag, so one
  script call touches one cluster slot and names may contain any character.
* Fences are ``max(bucket floor + 1, server time in microseconds)``: strictly
  increasing while Redis keeps its data, and still increasing after it loses it.
* Waiters block on a signal list of their own (``BLPOP``, on connections reserved
  for blocking calls); a release hands its place to the first waiter in the same
  script and pushes to that waiter's list only.
* The server's ``run_id`` (restart detection) is read once per connection, not per
  script: see ``_stamp``. In a cluster, once per node: a grant is stamped with the
  run_id of the node that owns its name's slot.
* In a cluster, redis-py's cluster client routes each script by its keys and
  follows MOVED and ASK. The two operations that span buckets are split per slot
  and pipelined (one round trip per node): a renewal batch, and ``leases()``.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from hashlib import sha1
from importlib import resources
from typing import Any, Final, NamedTuple, Protocol

import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.crc import key_slot

from leasehold import _deadline
from leasehold._async._concurrency import sleep
from leasehold._async.backends._redis_io import (
    cancellations,
    close_cluster,
    cluster_client,
    cluster_ready,
    connection_classes,
    raise_if_cancelled_since,
)
from leasehold._async.backends._redis_pubsub import PubSubListener
from leasehold._async.store import (
    AsyncStore,
    AsyncSubscription,
    HubSubscription,
    ListenerSlot,
    TopicHub,
)
from leasehold._core import validate
from leasehold._core.clock import Clock
from leasehold._core.records import (
    MAX_RECORD_BYTES,
    AcquireRequest,
    AcquireResult,
    Busy,
    Capabilities,
    Granted,
    HandedOver,
    Holder,
    HolderInfo,
    Record,
    RenewItem,
    WaitResult,
)
from leasehold._core.url import StoreURL
from leasehold._errors import InvalidArgument, StoreMisconfigured, StoreUnavailable

# Part of the key layout: changing it moves every name to other keys, so two
# versions with different values would not see each other's leases.
BUCKETS: Final = 1024

DEFAULT_PREFIX: Final = "leasehold:"
DEFAULT_SOCKET_TIMEOUT: Final = 5.0
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_MAX_CONNECTIONS: Final = 32
DEFAULT_MAX_BLOCKING_CONNECTIONS: Final = 64
DEFAULT_CLIENT_NAME: Final = "leasehold"

# How late Redis may answer a BLPOP that timed out: one tick at the default hz 10.
_BLPOP_OVERRUN: Final = 0.1
# wait() polls its signal list this often in the last _BLPOP_OVERRUN before its
# deadline, and when every blocking connection is busy.
_TAIL_POLL: Final = 0.02
_BUSY_POLL: Final = 0.1
# renew() sends its items in scripts of at most this many, pipelined in one round
# trip, so that no single script blocks Redis for long (10,000 items: ~50 ms each
# instead of one ~500 ms script).
RENEW_CHUNK: Final = 1000
# PEXPIRE ... GT/NX in the scripts.
MIN_REDIS_VERSION: Final = (7, 0)
# The announcement listener's connection PINGs after this many idle seconds, and a
# listener that could not subscribe is tried again after _ANNOUNCE_RETRY.
_ANNOUNCE_HEALTH_CHECK: Final = 15
_ANNOUNCE_RETRY: Final = 5.0
# In a cluster, a command finding every connection to its node busy polls for a free
# one this often, for up to socket_timeout (redis-py's cluster client fails at once
# where the standalone store's pool waits).
_POOL_POLL: Final = 0.005

# For standalone servers (the cluster client picks its own): see _redis_io.
_TCP_CONNECTION, _TLS_CONNECTION, _UNIX_CONNECTION = connection_classes()

# Errors of redis-py, of its cluster client (some of which are no RedisError) and of
# sockets: each becomes StoreUnavailable in _translated.
_DRIVER_ERRORS: Final = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)


# --------------------------------------------------------------------------- URL


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Everything a ``redis[s]://``, ``redis[s]+cluster://`` or ``unix://`` URL says,
    validated."""

    tls: bool
    host: str
    port: int
    unix_path: str | None
    db: int
    username: str | None
    password: str | None = None
    prefix: str = DEFAULT_PREFIX
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_blocking_connections: int = DEFAULT_MAX_BLOCKING_CONNECTIONS
    client_name: str = DEFAULT_CLIENT_NAME
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    # host:port is then a seed node: any node of the cluster will do.
    cluster: bool = False

    def __repr__(self) -> str:
        # The password never reaches a repr.
        where = self.unix_path or f"{self.host}:{self.port}"
        mode = ", cluster=True" if self.cluster else ""
        return (
            f"RedisOptions({where!r}, db={self.db}, prefix={self.prefix!r}, tls={self.tls}{mode})"
        )


_OPTIONS: Final = {
    "db": (
        "database number (unix:// URLs; redis:// URLs may also use the path /N; "
        "a cluster has only database 0)"
    ),
    "prefix": f"key prefix, default {DEFAULT_PREFIX!r}",
    "socket_timeout": f"seconds to wait for a reply, default {DEFAULT_SOCKET_TIMEOUT:g}",
    "socket_connect_timeout": f"seconds to connect, default {DEFAULT_CONNECT_TIMEOUT:g}",
    "max_connections": f"connections for commands, default {DEFAULT_MAX_CONNECTIONS}",
    "max_blocking_connections": (
        f"connections for waiting (BLPOP), default {DEFAULT_MAX_BLOCKING_CONNECTIONS}"
    ),
    "client_name": f"CLIENT SETNAME value, default {DEFAULT_CLIENT_NAME!r}",
    "username": "ACL user (or put it in the URL's user part)",
    "password": "password (or put it in the URL's user part)",
    "ssl_ca_certs": "rediss:// only: CA bundle file to verify the server with",
    "ssl_certfile": "rediss:// only: client certificate file",
    "ssl_keyfile": "rediss:// only: client private key file",
    "ssl_cert_reqs": "rediss:// only: none, optional or required (default)",
    "ssl_check_hostname": "rediss:// only: true (default with required) or false",
}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _bad(url: StoreURL, message: str) -> InvalidArgument:
    return InvalidArgument(f"redis store url {url.redacted!r}: {message}")


def _seconds(url: StoreURL, key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _bad(url, f"{key} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise _bad(url, f"{key} must be > 0 and <= 3600 seconds, got {raw!r}")
    return value


def _count(url: StoreURL, key: str, raw: str, low: int, high: int) -> int:
    if not raw.isdigit():
        raise _bad(url, f"{key} must be a whole number, got {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise _bad(url, f"{key} must be between {low} and {high}, got {value}")
    return value


def _flag(url: StoreURL, key: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise _bad(url, f"{key} must be true or false, got {raw!r}")


def _printable(url: StoreURL, key: str, raw: str, forbidden: str = "") -> str:
    if not raw or not raw.isprintable() or any(ch in forbidden for ch in raw):
        extra = f" and none of {forbidden!r}" if forbidden else ""
        raise _bad(url, f"{key} must be non-empty printable text{extra}, got {raw!r}")
    return raw


def parse_options(url: StoreURL) -> RedisOptions:
    """Validate every part of the URL before any I/O (``InvalidArgument`` if bad)."""
    try:
        parts = urllib.parse.urlsplit(url.raw)
        port_number = parts.port
    except ValueError as exc:
        raise _bad(url, f"invalid host or port: {exc}") from None
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in _OPTIONS:
            allowed = "; ".join(f"{name}: {doc}" for name, doc in _OPTIONS.items())
            raise _bad(url, f"unknown option {key!r}. Allowed options: {allowed}")
        if key in query:
            raise _bad(url, f"option {key!r} is given twice")
        query[key] = value
    cluster = url.scheme.endswith("+cluster")
    tls = url.scheme in ("rediss", "rediss+cluster")
    if not tls and any(key.startswith("ssl_") for key in query):
        raise _bad(url, "ssl_* options need a rediss:// or rediss+cluster:// URL")

    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    if "username" in query:
        if username is not None:
            raise _bad(url, "the user name is given both in the URL and as ?username=")
        username = query["username"] or None
    if "password" in query:
        if password is not None:
            raise _bad(url, "the password is given both in the URL and as ?password=")
        password = query["password"] or None

    unix_path: str | None = None
    db: int | None = None
    host, port = "localhost", 6379
    if url.scheme == "unix":
        if parts.hostname:
            raise _bad(url, "write unix:///absolute/path/to/redis.sock (three slashes)")
        unix_path = urllib.parse.unquote(parts.path)
        if not unix_path or unix_path == "/":
            raise _bad(url, "the socket path is missing: unix:///path/to/redis.sock")
    else:
        host = parts.hostname or host
        port = port_number if port_number is not None else port
        path = parts.path.strip("/")
        if path:
            db = _count(url, "the database number in the path", path, 0, 1_000_000)
    if "db" in query:
        from_query = _count(url, "db", query["db"], 0, 1_000_000)
        if db is not None and db != from_query:
            raise _bad(url, f"database {db} in the path but db={from_query} in the query")
        db = from_query
    if cluster and db:
        raise _bad(url, f"a Redis Cluster has only database 0, got {db}")

    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in ("none", "optional", "required"):
        raise _bad(url, f"ssl_cert_reqs must be none, optional or required, got {cert_reqs!r}")
    check_hostname = cert_reqs == "required"
    if "ssl_check_hostname" in query:
        check_hostname = _flag(url, "ssl_check_hostname", query["ssl_check_hostname"])
        if check_hostname and cert_reqs != "required":
            raise _bad(url, "ssl_check_hostname=true needs ssl_cert_reqs=required")

    return RedisOptions(
        tls=tls,
        host=host,
        port=port,
        unix_path=unix_path,
        db=db or 0,
        username=username,
        password=password,
        # Braces would change the hash tag of every key (see KeyLayout).
        prefix=_printable(url, "prefix", query.get("prefix", DEFAULT_PREFIX), "{} "),
        socket_timeout=_seconds(
            url, "socket_timeout", query.get("socket_timeout", str(DEFAULT_SOCKET_TIMEOUT))
        ),
        socket_connect_timeout=_seconds(
            url,
            "socket_connect_timeout",
            query.get("socket_connect_timeout", str(DEFAULT_CONNECT_TIMEOUT)),
        ),
        max_connections=_count(
            url,
            "max_connections",
            query.get("max_connections", str(DEFAULT_MAX_CONNECTIONS)),
            1,
            10_000,
        ),
        max_blocking_connections=_count(
            url,
            "max_blocking_connections",
            query.get("max_blocking_connections", str(DEFAULT_MAX_BLOCKING_CONNECTIONS)),
            1,
            10_000,
        ),
        # CLIENT SETNAME refuses spaces.
        client_name=_printable(url, "client_name", query.get("client_name", "leasehold"), " "),
        ssl_ca_certs=query.get("ssl_ca_certs") or None,
        ssl_certfile=query.get("ssl_certfile") or None,
        ssl_keyfile=query.get("ssl_keyfile") or None,
        ssl_cert_reqs=cert_reqs,
        ssl_check_hostname=check_hostname,
        cluster=cluster,
    )


# -------------------------------------------------------------------- key layout


@dataclass(frozen=True, slots=True)
class NameKeys:
    """The keys of one lease name (all in one cluster slot)."""

    state: str  # MessagePack: limit hint, holders (see _prelude.lua)
    floor: str  # per bucket: highest fence issued
    index: str  # per bucket: zset name -> latest holder expiry_us
    queue: str  # zset token -> arrival
    queue_expiry: str  # zset token -> queue expiry_us
    queue_info: str  # hash token -> "<limit> <ttl_us> <holder json>"
    signal_prefix: str  # + token: a waiter's signal list

    def script_keys(self) -> list[str]:
        """KEYS[1..6] of acquire.lua, release.lua and break.lua, in order."""
        return [
            self.state,
            self.floor,
            self.index,
            self.queue,
            self.queue_expiry,
            self.queue_info,
        ]

    def signal(self, token: str) -> str:
        return self.signal_prefix + token


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Where a name's state lives: ``<prefix>{<bucket>}:<kind>:<name>``.

    The hash tag is the bucket number, not the name: names may contain braces, and
    a bounded number of tags keeps the per-bucket fence floors and name indexes
    bounded too. The bucket is CRC-32 of the UTF-8 name modulo ``BUCKETS``.
    """

    prefix: str = DEFAULT_PREFIX

    @staticmethod
    def bucket(name: str) -> int:
        return zlib.crc32(name.encode("utf-8")) % BUCKETS

    def tag(self, bucket: int) -> str:
        return f"{self.prefix}{{{bucket}}}"

    def for_name(self, name: str) -> NameKeys:
        return _name_keys(self, name)

    def _for_name(self, name: str) -> NameKeys:
        tag = self.tag(self.bucket(name))
        # The name's byte length makes "<name>:<token>" unambiguous when either
        # contains ':'.
        size = len(name.encode("utf-8"))
        return NameKeys(
            state=f"{tag}:n:{name}",
            floor=f"{tag}:fence",
            index=f"{tag}:index",
            queue=f"{tag}:qa:{name}",
            queue_expiry=f"{tag}:qe:{name}",
            queue_info=f"{tag}:qi:{name}",
            signal_prefix=f"{tag}:w:{size}:{name}:",
        )

    def for_record(self, key: str) -> tuple[str, str]:
        """The record's own key and the fence floor its versions are drawn from.
        Records are a namespace apart from lease names (kind ``r``)."""
        tag = self.tag(self.bucket(key))
        return f"{tag}:r:{key}", f"{tag}:fence"

    def indexes(self) -> list[str]:
        """The name index of every bucket, bucket 0 first (KEYS of leases.lua)."""
        return [f"{self.tag(bucket)}:index" for bucket in range(BUCKETS)]


@lru_cache(maxsize=4096)
def _name_keys(layout: KeyLayout, name: str) -> NameKeys:
    # Hot names are few: computing their keys (CRC-32, four strings) once each
    # takes that work off every acquire and release.
    return layout._for_name(name)


@lru_cache(maxsize=256)
def _holder_json(holder: Holder) -> str:
    return json.dumps(
        [holder.owner, holder.host, holder.pid], ensure_ascii=False, separators=(",", ":")
    )


# ----------------------------------------------------------------------- scripts


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str


@cache
def _script(name: str) -> _Script:
    folder = resources.files("leasehold") / "_scripts" / "redis"
    prelude = (folder / "_prelude.lua").read_text(encoding="utf-8")
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    source = f"{prelude}\n{body}"
    digest = sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
    return _Script(name=name, source=source, sha=digest)


# ------------------------------------------------------------------------- store


class _Commands(Protocol):
    """The redis-py methods the store calls (redis-py leaves them unannotated)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any: ...

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any: ...


class _Pool(Protocol):
    async def disconnect(self, inuse_connections: bool = True) -> None: ...


@dataclass(slots=True)
class _Connections:
    pid: int
    commands: _Commands
    blocking: _Commands
    # Standalone: the two connection pools. Cluster: no pools of ours; ``cluster``
    # is the commands client (slots, nodes), ``clusters`` both clients, to close.
    pools: tuple[_Pool, ...] = ()
    cluster: Any = None
    clusters: tuple[Any, ...] = ()


class _Stamp(NamedTuple):
    """Where a run_id was read (a node's "host:port"; "" standalone), the run_id,
    and the generation of that node's cache entry when it was read."""

    where: str
    run_id: str
    generation: int


@cache
def _bucket_slot(bucket: int) -> int:
    # The bucket number is the hash tag of every key of the bucket (see KeyLayout).
    return key_slot(str(bucket).encode())


def _node_name(connection: Any) -> str:
    # redis-py's name of a cluster node ("host:port"), from one of its connections.
    return f"{connection.host}:{connection.port}"


def _pool_exhausted(exc: BaseException) -> bool:
    """Whether redis-py refused to open another connection (nothing was sent).
    redis-py 6+ raises MaxConnectionsError (without a message from the asyncio
    cluster client), older versions a ConnectionError saying so."""
    exhausted = getattr(redis_errors, "MaxConnectionsError", None)
    return (exhausted is not None and isinstance(exc, exhausted)) or (
        "Too many connections" in str(exc)
    )


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


def _value_bytes(value: str | bytes) -> bytes:
    """Undo the lossless decoding of a record value (decode_responses + surrogateescape)."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _holder_info(name: str, now: int, expiry: int, meta: str) -> HolderInfo:
    fence, acquired, limit, _run_id, holder = meta.split(" ", 4)
    owner, host, pid = json.loads(holder)
    return HolderInfo(
        name=name,
        owner=str(owner),
        host=str(host),
        pid=int(pid),
        fence=int(fence),
        limit=int(limit),
        held_for=max(0.0, (now - int(acquired)) / 1e6),
        expires_in=max(0.0, (int(expiry) - now) / 1e6),
    )


def _signalled(value: object) -> WaitResult:
    """What a waiter's signal list said: "h <fence>" is a hand-over (see hand_over in
    _prelude.lua); anything else only wakes the waiter, whose next acquire then
    confirms or queues again. None: nothing arrived."""
    if value is None:
        return False
    text = value.decode() if isinstance(value, bytes) else str(value)
    if text.startswith("h "):
        try:
            return HandedOver(int(text[2:]))
        except ValueError:
            return True
    return True


class AsyncRedisStore(AsyncStore):
    capabilities = Capabilities(
        server_clock=True,
        # Depends on the server: appendonly yes + appendfsync always keeps grants.
        durable=False,
        cross_host=True,
        notifications=True,
        fence_survives_data_loss=True,
        hand_over=True,
        notes=(
            "durable only with appendonly yes and appendfsync always",
            "fences stay increasing after data loss unless the server clock stepped back across it",
            "leases granted before a restart or failover are reported lost at their next renewal",
            "maxmemory-policy must be noeviction",
        ),
        announcements=True,
    )

    def __init__(self, url: StoreURL, options: RedisOptions) -> None:
        self.url = url
        self.options = options
        self.keys = KeyLayout(options.prefix)
        # The KEYS of each leases.lua call: every bucket's index in one call
        # standalone; one call per slot in a cluster (slot order, buckets ascending).
        self._index_groups = self._group_indexes()
        self._guard = threading.Lock()
        self._connections: _Connections | None = None
        # Connections inherited over fork(): never used or closed in the child (their
        # sockets belong to the parent), only kept from the garbage collector.
        self._inherited: list[_Connections] = []
        self._closed = False
        # INFO of each server ("" standalone; each primary's "host:port" in a cluster).
        self._server_facts: dict[str, dict[str, Any]] = {}
        # wait() blocks in slices of this, so a silent server is noticed.
        self._block_slice = options.socket_timeout
        # Each server's run_id as read by INFO on one of our connections, by where
        # it was read (see _Stamp). Every new connection to a server (a restart or
        # failover breaks them all) forgets that server's entry and bumps its
        # generation (see _stamp). A lock of its own: the sync cluster client makes
        # connections while _guard is held (its constructor discovers the cluster).
        self._run_ids: dict[str, str] = {}
        self._generations: dict[str, int] = {}
        self._run_id_guard = threading.Lock()
        # Announcements: PUBLISH on one channel per prefix and database, the topic as
        # the message; subscribers share one SUBSCRIBEd connection per store.
        self.announce_channel = f"{options.prefix}announce:{options.db}"
        self._topics = TopicHub()
        self._announcements = ListenerSlot(
            self._announce_listener, retry=_ANNOUNCE_RETRY, what=repr(self)
        )

    def _group_indexes(self) -> list[list[str]]:
        indexes = self.keys.indexes()
        if not self.options.cluster:
            return [indexes]
        by_slot: dict[int, list[str]] = {}
        for bucket, index in enumerate(indexes):
            by_slot.setdefault(_bucket_slot(bucket), []).append(index)
        return [by_slot[slot] for slot in sorted(by_slot)]

    # -- connections ---------------------------------------------------------

    def _connection_kwargs(self, socket_timeout: float) -> dict[str, Any]:
        options = self.options
        kwargs: dict[str, Any] = {
            "db": options.db,
            "username": options.username,
            "password": options.password,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": options.socket_connect_timeout,
            "client_name": options.client_name,
            # Replies are text except record values, which may be any bytes:
            # surrogateescape decodes those losslessly (see _value_bytes).
            "decode_responses": True,
            "encoding_errors": "surrogateescape",
            # RESP2 on purpose: every server and proxy speaks it, replies keep one
            # shape across redis-py versions, and with RESP3 redis-py 8 turns on
            # maintenance notifications, which skip its check that a pooled
            # connection is still alive (after a server restart every pooled
            # connection would then fail once).
            "protocol": 2,
            # No automatic retries. A command whose connection broke may have run
            # (a repeated compare-and-set would then report a conflict with its own
            # write), and a timed-out one must not spend the caller's safe deadline
            # twice; callers retry what is safe to retry. Pooled sockets that died
            # with a server restart are noticed and replaced when checked out.
            # (For a cluster client this is its retry of whole commands after a
            # connection error; MOVED, ASK and TRYAGAIN are still followed, as the
            # command did not run.)
            "retry": redis.asyncio.retry.Retry(NoBackoff(), 0),
            # Replaces redis-py's handshake (which it calls) to notice new connections.
            "redis_connect_func": self._on_connect,
        }
        if options.unix_path is not None:
            kwargs["connection_class"] = _UNIX_CONNECTION
            kwargs["path"] = options.unix_path
            return kwargs
        kwargs["host"] = options.host
        kwargs["port"] = options.port
        kwargs["socket_keepalive"] = True
        if options.tls:
            kwargs["connection_class"] = _TLS_CONNECTION
            kwargs["ssl_ca_certs"] = options.ssl_ca_certs
            kwargs["ssl_certfile"] = options.ssl_certfile
            kwargs["ssl_keyfile"] = options.ssl_keyfile
            kwargs["ssl_cert_reqs"] = options.ssl_cert_reqs
            kwargs["ssl_check_hostname"] = options.ssl_check_hostname
        else:
            kwargs["connection_class"] = _TCP_CONNECTION
        return kwargs

    def _cluster_kwargs(self, socket_timeout: float, max_connections: int) -> dict[str, Any]:
        """redis-py ``RedisCluster`` arguments: the same connections, to any node."""
        kwargs = self._connection_kwargs(socket_timeout)
        # The cluster client has only database 0; cluster_client installs the
        # connect hook and the connection class (for ssl= too).
        for key in ("db", "connection_class", "redis_connect_func"):
            del kwargs[key]
        kwargs["ssl"] = self.options.tls
        # Per node.
        kwargs["max_connections"] = max_connections
        # Names on the nodes that are up keep working while another node's slots
        # have no master (the servers decide whether to serve meanwhile:
        # cluster-require-full-coverage).
        kwargs["require_full_coverage"] = False
        return kwargs

    def _connect(self) -> _Connections:
        """The connections of this process, created on first use (no I/O here,
        except that redis-py's sync cluster client discovers the cluster when built)."""
        if self._closed:
            raise StoreUnavailable(f"redis store {self.url.redacted}: the store is closed")
        with self._guard:
            current = self._connections
            pid = os.getpid()
            if current is not None and current.pid == pid:
                return current
            if current is not None:
                self._inherited.append(current)
                self._connections = None
            if self.options.cluster:
                current = self._new_cluster_connections(pid)
            else:
                current = self._new_connections(pid)
            self._connections = current
            return current

    def _new_connections(self, pid: int) -> _Connections:
        # Commands wait for a free connection (up to socket_timeout) instead of
        # failing when all are busy.
        # (Any: redis-py leaves the sync BlockingConnectionPool unannotated.)
        blocking_pool_class: Any = redis.asyncio.BlockingConnectionPool
        command_pool = blocking_pool_class(
            max_connections=self.options.max_connections,
            timeout=self.options.socket_timeout,
            **self._connection_kwargs(self.options.socket_timeout),
        )
        # BLPOP holds its connection for the whole wait, so waiters get their own
        # pool and never starve commands (renewals above all). Its read timeout
        # covers one blocking slice plus the usual reply time.
        blocking_pool = redis.asyncio.ConnectionPool(
            max_connections=self.options.max_blocking_connections,
            **self._connection_kwargs(self._block_slice + self.options.socket_timeout),
        )
        return _Connections(
            pid=pid,
            commands=redis.asyncio.Redis(connection_pool=command_pool),
            blocking=redis.asyncio.Redis(connection_pool=blocking_pool),
            pools=(command_pool, blocking_pool),
        )

    def _new_cluster_connections(self, pid: int) -> _Connections:
        # As standalone: waiters (BLPOP) get clients of their own, here a second
        # cluster client with its own connections to each node.
        with self._translated("connect"):
            commands = cluster_client(
                self._cluster_kwargs(self.options.socket_timeout, self.options.max_connections),
                self._on_cluster_connect,
            )
            blocking = cluster_client(
                self._cluster_kwargs(
                    self._block_slice + self.options.socket_timeout,
                    self.options.max_blocking_connections,
                ),
                self._on_cluster_connect,
            )
        return _Connections(
            pid=pid,
            commands=commands,
            blocking=blocking,
            cluster=commands,
            clusters=(commands, blocking),
        )

    async def _on_connect(self, connection: Any) -> None:
        await connection.on_connect()
        self._forget_run_id("")

    def _on_cluster_connect(self, connection: Any) -> None:
        self._forget_run_id(_node_name(connection))

    def _forget_run_id(self, where: str) -> None:
        with self._run_id_guard:
            self._run_ids.pop(where, None)
            self._generations[where] = self._generations.get(where, 0) + 1

    async def _owner(self, connections: _Connections, key: str) -> tuple[str, dict[str, Any]]:
        """Where ``key`` lives: ("", {}) standalone; in a cluster, the name of the
        primary that owns its slot and the ``target_nodes`` argument that reaches it."""
        cluster = connections.cluster
        if cluster is None:
            return "", {}
        await cluster_ready(cluster)
        node = cluster.get_node_from_key(key)
        return str(node.name), {"target_nodes": node}

    def _still_owner(self, connections: _Connections, key: str, where: str) -> bool:
        """Whether ``where`` (see _owner) still owns ``key``, as far as the client
        knows: a MOVED during a call updates what it knows."""
        cluster = connections.cluster
        if cluster is None:
            return True
        try:
            return bool(cluster.get_node_from_key(key).name == where)
        except redis_errors.RedisClusterException:
            return False  # the client forgot the slots after an error

    async def _stamp(self, connections: _Connections, key: str) -> _Stamp:
        """The run_id of the server that owns ``key``, read with ``INFO server``
        once per server and cached.

        Grants are stamped with it so that renew.lua can tell a grant of an earlier
        server process (restart, failover). Reading it inside every acquire script
        cost ~18 µs of server time per grant; now acquire passes it in ARGV. In a
        cluster each node has its own run_id and renew.lua compares a grant's stamp
        with the run_id of the node it runs on, so the stamp must come from the
        node that owns the name's slot: the cache is per node, and a name whose slot
        moves (MOVED: failover, resharding) is looked up on its new owner. An entry
        is forgotten whenever a connection to its server is (re)established — a
        restart or failover breaks every connection, so a new server is always met
        on a new connection — and on NOSCRIPT. Soundness does not rest on the
        cache: renew.lua still compares each stamp with INFO's run_id (once per
        script, not per grant), so a stale stamp can only make a renewal fail (the
        holder is told its lease is lost), never let a grant from before a restart
        renew. And acquire re-stamps a grant when a connection to its server was
        made, or its slot moved, during its call (see ``acquire``), so even that
        false alarm needs a proxy that hides restarts.
        """
        where, target = await self._owner(connections, key)
        with self._run_id_guard:
            cached = self._run_ids.get(where)
            if cached is not None:
                return _Stamp(where, cached, self._generations.get(where, 0))
        info = await self._execute(connections.commands, "INFO", "server", **target)
        if not isinstance(info, dict) or "run_id" not in info:
            raise self._malformed("INFO server", info)
        raw = info["run_id"]
        # redis-py turns an all-digit id into an int; ids are 40 hex digits.
        run_id = f"{raw:040d}" if isinstance(raw, int) else str(raw)
        too_old = _too_old(info)
        if too_old is not None:
            raise StoreMisconfigured(f"redis store {self.url.redacted}: {too_old}")
        with self._run_id_guard:
            self._run_ids[where] = run_id
            # Read after INFO: the connection INFO may have made does not count as
            # one made during the caller's script.
            return _Stamp(where, run_id, self._generations.get(where, 0))

    def _stamp_is_current(self, connections: _Connections, key: str, stamp: _Stamp) -> bool:
        with self._run_id_guard:
            fresh = self._generations.get(stamp.where, 0) == stamp.generation
        return fresh and self._still_owner(connections, key, stamp.where)

    # -- errors --------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        password = self.options.password
        if password:
            for secret in {password, urllib.parse.quote(password, safe="")}:
                text = text.replace(secret, "***")
        return text

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        """The one place a redis-py (or socket/TLS) error becomes a leasehold error."""
        detail = str(exc) or type(exc).__name__
        # Answers that waiting cannot change: StoreMisconfigured, never retried.
        misconfigured = True
        if isinstance(exc, redis_errors.AuthenticationError) or "WRONGPASS" in detail:
            detail = (
                f"authentication failed: check the user name and password in the URL ({detail})"
            )
        elif isinstance(exc, redis_errors.NoPermissionError) or "can't run this command" in detail:
            detail = f"the Redis user lacks a permission (see the ACL in the docs): {detail}"
        elif "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail:
            detail = f"TLS certificate verification failed (check ssl_ca_certs): {detail}"
        elif isinstance(exc, redis_errors.ReadOnlyError):
            detail = f"connected to a read-only replica: {detail}"
        elif "DB index is out of range" in detail or "invalid DB index" in detail:
            detail = f"the database number in the URL does not exist on the server: {detail}"
        elif "Cluster mode is not enabled" in detail:
            # redis-py says so both for a standalone server and for an ACL user
            # that may not read the slot map.
            detail = (
                "the seed node is not a cluster node (use redis:// for a standalone "
                "server), or the Redis user lacks +cluster|slots and +command: "
                f"{detail}"
            )
        else:
            misconfigured = False
        if misconfigured:
            pass  # explained above
        elif isinstance(exc, redis_errors.TimeoutError):
            detail = f"no reply within {self.options.socket_timeout:g} s: {detail}"
        elif isinstance(exc, redis_errors.OutOfMemoryError):
            detail = f"Redis is out of memory (maxmemory): {detail}"
        elif isinstance(exc, redis_errors.BusyLoadingError):
            detail = f"Redis is still loading its data set: {detail}"
        elif isinstance(exc, redis_errors.ClusterDownError | redis_errors.SlotNotCoveredError):
            detail = f"the Redis Cluster is down or a slot has no master: {detail}"
        # Only the driver's text is scrubbed: the URL is redacted already, and a short
        # password would otherwise also be blotted out of the user name.
        kind = StoreMisconfigured if misconfigured else StoreUnavailable
        return kind(f"redis store {self.url.redacted}: {doing} failed: {self._scrub(detail)}")

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        try:
            yield
        except _DRIVER_ERRORS as exc:
            # `from None`: the driver's exception may carry connection details; what
            # matters is already in the message.
            raise self._unavailable(doing, exc) from None

    async def _execute(
        self,
        client: _Commands,
        *args: str | int | bytes,
        wait_for_connection: bool = True,
        **options: Any,
    ) -> Any:
        """One command; ``options`` go to redis-py (``target_nodes`` in a cluster).
        In a cluster, a command that finds every connection to its node busy waits
        for one up to socket_timeout, as the standalone command pool does, unless
        ``wait_for_connection`` is false."""
        before = cancellations()
        deadline: float | None = None
        while True:
            try:
                reply = await client.execute_command(*args, **options)
                break
            except redis_errors.ConnectionError as exc:
                deadline = self._wait_for_connection(exc, deadline, wait_for_connection)
                await sleep(_POOL_POLL)
        # A cancellation that arrived while redis-py was sending can be lost (see
        # _redis_io); raise it here so a cancelled caller never carries on.
        raise_if_cancelled_since(before)
        return reply

    def _wait_for_connection(
        self, exc: redis_errors.ConnectionError, deadline: float | None, wait: bool
    ) -> float:
        """The deadline for a cluster command to get a connection; raises ``exc``
        unless it only said that none was free and there is time left."""
        if not (wait and self.options.cluster and _pool_exhausted(exc)):
            raise exc
        now = time.monotonic()
        if deadline is None:
            # Never past the operation's deadline.
            return now + _deadline.remaining(self.options.socket_timeout)
        if now >= deadline:
            raise exc
        return deadline

    # -- scripts -------------------------------------------------------------

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
        """Run a script once (in a cluster, on the node that owns its keys' slot)."""
        script = _script(name)
        connections = self._connect()
        client = connections.commands
        with self._translated(name):
            try:
                return await self._execute(client, "EVALSHA", script.sha, len(keys), *keys, *args)
            except redis_errors.NoScriptError:
                # A restart, a failover or SCRIPT FLUSH emptied the script cache. The
                # script did not run, so loading it and running it again is safe. A
                # restart may also mean another run_id.
                await self._load_script(connections, script, [keys[0]])
                return await self._execute(client, "EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load_script(
        self, connections: _Connections, script: _Script, keys: Sequence[str]
    ) -> None:
        """After NOSCRIPT: load the script on the server(s) that own ``keys`` (one
        key per call that met NOSCRIPT) and forget their run_ids."""
        owners: dict[str, dict[str, Any]] = {}
        for key in keys:
            where, target = await self._owner(connections, key)
            owners[where] = target
        for where, target in owners.items():
            self._forget_run_id(where)
            await self._execute(connections.commands, "SCRIPT", "LOAD", script.source, **target)

    def _malformed(self, what: str, reply: object) -> StoreUnavailable:
        return StoreUnavailable(
            f"redis store {self.url.redacted}: unexpected reply to {what}: {reply!r:.200}"
        )

    # -- the contract --------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        keys = self.keys.for_name(request.name)
        holder = _holder_json(request.holder)
        queue_ttl = "" if request.queue_ttl is None else _us(request.queue_ttl)
        connections = self._connect()
        for attempt in range(3):
            with self._translated("acquire"):
                stamp = await self._stamp(connections, keys.state)
            reply = await self._run(
                "acquire",
                keys.script_keys(),
                [
                    request.name,
                    keys.signal_prefix,
                    request.token,
                    _us(request.ttl),
                    request.limit,
                    queue_ttl,
                    holder,
                    stamp.run_id,
                ],
            )
            granted = isinstance(reply, list) and bool(reply) and reply[0] == 1
            # A connection made during the call may have met a restarted server, or
            # (cluster) the name's slot may have moved to another node, so the grant
            # may carry the wrong run_id: acquire again (idempotent for a holder:
            # same fence) to stamp the right one.
            if (
                not granted
                or attempt == 2
                or self._stamp_is_current(connections, keys.state, stamp)
            ):
                break
        try:
            if reply[0] == 1:
                return Granted(fence=int(reply[1]))
            retry_after, position = int(reply[1]), int(reply[2])
        except (TypeError, ValueError, IndexError):
            raise self._malformed("acquire", reply) from None
        return Busy(
            retry_after=None if retry_after < 0 else retry_after / 1e6,
            position=None if position < 0 else position,
        )

    async def renew(self, items: Sequence[RenewItem]) -> list[bool | None]:
        if not items:
            return []
        # Scripts of at most RENEW_CHUNK items, so that no one script blocks Redis
        # for long; all of them in one pipelined round trip (in a cluster, one per
        # node, all nodes at once). Each item is renewed atomically on its own,
        # which is all the contract asks.
        batches = self._renew_batches(items)
        calls: list[tuple[list[str], list[str | int]]] = []
        for positions in batches:
            keys: list[str] = []
            args: list[str | int] = []
            for position in positions:
                item = items[position]
                name_keys = self.keys.for_name(item.name)
                keys += (name_keys.state, name_keys.index)
                args += (item.name, item.token, _us(item.ttl))
            calls.append((keys, args))
        if len(calls) == 1:
            replies = [await self._run("renew", *calls[0])]
        else:
            # In a cluster, a node that does not answer leaves its items unanswered
            # (None) rather than failing the whole batch: the keeper retries them,
            # and the leases kept on the other nodes are renewed meanwhile.
            replies = await self._run_many("renew", calls, partial=self.options.cluster)
        answers: list[bool | None] = [None] * len(items)
        for reply, positions in zip(replies, batches, strict=True):
            if reply is None:
                continue
            if not isinstance(reply, list) or len(reply) != len(positions):
                raise self._malformed("renew", reply)
            for position, answer in zip(positions, reply, strict=True):
                answers[position] = answer == 1
        return answers

    def _renew_batches(self, items: Sequence[RenewItem]) -> list[list[int]]:
        """The items of each renew.lua call, as positions in ``items``: chunks of
        RENEW_CHUNK in order; in a cluster, where a script's keys must share one
        slot, chunks of the items of each slot."""
        if self.options.cluster:
            by_slot: dict[int, list[int]] = {}
            for position, item in enumerate(items):
                slot = _bucket_slot(KeyLayout.bucket(item.name))
                by_slot.setdefault(slot, []).append(position)
            groups = list(by_slot.values())
        else:
            groups = [list(range(len(items)))]
        return [
            group[start : start + RENEW_CHUNK]
            for group in groups
            for start in range(0, len(group), RENEW_CHUNK)
        ]

    async def _run_many(
        self,
        name: str,
        calls: Sequence[tuple[Sequence[str], Sequence[str | int]]],
        *,
        partial: bool = False,
    ) -> list[Any]:
        """Run one script once per (keys, args) in one pipelined round trip (in a
        cluster, redis-py's pipeline sends each node its calls, all nodes at once).
        ``partial``: if that fails, run each node's calls on their own, and answer
        None for the calls of a node that fails too (unless every node failed)."""
        script = _script(name)
        connections = self._connect()
        with self._translated(name):
            try:
                replies = await self._pipelined(connections, script, calls)
            except _DRIVER_ERRORS:
                if not partial:
                    raise
                replies = await self._pipelined_per_node(connections, script, calls)
            noscript = redis_errors.NoScriptError
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, noscript)]
            if missing:
                # As in _run: the calls that met NOSCRIPT did not run, so run them again.
                await self._load_script(connections, script, [calls[i][0][0] for i in missing])
                again = await self._pipelined(connections, script, [calls[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def _pipelined_per_node(
        self,
        connections: _Connections,
        script: _Script,
        calls: Sequence[tuple[Sequence[str], Sequence[str | int]]],
    ) -> list[Any]:
        """``calls`` as one pipeline per node, one node after another: the replies,
        with None for the calls of a node that failed. Raises if every node failed.
        (redis-py fails a cluster pipeline as a whole when one node cannot be
        reached.) A node that refuses connections costs nothing; one that does not
        answer at all costs its socket_connect_timeout once per renewal round."""
        by_node: dict[str, list[int]] = {}
        for index, (keys, _args) in enumerate(calls):
            where, _target = await self._owner(connections, keys[0])
            by_node.setdefault(where, []).append(index)
        replies: list[Any] = [None] * len(calls)
        failure: BaseException | None = None
        for indices in by_node.values():
            try:
                part = await self._pipelined(
                    connections, script, [calls[index] for index in indices]
                )
            except _DRIVER_ERRORS as exc:
                failure = exc
                continue
            for index, reply in zip(indices, part, strict=True):
                replies[index] = reply
        if failure is not None and all(reply is None for reply in replies):
            raise failure
        return replies

    async def _pipelined(
        self,
        connections: _Connections,
        script: _Script,
        calls: Sequence[tuple[Sequence[str], Sequence[str | int]]],
    ) -> list[Any]:
        client = connections.commands
        # In a cluster, each call names its node: redis-py's sync cluster pipeline
        # would otherwise ask a default node for the keys of every EVALSHA (COMMAND
        # GETKEYS, a round trip per call, failing whenever that node is down).
        targets = [(await self._owner(connections, keys[0]))[1] for keys, _args in calls]
        before = cancellations()
        deadline: float | None = None
        while True:
            pipe = client.pipeline(transaction=False)
            for (keys, args), target in zip(calls, targets, strict=True):
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, **target)
            try:
                replies = await pipe.execute(raise_on_error=False)
                break
            except redis_errors.ConnectionError as exc:
                # Every connection to a node was busy. Repeating the whole pipeline
                # is safe for the scripts pipelined (renewals, leases()), even if
                # other nodes ran their part.
                deadline = self._wait_for_connection(exc, deadline, True)
                await sleep(_POOL_POLL)
        # As in _execute: a cancellation swallowed while sending is raised again.
        raise_if_cancelled_since(before)
        return list(replies)

    async def release(self, name: str, token: str) -> bool:
        keys = self.keys.for_name(name)
        connections = self._connect()
        with self._translated("release"):
            # Stamped on the place handed to the next waiter (see hand_over).
            stamp = await self._stamp(connections, keys.state)
        reply = await self._run(
            "release", keys.script_keys(), [name, keys.signal_prefix, token, stamp.run_id]
        )
        return bool(reply == 1)

    async def break_lease(self, name: str) -> int:
        keys = self.keys.for_name(name)
        connections = self._connect()
        with self._translated("break"):
            stamp = await self._stamp(connections, keys.state)
        reply = await self._run(
            "break", keys.script_keys(), [name, keys.signal_prefix, stamp.run_id]
        )
        if not isinstance(reply, int):
            raise self._malformed("break", reply)
        return reply

    async def holders(self, name: str) -> list[HolderInfo]:
        keys = self.keys.for_name(name)
        reply = await self._run("holders", [keys.state], [])
        try:
            now = int(reply[0])
            infos = [
                _holder_info(name, now, int(reply[i]), reply[i + 1])
                for i in range(1, len(reply), 2)
            ]
        except (TypeError, ValueError, IndexError):
            raise self._malformed("holders", reply) from None
        return sorted(infos, key=lambda info: info.fence)

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        # Standalone: one script over every bucket, an atomic snapshot. Cluster: one
        # script per slot, each a snapshot of its buckets on its node's clock.
        groups = self._index_groups
        if len(groups) == 1:
            replies = [await self._run("leases", groups[0], [prefix])]
        else:
            replies = await self._run_many("leases", [(group, [prefix]) for group in groups])
        infos: list[HolderInfo] = []
        for reply in replies:
            try:
                now = int(reply[0])
                infos += [
                    _holder_info(reply[i], now, int(reply[i + 1]), reply[i + 2])
                    for i in range(1, len(reply), 3)
                ]
            except (TypeError, ValueError, IndexError):
                raise self._malformed("leases", reply) from None
        return sorted(infos, key=lambda info: (info.name, info.fence))

    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:  # noqa: ASYNC109, RUF100
        signal = self.keys.for_name(name).signal(token)
        connections = self._connect()
        # A local deadline for I/O only; expiry decisions stay on the server's clock.
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            return await self._wait(connections, signal, deadline)
        except _DRIVER_ERRORS:
            # A wait is only the pause between two acquire attempts. If Redis fails
            # meanwhile, sleep out the pause like a store without notifications: the
            # next acquire reports the error, and a caller that retries acquire
            # (with wait() as its pause) never spins against a dead server.
            await sleep(deadline - time.monotonic())
            return False

    async def _wait(self, connections: _Connections, signal: str, deadline: float) -> WaitResult:
        while True:
            remaining = deadline - time.monotonic()
            # Redis expires a blocked BLPOP only on its next event-loop tick (hz ticks
            # per second), so block until shortly before the deadline and poll the
            # last moments: the caller's timeout holds. Never send BLPOP a timeout of
            # 0, which means "forever".
            block_for = min(remaining - _BLPOP_OVERRUN, self._block_slice)
            if block_for < 0.01:
                popped = await self._execute(connections.commands, "LPOP", signal)
                if popped is not None or remaining <= 0:
                    return _signalled(popped)
                await sleep(min(remaining, _TAIL_POLL))
                continue
            blpop = ("BLPOP", signal, f"{block_for:.3f}")
            try:
                popped = await self._execute(
                    connections.blocking, *blpop, wait_for_connection=False
                )
            except redis_errors.ConnectionError as exc:
                if not _pool_exhausted(exc):
                    raise
                # Every blocking connection is in use: poll rather than fail (the
                # signal stays in its list, so it is only noticed later, not lost).
                popped = await self._execute(connections.commands, "LPOP", signal)
                if popped is not None:
                    return _signalled(popped)
                await sleep(min(remaining, _BUSY_POLL))
                continue
            if popped is not None:
                return _signalled(popped[1])

    async def read_record(self, key: str) -> Record:
        record_key, _floor = self.keys.for_record(key)
        reply = await self._run("record_read", [record_key], [])
        try:
            now, version, value = reply
            return Record(
                key=key,
                value=None if value is None else _value_bytes(value),
                version=int(version),
                now=int(now) / 1e6,
            )
        except (TypeError, ValueError):
            raise self._malformed("record_read", reply) from None

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        if value is not None and len(value) > MAX_RECORD_BYTES:
            raise InvalidArgument(
                f"record {key!r} is {len(value)} bytes; at most {MAX_RECORD_BYTES} are allowed"
            )
        record_key, floor = self.keys.for_record(key)
        ttl_ms = "" if ttl is None else max(1, math.ceil(ttl * 1000))
        reply = await self._run(
            "record_write",
            [record_key, floor],
            [expected_version, "1" if value is None else "0", value or b"", ttl_ms],
        )
        if not isinstance(reply, int):
            raise self._malformed("record_write", reply)
        return None if reply < 0 else reply

    async def ping(self) -> None:
        connections = self._connect()
        client = connections.commands
        # A cluster is reachable when every primary answers (all at once).
        target: dict[str, Any] = {}
        if connections.cluster is not None:
            target["target_nodes"] = connections.cluster.PRIMARIES
        with self._translated("ping"):
            if self._server_facts:
                await self._execute(client, "PING", **target)
                return
            # The first ping reads INFO instead (still one round trip) so that
            # warnings() can report the servers' configuration without I/O.
            info = await self._execute(client, "INFO", **target)
        if connections.cluster is None:
            info = {"": info}
        if isinstance(info, dict):
            self._server_facts = {
                str(where): dict(facts) for where, facts in info.items() if isinstance(facts, dict)
            }

    async def server_time(self) -> float | None:
        client = self._connect().commands
        with self._translated("time"):
            reply = await self._execute(client, "TIME")
        try:
            seconds, micros = reply
            return int(seconds) + int(micros) / 1e6
        except (TypeError, ValueError):
            raise self._malformed("TIME", reply) from None

    # -- announcements -------------------------------------------------------

    async def announce(self, topic: str) -> None:
        topic = validate.topic(topic)
        client = self._connect().commands
        with self._translated("announce"):
            await self._execute(client, "PUBLISH", self.announce_channel, topic)

    def subscribe(self, topic: str) -> AsyncSubscription:
        return HubSubscription(validate.topic(topic), self._topics, self._announcements)

    def _announce_listener(self) -> PubSubListener:
        kwargs = self._connection_kwargs(self.options.socket_timeout)
        # Not a command connection: no run_id bookkeeping on (re)connect.
        kwargs.pop("redis_connect_func", None)
        if self.options.cluster:
            # A cluster passes every PUBLISH to the subscribers on all its nodes, so
            # one plain connection to any node hears every announcement.
            kwargs["host"], kwargs["port"] = self._any_node()
        kwargs["health_check_interval"] = _ANNOUNCE_HEALTH_CHECK
        return PubSubListener(
            kwargs,
            self.announce_channel,
            on_message=self._topics.wake,
            on_lost=self._topics.wake_all,
            unavailable=self._unavailable,
            confirm_timeout=self.options.socket_timeout,
        )

    def _any_node(self) -> tuple[str, int]:
        """A primary of the cluster: a random one of those the cluster client knows
        (so a listener started again after its node failed likely meets another),
        the seed node while it knows none."""
        current = self._connections
        if current is not None and current.pid == os.getpid() and current.cluster is not None:
            primaries = current.cluster.get_primaries()
            if primaries:
                node = random.choice(primaries)
                return str(node.host), int(node.port)
        return self.options.host, self.options.port

    async def aclose(self) -> None:
        await self._announcements.aclose()
        with self._guard:
            self._closed = True
            current, self._connections = self._connections, None
        if current is None or current.pid != os.getpid():
            return
        for pool in current.pools:
            with self._translated("close"):
                await pool.disconnect()
        for client in current.clusters:
            with self._translated("close"):
                await close_cluster(client)

    def warnings(self) -> list[str]:
        found: list[str] = []
        if self.options.password and not self.options.tls and self.options.unix_path is None:
            found.append("the password travels unencrypted: use rediss:// across hosts")
        if self._announcements.error is not None:
            found.append(
                f"cannot SUBSCRIBE for announcements ({self._announcements.error}); "
                "election observers poll"
            )
        # A cluster's servers each warn for themselves; one warning names them all.
        servers: dict[str, list[str]] = {}
        for where, facts in sorted(self._server_facts.items()):
            for warning in _server_warnings(facts):
                servers.setdefault(warning, []).append(where)
        for warning, wheres in servers.items():
            if self.options.cluster:
                warning = f"{', '.join(wheres)}: {warning}"
            found.append(warning)
        return found


def _server_warnings(facts: dict[str, Any]) -> list[str]:
    """What is risky in one server's INFO."""
    found: list[str] = []
    policy = facts.get("maxmemory_policy")
    if policy not in (None, "noeviction"):
        found.append(
            f"maxmemory-policy is {policy}: under memory pressure Redis may evict "
            "lease keys and grant a held lease again; use noeviction"
        )
    if facts.get("aof_enabled") == 0:
        found.append(
            "persistence is off (appendonly no): a restart forgets every lease; "
            "holders learn it at their next renewal and fences stay increasing"
        )
    if facts.get("role") == "slave":
        found.append("connected to a replica: writes will fail")
    too_old = _too_old(facts)
    if too_old is not None:
        found.append(too_old)
    return found


def _too_old(info: dict[str, Any]) -> str | None:
    """Why the server of this INFO is too old for leasehold, or None."""
    version = str(info.get("redis_version", ""))
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if len(numbers) == 2 and numbers < MIN_REDIS_VERSION:
        return f"Redis {version} is too old: leasehold needs 7.0 or newer"
    return None


def from_url(url: StoreURL, clock: Clock) -> AsyncRedisStore:
    """Build a store from a URL; validates options now, connects on first use.

    ``clock`` is unused: Redis decides expiry on its own clock.
    """
    del clock
    return AsyncRedisStore(url, parse_options(url))
