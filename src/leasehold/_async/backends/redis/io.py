"""The async half of the Redis backend's tiny shim (its twin: _sync/backends/redis/io.py).

Two things differ between redis-py's asyncio and sync clients and live here.

Cancellation. redis-py's asyncio client sends each command through ``asyncio.wait_for``. On
Python 3.11, ``wait_for`` returns the inner result when a cancellation arrives just
as the inner operation completes, and the cancellation is lost: the command's
caller carries on as if never cancelled (a cancelled lock acquire would keep
waiting). The store counts the task's cancellation requests around each command
and raises a swallowed one again (``cancellations`` and ``resume_cancellation`` in
_async/_concurrency.py, which the PostgreSQL store uses around its pool's wait too).
Threads cannot be cancelled, so the sync twins do nothing.

Cluster clients. The asyncio ``RedisCluster`` takes no ``redis_connect_func`` and
discovers the cluster on first use; the sync one takes the hook as an argument and
discovers the cluster in its constructor (I/O).

Deadlines. Every command a connection sends attaches its socket to the current
operation's deadline (``leasehold._deadline``), so a server that stops answering
costs the caller its operation timeout, not redis-py's socket timeout, and the
connection is shut down and replaced instead of reused. A script call detaches
its socket once the reply is in, before the connection goes back to the pool,
and every disconnect detaches before the socket closes: a deadline shuts down only
the connections its operation is still using. The connection classes below do it
for standalone and cluster clients alike.

Packing commands. redis-py's sync connections pack a command with hiredis; its
asyncio connections do it in Python, about 2 µs per argument, and every script
call has 10 to 16 (measured: an EVALSHA of acquire.lua 37 µs slower than a PING on
asyncio, 5 µs on sync). The connection classes here pack with redis-py's own hiredis
serializer, the one its sync connections use: the same bytes on the wire.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import redis.asyncio.cluster
import redis.asyncio.connection
import redis.connection
import redis.exceptions
from redis.utils import HIREDIS_AVAILABLE

from leasehold import _deadline

# Outside any operation, the configured connect timeout alone bounds a connect.
_NO_LIMIT = 3600.0


# Script calls skip redis-py's command layer (see RedisConnection._call): one
# hiredis call packs the whole command; without hiredis, or for an argument it
# cannot encode the way redis-py does (a str with lone surrogates), the
# connection's own packer does it.
_HIREDIS_PACK: Any = None
try:
    import hiredis

    _HIREDIS_PACK = hiredis.pack_command
except ImportError:  # pragma: no cover - hiredis is an optional extra
    pass


def pack_command(connection: Any, args: tuple[Any, ...]) -> Any:
    """``args`` as RESP bytes for ``connection.send_packed_command``, the same
    bytes redis-py's packer would produce."""
    if _HIREDIS_PACK is not None:
        try:
            return [_HIREDIS_PACK(args)]
        except (TypeError, UnicodeError):
            pass
    return connection.pack_command(*args)


def cluster_client(kwargs: dict[str, Any], on_new_connection: Callable[[Any], None]) -> Any:
    """A redis-py cluster client; ``on_new_connection(connection)`` runs after the
    handshake of every connection it makes, to any node. No I/O."""
    kwargs = dict(kwargs)
    tcp, tls, _ = connection_classes()
    connection_class = tls if kwargs.get("ssl") else tcp
    client = redis.asyncio.cluster.RedisCluster(**kwargs)
    # The asyncio cluster client takes no connection_class: its nodes copy it from
    # these kwargs (and the startup nodes were made with it already).
    client.nodes_manager.connection_kwargs["connection_class"] = connection_class
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = connection_class

    async def connected(connection: Any) -> None:
        # A redis_connect_func replaces redis-py's handshake, so it makes it first.
        await connection.on_connect()
        on_new_connection(connection)

    # The asyncio client builds each node's connections from these kwargs: the
    # template for nodes it discovers, and a copy per startup node made in its
    # constructor. redis-py installs its own connection hooks the same way.
    client.nodes_manager.connection_kwargs["redis_connect_func"] = connected
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_kwargs["redis_connect_func"] = connected
    return client


async def cluster_ready(client: Any) -> None:
    """Learn the cluster's nodes and slots if the client has not yet, or has
    forgotten them after an error (redis-py rediscovers on the next command)."""
    await client.initialize()


async def close_cluster(client: Any) -> None:
    await client.aclose()


# redis-py 5.0 and newer; without hiredis (or the class) the stock classes are used.
_HIREDIS_SERIALIZER: Any = (
    redis.connection.HiredisRespSerializer()  # type: ignore[no-untyped-call,unused-ignore]
    if HIREDIS_AVAILABLE and hasattr(redis.connection, "HiredisRespSerializer")
    else None
)


class _Bounded:
    """Attaches the connection's socket to the deadline of the operation that
    sends on it (the handshake of a new connection included)."""

    _writer: Any
    _parser: Any
    socket_timeout: float | None
    health_check_interval: float

    _reader: Any
    # reusable(): a poll object registered for the socket it was made for.
    _poller: Any = None
    _polled: Any = None

    def reusable(self) -> bool | None:
        """Whether a connection kept out of the pool between calls can carry the next
        command as it is. True: connected over plain TCP or a Unix socket, no health
        checks due, and no reply bytes anywhere: none parsed and unread by hiredis,
        none the event loop has read into the connection's stream (nor its end),
        none waiting on the socket for the loop's next turn. False: it is dirty (a
        reply left over, or the server's close: a restart, CLIENT KILL, an idle
        timeout), and the caller reconnects it; the pool's own check
        (``ensure_connection``) does not look at the socket, so it would pass a
        close the loop has not read yet. None: this check cannot tell (not
        connected, health checks, no hiredis, TLS, whose transport may hold part of
        a record, or asyncio internals other than those read here: the stream's
        buffer has no public accessor, and redis-py's own check reads the same
        attribute), and the pool's check decides. (Unlike the sync twin's, this
        saves no time against redis-py 8's check: a dozen calls either way.)"""
        writer = self._writer
        if writer is None or self._reader is None or self.health_check_interval:
            return None
        parser = self._parser
        reader = getattr(parser, "_reader", None)
        stream: Any = getattr(parser, "_stream", None)
        buffered = getattr(stream, "_buffer", None)
        if reader is None or not hasattr(reader, "has_data") or buffered is None:
            return None  # no hiredis parser, or a stream unlike asyncio's own
        transport = writer.transport
        if transport.get_extra_info("sslcontext") is not None:
            return None
        if reader.has_data() or buffered or stream.at_eof() or stream.exception() is not None:
            return False
        if transport.is_closing():
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        poller = self._poller
        if poller is None or self._polled is not sock:
            # Made anew for a new socket, which may have been given the number of
            # a closed one.
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            self._poller, self._polled = poller, sock
        return not poller.poll(0)

    async def exchange(self, packed: Any) -> Any:
        """Send one packed command and read its reply (an error reply raised as
        redis-py's exception), as send_packed_command + read_response do, without
        their two asyncio timers per call (a task for ``wait_for`` around the send,
        a timeout around the read: together about 25 µs, more than the rest of a
        script call's client side). Under an operation deadline no later than
        socket_timeout, that deadline bounds the call instead: the socket is
        attached to it and shut down when it passes, which ends the read (see
        leasehold._deadline). Elsewhere, and on connections with health checks,
        the redis-py calls run. Any failure disconnects, as redis-py does."""
        writer = self._writer
        limit = self.socket_timeout or _NO_LIMIT
        if writer is None or self.health_check_interval or _deadline.remaining(_NO_LIMIT) > limit:
            await self.send_packed_command(packed)
            return await self.read_response()  # type: ignore[attr-defined]
        sock = writer.get_extra_info("socket")
        fd = None if sock is None else sock.fileno()
        _deadline.attach(fd)
        try:
            writer.writelines(packed)
            await writer.drain()
            reply = await self._parser.read_response()
        except BaseException:
            await self.disconnect(nowait=True)  # detaches the socket too
            raise
        # Detached before the connection goes back to the pool: this operation may
        # go on (wait() polls, then sleeps, within one deadline) while the
        # connection serves another, which this operation's deadline must not shut
        # down when it passes. (redis-py's own path, send_packed_command, stays
        # attached to the end of the operation: it serves operations of one call,
        # and pipelines, whose every reply the deadline must bound.)
        _deadline.detach(fd)
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
        return reply

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        writer = self._writer
        if writer is not None:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                _deadline.attach(sock.fileno())
        await super().send_packed_command(command, check_health)  # type: ignore[misc]

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        # A closed socket's number soon belongs to another connection: this
        # operation's deadline must not shut that one down when it passes.
        writer = self._writer
        sock = None if writer is None else writer.get_extra_info("socket")
        if sock is not None:
            _deadline.detach(sock.fileno())
        await super().disconnect(*args, **kwargs)  # type: ignore[misc]

    socket_connect_timeout: float | None

    async def _connect(self) -> None:
        # Connecting never outlasts the operation's deadline either.
        configured = self.socket_connect_timeout
        self.socket_connect_timeout = max(0.001, _deadline.remaining(configured or _NO_LIMIT))
        try:
            await super()._connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout = configured


class _HiredisPacking:
    def pack_command(self, *args: Any) -> list[bytes]:
        # redis-py splits a command name with spaces ("CLUSTER SLOTS") into words.
        if _HIREDIS_PACK is not None and isinstance(args[0], str) and " " not in args[0]:
            try:
                return [_HIREDIS_PACK(args)]
            except (TypeError, UnicodeError):
                pass
        packed: list[bytes] = _HIREDIS_SERIALIZER.pack(*args)
        return packed


class _TCPConnection(_Bounded, _HiredisPacking, redis.asyncio.connection.Connection):
    pass


class _TLSConnection(_Bounded, _HiredisPacking, redis.asyncio.connection.SSLConnection):
    pass


class _UnixConnection(
    _Bounded, _HiredisPacking, redis.asyncio.connection.UnixDomainSocketConnection
):
    pass


class _PlainTCPConnection(_Bounded, redis.asyncio.connection.Connection):
    pass


class _PlainTLSConnection(_Bounded, redis.asyncio.connection.SSLConnection):
    pass


class _PlainUnixConnection(_Bounded, redis.asyncio.connection.UnixDomainSocketConnection):
    pass


def connection_classes() -> tuple[type[Any], type[Any], type[Any]]:
    """redis-py's connection classes for TCP, TLS and unix sockets."""
    if _HIREDIS_SERIALIZER is None:
        return _PlainTCPConnection, _PlainTLSConnection, _PlainUnixConnection
    return _TCPConnection, _TLSConnection, _UnixConnection
