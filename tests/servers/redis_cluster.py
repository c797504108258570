"""A throwaway Redis Cluster for tests: N masters on random loopback ports, no replicas.

Each master is a ``RedisServer`` (its own process, temp dir and ports, nothing
persisted but the cluster's own ``nodes.conf``). ``start()`` splits the 16,384
slots evenly (``CLUSTER ADDSLOTSRANGE``), joins the nodes (``CLUSTER MEET``) and
waits until every node reports ``cluster_state:ok`` and knows every slot's owner.
Only the processes this object started are ever signalled.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from tests.servers.redis import RedisServer

SLOTS = 16384


class RedisClusterServers:
    """``masters`` redis-server processes forming one cluster (see the module docstring)."""

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 2000) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        # cluster-node-timeout bounds how long a node that is down (say, being
        # restarted) may go unnoticed; nothing here waits for it to expire.
        self.nodes = [
            RedisServer(cluster=True, extra_config=[f"cluster-node-timeout {node_timeout_ms}"])
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL with the first node as the seed."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> None:
        try:
            for node in self.nodes:
                node.start()
            share = SLOTS // len(self.nodes)
            for index, node in enumerate(self.nodes):
                first = index * share
                last = SLOTS - 1 if index == len(self.nodes) - 1 else first + share - 1
                self._admin(node, "CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                self._admin(self.nodes[0], "CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
            self.wait_ok(timeout)
        except BaseException:
            self.cleanup()
            raise

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node says the cluster is ok and maps all slots to the
        nodes of this cluster."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._settled(node) for node in self.nodes):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(node.log() for node in self.nodes)
                raise RuntimeError(f"the cluster did not become ok; logs:\n{logs}")
            time.sleep(0.05)

    def _settled(self, node: RedisServer) -> bool:
        try:
            info = self._admin(node, "CLUSTER", "INFO")
            slots = self._admin(node, "CLUSTER", "SLOTS")
        except Exception:
            return False
        if "cluster_state:ok" not in str(info):
            return False
        owners = {int(entry[2][1]) for entry in slots}
        covered = sum(int(entry[1]) - int(entry[0]) + 1 for entry in slots)
        return covered == SLOTS and owners == {peer.port for peer in self.nodes}

    def _admin(self, node: RedisServer, *args: Any) -> Any:
        client = node.client(socket_timeout=5, socket_connect_timeout=2)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def owner_of(self, key: str) -> RedisServer:
        """The node that owns ``key``'s slot."""
        slot = int(self._admin(self.nodes[0], "CLUSTER", "KEYSLOT", key))
        for entry in self._admin(self.nodes[0], "CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                port = int(entry[2][1])
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node owns slot {slot}")

    def restart(self, node: RedisServer, timeout: float = 30.0) -> None:
        """Restart one master on its ports and directory: without persistence it
        comes back empty, with a new run_id, still owning its slots (nodes.conf)."""
        node.restart()
        self.wait_ok(timeout)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RedisClusterServers(ports={[node._port for node in self.nodes]})"
