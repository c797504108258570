"""Stores behind fault proxies: what a scenario needs to know about one backend.

A ``Target`` hands out *paths*: one client's way to the store, through proxies the
scenario can stall, slow or reset. To add a backend (etcd, say) write a function that
starts its server (or takes a session fixture) and returns a ``Target``, and add it to
``TARGETS`` in tests/faults/conftest.py; every scenario then runs on it.

- ``isolated``: each path has its own proxies, so one client can be cut off while
  the others still reach the store (Redis, PostgreSQL). A Redis Cluster tells its
  clients where each node is (CLUSTER SLOTS), so its nodes announce the proxies'
  ports and every client shares one set of proxies: a fault there hits every client
  at once, and scenarios that need one client cut off alone skip it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leasehold.testing import FaultProxy


@dataclass
class Route:
    """One client's way to the store: a URL and the proxies it goes through."""

    url: str
    proxies: list[FaultProxy]
    owned: bool = True  # made for one client of one trial; False: shared (a cluster's)

    def close(self) -> None:
        """End of the trial: close proxies of its own, heal shared ones."""
        for proxy in self.proxies:
            if self.owned:
                proxy.close()
            else:
                proxy.pass_through()

    def pass_through(self) -> None:
        for proxy in self.proxies:
            proxy.pass_through()

    def stall(self, up: bool = True, down: bool = True) -> None:
        for proxy in self.proxies:
            proxy.stall(up=up, down=down)

    def delay(self, up: float = 0.0, down: float = 0.0) -> None:
        for proxy in self.proxies:
            proxy.delay(up=up, down=down)

    def reset(self) -> None:
        for proxy in self.proxies:
            proxy.reset()


@dataclass
class Target:
    name: str
    isolated: bool
    direct_url: str
    new_path: Callable[[], Route]
    clock_step: Callable[[float], None] | None = None  # step the server's wall clock
    close: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    # The lease TTL its scenarios use, when the suite's default is too short for it.
    ttl: float | None = None


class ProxyPool:
    """Proxies made for one target, all closed at the end."""

    def __init__(self) -> None:
        self.proxies: list[FaultProxy] = []

    def new(self, port: int) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", port).start()
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        self.proxies.clear()


def single_server_target(name: str, url: str, port: int, pool: ProxyPool) -> Target:
    """Redis, PostgreSQL and any other one-address store: a proxy per path."""

    def new_path() -> Route:
        proxy = pool.new(port)
        return Route(proxy.rewrite_url(url), [proxy])

    return Target(name=name, isolated=True, direct_url=url, new_path=new_path, close=pool.close)


def _admin(node: Any, *args: Any) -> Any:
    client = node.client(socket_timeout=5, socket_connect_timeout=2)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def cluster_target(cluster: Any, pool: ProxyPool) -> Target:
    """A Redis Cluster whose nodes announce proxy ports (see the module docstring)."""
    proxies = [pool.new(node.port) for node in cluster.nodes]
    for node, proxy in zip(cluster.nodes, proxies, strict=True):
        _admin(node, "CONFIG", "SET", "cluster-announce-port", str(proxy.port))
    wanted = {proxy.port for proxy in proxies}
    deadline = time.monotonic() + 30
    while True:
        seen = [
            {int(entry[2][1]) for entry in _admin(node, "CLUSTER", "SLOTS")}
            for node in cluster.nodes
        ]
        if all(ports == wanted for ports in seen):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster nodes still announce {seen}, not {wanted}")
        time.sleep(0.1)
    url = f"redis+cluster://127.0.0.1:{proxies[0].port}"
    shared = Route(url, proxies, owned=False)

    def restore() -> None:
        for node in cluster.nodes:
            with contextlib.suppress(Exception):
                _admin(node, "CONFIG", "SET", "cluster-announce-port", "0")
        pool.close()

    return Target(
        name="redis-cluster",
        isolated=False,
        direct_url=url,
        new_path=lambda: shared,
        close=restore,
        notes=["every client shares the nodes' proxies: faults hit all clients at once"],
    )


# -- a Redis server whose wall clock the test can step --------------------------------

SHIM_SOURCE = Path(__file__).with_name("clockshim.c")


def build_clock_shim(directory: Path) -> Path | None:
    """Compile clockshim.c into ``directory``; None when gcc is not installed."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    output = directory / "leasehold_clockshim.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(output), str(SHIM_SOURCE), "-ldl"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return output


class ClockStepper:
    """Writes the offset file the shim maps (8 bytes, signed nanoseconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        path.write_bytes(struct.pack("=q", 0))

    def step(self, seconds: float) -> None:
        self.offset += seconds
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("=q", int(self.offset * 1e9)), 0)
        finally:
            os.close(fd)


@contextlib.contextmanager
def clock_shifted_redis(shim: Path) -> Iterator[tuple[Any, ClockStepper]]:
    """A redis-server (tests/servers/redis.py) started under the shim."""
    from tests.servers.redis import RedisServer

    directory = Path(tempfile.mkdtemp(prefix="leasehold-clock-"))
    stepper = ClockStepper(directory / "offset")

    class ShiftedRedis(RedisServer):
        def _command(self) -> list[str]:
            return [
                "env",
                f"LD_PRELOAD={shim}",
                f"LEASEHOLD_CLOCK_OFFSET_FILE={stepper.path}",
                *super()._command(),
            ]

    server = ShiftedRedis()
    try:
        server.start()
        client = server.client()
        try:
            before = float(client.time()[0])
            stepper.step(1000.0)
            moved = float(client.time()[0]) - before
            stepper.step(-1000.0)
        finally:
            client.close()
        if not 990 < moved < 1010:
            raise RuntimeError(f"the clock shim did not move redis-server's clock ({moved} s)")
        yield server, stepper
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
