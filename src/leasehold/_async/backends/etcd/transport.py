"""The etcd backend's sockets under the operation's deadline (``leasehold._deadline``).

httpx bounds a request only per step (each read, each write, the connect, the wait
for a pooled connection), each with the configured timeout: a reply that trickles
in, or a request that reconnects and retries, can outlast any single one. So the
transport's network backend is wrapped: every read and write of a connection first
attaches its socket to the deadline of the operation that uses it, and never waits
longer than that deadline has left. When the deadline passes, the watchdog shuts
the socket down; httpx fails the request and drops the connection (a connection
whose exchange did not finish is never put back in the pool). Connecting is capped
the same way.

After a request, ``release(response)`` detaches its socket: the connection goes
back to the pool, and this operation's deadline must not shut it down later, while
another operation uses it. A connection that is closed detaches first, since its
descriptor's number is soon reused for another socket.
"""

from __future__ import annotations

from typing import Any

import httpx

from leasehold import _deadline


def _cap(timeout: float | None) -> float | None:
    """``timeout``, never past the current operation's deadline."""
    if _deadline.current() is None:
        return timeout
    return max(0.001, _deadline.remaining(float("inf") if timeout is None else timeout))


class _BoundedStream:
    """One connection's stream; reads and writes keep the operation's bound."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        sock = stream.get_extra_info("socket")
        self.fd: int | None = sock.fileno() if sock is not None else None
        # The deadline the socket is attached to, if any.
        self._deadline: _deadline.Deadline | None = None

    def _attach(self) -> None:
        deadline = _deadline.current()
        # Once per operation (a deadline keeps a list; detach takes one entry off),
        # and to one operation at a time: the one using the connection now.
        if deadline is not None and deadline is not self._deadline and self.fd is not None:
            self.detach()
            deadline.attach(self.fd)
            self._deadline = deadline

    def detach(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and self.fd is not None:
            deadline.detach(self.fd)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._attach()
        data: bytes = await self._stream.read(max_bytes, _cap(timeout))
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._attach()
        await self._stream.write(buffer, _cap(timeout))

    async def aclose(self) -> None:
        # Before the descriptor is closed: its number may soon belong to another
        # socket, which the deadline must never shut down.
        self.detach()
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> _BoundedStream:
        self._attach()
        return _BoundedStream(
            await self._stream.start_tls(ssl_context, server_hostname, _cap(timeout))
        )

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


def release(response: httpx.Response) -> None:
    """The request is done: its connection no longer answers to this deadline."""
    stream = response.extensions.get("network_stream")
    if isinstance(stream, _BoundedStream):
        stream.detach()
