"""The etcd backend's sockets under the operation's deadline (``leasehold._deadline``).

httpx bounds a request only per step (each read, each write, the connect, the wait
for a pooled connection), each with the configured timeout: a reply that trickles
in, or a request that reconnects and retries, can outlast any single one. So the
transport's network backend is wrapped: every read and write of a connection waits
no longer than the operation's deadline has left, and for the time of that one call
its socket is attached to the deadline. When the deadline passes, the watchdog
shuts the socket down; httpx fails the request and drops the connection (a
connection whose exchange did not finish is never put back in the pool). A call
that returns after the deadline passed fails too, even with bytes in hand (see
``_attached``). Connecting is capped the same way.

Why attached only during each call, not from a request's first write to its end:
httpx puts a connection back in its pool as soon as the answer is read, before the
caller regains control, and another thread may take it at once. A socket still
attached to the finished operation's deadline would then be shut down under the
next user when that deadline passed (and a late detach would take the next user's
deadline off it). Between two calls of one request the socket is idle in this
thread's hands, so nothing needs bounding there; a call that starts after the
deadline passed finds its socket shut at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpcore
import httpx

from leasehold import _deadline


def _cap(timeout: float | None) -> float | None:
    """``timeout``, never past the current operation's deadline."""
    if _deadline.current() is None:
        return timeout
    return max(0.001, _deadline.remaining(float("inf") if timeout is None else timeout))


@contextlib.contextmanager
def _attached(fd: int | None, error: type[Exception]) -> Iterator[None]:
    """The socket ``fd`` under the current operation's deadline, for one call; the
    call fails with ``error`` if that deadline has passed when it returns.

    Why fail a call that worked: once the deadline passed, the watchdog shut the
    socket down (or is about to), yet the kernel still hands over bytes it had
    queued before. A reply that was already waiting when the thread got the CPU
    back would complete the request, and httpx would put the shut connection back
    in its pool; its check for a dead idle connection runs before it hands one out,
    but a connection that turns idle during another thread's assignment is handed
    out unchecked, and that operation's write then fails with time to spare (a
    loaded CI machine: fifty threads opening one presence room). Failed here, the
    request ends as every call past its deadline does (``NoAnswer``), and httpx
    closes the connection."""
    deadline = _deadline.current()
    if deadline is None or fd is None:
        yield
        return
    deadline.attach(fd)
    try:
        yield
    finally:
        deadline.detach(fd)
    if deadline.expired:
        raise error("the operation's deadline passed; its connection was shut down")


class _BoundedStream:
    """One connection's stream; reads and writes keep the operation's bound."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        sock = stream.get_extra_info("socket")
        self.fd: int | None = sock.fileno() if sock is not None else None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _attached(self.fd, httpcore.ReadError):
            data: bytes = await self._stream.read(max_bytes, _cap(timeout))
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _attached(self.fd, httpcore.WriteError):
            await self._stream.write(buffer, _cap(timeout))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> _BoundedStream:
        with _attached(self.fd, httpcore.ConnectError):
            stream = await self._stream.start_tls(ssl_context, server_hostname, _cap(timeout))
        return _BoundedStream(stream)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _BoundedBackend:
    """httpcore's network backend, making bounded streams."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> _BoundedStream:
        stream = await self._backend.connect_tcp(
            host, port, _cap(timeout), local_address, socket_options
        )
        return _BoundedStream(stream)

    def __getattr__(self, name: str) -> Any:
        # sleep, connect_unix_socket: as they are.
        return getattr(self._backend, name)


def bounded_transport(verify: Any, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport, its sockets bounded by each operation's deadline."""
    transport = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    # httpcore 1.x makes every connection with the pool's backend (an attribute it
    # reads when it opens a connection), so wrapping it here covers them all.
    pool: Any = transport._pool
    pool._network_backend = _BoundedBackend(pool._network_backend)
    return transport
