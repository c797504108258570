"""Failover of a Redis primary to a replica that had not received the grant.

Redis replicates asynchronously. Here the replication link runs through a FaultProxy
that is stalled just before A's grant, so the grant never reaches the replica; then
the replica is promoted (``REPLICAOF NO ONE``), the old primary stops, and every
client's service address (its own FaultProxy) is retargeted to the new primary. B is
granted at once by the new primary; A keeps reporting the lease held until its next
renewal, which the new primary refuses. This is the documented limit of asynchronous
replication: the scenario expects the overlap and measures it, and checks what still
holds (fences increase; the fenced ledger accepts A's writes only until B's first).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from leasehold.testing import FaultProxy
from tests.faults.scenarios import NEW_HOLDER_WORK, Run, _measure_overlap, _write_while_held


def _admin(server: Any, *args: Any) -> Any:
    client = server.client(socket_timeout=5, socket_connect_timeout=2)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def _wait_replicating(replica: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _admin(replica, "INFO", "replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replica never synced; log:\n{replica.log()}")
        time.sleep(0.05)


async def failover(run: Run) -> None:
    from tests.servers.redis import RedisServer

    ttl = run.ttl
    primary = RedisServer()
    primary.start()
    link = FaultProxy("127.0.0.1", primary.port).start()
    replica = RedisServer(extra_config=[f"replicaof 127.0.0.1 {link.port}"])
    routes = [FaultProxy("127.0.0.1", primary.port).start() for _ in range(2)]
    try:
        replica.start()
        await asyncio.to_thread(_wait_replicating, replica)
        a = run.actor("A", routes[0].rewrite_url(primary.url))
        b = run.actor("B", routes[1].rewrite_url(primary.url))
        # B is connected and its scripts loaded, as a client that has been running.
        warm = await b.try_acquire(f"{run.name}-warm", ttl, record=False, track=False)
        if warm is not None:
            await b.release(warm, record=False)
        link.stall()  # from here on, nothing the primary writes reaches the replica
        lease = await a.acquire(run.name, ttl, timeout=5.0)
        if lease is None:
            run.history.violation("setup", "A could not acquire on the primary")
            return
        writer = asyncio.ensure_future(
            _write_while_held(a, run.ledger, lease, time.monotonic() + 3 * ttl)
        )
        await asyncio.sleep(0.1)
        await asyncio.to_thread(_admin, replica, "REPLICAOF", "NO", "ONE")
        run.history.fault()
        await asyncio.to_thread(primary.stop)
        for route in routes:
            route.retarget("127.0.0.1", replica.port)
        b_lease = await b.acquire(run.name, ttl, timeout=2 * ttl + 2.0)
        if b_lease is not None:
            await asyncio.sleep(NEW_HOLDER_WORK)
            await b.write(run.ledger, b_lease)
        await a.wait_lost(lease, 2 * ttl)
        await writer
        if b_lease is not None:
            await b.write(run.ledger, b_lease)
            await b.release(b_lease)
        else:
            run.history.violation("liveness", "the new primary never granted B")
        await a.release(lease)
        _measure_overlap(run.history)
    finally:
        await run.close()
        for proxy in (*routes, link):
            proxy.close()
        primary.cleanup()
        replica.cleanup()
