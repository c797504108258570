"""The sync half of the Redis backend's tiny shim (its twin: _async/backends/redis/io.py).

Threads cannot be cancelled, so there is no swallowed cancellation to raise again.
The sync ``RedisCluster`` runs a ``redis_connect_func`` after its own handshake, and
discovers the cluster in its constructor. redis-py's sync connections pack commands
with hiredis already; the connection classes here only attach their sockets to the
current operation's deadline (see the async twin).
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import redis.cluster
import redis.connection
import redis.exceptions

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
    handshake of every connection it makes, to any node. Connects to discover the
    cluster (redis-py's sync client does so in its constructor)."""
    tcp, tls, _ = connection_classes()
    return redis.cluster.RedisCluster(
        **kwargs,
        connection_class=tls if kwargs.get("ssl") else tcp,
        redis_connect_func=on_new_connection,
    )


def cluster_ready(client: Any) -> None:
    # The sync client discovers the cluster in its constructor, and again at once
    # after a connection error: there is nothing left to do here.
    del client


def close_cluster(client: Any) -> None:
    client.close()


class _Bounded:
    """Attaches the connection's socket to the deadline of the operation that
    sends on it (the handshake of a new connection included): see the async twin."""

    _sock: Any

    _parser: Any
    health_check_interval: Any
    # reusable(): a poll object registered for the socket it was made for.
    _poller: Any = None
    _polled: Any = None

    def reusable(self) -> bool | None:
        """Whether a connection kept out of the pool between calls can carry the next
        command as it is. True: connected, no health checks due, no reply bytes
        buffered by the hiredis parser or by TLS, and nothing readable on its socket.
        False: it is dirty (a reply left over, or the server's close: a restart,
        CLIENT KILL, an idle timeout), and the caller reconnects it. None: this
        check cannot tell (not connected, health checks, no hiredis), and the pool's
        own check (``ensure_connection``) decides. True is that check's answer in
        the common case, without its layers (a connect() through the retry wrapper,
        a new poll object per check), which cost about a tenth of the throughput at
        8 processes on one lock on the benchmark's 2-core host."""
        sock = self._sock
        if sock is None or self.health_check_interval:
            return None
        reader = getattr(self._parser, "_reader", None)
        if reader is None or not hasattr(reader, "has_data"):
            return None  # no hiredis
        if reader.has_data():
            return False  # a reply partly read
        pending = getattr(sock, "pending", None)
        if pending is not None and pending():
            return False
        poller = self._poller
        if poller is None or self._polled is not sock:
            # Registered by descriptor: made anew for a new socket, which may have
            # been given the number of a closed one.
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            self._poller, self._polled = poller, sock
        return not poller.poll(0)

    def exchange(self, packed: Any) -> Any:
        """Send one packed command and read its reply (an error reply raised as
        redis-py's exception), as send_packed_command + read_response do, without
        their per-call bookkeeping (host strings for error messages, health-check
        and timeout plumbing). The socket's own timeout (socket_timeout, set when
        it connected) and the operation's deadline bound both steps; any failure
        disconnects, and socket errors become redis-py's, as in redis-py."""
        sock = self._sock
        if sock is None or self.health_check_interval:
            self.send_packed_command(packed)
            return self.read_response()  # type: ignore[attr-defined]
        fd = sock.fileno()
        _deadline.attach(fd)
        try:
            try:
                for item in packed:
                    sock.sendall(item)
            except TimeoutError:
                raise redis.exceptions.TimeoutError("Timeout writing to socket") from None
            except OSError as exc:
                raise redis.exceptions.ConnectionError(
                    f"Error while writing to socket: {exc.args}"
                ) from None
            reply = self._parser.read_response()
        except BaseException:
            self.disconnect()  # detaches the socket too
            raise
        # Detached before the connection goes back to the pool: see the async twin.
        _deadline.detach(fd)
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
        return reply

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        sock = self._sock
        if sock is not None:
            _deadline.attach(sock.fileno())
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        # See the async twin.
        sock = self._sock
        if sock is not None:
            _deadline.detach(sock.fileno())
        super().disconnect(*args, **kwargs)  # type: ignore[misc]

    socket_connect_timeout: float | None

    def _connect(self) -> Any:
        # Connecting never outlasts the operation's deadline either.
        configured = self.socket_connect_timeout
        self.socket_connect_timeout = max(0.001, _deadline.remaining(configured or _NO_LIMIT))
        try:
            return super()._connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout = configured


class _TCPConnection(_Bounded, redis.connection.Connection):
    pass


class _TLSConnection(_Bounded, redis.connection.SSLConnection):
    pass


class _UnixConnection(_Bounded, redis.connection.UnixDomainSocketConnection):
    pass


def connection_classes() -> tuple[type[Any], type[Any], type[Any]]:
    """redis-py's connection classes for TCP, TLS and unix sockets."""
    return _TCPConnection, _TLSConnection, _UnixConnection
