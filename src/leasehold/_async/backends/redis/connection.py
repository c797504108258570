"""Connections of one Redis store: pools or the cluster client, run_id stamps, error
translation, script calls and the announcement listener. The store operations
(store.py) subclass it.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff

from leasehold import _deadline
from leasehold._async._concurrency import cancellations, resume_cancellation, sleep
from leasehold._async.backends.redis.errors import (
    _pool_exhausted,
    _too_old,
    _Translated,
    unavailable,
)
from leasehold._async.backends.redis.io import (
    close_cluster,
    cluster_client,
    cluster_ready,
    connection_classes,
    pack_command,
)
from leasehold._async.backends.redis.layout import KeyLayout, _bucket_slot, _node_name
from leasehold._async.backends.redis.options import RedisOptions
from leasehold._async.backends.redis.pubsub import PubSubListener
from leasehold._async.backends.redis.scripts import (
    _library,
    _Script,
    _script,
    function_missing,
    functions_refused,
)
from leasehold._async.store import (
    AsyncStore,
    ListenerSlot,
    TopicHub,
)
from leasehold._core.url import StoreURL
from leasehold._errors import StoreMisconfigured, StoreUnavailable

# The announcement listener's connection PINGs after this many idle seconds, and a
# listener that could not subscribe is tried again after _ANNOUNCE_RETRY.
_ANNOUNCE_HEALTH_CHECK: Final = 15
_ANNOUNCE_RETRY: Final = 5.0
# In a cluster, a command finding every connection to its node busy polls for a free
# one this often, for up to socket_timeout (redis-py's cluster client fails at once
# where the standalone store's pool waits).
_POOL_POLL: Final = 0.005

# A script call runs at most this often: once more after loading the library or
# the script, once more after falling back from functions to scripts.
_SCRIPT_ATTEMPTS: Final = 3

# For standalone servers (the cluster client picks its own): see redis/io.py.
_TCP_CONNECTION, _TLS_CONNECTION, _UNIX_CONNECTION = connection_classes()


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
    # Standalone: the pool of ``commands``, which script calls use directly (_call),
    # and the one connection they keep out of it between calls (see _call).
    command_pool: Any = None
    spare: list[Any] | None = None
    blocking_pool: Any = None
    blocking_spare: list[Any] | None = None


class _Stamp(NamedTuple):
    """Where a run_id was read (a node's "host:port"; "" standalone), the run_id,
    and the generation of that node's cache entry when it was read."""

    where: str
    run_id: str
    generation: int


class RedisConnection(AsyncStore):
    """What every Redis store operation stands on (see the module docstring)."""

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
        # The connections close() disconnected, for calls that outlive it.
        self._abandoned: _Connections | None = None
        # Scripts run as functions of a library (FCALL) on a standalone server, as
        # scripts (EVALSHA) in a cluster and once the server or the ACL refused
        # functions; why, for warnings() (see scripts.py).
        self._functions = not options.cluster
        self._functions_refused: str | None = None
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
        # The last run_id ever read per server (kept when the cache above forgets
        # it), and how many times it changed: restarts and failovers this store
        # saw (see restarts()).
        self._seen_run_ids: dict[str, str] = {}
        self._restart_counts: dict[str, int] = {}
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
        # Every call comes here: once made, this process's connections are read
        # without the lock (one attribute read; replacing them happens under it).
        current = self._connections
        pid = os.getpid()
        if current is not None and current.pid == pid:
            return current
        with self._guard:
            current = self._connections
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
            command_pool=command_pool,
            blocking_pool=blocking_pool,
            # The blocking pool never makes a caller wait for a connection (wait()
            # polls when all are busy), so one kept out of it starves nobody.
            blocking_spare=[] if hasattr(blocking_pool, "ensure_connection") else None,
            # redis-py 5.1+ exposes the check the pool runs on every checkout; a
            # pool of one connection must never have it kept out of it.
            spare=(
                []
                if self.options.max_connections > 1 and hasattr(command_pool, "ensure_connection")
                else None
            ),
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

    async def _stamp(self, connections: _Connections, key: str, doing: str) -> _Stamp:
        """The run_id of the server that owns ``key``, read with ``INFO server``
        once per server and cached; a driver error while reading it is the store's
        error for ``doing`` (translated here, where the I/O is: the cached answer,
        read on every acquire and release, needs no translation).

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
        if connections.cluster is None:
            # Standalone, the common case: two dict reads, no lock, no coroutine.
            # The generation first: _forget_run_id drops the run_id before it bumps
            # the generation, so a run_id read after a generation is never older
            # than it (a stamp taken meanwhile is then not current: see acquire).
            generation = self._generations.get("", 0)
            cached = self._run_ids.get("")
            if cached is not None:
                return _Stamp("", cached, generation)
        with self._translated(doing):
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
            seen = self._seen_run_ids.get(where)
            if seen is not None and seen != run_id:
                self._restart_counts[where] = self._restart_counts.get(where, 0) + 1
            self._seen_run_ids[where] = run_id
            # Read after INFO: the connection INFO may have made does not count as
            # one made during the caller's script.
            return _Stamp(where, run_id, self._generations.get(where, 0))

    def _count_restart(self, where: str) -> None:
        with self._run_id_guard:
            self._restart_counts[where] = self._restart_counts.get(where, 0) + 1

    def restarts(self, name: str) -> int:
        # Read on every grant: no lock (one dict read is atomic), no I/O.
        connections = self._connections
        if connections is None or connections.cluster is None:
            return self._restart_counts.get("", 0)
        key = self.keys.for_name(name).state
        try:
            where = str(connections.cluster.get_node_from_key(key).name)
        except redis_errors.RedisClusterException:
            # The client forgot the slots after an error: any node's restart counts.
            return sum(list(self._restart_counts.values()))
        return self._restart_counts.get(where, 0)

    def _stamp_is_current(self, connections: _Connections, key: str, stamp: _Stamp) -> bool:
        # One dict read (atomic): generations only grow.
        fresh = self._generations.get(stamp.where, 0) == stamp.generation
        return fresh and self._still_owner(connections, key, stamp.where)

    # -- errors --------------------------------------------------------------

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        """The one place a redis-py (or socket/TLS) error becomes a leasehold error."""
        return unavailable(self.url.redacted, self.options, doing, exc)

    def _translated(self, doing: str) -> _Translated:
        return _Translated(self, doing)

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
        try:
            while True:
                try:
                    reply = await client.execute_command(*args, **options)
                    break
                except redis_errors.ConnectionError as exc:
                    deadline = self._wait_for_connection(exc, deadline, wait_for_connection)
                    await sleep(_POOL_POLL)
        finally:
            if self._closed:
                await self._disconnect_late()
        # A cancellation that arrived while redis-py was sending can be lost (see
        # redis/io.py); raise it here so a cancelled caller never carries on.
        resume_cancellation(before)
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

    async def _run(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[str | int | bytes],
        connections: _Connections | None = None,
    ) -> Any:
        """Run a script once (in a cluster, on the node that owns its keys' slot);
        ``connections``: this process's, if the caller has them at hand."""
        script = _script(name)
        if connections is None:
            connections = self._connect()
        with self._translated(name):
            for attempt in range(_SCRIPT_ATTEMPTS):
                try:
                    return await self._call(connections, self._script_call(script, keys, args))
                except redis_errors.ResponseError as exc:
                    if attempt == _SCRIPT_ATTEMPTS - 1 or not self._script_not_run(exc):
                        raise
                    await self._load_script(connections, script, [keys[0]], exc)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _script_call(
        self, script: _Script, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> tuple[Any, ...]:
        if self._functions:
            return ("FCALL", script.function, len(keys), *keys, *args)
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    def _script_not_run(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the server did not run the script at all, so that
        running it again, once it is loaded (or as a script), is safe: NOSCRIPT or
        no such function (a restart, a failover or a flush emptied the server's
        cache), or FCALL refused."""
        if isinstance(exc, redis_errors.NoScriptError):
            return True
        return self._functions and (function_missing(exc) or functions_refused(exc))

    async def _call(
        self, connections: _Connections, command: tuple[Any, ...], blocking: bool = False
    ) -> Any:
        """One command whose reply needs no parsing by redis-py (a script call).

        Standalone, it goes straight to a pooled connection: packed in one hiredis
        call, sent and its reply read by the connection's ``exchange`` (redis/io.py).
        redis-py's command layer (retry wrapper, per-argument encoding, metrics
        hooks, reply callbacks) cost about 18 µs a call on top (sync; more on
        asyncio), more than the server's work. What that layer did for us stays:
        the socket is attached to the operation's deadline; a connection that fails
        while sending or reading is disconnected (never reused with a reply
        pending), and an error reply (NOSCRIPT, NOPERM, OOM) is raised as
        redis-py's exception, the connection left clean; the pool still waits up
        to socket_timeout for a free connection; nothing is retried. In a cluster,
        redis-py's client routes the command (MOVED, ASK).

        One connection that served a call successfully is kept out of the pool for
        the next (``spare``): taking a connection from redis-py's blocking pool and
        giving it back cost 7-9 µs (sync) or ~15 µs (asyncio), twice per acquire
        and release. It is checked as the pool checks every connection it hands
        out (``ensure_connection``: reconnected if the server closed it or it has
        unread data), first by a leaner test of the same (``reusable`` in io.py),
        which passes a clean one without the pool's layers, reconnects a dirty one
        and leaves the pool's check to decide when it cannot tell; it counts
        against max_connections like any connection in use; every caller takes it
        before asking the pool, and a pool of one connection keeps none.

        ``blocking``: on a connection reserved for blocking calls (BLPOP; see
        waiting.py), whose pool fails at once when all are busy."""
        if blocking:
            pool, spare = connections.blocking_pool, connections.blocking_spare
            if pool is None:
                return await self._execute(
                    connections.blocking, *command, wait_for_connection=False
                )
        else:
            pool, spare = connections.command_pool, connections.spare
            if pool is None:
                return await self._execute(connections.commands, *command)
        before = cancellations()
        connection = None
        if spare:
            try:
                connection = spare.pop()
            except IndexError:  # another thread took it meanwhile
                connection = None
        try:
            if connection is None:
                connection = await pool.get_connection()
            elif (clean := connection.reusable()) is not True:
                try:
                    if clean is False:
                        # Dirty: reconnected here, since the pool's check may not
                        # see it yet (asyncio: a close still on the socket).
                        await connection.disconnect()
                    await pool.ensure_connection(connection)
                except BaseException:
                    await pool.release(connection)
                    raise
            try:
                reply = await connection.exchange(pack_command(connection, command))
            except BaseException:
                await pool.release(connection)
                raise
            if spare is not None and not spare:
                spare.append(connection)
            else:
                await pool.release(connection)
        finally:
            if self._closed:
                await self._disconnect_late()
        # As in _execute: a cancellation swallowed while sending is raised again.
        resume_cancellation(before)
        return reply

    async def _disconnect_late(self) -> None:
        """Close what a call made after the store closed. A call that took this
        process's connections just before close() (on another thread or task: a
        background clean-up, the keeper's last renewal) and reached the pools only
        after close() disconnected them connected anew; nobody else would close that
        connection, which would hold its socket, file descriptor and server slot
        until the garbage collector found it. Every call checks ``_closed`` when it
        ends: one that ended before close() set it left its connection in a pool
        that close() then disconnects. Closing twice is harmless; a failure to
        close must not replace the call's own answer or error."""
        current = self._abandoned
        if current is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._disconnect(current)

    async def _disconnect(self, connections: _Connections) -> None:
        for pool in connections.pools:
            with self._translated("close"):
                await pool.disconnect()
        for client in connections.clusters:
            with self._translated("close"):
                await close_cluster(client)

    async def _load_script(
        self,
        connections: _Connections,
        script: _Script,
        keys: Sequence[str],
        cause: BaseException,
    ) -> None:
        """After ``cause`` (see _script_not_run): load the library, or the script, on
        the server(s) that own ``keys`` (one key per call that was not run) and
        forget their run_ids. A server or user that refuses functions gets scripts
        from then on."""
        if self._functions and functions_refused(cause):
            self._use_scripts(cause)
            return  # the next attempt runs EVALSHA, and loads the script if need be
        owners: dict[str, dict[str, Any]] = {}
        for key in keys:
            where, target = await self._owner(connections, key)
            owners[where] = target
        for where, target in owners.items():
            self._forget_run_id(where)
            if self._functions:
                try:
                    await self._execute(
                        connections.commands,
                        "FUNCTION",
                        "LOAD",
                        "REPLACE",
                        _library().source,
                        **target,
                    )
                    continue
                except redis_errors.ResponseError as exc:
                    self._use_scripts(exc)
            await self._execute(connections.commands, "SCRIPT", "LOAD", script.source, **target)

    def _use_scripts(self, cause: BaseException) -> None:
        self._functions = False
        self._functions_refused = f"{cause}"[:200]

    def _malformed(self, what: str, reply: object) -> StoreUnavailable:
        return StoreUnavailable(
            f"redis store {self.url.redacted}: unexpected reply to {what}: {reply!r:.200}"
        )

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
