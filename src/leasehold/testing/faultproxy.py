"""FaultProxy: a TCP proxy on loopback that misbehaves on command.

Put it between your application and its store in your own tests::

    from leasehold.testing import FaultProxy

    with FaultProxy("127.0.0.1", redis_port) as proxy:
        client = leasehold.Client(proxy.rewrite_url("redis://127.0.0.1:6379/0"))
        lease = client.lock("job").acquire()
        proxy.stall()            # the store goes silent; the kernel still ACKs
        ...                      # lease.held turns False at its safe deadline
        proxy.pass_through()

The proxy runs its own event loop in a daemon thread, so the same object serves
sync tests and asyncio tests (``async with`` works too), and every method may be
called from any thread while traffic flows. Modes switch at once for connections
already open and for new ones:

- ``pass_through()``: forward both directions unchanged.
- ``delay(up=, down=)``: hold every chunk for that many seconds before forwarding it,
  per direction (``up`` = client to store, ``down`` = store to client). Order is kept.
- ``stall(up=True, down=True)``: read and discard what the chosen direction carries.
  The peer's kernel keeps ACKing, so TCP keepalives never notice: a hung server or
  pooler, or a silent partition. A connection that lost bytes has a torn protocol
  stream, so it is reset when the stall ends (as a long partition would do).
- ``refuse()``: stop listening; new connections get ECONNREFUSED. Open ones go on.
- ``reset()``: abort every open connection on both sides with a TCP RST (a one-off
  action; the mode is unchanged).
- ``stall(where=...)`` and ``reset(where=...)``: only the connections whose client
  address (host, port) the predicate accepts; the others flow as before. The
  predicate runs on the proxy's thread, once per connection for each stall: for
  open connections when the mode is set, for new ones when they are accepted. It
  must be quick; a predicate that raises aborts that connection.
- ``retarget(host, port)``: new connections go to another loopback upstream and open
  ones are reset (a failover, as clients behind a service address see it).

Only loopback is allowed on both ends: the proxy listens on 127.0.0.1 and refuses an
upstream that is not a loopback address. It is a test tool, not a network tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

__all__ = ["FaultProxy", "ProxyMode"]

_T = TypeVar("_T")
# Picks connections by the client's (host, port), as the proxy saw it on accept.
Where = Callable[[tuple[str, int]], bool]
_CHUNK = 65536
# How long a control call waits for the proxy's loop thread; it never does I/O that
# could block, so this only trips if the loop thread died.
_CONTROL_TIMEOUT = 10.0


@dataclass(frozen=True)
class ProxyMode:
    """What the proxy does right now (``FaultProxy.mode``)."""

    delay_up: float = 0.0
    delay_down: float = 0.0
    stall_up: bool = False
    stall_down: bool = False
    refusing: bool = False
    # Only connections this accepts are stalled (None: every connection).
    where: Where | None = None

    @property
    def name(self) -> str:
        if self.refusing:
            return "refuse"
        if self.stall_up or self.stall_down:
            return "stall"
        if self.delay_up or self.delay_down:
            return "delay"
        return "pass"


def _judge(where: Where, address: tuple[str, int]) -> bool:
    try:
        return bool(where(address))
    except Exception:
        return True  # a predicate that raises aborts the connection


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Pipe:
    """One proxied connection: two directions, each a reader plus a timed writer."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.up_reader, self.up_writer = upstream
        self.torn = False  # bytes were discarded: the stream cannot be resumed
        self.tasks: list[asyncio.Task[None]] = []
        peer = self.client_writer.get_extra_info("peername")
        self.client_address: tuple[str, int] = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        # The mode this pipe was last judged against, and whether it is stalled by it.
        self._judged: tuple[ProxyMode, bool] | None = None

    def stalled(self, mode: ProxyMode) -> bool:
        """Whether ``mode``'s stall applies to this connection (judged once a mode)."""
        if mode.where is None:
            return True
        if self._judged is None or self._judged[0] is not mode:
            self._judged = (mode, bool(mode.where(self.client_address)))
        return self._judged[1]

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for direction in ("up", "down"):
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            self.tasks.append(loop.create_task(self._read(direction, queue)))
            self.tasks.append(loop.create_task(self._write(direction, queue)))

    async def _read(self, direction: str, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        reader = self.client_reader if direction == "up" else self.up_reader
        last_due = 0.0
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                mode = self.proxy._mode
                stall = mode.stall_up if direction == "up" else mode.stall_down
                if stall and self.stalled(mode):
                    self.torn = True
                    self.proxy._count("discarded", len(data))
                    continue
                delay = mode.delay_up if direction == "up" else mode.delay_down
                # Never reorder: a chunk is due no earlier than the one before it.
                last_due = max(last_due, time.monotonic() + delay)
                await queue.put((last_due, data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            await queue.put(None)

    async def _write(
        self, direction: str, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        writer = self.up_writer if direction == "up" else self.client_writer
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                due, data = item
                pause = due - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                writer.write(data)
                await writer.drain()
                self.proxy._count("forwarded", len(data))
            # The source closed: pass the FIN on, keep the other direction open.
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            self.abort()

    def abort(self) -> None:
        """Close both sides with RST (SO_LINGER 0), not a graceful FIN."""
        for writer in (self.client_writer, self.up_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()

    @property
    def finished(self) -> bool:
        return all(task.done() for task in self.tasks)


class FaultProxy:
    """A loopback TCP proxy to ``upstream_host:upstream_port`` (see the module docs).

    ``listen_port=0`` picks a free port; read it from ``port`` after ``start()``.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, listen_port: int = 0) -> None:
        if not _is_loopback(upstream_host):
            raise ValueError(
                f"FaultProxy forwards to loopback only, not {upstream_host!r} "
                "(it is a test tool: run the store on 127.0.0.1)"
            )
        if not 0 < upstream_port < 65536:
            raise ValueError(f"bad upstream port {upstream_port!r}")
        self.upstream = (upstream_host, upstream_port)
        self._listen_port = listen_port
        self._mode = ProxyMode()
        self._pipes: set[_Pipe] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._counters = {"accepted": 0, "refused_upstream": 0, "forwarded": 0, "discarded": 0}
        self._guard = threading.Lock()

    # -- addresses -------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if not self._listen_port:
            raise RuntimeError("the proxy has not been started")
        return self._listen_port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def rewrite_url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (user, path and
        query kept): ``redis://:pw@127.0.0.1:6379/0`` -> ``redis://:pw@127.0.0.1:PORT/0``."""
        parts = urllib.parse.urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        return urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path, parts.query, parts.fragment)
        )

    # -- state -------------------------------------------------------------------

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return self._call(lambda: sum(1 for pipe in self._pipes if not pipe.finished))

    def statistics(self) -> dict[str, int]:
        """Counters since start: accepted connections, upstream connects refused,
        bytes forwarded and bytes discarded by a stall."""
        with self._guard:
            return dict(self._counters)

    def _count(self, key: str, amount: int = 1) -> None:
        with self._guard:
            self._counters[key] += amount

    # -- modes -------------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward both directions at once, unchanged; listen again if refusing."""
        self._set(ProxyMode())

    def delay(self, up: float = 0.0, down: float = 0.0) -> None:
        """Hold each chunk ``up`` seconds on its way to the store and ``down`` seconds
        on its way back (chunks already in flight keep the delay they were given)."""
        if up < 0 or down < 0:
            raise ValueError("delays must be >= 0")
        self._set(ProxyMode(delay_up=up, delay_down=down))

    def stall(self, up: bool = True, down: bool = True, *, where: Where | None = None) -> None:
        """Discard what the chosen directions carry (a silent store or partition).
        Connections that lost bytes are reset when the stall ends. With ``where``,
        only the connections (open or new) whose client address it accepts."""
        if not (up or down):
            raise ValueError("stall at least one direction")
        self._set(ProxyMode(stall_up=up, stall_down=down, where=where))

    def refuse(self) -> None:
        """Stop listening: new connections are refused, open ones keep working."""
        self._set(ProxyMode(refusing=True))

    def reset(self, *, where: Where | None = None) -> None:
        """Abort every open connection (with ``where``: those whose client address it
        accepts) with a TCP RST on both sides."""
        if where is None:
            self._call(self._abort_all)
            return

        def abort_chosen() -> None:
            for pipe in list(self._pipes):
                if _judge(where, pipe.client_address):
                    pipe.abort()
                    self._pipes.discard(pipe)

        self._call(abort_chosen)

    def retarget(self, upstream_host: str, upstream_port: int) -> None:
        """Send new connections to another loopback upstream and reset the open ones:
        a failover, as clients see it when the service address moves to a new primary."""
        if not _is_loopback(upstream_host):
            raise ValueError(f"FaultProxy forwards to loopback only, not {upstream_host!r}")

        def move() -> None:
            self.upstream = (upstream_host, upstream_port)
            self._abort_all()

        self._call(move)

    def _set(self, mode: ProxyMode) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("the proxy is not running (use start() or `with`)")
        # Returns once the mode is in force, listening socket included.
        future = asyncio.run_coroutine_threadsafe(self._apply(mode), loop)
        future.result(_CONTROL_TIMEOUT)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            return self
        ready: list[BaseException | None] = []
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
                ready.append(None)
            except BaseException as exc:
                ready.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="leasehold-faultproxy", daemon=True)
        self._thread.start()
        if not started.wait(_CONTROL_TIMEOUT) or ready[0] is not None:
            self._thread = None
            raise RuntimeError(f"FaultProxy could not listen: {ready[0] if ready else 'timeout'}")
        return self

    def close(self) -> None:
        """Stop listening, abort every connection and end the proxy's thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CONTROL_TIMEOUT)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> FaultProxy:
        # Starting binds a socket and starts a thread: quick, no network waits.
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        port = self._listen_port or "?"
        return (
            f"<FaultProxy 127.0.0.1:{port} -> {self.upstream[0]}:{self.upstream[1]}"
            f" mode={self._mode.name}>"
        )

    # -- inside the proxy's loop -------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("the proxy is not running (use start() or `with`)")
        if threading.current_thread() is self._thread:
            return fn()

        async def run() -> _T:
            return fn()

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        return future.result(_CONTROL_TIMEOUT)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._listen_port, reuse_address=True
        )
        self._listen_port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, mode: ProxyMode) -> None:
        if mode.where is not None:
            # Judge the open connections now, before the mode is in force, so the
            # stall covers them from the next byte on (a raising predicate aborts).
            for pipe in list(self._pipes):
                try:
                    pipe.stalled(mode)
                except Exception:
                    pipe.abort()
        before, self._mode = self._mode, mode
        if before.stall_up or before.stall_down:
            for pipe in list(self._pipes):
                if pipe.torn:
                    pipe.abort()
        if mode.refusing and self._server is not None:
            self._server.close()
            self._server = None
        elif not mode.refusing and self._server is None:
            await self._listen()

    def _abort_all(self) -> None:
        for pipe in list(self._pipes):
            pipe.abort()
        self._pipes.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count("accepted")
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        pipe: _Pipe | None = None
        try:
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5.0)
            except (OSError, TimeoutError):
                self._count("refused_upstream")
                return
            pipe = _Pipe(self, (reader, writer), upstream)
            mode = self._mode
            if mode.where is not None:
                try:
                    pipe.stalled(mode)  # judged on accept, before any byte flows
                except Exception:
                    return
            self._pipes.add(pipe)
            pipe.start()
            await asyncio.gather(*pipe.tasks, return_exceptions=True)
        finally:
            # Every path closes both sockets, a cancellation at close() included
            # (an unclosed socket is a ResourceWarning in the user's test run).
            if pipe is not None:
                self._pipes.discard(pipe)
                for task in pipe.tasks:
                    task.cancel()
            writer.transport.abort()
            if upstream is not None:
                upstream[1].transport.abort()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        pipes = list(self._pipes)
        self._abort_all()
        tasks = [task for pipe in pipes for task in pipe.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Let the accept handlers finish closing their transports.
        await asyncio.sleep(0)
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        # Aborted transports close their sockets in callbacks: let those run before
        # the loop closes.
        for _ in range(3):
            await asyncio.sleep(0)
