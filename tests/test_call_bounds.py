"""Every call keeps its bound when the store stalls; lost and late replies (issue #21).

Real servers behind a tiny loopback forwarder (``_Forwarder`` below, private to this
file) that can stall (relay nothing while keeping every connection open: the
kernel still acknowledges, as with a hung server or pooler), delay the replies, or
drop one reply and reset its connection. Bounds are checked generously for a
loaded machine only where liveness is concerned: never a dead lease, never a
second holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import leasehold
from leasehold import AcquireTimeout, AsyncClient, Client, StoreMisconfigured, StoreUnavailable
from leasehold._core import defaults

# How far past its bound a call may return on a loaded machine (the library's own
# slack for acquire is max(0.5 s, 10 %)).
LOADED = 1.0


class _Forwarder:
    """127.0.0.1:port -> target, one thread per direction per connection.

    ``stall``: relay nothing (data waits) until it is cleared. ``reply_delay``:
    hold each server-to-client chunk that long. ``drop_next_reply``: swallow the
    next server-to-client chunk and reset both sides of that connection.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.stall = threading.Event()
        self.reply_delay = 0.0
        self.drop_next_reply = threading.Event()
        self.dropped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._guard = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._guard:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
                pumps = [
                    threading.Thread(target=self._pump, args=(client, server, False), daemon=True),
                    threading.Thread(target=self._pump, args=(server, client, True), daemon=True),
                ]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                # Bounded waits: a test that forgets to clear a stall ends at teardown.
                deadline = time.monotonic() + 120
                while self.stall.is_set() and not self._closed and time.monotonic() < deadline:
                    time.sleep(0.01)
                if replies and self.drop_next_reply.is_set():
                    self.drop_next_reply.clear()
                    for sock in (sink, source):
                        # SO_LINGER 0: close with a reset, as a failing middlebox does.
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        sock.close()
                    self.dropped.set()
                    return
                if replies and self.reply_delay:
                    time.sleep(self.reply_delay)
                sink.sendall(data)
        # One direction ended: the connection is over (neither protocol half-closes).
        for sock in (source, sink):
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.stall.clear()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self._acceptor.join(5)
        with self._guard:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(5)


def _proxied(url: str, port: int) -> str:
    return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", url, count=1)


def _port_of(url: str) -> int:
    found = re.search(r"127\.0\.0\.1:(\d+)", url)
    assert found is not None, url
    return int(found.group(1))


@pytest.fixture(params=["redis", "postgres"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, _Forwarder]]:
    """(a URL through a fresh forwarder, the forwarder) for each server backend."""
    server = request.getfixturevalue(f"{request.param}_server")
    forwarder = _Forwarder(("127.0.0.1", _port_of(server.url)))
    try:
        yield _proxied(server.url, forwarder.port), forwarder
    finally:
        forwarder.close()


def _with(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


def _elapsed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    try:
        result: Any = fn()
    except Exception as exc:
        result = exc
    return time.monotonic() - started, result


def _name(request: pytest.FixtureRequest) -> str:
    return "bound:" + request.node.name.replace("[", ":").replace("]", "")


# -- stalled store: every call keeps its bound ---------------------------------------


def test_sync_calls_keep_their_bounds_when_the_store_stalls(
    served: tuple[str, _Forwarder], request: pytest.FixtureRequest
) -> None:
    url, forwarder = served
    name = _name(request)
    with Client(url, operation_timeout=1.0) as client:
        held = client.lock(name, ttl=30).acquire(timeout=5)
        client.holders(name)  # connections are open and warm
        forwarder.stall.set()
        try:
            took, result = _elapsed(lambda: client.lock(name + ":2").acquire(timeout=1.0))
            assert isinstance(result, StoreUnavailable | AcquireTimeout), result
            assert took < 1.0 + 0.5 + LOADED, took
            for call in (
                lambda: client.lock(name + ":3").try_acquire(),
                lambda: client.holders(name),
                lambda: client.leases("bound:"),
                held.extend,
            ):
                took, result = _elapsed(call)
                assert isinstance(result, StoreUnavailable), result
                assert took < 1.0 + 0.5 + LOADED, took
            took, result = _elapsed(held.release)
            assert took < 1.0 + 0.5 + LOADED, took
        finally:
            forwarder.stall.clear()
        # The stalled connections were dropped, not reused: the next calls work.
        lease = client.lock(name + ":4").acquire(timeout=10)
        assert lease.held
        lease.release()


def test_async_calls_keep_their_bounds_when_the_store_stalls(
    served: tuple[str, _Forwarder], request: pytest.FixtureRequest
) -> None:
    url, forwarder = served
    name = _name(request)

    async def main() -> None:
        async with AsyncClient(url, operation_timeout=1.0) as client:
            held = await client.lock(name, ttl=30).acquire(timeout=5)
            await client.holders(name)
            forwarder.stall.set()
            try:
                for call in (
                    lambda: client.lock(name + ":2").acquire(timeout=1.0),
                    lambda: client.lock(name + ":3").try_acquire(),
                    lambda: client.holders(name),
                    held.extend,
                    held.release,
                ):
                    started = time.monotonic()
                    with contextlib.suppress(StoreUnavailable, AcquireTimeout):
                        await call()
                    took = time.monotonic() - started
                    assert took < 1.0 + 0.5 + LOADED, took
            finally:
                forwarder.stall.clear()
            lease = await client.lock(name + ":4").acquire(timeout=10)
            assert lease.held
            await lease.release()

    asyncio.run(main())


def test_acquire_keeps_its_own_timeout_below_the_operation_timeout(
    served: tuple[str, _Forwarder], request: pytest.FixtureRequest
) -> None:
    # operation_timeout 5 s (the default), acquire(timeout=1): 1 s is the bound.
    url, forwarder = served
    with Client(url) as client:
        assert client.operation_timeout == leasehold._deadline.DEFAULT_OPERATION_TIMEOUT
        client.holders("warm")
        forwarder.stall.set()
        try:
            took, result = _elapsed(lambda: client.lock(_name(request)).acquire(timeout=1.0))
        finally:
            forwarder.stall.clear()
        assert isinstance(result, StoreUnavailable | AcquireTimeout), result
        assert took < 1.0 + 0.5 + LOADED, took


def test_the_keeper_still_reports_loss_by_the_safe_deadline(
    served: tuple[str, _Forwarder], request: pytest.FixtureRequest
) -> None:
    url, forwarder = served
    with Client(url, operation_timeout=10.0) as client:
        lease = client.lock(_name(request), ttl=1.5).acquire(timeout=5)
        deadline = lease.deadline
        forwarder.stall.set()
        try:
            assert lease.wait_lost(timeout=10)
            lost_at = time.monotonic()
        finally:
            forwarder.stall.clear()
        assert lease.lost
        assert lost_at < deadline + 0.5, lost_at - deadline
        # The release after a loss does not wait for the store.
        took, _ = _elapsed(lease.release)
        assert took < 0.5, took


# -- lost replies are retried with the same token ---------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_lost_acquire_reply_is_retried_with_the_same_token(
    served: tuple[str, _Forwarder], flavour: str, request: pytest.FixtureRequest
) -> None:
    url, forwarder = served
    name = _name(request)
    with Client(url) as observer:
        if flavour == "sync":
            with Client(url) as client:
                client.lock(name + ":warm").acquire(timeout=10).release()
                forwarder.drop_next_reply.set()  # the reply to the acquire script
                lease = client.lock(name, ttl=30).acquire(timeout=10)
                assert forwarder.dropped.is_set()
                holders = observer.holders(name)
                lease.release()
        else:

            async def main() -> tuple[Any, Any]:
                async with AsyncClient(url) as client:
                    await (await client.lock(name + ":warm").acquire(timeout=10)).release()
                    forwarder.drop_next_reply.set()  # the reply to the acquire script
                    lease = await client.lock(name, ttl=30).acquire(timeout=10)
                    holders = observer.holders(name)
                    await lease.release()
                    return lease, holders

            lease, holders = asyncio.run(main())
            assert forwarder.dropped.is_set()
        # One grant, the one made for this caller: the retry found its own token.
        assert [info.fence for info in holders] == [lease.fence]
        assert observer.holders(name) == []


def test_a_caller_that_gives_up_releases_its_unanswered_grant(
    served: tuple[str, _Forwarder], request: pytest.FixtureRequest
) -> None:
    # Every reply lost until the caller's deadline: the grant made for it must not
    # keep the others out for its ttl once the store answers again.
    url, forwarder = served
    name = _name(request)
    with Client(url) as client:
        client.holders("warm")
        forwarder.reply_delay = 3.0
        took, result = _elapsed(lambda: client.lock(name, ttl=60).acquire(timeout=1.0))
        forwarder.reply_delay = 0.0
        assert isinstance(result, StoreUnavailable | AcquireTimeout), result
        assert took < 1.0 + 0.5 + LOADED, took
    with Client(_direct(request, url)) as other:
        give_up = time.monotonic() + 15
        while other.holders(name) and time.monotonic() < give_up:
            time.sleep(0.1)
        assert other.holders(name) == []  # well before the 60 s ttl


def _direct(request: pytest.FixtureRequest, url: str) -> str:
    backend = "redis" if url.startswith("redis") else "postgres"
    server: Any = request.getfixturevalue(f"{backend}_server")
    return str(server.url)


# -- no dead lease reaches user code ---------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_grant_answered_after_its_safe_deadline_is_not_returned(
    served: tuple[str, _Forwarder], flavour: str, request: pytest.FixtureRequest
) -> None:
    url, forwarder = served
    name = _name(request)
    ttl = 1.0
    entered: list[bool] = []
    with Client(url, operation_timeout=5.0) as client:
        client.holders("warm")
        if flavour == "sync":
            forwarder.reply_delay = 1.5 * ttl
        try:
            if flavour == "sync":
                took, result = _elapsed(lambda: client.lock(name, ttl=ttl).acquire(timeout=3.0))
                assert isinstance(result, AcquireTimeout | StoreUnavailable), result

                def body() -> None:
                    with client.lock(name, ttl=ttl) as lease:
                        entered.append(lease.held)

                # Every grant it gets is answered past its safe deadline, so the body
                # never runs: the acquire fails, or is still asking after 6 s (a
                # reply that beats the operation timeout makes it retry for ever).
                with contextlib.suppress(
                    TimeoutError, leasehold.LeaseLost, StoreUnavailable, AcquireTimeout
                ):
                    _run_for(body, 6.0)
            else:

                async def main() -> tuple[float, Any]:
                    async with AsyncClient(url, operation_timeout=5.0) as aclient:
                        await aclient.holders("warm")
                        forwarder.reply_delay = 1.5 * ttl
                        started = time.monotonic()
                        try:
                            result: Any = await aclient.lock(name, ttl=ttl).acquire(timeout=3.0)
                        except (AcquireTimeout, StoreUnavailable) as exc:
                            result = exc
                        took = time.monotonic() - started

                        async def body() -> None:
                            async with aclient.lock(name, ttl=ttl) as lease:
                                entered.append(lease.held)

                        with contextlib.suppress(
                            TimeoutError, leasehold.LeaseLost, StoreUnavailable, AcquireTimeout
                        ):
                            await asyncio.wait_for(body(), 6.0)
                        return took, result

                took, result = asyncio.run(main())
                assert isinstance(result, AcquireTimeout | StoreUnavailable), result
        finally:
            forwarder.reply_delay = 0.0
        assert took < 3.0 + 0.5 + 1.5 * ttl + LOADED, took
        assert entered == [], "a body ran under a lease answered past its safe deadline"


def _run_for(fn: Callable[[], None], seconds: float) -> None:
    """Run ``fn`` on a thread; raise what it raised, or TimeoutError after ``seconds``
    (it keeps running in the background, bounded by its own calls)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise TimeoutError


def test_a_lease_entered_after_its_deadline_never_runs_the_body(tmp_path: Path) -> None:
    clock = leasehold.FakeClock()
    with Client(f"sqlite:///{tmp_path / 'x.db'}", clock=clock) as client:
        lease = client.lock("late-body", ttl=10, renew=False).acquire()
        clock.advance(11)
        ran = []
        with pytest.raises(leasehold.LeaseLost):
            with lease:
                ran.append(True)
        assert ran == []
        assert lease.lost

    async def main() -> None:
        async with AsyncClient(f"sqlite:///{tmp_path / 'y.db'}", clock=clock) as aclient:
            alease = await aclient.lock("late-body", ttl=10, renew=False).acquire()
            clock.advance(11)
            aran = []
            with pytest.raises(leasehold.LeaseLost):
                async with alease:
                    aran.append(True)  # code before any await must not run either
            assert aran == []

    asyncio.run(main())


# -- SQLite: a stopped writer is a stall too -----------------------------------------


@pytest.mark.parametrize("restarts", [True, False], ids=["restarts", "control-stays-down"])
def test_the_deadline_watchdog_starts_again_if_its_thread_ends(
    monkeypatch: pytest.MonkeyPatch, restarts: bool
) -> None:
    """The watchdog notes that its thread runs in a flag (cheaper than
    Thread.is_alive() on every armed call): a thread that ever ends clears it, and
    the next armed call starts another. The control keeps the flag set, as a thread
    that died without saying so would: then no deadline is acted on any more."""
    from leasehold import _deadline

    watchdog = _deadline._Watchdog()
    monkeypatch.setattr(_deadline, "_WATCHDOG", watchdog)
    real_watch = _deadline._Watchdog._watch
    ended: list[bool] = []

    def ends_once(self: Any) -> None:
        if not ended:
            ended.append(True)
            return  # the first thread ends at once
        real_watch(self)

    monkeypatch.setattr(_deadline._Watchdog, "_watch", ends_once)
    if not restarts:
        monkeypatch.setattr(_deadline._Watchdog, "_run", lambda self: self._watch())
    first, second = socket.socketpair()
    with contextlib.closing(first), contextlib.closing(second):
        with _deadline.bounded(5.0):
            _deadline.attach(first.fileno())
            thread = watchdog._thread
            assert thread is not None
            thread.join(5.0)
            assert not thread.is_alive()
            _deadline.detach(first.fileno())
        second.settimeout(2.0)
        with _deadline.bounded(0.1):
            _deadline.attach(second.fileno())
            try:
                got: bytes | None = second.recv(1)  # b"" once shut down
            except TimeoutError:
                got = None
    if restarts:
        assert got == b"", "the deadline passed and no watchdog shut the socket down"
    else:
        assert got is None, "the control should leave the socket open"


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_sqlite_calls_keep_the_operation_timeout_under_a_held_write_lock(
    tmp_path: Path, flavour: str
) -> None:
    path = tmp_path / "stalled.db"
    url = f"sqlite:///{path}?operation_timeout=0.5"
    with Client(url) as client:
        client.lock("warm").acquire().release()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # as a process stopped mid-transaction would
    try:
        if flavour == "sync":
            with Client(url) as client:
                took, result = _elapsed(lambda: client.lock("x").try_acquire())
        else:

            async def main() -> tuple[float, Any]:
                async with AsyncClient(url) as aclient:
                    started = time.monotonic()
                    try:
                        result: Any = await aclient.lock("x").try_acquire()
                    except StoreUnavailable as exc:
                        result = exc
                    return time.monotonic() - started, result

            took, result = asyncio.run(main())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert isinstance(result, StoreUnavailable), result
    # Retried within the operation timeout, not the 10 s busy_timeout.
    assert took < 0.5 + 0.5 + LOADED, took


# -- misconfiguration is not an outage -------------------------------------------------


def test_an_unknown_postgres_database_is_misconfiguration(postgres_server: Any) -> None:
    url = str(postgres_server.url)
    base, _, _ = url.rpartition("/")
    with Client(f"{base}/no_such_database_here") as client:
        took, result = _elapsed(lambda: client.lock("x").acquire(timeout=10))
    assert isinstance(result, StoreMisconfigured), result
    assert took < 2.0 + LOADED, took  # at once, not after the 10 s timeout


def test_a_missing_schema_without_create_schema_is_misconfiguration(
    postgres_server: Any,
) -> None:
    url = _with(str(postgres_server.url), "schema=lh_never_made&create_schema=false")
    with Client(url) as client:
        took, result = _elapsed(lambda: client.lock("x").acquire(timeout=10))
    assert isinstance(result, StoreMisconfigured), result
    assert "create_schema" in str(result)
    assert took < 2.0 + LOADED, took


def test_a_wrong_redis_password_is_misconfiguration(redis_server: Any) -> None:
    del redis_server  # only to skip (or fail) like the others without redis-server
    from tests.servers.redis import RedisServer

    with RedisServer(password="the-right-one") as server:
        wrong = _proxied("redis://:not-the-password-s3cret@127.0.0.1:1/0", server.port)
        with Client(wrong) as client:
            took, result = _elapsed(lambda: client.lock("x").acquire(timeout=10))
    assert isinstance(result, StoreMisconfigured), result
    assert "not-the-password-s3cret" not in str(result)
    assert took < 2.0 + LOADED, took


def test_a_redis_database_out_of_range_is_misconfiguration(redis_server: Any) -> None:
    url = str(redis_server.url).split("?")[0].rstrip("/")
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    with Client(f"{base}/9999") as client:
        took, result = _elapsed(lambda: client.lock("x").try_acquire())
    assert isinstance(result, StoreMisconfigured), result
    assert took < 2.0 + LOADED, took


def test_the_asgi_lifespan_fails_fast_on_misconfiguration(postgres_server: Any) -> None:
    from leasehold.asgi import lifespan

    base = str(postgres_server.url).rpartition("/")[0]
    span = lifespan(f"{base}/no_such_database_here", leader=lambda lease: asyncio.sleep(0))

    async def main() -> None:
        async with span(object()):
            pass

    started = time.monotonic()
    with pytest.raises(StoreMisconfigured):
        asyncio.run(main())
    assert time.monotonic() - started < 5


def test_the_integrations_refuse_the_host_local_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from leasehold.asgi import lifespan
    from leasehold.celery import client_for

    monkeypatch.delenv(defaults.ENV_URL, raising=False)
    span = lifespan()

    async def main() -> None:
        async with span(object()):
            pass

    with pytest.raises(leasehold.InvalidArgument, match="LEASEHOLD_URL"):
        asyncio.run(main())
    with pytest.raises(leasehold.InvalidArgument, match="LEASEHOLD_URL"):
        client_for(None)


def test_the_library_warns_once_about_the_host_local_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(defaults.ENV_URL, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(defaults, "_warned_default", False)
    with caplog.at_level(logging.WARNING, logger="leasehold"):
        Client().close()
        Client().close()
    warnings = [r for r in caplog.records if "local to this host" in r.getMessage()]
    assert len(warnings) == 1
    assert str(tmp_path / "leasehold" / "leasehold.db") in warnings[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(defaults, "_warned_default", False)
    with caplog.at_level(logging.WARNING, logger="leasehold"):
        Client(f"sqlite:///{tmp_path / 'explicit.db'}").close()
    assert not [r for r in caplog.records if "local to this host" in r.getMessage()]


# -- the option ------------------------------------------------------------------------


def test_operation_timeout_option() -> None:
    assert Client("memory://ot?operation_timeout=1.5").operation_timeout == 1.5
    assert Client("memory://ot", operation_timeout=2).operation_timeout == 2.0
    # The argument wins over the URL; the URL keeps the backend's own options.
    assert Client("memory://ot?operation_timeout=1.5", operation_timeout=3).operation_timeout == 3
    with pytest.raises(leasehold.InvalidArgument, match="operation_timeout"):
        Client("memory://ot?operation_timeout=soon")
    with pytest.raises(leasehold.InvalidArgument, match="operation_timeout"):
        Client("memory://ot", operation_timeout=0)
    assert issubclass(StoreMisconfigured, StoreUnavailable)


def test_leasehold_leader_fails_fast_on_misconfiguration(postgres_server: Any) -> None:
    import subprocess
    import sys

    base = str(postgres_server.url).rpartition("/")[0]
    started = time.monotonic()
    command = [sys.executable, "-m", "leasehold", "--url", f"{base}/no_such_database_here"]
    command += ["leader", "bound-leader", "--", sys.executable, "-c", "pass"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 69, done.stderr
    assert "misconfigured" in done.stderr
    assert time.monotonic() - started < 15  # at once (process start-up included)


# -- stalls by SIGSTOP: Redis Cluster, pgbouncer ----------------------------------------


@contextlib.contextmanager
def _stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP the given processes (which this test started) for the block."""
    import os
    import signal

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_cluster_calls_keep_their_bounds_when_every_node_stops(
    redis_cluster: Any, request: pytest.FixtureRequest
) -> None:
    name = _name(request)
    pids = [node.pid for node in redis_cluster.nodes]
    assert all(pids)
    with Client(_with(redis_cluster.url, "operation_timeout=0.5")) as client:
        lease = client.lock(name, ttl=30).acquire(timeout=10)
        with _stopped(pids):
            for call in (
                lambda: client.lock(name + ":2").acquire(timeout=0.5),
                lambda: client.lock(name + ":3").try_acquire(),
                lambda: client.holders(name),
            ):
                took, result = _elapsed(call)
                assert isinstance(result, StoreUnavailable | AcquireTimeout), result
                assert took < 0.5 + 0.5 + LOADED, took
        lease.release()
        redis_cluster.wait_ok()
        again = client.lock(name + ":4").acquire(timeout=15)
        assert again.held
        again.release()


def test_pooler_mode_calls_keep_their_bounds_when_pgbouncer_stops(
    postgres_server: Any, request: pytest.FixtureRequest
) -> None:
    from tests.servers.postgres import PgBouncer, pgbouncer_binary

    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (optional: apt-get install pgbouncer)")
    name = _name(request)
    with PgBouncer(postgres_server, pool_mode="transaction", pool_size=2) as bouncer:
        url = bouncer.url + "?pooler=transaction&schema=bounds_bounced&operation_timeout=1"
        proc = bouncer._proc
        assert proc is not None
        with Client(url) as client:
            lease = client.lock(name, ttl=30).acquire(timeout=10)

            async def async_calls() -> list[float]:
                async with AsyncClient(url) as aclient:
                    await aclient.holders(name)
                    took = []
                    with _stopped([proc.pid]):
                        for call in (
                            lambda: aclient.lock(name + ":a").acquire(timeout=1),
                            lambda: aclient.holders(name),
                        ):
                            started = time.monotonic()
                            with contextlib.suppress(StoreUnavailable, AcquireTimeout):
                                await call()
                            took.append(time.monotonic() - started)
                    return took

            with _stopped([proc.pid]):
                for call in (
                    lambda: client.lock(name + ":2").acquire(timeout=1),
                    lambda: client.lock(name + ":3").try_acquire(),
                    lambda: client.holders(name),
                    lease.extend,
                ):
                    took, result = _elapsed(call)
                    assert isinstance(result, StoreUnavailable | AcquireTimeout), result
                    assert took < 1 + 0.5 + LOADED, took
            for took in asyncio.run(async_calls()):
                assert took < 1 + 0.5 + LOADED, took
            lease.release()
            again = client.lock(name + ":4").acquire(timeout=15)
            assert again.held
            again.release()


def test_primitives_keep_the_operation_timeout_when_the_store_stalls(
    served: tuple[str, _Forwarder], request: pytest.FixtureRequest
) -> None:
    url, forwarder = served
    name = _name(request)
    with Client(url, operation_timeout=1.0) as client:
        room = client.presence(name)
        election = client.election(name + ":e")
        once = client.once(name + ":o", timeout=1.0)
        room.members()
        forwarder.stall.set()
        try:
            for call in (
                room.members,
                lambda: once.run(lambda: 1),
                lambda: election.campaign(timeout=1.0),
                election.leader,
            ):
                took, result = _elapsed(call)
                assert isinstance(result, StoreUnavailable | AcquireTimeout), result
                assert took < 1.0 + 0.5 + LOADED, (call, took)
        finally:
            forwarder.stall.clear()


def test_a_failed_tls_verification_is_misconfiguration(redis_server: Any, tmp_path: Path) -> None:
    del redis_server  # only to skip (or fail) like the others without redis-server
    from tests.servers.redis import RedisServer, make_tls_files, openssl_binary

    if openssl_binary() is None:
        pytest.skip("openssl is not installed")
    other_ca = make_tls_files(tmp_path / "other", name="other").ca_cert
    with RedisServer(tls=True) as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={other_ca}"
        with Client(url) as client:
            took, result = _elapsed(lambda: client.lock("x").acquire(timeout=10))
    assert isinstance(result, StoreMisconfigured), result
    assert "TLS" in str(result)
    assert took < 2.0 + LOADED, took


def test_a_read_only_redis_replica_is_misconfiguration(redis_server: Any) -> None:
    from tests.servers.redis import RedisServer

    # A replica of a primary that is not there: it answers, and refuses writes.
    primary_port = _port_of(str(redis_server.url))
    with RedisServer(extra_config=[f"replicaof 127.0.0.1 {primary_port}"]) as replica:
        with Client(f"redis://127.0.0.1:{replica.port}/0") as client:
            took, result = _elapsed(lambda: client.lock("x").acquire(timeout=10))
    assert isinstance(result, StoreMisconfigured), result
    assert "read-only" in str(result)
    assert took < 2.0 + LOADED, took


def test_a_read_only_postgres_session_is_misconfiguration(postgres_server: Any) -> None:
    # As on a hot standby: every write is refused with SQLSTATE 25006.
    read_only = "options=-c%20default_transaction_read_only%3Don&schema=lh_read_only"
    with Client(_with(str(postgres_server.url), read_only)) as client:
        took, result = _elapsed(lambda: client.lock("x").acquire(timeout=10))
    assert isinstance(result, StoreMisconfigured), result
    assert took < 2.0 + LOADED, took


def test_the_cli_keeps_its_default_silently(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != defaults.ENV_URL}
    env["XDG_STATE_HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "leasehold", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "local to this host" not in done.stderr
    assert (tmp_path / "leasehold" / "leasehold.db").exists()


def test_celery_workers_check_their_stores_at_startup(
    postgres_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery  # type: ignore[import-untyped]

    from leasehold.celery import LeaderScheduler, SingletonTask, check_startup

    monkeypatch.delenv(defaults.ENV_URL, raising=False)
    base = str(postgres_server.url).rpartition("/")[0]
    app = Celery("lh_bounds_check", broker="memory://", set_as_current=False)

    @app.task(base=SingletonTask, lock_key="k", shared=False)
    def job() -> None:
        pass

    # No URL anywhere: refused (the host-local default would split the fleet).
    with pytest.raises(leasehold.InvalidArgument, match="leasehold_url"):
        check_startup(app)
    with pytest.raises(leasehold.InvalidArgument, match="leasehold_url"):
        LeaderScheduler(app)
    # A store that rejects the configuration: the worker does not start.
    app.conf.leasehold_url = f"{base}/no_such_database_here"
    started = time.monotonic()
    with pytest.raises(StoreMisconfigured):
        check_startup(app)
    assert time.monotonic() - started < 2.0 + LOADED
    # A good one passes.
    app.conf.leasehold_url = str(postgres_server.url)
    check_startup(app)


def test_closing_a_client_takes_one_operation_timeout_for_all_its_leases(
    served: tuple[str, _Forwarder], request: pytest.FixtureRequest
) -> None:
    url, forwarder = served
    name = _name(request)
    client = Client(url, operation_timeout=1.0)
    leases = [client.lock(f"{name}:{i}", ttl=30).acquire(timeout=5) for i in range(4)]
    forwarder.stall.set()
    try:
        took, result = _elapsed(client.close)
    finally:
        forwarder.stall.clear()
    assert result is None, result
    # One operation timeout for the releases (not 4 x 1 s), then a little to stop
    # a connection pool whose workers may be connecting to the stalled server.
    assert took < 1.0 + 0.5 + LOADED, took
    assert all(lease.released for lease in leases)


def test_a_file_that_is_not_a_sqlite_database_is_misconfiguration(tmp_path: Path) -> None:
    path = tmp_path / "not-a-database.db"
    path.write_bytes(b"this is no SQLite database, and waiting will not make it one" * 100)
    with Client(f"sqlite:///{path}") as client:
        took, result = _elapsed(lambda: client.lock("x").acquire(timeout=10))
    assert isinstance(result, StoreMisconfigured), result
    assert took < 2.0 + LOADED, took
