"""A contended acquire in one round trip: the queueing acquire.lua and the BLPOP
that waits for the hand-over, pipelined on one blocking connection.

A contended acquisition otherwise costs the waiter two round trips: acquire (busy,
queued), then BLPOP on its signal list until the release hands it the place. Redis
runs a pipeline's commands in order, so the BLPOP starts right after the script
has queued the waiter, and a hand-over pushed later wakes it as before. The script
is told how long the BLPOP will block (ARGV[9]) and, when the BLPOP must not block
-- it granted, or a holder expires sooner than the BLPOP would end -- pushes a
marker onto the waiter's own list so the BLPOP returns at once.

Only standalone Redis: in a cluster the two commands may need different
connections (the blocking client's node), and the plain path serves as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from redis import exceptions as redis_errors

from leasehold._async.backends.redis.connection import _DRIVER_ERRORS, _pool_exhausted
from leasehold._async.backends.redis.io import cancellations, raise_if_cancelled_since
from leasehold._async.backends.redis.scripts import _script
from leasehold._core.records import AcquireRequest, AcquireResult, Busy, Granted, WaitResult

if TYPE_CHECKING:
    from leasehold._async.backends.redis.store import AsyncRedisStore

# How late Redis may answer a BLPOP that timed out (one tick at hz 10), as in wait().
_BLPOP_OVERRUN: Final = 0.1
# Shorter bounds are not worth a blocking connection: the plain path serves them.
_SHORTEST: Final = 0.05


async def acquire_and_wait(
    store: AsyncRedisStore, request: AcquireRequest, timeout: float
) -> tuple[AcquireResult, WaitResult | None]:
    """``store.acquire(request)`` and, if it queued the token, up to ``timeout`` of
    ``store.wait`` -- one round trip. None as the second value: nothing was waited
    for (the caller waits as usual)."""
    block_for = min(timeout - _BLPOP_OVERRUN, store._block_slice)
    if store.options.cluster or request.queue_ttl is None or block_for < _SHORTEST:
        return await store.acquire(request), None
    from leasehold._async.backends.redis.store import _holder_json, _signalled, _us

    keys = store.keys.for_name(request.name)
    signal = keys.signal(request.token)
    connections = store._connect()
    script = _script("acquire")
    with store._translated("acquire"):
        stamp = await store._stamp(connections, keys.state)
        pipe = connections.blocking.pipeline(transaction=False)
        script_keys = keys.script_keys()
        pipe.execute_command(
            "EVALSHA",
            script.sha,
            len(script_keys),
            *script_keys,
            request.name,
            keys.signal_prefix,
            request.token,
            _us(request.ttl),
            request.limit,
            _us(request.queue_ttl),
            _holder_json(request.holder),
            stamp.run_id,
            _us(block_for),
        )
        pipe.execute_command("BLPOP", signal, f"{block_for:.3f}")
        before = cancellations()
        try:
            reply, popped = await pipe.execute(raise_on_error=False)
        except redis_errors.ConnectionError as exc:
            if not _pool_exhausted(exc):
                raise
            popped = reply = exc  # every blocking connection is busy: nothing was sent
        raise_if_cancelled_since(before)
        for result in (reply, popped):
            # A connection that died under the pipeline is the caller's error; a
            # reply error (NOSCRIPT after a restart or SCRIPT FLUSH: the script did
            # not run, the BLPOP waited for nothing) is left to the plain path, which
            # loads the script and reports what it meets again.
            if isinstance(result, _DRIVER_ERRORS) and not isinstance(
                result, redis_errors.ResponseError | redis_errors.ConnectionError
            ):
                raise result
            if isinstance(result, redis_errors.ConnectionError) and not _pool_exhausted(result):
                raise result
    if isinstance(reply, BaseException) or isinstance(popped, BaseException):
        return await store.acquire(request), None
    if not isinstance(reply, list) or not reply:
        raise store._malformed("acquire", reply)
    if reply[0] == 1:
        if not store._stamp_is_current(connections, keys.state, stamp):
            # As in acquire: a connection made during the call may have met a
            # restarted server; acquire again (same fence) to stamp the right run id.
            return await store.acquire(request), None
        try:
            return Granted(fence=int(reply[1])), None
        except (TypeError, ValueError, IndexError):
            raise store._malformed("acquire", reply) from None
    try:
        retry_after, position = int(reply[1]), int(reply[2])
    except (TypeError, ValueError, IndexError):
        raise store._malformed("acquire", reply) from None
    busy = Busy(
        retry_after=None if retry_after < 0 else retry_after / 1e6,
        position=None if position < 0 else position,
    )
    if popped is None:
        # The BLPOP timed out: the caller's whole pause, less the server's overrun.
        return busy, False
    value = popped[1] if isinstance(popped, list | tuple) and len(popped) == 2 else popped
    if value in ("x", b"x"):
        return busy, None  # a holder expires sooner: the caller waits until then
    return busy, _signalled(value)
