"""How a Redis waiter waits: ``BLPOP`` on a signal list of its own, on the
connections reserved for blocking calls; the base of ``AsyncRedisStore``."""

from __future__ import annotations

import time
from typing import Final

from redis import exceptions as redis_errors

from leasehold._async._concurrency import sleep
from leasehold._async.backends.redis.connection import RedisConnection, _Connections
from leasehold._async.backends.redis.errors import _DRIVER_ERRORS, _pool_exhausted
from leasehold._core.records import HandedOver, WaitResult

# How late Redis may answer a BLPOP that timed out: one tick at the default hz 10.
_BLPOP_OVERRUN: Final = 0.1
# wait() polls its signal list this often in the last _BLPOP_OVERRUN before its
# deadline, and when every blocking connection is busy.
_TAIL_POLL: Final = 0.02
_BUSY_POLL: Final = 0.1


def _signalled(value: object) -> WaitResult:
    """What a waiter's signal list said: "h <fence>" is a hand-over (see hand_over in
    _prelude.lua); anything else only wakes the waiter, whose next acquire then
    confirms or queues again. None: nothing arrived."""
    if value is None:
        return False
    text = value.decode() if isinstance(value, bytes) else str(value)
    if text.startswith("h "):
        try:
            return HandedOver(int(text[2:]))
        except ValueError:
            return True
    return True


class RedisWaiting(RedisConnection):
    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:  # noqa: ASYNC109, RUF100
        signal = self.keys.for_name(name).signal(token)
        connections = self._connect()
        # A local deadline for I/O only; expiry decisions stay on the server's clock.
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            return await self._wait(connections, signal, deadline)
        except _DRIVER_ERRORS:
            # A wait is only the pause between two acquire attempts. If Redis fails
            # meanwhile, sleep out the pause like a store without notifications: the
            # next acquire reports the error, and a caller that retries acquire
            # (with wait() as its pause) never spins against a dead server.
            await sleep(deadline - time.monotonic())
            return False

    async def _wait(self, connections: _Connections, signal: str, deadline: float) -> WaitResult:
        while True:
            remaining = deadline - time.monotonic()
            # Redis expires a blocked BLPOP only on its next event-loop tick (hz ticks
            # per second), so block until shortly before the deadline and poll the
            # last moments: the caller's timeout holds. Never send BLPOP a timeout of
            # 0, which means "forever".
            block_for = min(remaining - _BLPOP_OVERRUN, self._block_slice)
            if block_for < 0.01:
                popped = await self._call(connections, ("LPOP", signal))
                if popped is not None or remaining <= 0:
                    return _signalled(popped)
                await sleep(min(remaining, _TAIL_POLL))
                continue
            blpop = ("BLPOP", signal, f"{block_for:.3f}")
            try:
                # Straight to the connection, as script calls (see _call).
                popped = await self._call(connections, blpop, blocking=True)
            except redis_errors.ConnectionError as exc:
                if not _pool_exhausted(exc):
                    raise
                # Every blocking connection is in use: poll rather than fail (the
                # signal stays in its list, so it is only noticed later, not lost).
                popped = await self._call(connections, ("LPOP", signal))
                if popped is not None:
                    return _signalled(popped)
                await sleep(min(remaining, _BUSY_POLL))
                continue
            if popped is not None:
                return _signalled(popped[1])
