"""The hand-written async half of the Redis announcement listener.

Its twin is ``_sync/backends/redis/pubsub.py``. Like the PostgreSQL listener, this
is where asyncio and threads differ: here a task reads the pub/sub connection and
is cancelled on close; the sync twin runs a thread, which close() wakes by shutting
the connection down.

One dedicated connection per store SUBSCRIBEs to the store's announcement channel
(never a pooled command connection: a subscribed connection can run nothing else).
Messages carry the topic; ``on_message(topic)`` runs for each. If the connection
fails, ``on_lost()`` runs once and the listener is dead for good (announcements
sent meanwhile are gone, so subscribers must look again and a new listener must
subscribe anew; redis-py's silent re-subscription would hide that gap).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio
from redis import exceptions as redis_errors

from leasehold._errors import StoreUnavailable

# The reader comes back to the connection at least this often, so that redis-py's
# health-check PING (health_check_interval) goes out on a quiet connection.
READ_SLICE = 5.0


class PubSubListener:
    """One connection SUBSCRIBEd to ``channel``; see the module docstring."""

    def __init__(
        self,
        connection_kwargs: dict[str, Any],
        channel: str,
        *,
        on_message: Callable[[str], None],
        on_lost: Callable[[], None],
        unavailable: Callable[[str, BaseException], StoreUnavailable],
        confirm_timeout: float,
    ) -> None:
        self._kwargs = connection_kwargs
        self._channel = channel
        self._on_message = on_message
        self._on_lost = on_lost
        self._unavailable = unavailable
        self._confirm_timeout = confirm_timeout
        self._pool: Any = None
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failed = False

    @property
    def alive(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and not self._closing
            and not self._failed
        )

    async def start(self) -> None:
        """Connect and SUBSCRIBE; when this returns, Redis has subscribed us, so no
        announcement published after it can be missed."""
        self._pool = redis.asyncio.ConnectionPool(max_connections=1, **self._kwargs)
        self._pubsub = redis.asyncio.Redis(connection_pool=self._pool).pubsub()
        loop = asyncio.get_running_loop()
        try:
            await self._pubsub.subscribe(self._channel)
            deadline = loop.time() + self._confirm_timeout
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise redis_errors.TimeoutError("no reply to SUBSCRIBE")
                message = await self._pubsub.get_message(timeout=remaining)
                if message is not None and message.get("type") == "subscribe":
                    break
        except (redis_errors.RedisError, OSError) as exc:
            raise self._unavailable("subscribe", exc) from None
        self._task = loop.create_task(self._read(), name=f"leasehold-subscribe-{self._channel}")

    async def _read(self) -> None:
        try:
            while not self._closing:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=READ_SLICE
                )
                if message is not None and message.get("type") == "message":
                    self._on_message(str(message["data"]))
        except (redis_errors.RedisError, OSError):
            pass  # the connection failed: reported through on_lost below
        finally:
            if not self._closing:
                self._failed = True
                self._on_lost()

    async def aclose(self) -> None:
        """Stop reading and close the connection. Idempotent."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait() does not re-raise the reader's CancelledError, so a
            # cancellation of *our* caller is never swallowed here.
            await asyncio.wait([task])
        pubsub, self._pubsub = self._pubsub, None
        pool, self._pool = self._pool, None
        try:
            if pubsub is not None:
                await pubsub.aclose()
            if pool is not None:
                await pool.disconnect()
        except (redis_errors.RedisError, OSError):
            pass  # closing a connection that failed already
