"""The sync half of the Redis backend's tiny shim (its twin: _async/backends/redis/io.py).

Threads cannot be cancelled, so there is no swallowed cancellation to raise again.
The sync ``RedisCluster`` runs a ``redis_connect_func`` after its own handshake, and
discovers the cluster in its constructor. redis-py's sync connections pack commands
with hiredis already, so its own connection classes serve as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.cluster
import redis.connection


def cancellations() -> int:
    return 0


def raise_if_cancelled_since(before: int) -> None:
    del before


def cluster_client(kwargs: dict[str, Any], on_new_connection: Callable[[Any], None]) -> Any:
    """A redis-py cluster client; ``on_new_connection(connection)`` runs after the
    handshake of every connection it makes, to any node. Connects to discover the
    cluster (redis-py's sync client does so in its constructor)."""
    return redis.cluster.RedisCluster(**kwargs, redis_connect_func=on_new_connection)


def cluster_ready(client: Any) -> None:
    # The sync client discovers the cluster in its constructor, and again at once
    # after a connection error: there is nothing left to do here.
    del client


def close_cluster(client: Any) -> None:
    client.close()


def connection_classes() -> tuple[type[Any], type[Any], type[Any]]:
    """redis-py's connection classes for TCP, TLS and unix sockets."""
    return (
        redis.connection.Connection,
        redis.connection.SSLConnection,
        redis.connection.UnixDomainSocketConnection,
    )
