"""Once-only execution with a stored result, written once against the store contract.

``client.once(key).run(fn)``: the first caller takes the lease ``once:<key>`` and
runs ``fn`` under it (renewed); concurrent callers queue on the same lease and, when
they get it, find the stored result and return it. The result lives in the record
``once:<key>`` for ``keep`` seconds.

Fencing of results. Before running, the runner turns the record into
``running(fence)`` by compare-and-set; it stores the outcome by compare-and-set
against the version *it* wrote. A successor that takes over after the runner's
lease expired first writes its own ``running`` record, which changes the version,
so a late result from the old runner (paused, partitioned, or merely slow) is
refused by the store, never stored over the successor's. Versions come from the
store's fence sequence and are never reused, so no other write can restore the
old version by accident.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from leasehold import events, retry
from leasehold._async._concurrency import IS_ASYNC, sleep
from leasehold._async.lease import AsyncLease
from leasehold._async.lock import AsyncLock
from leasehold._core import validate
from leasehold._core.once import (
    JSON,
    PREFIX,
    NoResult,
    OnceState,
    Serializer,
    decode,
    encode_done,
    encode_failed,
    encode_running,
    error_type,
    to_bytes,
)
from leasehold._core.records import MAX_RECORD_BYTES
from leasehold._errors import InvalidArgument, LeaseLost, StoreUnavailable
from leasehold._observe import lease_fields, log_fields

if TYPE_CHECKING:
    from leasehold._async.context import AsyncContext

logger = logging.getLogger("leasehold")

DEFAULT_KEEP = 24 * 3600.0
# A "running" record outlives any sane run; it only bounds what an abandoned run
# (the runner died and nobody called again) leaves behind in the store.
RUNNING_TTL = validate.MAX_TTL
# Storing the outcome after fn ran is retried on store errors while the lease lasts.
STORE_RETRY_INITIAL = 0.05
STORE_RETRY_MAXIMUM = 1.0


class AsyncOnce:
    """``client.once(key)``: run a function once per ``key`` and share its result.

    ``ttl``: the runner's lease (renewed while ``fn`` runs; after a runner dies,
    another caller takes over within about ``ttl``). ``keep``: seconds a result or
    failure is kept (None: until ``forget()``). ``retry_failed``: after a failure,
    whether the next call runs ``fn`` again (True) or raises ``OnceFailed`` until
    the failure's ``keep`` has passed (False); callers that were already waiting
    while the failing run ran get ``OnceFailed`` either way. ``serializer``: how
    results are stored (default JSON). ``timeout``: how long ``run()`` waits for a
    running caller (None: as long as it takes; then ``AcquireTimeout``).
    """

    def __init__(
        self,
        context: AsyncContext,
        key: str,
        *,
        ttl: float = 30.0,
        keep: float | None = DEFAULT_KEEP,
        retry_failed: bool = True,
        serializer: Serializer | None = None,
        timeout: float | None = None,
        margin: float | None = None,
    ) -> None:
        self._context = context
        self._key = validate.name(key, what="key")
        self._name = validate.name(PREFIX + key, what=f"key (with the {PREFIX!r} prefix)")
        self._keep = validate.timeout(keep, what="keep")
        if self._keep is not None and self._keep < validate.MIN_TTL:
            raise InvalidArgument(f"keep must be at least {validate.MIN_TTL:g} s or None")
        if not isinstance(retry_failed, bool):
            raise InvalidArgument(f"retry_failed must be a bool, got {type(retry_failed).__name__}")
        self._retry_failed = retry_failed
        if serializer is not None and not (
            callable(getattr(serializer, "dumps", None))
            and callable(getattr(serializer, "loads", None))
        ):
            raise InvalidArgument("serializer must have dumps(obj) -> bytes and loads(bytes)")
        self._serializer: Serializer = JSON if serializer is None else serializer
        self._timeout = validate.timeout(timeout)
        self._lock = AsyncLock(context, self._name, ttl=ttl, margin=margin, primitive="once")

    @property
    def key(self) -> str:
        return self._key

    @property
    def ttl(self) -> float:
        return self._lock.ttl

    @property
    def keep(self) -> float | None:
        return self._keep

    @property
    def retry_failed(self) -> bool:
        return self._retry_failed

    # -- running -----------------------------------------------------------------

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Return the stored result for this key, running ``fn(*args, **kwargs)``
        first if there is none; exactly one concurrent caller runs it.

        The caller that ran ``fn`` gets ``fn``'s own exception when it raises;
        callers that waited for that run get ``OnceFailed``. Every caller returns
        the *stored* result (what ``loads(dumps(value))`` gives), so all of them
        see the same value. A result that cannot be serialized or is larger than a
        record allows is recorded as a failure.

        Async: coroutine functions are awaited; plain functions run in a worker
        thread so that a slow one cannot stall the event loop (and with it the
        renewal of the lease that protects it). If the lease is lost, ``fn`` is
        cancelled (a thread cannot be, but its result is discarded) and
        ``LeaseLost`` is raised; a successor will run ``fn`` again.
        """
        if not callable(fn):
            raise InvalidArgument("run() needs a callable")
        if not IS_ASYNC and _is_coroutine_function(fn):
            raise InvalidArgument("Once.run() got an async function; use AsyncClient for it")
        store = self._context.store
        first = await store.read_record(self._name)
        entry = decode(first.value)
        if entry.state == "done":
            self._reused()
            return self._loads(entry.payload)
        if entry.state == "failed" and not self._retry_failed:
            raise entry.failure(self._key)
        # A failure already stored when this call began is "a previous call's": with
        # retry_failed it is run again. One stored while we waited is the outcome of
        # the run we waited for, and is ours too.
        old_failure = first.version if entry.state == "failed" else None
        lease = await self._lock.acquire(self._timeout)
        try:
            return await self._run_holding(lease, old_failure, fn, args, kwargs)
        finally:
            await lease.release()

    async def _run_holding(
        self,
        lease: AsyncLease,
        old_failure: int | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        store = self._context.store
        while True:
            lease.check()
            record = await store.read_record(self._name)
            entry = decode(record.value)
            if entry.state == "done":
                self._reused()
                return self._loads(entry.payload)
            if entry.state == "failed" and (
                not self._retry_failed or record.version != old_failure
            ):
                raise entry.failure(self._key)
            if entry.state == "running" and entry.fence > lease.fence:
                # Only a later grant of our own lease name can have written this:
                # the lease was broken or taken over while we looked.
                raise LeaseLost(self._name, lease.fence, f"taken over by fence {entry.fence}")
            # Absent, a failure to run again, or "running" left by a runner whose
            # lease has ended (we hold it now): this caller runs.
            running = encode_running(lease.fence, self._context.holder.owner)
            version = await store.write_record(self._name, record.version, running, RUNNING_TTL)
            if version is not None:
                return await self._execute(lease, version, fn, args, kwargs)
            # Changed between our read and write (a late runner's result, forget()):
            # look again.

    async def _execute(
        self,
        lease: AsyncLease,
        version: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        failure: Exception | None = None
        payload = b""
        stored = False
        owner = self._context.holder.owner
        clock = self._context.clock
        began = clock.monotonic()
        ran = 0.0
        try:
            async with lease:
                try:
                    value = await _invoke(fn, args, kwargs)
                    ran = clock.monotonic() - began
                    payload = self._dumps(value)
                except Exception as exc:
                    ran = clock.monotonic() - began
                    failure = exc
                    outcome = encode_failed(lease.fence, owner, error_type(exc), str(exc))
                else:
                    outcome = encode_done(lease.fence, owner, payload)
                stored = await self._store_outcome(lease, version, outcome)
                if not stored and failure is None:
                    raise LeaseLost(
                        self._name, lease.fence, "another runner took over; result not stored"
                    )
        except LeaseLost:
            # The compare-and-set is the real fence: once it succeeded, no other run
            # can have started, so the result stands even if the lease ran out after.
            if not stored:
                raise
        if failure is not None:
            if events.wanted():
                self._context.observer.emit(
                    events.OnceFailed,
                    "once",
                    self._key,
                    duration=ran,
                    error_type=type(failure).__name__,
                    error=str(failure) or type(failure).__name__,
                )
            if not stored:
                logger.warning(
                    "once %r: the failure of fence %d was not recorded (taken over)",
                    self._key,
                    lease.fence,
                    extra=lease_fields(lease, "once_failure_not_recorded"),
                )
            raise failure
        if events.wanted():
            self._context.observer.emit(events.OnceRan, "once", self._key, duration=ran)
        return self._loads(payload)

    async def _store_outcome(self, lease: AsyncLease, version: int, outcome: bytes) -> bool:
        """Compare-and-set the outcome over our own ``running`` record. True if
        stored; False if another runner has taken over."""
        store = self._context.store
        expected = version
        failures = 0
        while True:
            try:
                if await store.write_record(self._name, expected, outcome, self._keep) is not None:
                    return True
                record = await store.read_record(self._name)
            except StoreUnavailable as exc:
                # fn has run: its result is worth retrying for while the lease lasts
                # (the write may also have landed; the read after the pause tells).
                if not lease.held:
                    raise
                logger.warning(
                    "once %r: store error storing the result (%s); retrying",
                    self._key,
                    exc,
                    extra=log_fields("once_store_retry", "once", self._key, error=exc),
                )
                await sleep(
                    retry.delay(failures, initial=STORE_RETRY_INITIAL, maximum=STORE_RETRY_MAXIMUM)
                )
                failures += 1
                continue
            entry = decode(record.value)
            if entry.state in ("done", "failed") and entry.fence == lease.fence:
                return True  # our own write, whose answer was lost
            if record.version == 0 and lease.held:
                # forget() during the run: nobody else can run while we hold the
                # lease, so the result is still the one to keep.
                expected = 0
                continue
            return False

    def _reused(self) -> None:
        if events.wanted():
            self._context.observer.emit(events.OnceReused, "once", self._key)

    # -- reading -----------------------------------------------------------------

    async def state(self) -> OnceState:
        """``"absent"``, ``"running"``, ``"done"`` or ``"failed"`` right now.

        A ``running`` record whose runner no longer holds the lease (it died) reads
        as ``"absent"``: the next ``run()`` runs ``fn``.
        """
        store = self._context.store
        entry = decode((await store.read_record(self._name)).value)
        if entry.state == "running":
            holders = await store.holders(self._name)
            if not any(holder.fence == entry.fence for holder in holders):
                return "absent"
        return entry.state

    async def result(self) -> Any:
        """The stored result; ``OnceFailed`` for a stored failure; ``NoResult``
        when nothing is stored (not run, running, forgotten or expired)."""
        entry = decode((await self._context.store.read_record(self._name)).value)
        if entry.state == "done":
            return self._loads(entry.payload)
        if entry.state == "failed":
            raise entry.failure(self._key)
        raise NoResult(self._key, entry.state)

    async def forget(self) -> bool:
        """Delete the stored result or failure, so the next ``run()`` runs ``fn``
        again; True if there was a record. A run in progress still stores its
        result."""
        store = self._context.store
        while True:
            record = await store.read_record(self._name)
            if record.version == 0:
                return False
            if await store.write_record(self._name, record.version, None) is not None:
                return True

    # -- serialization -------------------------------------------------------------

    def _dumps(self, value: Any) -> bytes:
        payload = to_bytes(self._serializer.dumps(value))
        if len(payload) > MAX_RECORD_BYTES - 4096:
            raise InvalidArgument(
                f"the result of once {self._key!r} serializes to {len(payload)} bytes; "
                f"at most {MAX_RECORD_BYTES - 4096} can be stored (store a reference instead)"
            )
        return payload

    def _loads(self, payload: bytes) -> Any:
        return self._serializer.loads(payload)

    def __repr__(self) -> str:
        keep = "forever" if self._keep is None else f"{self._keep:g}s"
        return f"<{type(self).__name__} {self._key!r} ttl={self.ttl:g}s keep={keep}>"


def _is_coroutine_function(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - objects with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


async def _in_thread(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not IS_ASYNC:
        return fn(*args, **kwargs)
    if _is_coroutine_function(fn):
        return await fn(*args, **kwargs)
    value = await _in_thread(fn, args, kwargs)
    if inspect.isawaitable(value):
        # A plain function that returned a coroutine (a lambda, a partial).
        return await value
    return value


__all__ = ["AsyncOnce"]
