"""The hand-written sync half of the Redis announcement listener.

Its twin is ``_async/backends/redis/pubsub.py`` (which explains the design). Here a
thread reads the pub/sub connection in slices; ``close()`` shuts the connection
down, which wakes the thread at once, and joins it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis import exceptions as redis_errors

from leasehold._errors import StoreUnavailable

# The reader comes back to the connection at least this often (health-check PINGs,
# and the closing flag).
READ_SLICE = 1.0


class PubSubListener:
    """One connection SUBSCRIBEd to ``channel``; ``on_message`` and ``on_lost`` run
    on the listener thread."""

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
        self._thread: threading.Thread | None = None
        self._closing = False
        self._failed = False

    @property
    def alive(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and not self._closing
            and not self._failed
        )

    def start(self) -> None:
        """Connect and SUBSCRIBE; when this returns, Redis has subscribed us, so no
        announcement published after it can be missed."""
        self._pool = redis.ConnectionPool(max_connections=1, **self._kwargs)
        self._pubsub = redis.Redis(connection_pool=self._pool).pubsub()  # type: ignore[no-untyped-call,unused-ignore]
        try:
            self._pubsub.subscribe(self._channel)
            deadline = time.monotonic() + self._confirm_timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise redis_errors.TimeoutError("no reply to SUBSCRIBE")
                message = self._pubsub.get_message(timeout=remaining)
                if message is not None and message.get("type") == "subscribe":
                    break
        except (redis_errors.RedisError, OSError) as exc:
            raise self._unavailable("subscribe", exc) from None
        self._thread = threading.Thread(
            target=self._read, name=f"leasehold-subscribe-{self._channel}", daemon=True
        )
        self._thread.start()

    def _read(self) -> None:
        pubsub = self._pubsub
        try:
            while not self._closing:
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_SLICE)
                if message is not None and message.get("type") == "message":
                    self._on_message(str(message["data"]))
        except Exception:
            # The connection failed, or close() pulled it from under us: on_lost below
            # unless closing.
            pass
        finally:
            if not self._closing:
                self._failed = True
                self._on_lost()

    def close(self) -> None:
        """Stop reading and close the connection. Idempotent."""
        self._closing = True
        thread, self._thread = self._thread, None
        pubsub, self._pubsub = self._pubsub, None
        pool, self._pool = self._pool, None
        if pubsub is not None and thread is not None:
            connection = pubsub.connection
            if connection is not None:
                # Shutting the socket down wakes the reader blocked on it.
                with contextlib.suppress(Exception):
                    connection.disconnect()
            thread.join(READ_SLICE + 1.0)
        with contextlib.suppress(redis_errors.RedisError, OSError):
            if pubsub is not None:
                pubsub.close()
            if pool is not None:
                pool.disconnect()
