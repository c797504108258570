"""leasehold.testing.FaultProxy: each mode does what it says, switched while running,
from sync and asyncio code. The upstream is a tiny echo server on loopback (and a
real redis-server for the "users put it in front of their store" case)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from leasehold.testing import FaultProxy


class EchoServer:
    """Echoes every byte back; counts the bytes it received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.received = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.received += len(data)
            try:
                conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for conn in self._conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


def roundtrip(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        started = time.monotonic()
        conn.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, time.monotonic() - started


def test_refuses_a_non_loopback_upstream() -> None:
    for host in ("10.0.0.1", "example.com", "0.0.0.0", "192.168.1.1"):
        with pytest.raises(ValueError, match="loopback"):
            FaultProxy(host, 6379)
    FaultProxy("127.0.0.2", 6379)  # all of 127/8 is loopback
    FaultProxy("::1", 6379)
    FaultProxy("localhost", 6379)


def test_passes_bytes_through(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        assert proxy.host == "127.0.0.1"
        data, _ = roundtrip(proxy.port, b"x" * 200_000)
        assert data == b"x" * 200_000
        assert proxy.statistics()["accepted"] == 1
        assert proxy.mode.name == "pass"


def test_delays_each_direction_separately(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        _, fast = roundtrip(proxy.port)
        proxy.delay(up=0.3)
        data, slow_up = roundtrip(proxy.port)
        assert data == b"ping"
        proxy.delay(down=0.5)
        _, slow_down = roundtrip(proxy.port)
        proxy.delay(up=0.2, down=0.2)
        _, both = roundtrip(proxy.port)
    assert fast < 0.2
    assert 0.3 <= slow_up < 1.5
    assert 0.5 <= slow_down < 1.7
    assert 0.4 <= both < 1.6


def test_delay_keeps_byte_order(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.delay(up=0.2, down=0.1)
        with socket.create_connection(proxy.address, timeout=5) as conn:
            expected = b""
            for index in range(20):
                piece = f"<{index}>".encode()
                expected += piece
                conn.sendall(piece)
                if index == 10:
                    proxy.delay(up=0.0)  # later chunks must still not overtake
            data = b""
            while len(data) < len(expected):
                data += conn.recv(65536)
    assert data == expected


def test_stall_discards_then_resets_torn_connections(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        conn = socket.create_connection(proxy.address, timeout=5)
        idle = socket.create_connection(proxy.address, timeout=5)
        try:
            conn.sendall(b"a")
            assert conn.recv(10) == b"a"
            proxy.stall()
            conn.sendall(b"lost")  # the kernel accepts it; nothing comes back
            conn.settimeout(0.5)
            with pytest.raises(TimeoutError):
                conn.recv(10)
            assert echo.received == 1
            assert proxy.statistics()["discarded"] >= 4
            proxy.pass_through()
            # The stalled connection lost bytes, so it is reset; the idle one lives on.
            conn.settimeout(5)
            with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
                got = conn.recv(10)
                if got == b"":
                    raise ConnectionResetError("closed")
            idle.sendall(b"still here")
            assert idle.recv(100) == b"still here"
        finally:
            conn.close()
            idle.close()


def test_stall_of_one_direction_lets_requests_through(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as conn:
            proxy.stall(up=False, down=True)
            conn.sendall(b"commit")
            deadline = time.monotonic() + 5
            while echo.received < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert echo.received == 6  # the request reached the server...
            conn.settimeout(0.3)
            with pytest.raises(TimeoutError):
                conn.recv(10)  # ...its reply never comes back


def test_reset_aborts_every_connection(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        conns = [socket.create_connection(proxy.address, timeout=5) for _ in range(3)]
        try:
            for conn in conns:
                conn.sendall(b"x")
                assert conn.recv(1) == b"x"
            assert proxy.connections == 3
            proxy.reset()
            for conn in conns:
                with pytest.raises(ConnectionResetError):
                    got = conn.recv(1)
                    if got == b"":
                        raise ConnectionResetError("closed")
            # New connections still work: reset is an action, not a mode.
            assert roundtrip(proxy.port)[0] == b"ping"
        finally:
            for conn in conns:
                conn.close()


def test_refuse_new_connections_then_listen_again(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        port = proxy.port
        open_conn = socket.create_connection(proxy.address, timeout=5)
        try:
            open_conn.sendall(b"x")
            assert open_conn.recv(1) == b"x"  # accepted by the proxy, not just the kernel
            proxy.refuse()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(proxy.address, timeout=5).close()
            open_conn.sendall(b"y")
            assert open_conn.recv(1) == b"y"
            proxy.pass_through()
            assert proxy.port == port
            assert roundtrip(port)[0] == b"ping"
        finally:
            open_conn.close()


def test_rewrite_url_keeps_credentials_path_and_query(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        url = proxy.rewrite_url("redis://:s3cret@127.0.0.1:6379/2?socket_timeout=3")
        assert url == f"redis://:s3cret@127.0.0.1:{proxy.port}/2?socket_timeout=3"
        assert proxy.rewrite_url("postgresql://u@127.0.0.1:5432/db") == (
            f"postgresql://u@127.0.0.1:{proxy.port}/db"
        )
    with pytest.raises(RuntimeError, match="not"):
        proxy.stall()


def test_works_from_asyncio(echo: EchoServer) -> None:
    async def main() -> float:
        async with FaultProxy("127.0.0.1", echo.port) as proxy:
            proxy.delay(down=0.3)
            reader, writer = await asyncio.open_connection(*proxy.address)
            started = time.monotonic()
            writer.write(b"hello")
            await writer.drain()
            data = await asyncio.wait_for(reader.readexactly(5), 5)
            took = time.monotonic() - started
            assert data == b"hello"
            proxy.reset()
            with pytest.raises(ConnectionResetError):  # an RST, not a clean close
                await asyncio.wait_for(reader.read(10), 5)
            writer.close()
            return took

    assert 0.3 <= asyncio.run(main()) < 1.5


def test_in_front_of_a_real_redis(redis_server: object) -> None:
    import redis

    port = redis_server.port  # type: ignore[attr-defined]
    with FaultProxy("127.0.0.1", port) as proxy:
        client = redis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=0.5)
        try:
            assert client.ping()
            proxy.stall()
            with pytest.raises(redis.exceptions.TimeoutError):
                client.ping()
            proxy.pass_through()
            assert client.ping()  # redis-py reconnects after the reset
        finally:
            client.close()


def test_retarget_moves_new_connections_and_resets_open_ones(echo: EchoServer) -> None:
    second = EchoServer()
    try:
        with FaultProxy("127.0.0.1", echo.port) as proxy:
            conn = socket.create_connection(proxy.address, timeout=5)
            try:
                conn.sendall(b"1")
                assert conn.recv(1) == b"1"
                with pytest.raises(ValueError, match="loopback"):
                    proxy.retarget("10.1.1.1", second.port)
                proxy.retarget("127.0.0.1", second.port)
                with pytest.raises(ConnectionResetError):
                    got = conn.recv(1)
                    if got == b"":
                        raise ConnectionResetError("closed")
            finally:
                conn.close()
            before = second.received
            assert roundtrip(proxy.port, b"moved")[0] == b"moved"
            assert second.received == before + 5
    finally:
        second.close()


def test_the_documented_example_a_silent_store_loses_the_lease_at_its_deadline(
    redis_server: object,
) -> None:
    import leasehold

    port = redis_server.port  # type: ignore[attr-defined]
    with FaultProxy("127.0.0.1", port) as proxy:
        client = leasehold.Client(proxy.rewrite_url(f"redis://127.0.0.1:{port}/0"))
        try:
            lease = client.lock("faultproxy-doc-example", ttl=1).acquire(timeout=5)
            deadline = lease.deadline
            proxy.stall()
            assert lease.wait_lost(timeout=3)
            assert time.monotonic() >= deadline
            assert not lease.held
            proxy.pass_through()
        finally:
            client.close()


def test_stall_where_picks_connections_open_and_new(echo: EchoServer) -> None:
    """Only the connections the predicate accepts are stalled: one already open when
    the mode is set and one opened after; the others flow. Healing resets the torn
    ones only."""
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        chosen_old = socket.create_connection(proxy.address, timeout=5)
        spared = socket.create_connection(proxy.address, timeout=5)
        chosen_ports = {chosen_old.getsockname()[1]}
        seen: list[tuple[str, int]] = []

        def where(address: tuple[str, int]) -> bool:
            seen.append(address)
            return address[1] in chosen_ports

        try:
            for conn in (chosen_old, spared):
                conn.sendall(b"a")
                assert conn.recv(10) == b"a"
            proxy.stall(where=where)
            chosen_new = socket.socket()
            chosen_new.settimeout(5)
            chosen_new.bind(("127.0.0.1", 0))
            chosen_ports.add(chosen_new.getsockname()[1])
            chosen_new.connect(proxy.address)
            spared_new = socket.create_connection(proxy.address, timeout=5)
            for conn in (chosen_old, chosen_new):
                conn.sendall(b"lost")
                conn.settimeout(0.4)
                with pytest.raises(TimeoutError):
                    conn.recv(10)
            for conn in (spared, spared_new):
                conn.sendall(b"fine")
                assert conn.recv(10) == b"fine"
            # Judged once per connection for this mode, not once per chunk.
            assert sorted(p for _, p in seen) == sorted(
                c.getsockname()[1] for c in (chosen_old, spared, chosen_new, spared_new)
            )
            assert all(host == "127.0.0.1" for host, _ in seen)
            proxy.pass_through()
            for conn in (chosen_old, chosen_new):
                conn.settimeout(5)
                with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
                    if conn.recv(10) == b"":
                        raise ConnectionResetError("closed")
            spared.sendall(b"after")
            assert spared.recv(10) == b"after"
        finally:
            for conn in (chosen_old, spared):
                conn.close()
            for conn in (chosen_new, spared_new):
                conn.close()


def test_reset_where_aborts_only_the_chosen(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        doomed = socket.create_connection(proxy.address, timeout=5)
        kept = socket.create_connection(proxy.address, timeout=5)
        try:
            for conn in (doomed, kept):
                conn.sendall(b"x")
                assert conn.recv(1) == b"x"
            port = doomed.getsockname()[1]
            proxy.reset(where=lambda address: address[1] == port)
            with pytest.raises(ConnectionResetError):
                if doomed.recv(1) == b"":
                    raise ConnectionResetError("closed")
            kept.sendall(b"y")
            assert kept.recv(1) == b"y"
            assert proxy.mode.name == "pass"  # an action, not a mode
        finally:
            doomed.close()
            kept.close()


def test_a_predicate_that_raises_aborts_its_connection(echo: EchoServer) -> None:
    def broken(address: tuple[str, int]) -> bool:
        raise RuntimeError("no /proc here")

    with FaultProxy("127.0.0.1", echo.port) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as open_one:
            open_one.sendall(b"x")
            assert open_one.recv(1) == b"x"
            proxy.stall(where=broken)
            with pytest.raises(ConnectionResetError):
                if open_one.recv(1) == b"":
                    raise ConnectionResetError("closed")
        with socket.create_connection(proxy.address, timeout=5) as new_one:
            new_one.sendall(b"x")
            with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
                if new_one.recv(1) == b"":
                    raise ConnectionResetError("closed")
        proxy.pass_through()
        assert roundtrip(proxy.port)[0] == b"ping"
