"""``lock()`` and ``once()`` for views, management commands and Django Tasks.

Both are decorators and context managers. As decorators, the lease name (or
once key) may be a template over the call's arguments, ``"meeting:{meeting_id}"``,
or a callable taking them.

Coroutine functions work too: the lease calls run in a worker thread, the coroutine
on its own event loop (no on-commit deferral: ``atomic()`` does not span awaits).

Inside ``transaction.atomic()`` (the ``using`` database's), a lock is released and
a once result published only when that transaction commits -- at once when it
rolls back -- so the next holder always sees the writes the lease guarded
(``on_commit=False`` turns that off; ``LEASEHOLD["ON_COMMIT"] = False`` for the
whole project).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar, cast

from leasehold._core.once import PREFIX, decode, encode_done, encode_running
from leasehold._errors import AcquireTimeout, InvalidArgument
from leasehold._sync.lease import Lease
from leasehold._sync.once import DEFAULT_KEEP, RUNNING_TTL
from leasehold.django import _client, _tx
from leasehold.django._template import Template, render

logger = logging.getLogger("leasehold.django")

F = TypeVar("F", bound=Callable[..., Any])
WHEN_BUSY = ("wait", "skip", "raise")


def _defer(on_commit: bool | None, using: str | None) -> bool:
    if on_commit is None:
        on_commit = _client.source().on_commit
    return on_commit and _tx.in_atomic_block(using)


def _sync_body(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What the sync wrapper calls: ``fn``, or for a coroutine function the same
    run on its event loop (asgiref's ``async_to_sync``, which Django ships)."""
    if not inspect.iscoroutinefunction(fn):
        return fn
    from asgiref.sync import async_to_sync

    return async_to_sync(fn)


def _same_kind(fn: Callable[..., Any], wrapper: Callable[..., Any]) -> Any:
    """``wrapper`` for a sync ``fn``; for a coroutine function, an async wrapper that
    runs it in a worker thread (the lease calls block), so the event loop is free
    while it waits for a lease, and the body runs back on the loop."""
    if not inspect.iscoroutinefunction(fn):
        return wrapper
    from asgiref.sync import sync_to_async

    in_thread = sync_to_async(wrapper, thread_sensitive=False)

    @functools.wraps(fn)
    async def run_async(*args: Any, **kwargs: Any) -> Any:
        result = await in_thread(*args, **kwargs)
        if inspect.isawaitable(result):  # an async on_skip
            result = await result
        return result

    return run_async


class lock:  # used like a function: @lock("name") / with lock("name")
    """An exclusive lease around a call or a block.

    ``name``: the lease name, or a template over the decorated function's
    arguments. ``ttl``: lease TTL (renewed in the background while held).
    ``when_busy``: ``"wait"`` (block up to ``timeout`` seconds, None: as long as it
    takes, then ``AcquireTimeout``), ``"skip"`` (do not call; return ``on_skip``
    -- a value, or a callable given the call's arguments -- log it and send
    ``leasehold.django.signals.lease_skipped``) or ``"raise"``
    (``AcquireTimeout`` at once). As a context manager, ``"skip"`` gives ``None``
    instead of the lease. ``on_commit``/``using``: see the module docstring.
    """

    def __init__(
        self,
        name: Template,
        ttl: float = 30.0,
        *,
        when_busy: str = "wait",
        timeout: float | None = None,
        on_skip: Any = None,
        on_commit: bool | None = None,
        using: str | None = None,
    ) -> None:
        if when_busy not in WHEN_BUSY:
            raise InvalidArgument(f"when_busy must be one of {WHEN_BUSY}, got {when_busy!r}")
        self.name = name
        self.ttl = ttl
        self.when_busy = when_busy
        self.timeout = timeout
        self.on_skip = on_skip
        self.on_commit = on_commit
        self.using = using
        self._blocks: contextvars.ContextVar[tuple[AbstractContextManager[Lease | None], ...]] = (
            contextvars.ContextVar("leasehold_django_lock_blocks", default=())
        )

    # -- the lease itself -----------------------------------------------------------

    def _acquire(self, name: str) -> Lease | None:
        handle = _client.get_client().lock(name, ttl=self.ttl)
        if self.when_busy == "wait":
            return handle.acquire(timeout=self.timeout)
        lease = handle.try_acquire()
        if lease is None and self.when_busy == "raise":
            raise AcquireTimeout(name, 0.0)
        return lease

    def _end(self, lease: Lease, failed: bool) -> None:
        """Release now, or when the transaction ends; a lost lease raises LeaseLost."""
        if failed:
            lease.release()
            return
        try:
            lease.check()  # lost while the body ran: say so (its writes must not commit)
        except BaseException:
            lease.release()
            raise
        if _defer(self.on_commit, self.using):
            _tx.after_transaction(lambda committed: _release_quietly(lease), self.using)
        else:
            lease.release()

    def _skipped(self, name: str, sender: object) -> None:
        from leasehold.django.signals import lease_skipped

        try:
            holders = [info.owner for info in _client.get_client().holders(name)]
        except Exception:  # who held it is a detail; the skip itself must be told
            holders = []
        logger.info("skipped %r: lease %r is held by %s", sender, name, holders or "nobody now")
        lease_skipped.send(sender=sender, name=name, holders=holders)

    # -- context manager ------------------------------------------------------------

    @contextmanager
    def _block(self, name: str, sender: object) -> Iterator[Lease | None]:
        lease = self._acquire(name)
        if lease is None:
            self._skipped(name, sender)
            yield None
            return
        try:
            yield lease
        except BaseException:
            self._end(lease, failed=True)
            raise
        self._end(lease, failed=False)

    def __enter__(self) -> Lease | None:
        if callable(self.name) or "{" in self.name:
            raise InvalidArgument("a lease name template needs a call: use lock() as a decorator")
        block = self._block(self.name, self.name)
        lease = block.__enter__()
        # One object may be entered by several threads or tasks at once (a module
        # level `LOCK = lock("x")`): each exit must close its own entry.
        stack = self._blocks.get()
        self._blocks.set((*stack, block))
        return lease

    def __exit__(self, *exc_info: Any) -> bool | None:
        stack = self._blocks.get()
        self._blocks.set(stack[:-1])
        return stack[-1].__exit__(*exc_info)

    # -- decorator ------------------------------------------------------------------

    def __call__(self, fn: F) -> F:
        body = _sync_body(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            name = render(self.name, fn, args, kwargs, what="lock name")
            with self._block(name, fn) as lease:
                if lease is None:
                    return self.on_skip(*args, **kwargs) if callable(self.on_skip) else self.on_skip
                return body(*args, **kwargs)

        return cast(F, _same_kind(fn, locked))


def _release_quietly(lease: Lease) -> None:
    try:
        lease.release()
    except Exception as exc:  # the lease expires by its TTL anyway
        logger.warning("releasing %r after the transaction failed: %s", lease.name, exc)


class once:  # used like a function
    """Run the decorated call once per key; every caller gets the stored result.

    ``key``: a template over the call's arguments or a callable taking them.
    ``ttl``: the runner's lease. ``keep``: seconds the result is kept (None: until
    forgotten). ``timeout``: how long a duplicate waits for a running first call.
    The result must be JSON-serialisable (return ids, not model instances).

    Inside ``transaction.atomic()`` the result is published, and the runner's
    lease released, only when the transaction commits: concurrent duplicates wait
    and then return the result whose rows they can see. After a rollback the run
    never happened: the lease is released at once and the next call runs again.
    """

    def __init__(
        self,
        key: Template,
        ttl: float = 30.0,
        *,
        keep: float | None = DEFAULT_KEEP,
        timeout: float | None = None,
        on_commit: bool | None = None,
        using: str | None = None,
    ) -> None:
        self.key = key
        self.ttl = ttl
        self.keep = keep
        self.timeout = timeout
        self.on_commit = on_commit
        self.using = using

    def __call__(self, fn: F) -> F:
        body = _sync_body(fn)

        @functools.wraps(fn)
        def run_once(*args: Any, **kwargs: Any) -> Any:
            key = render(self.key, fn, args, kwargs, what="once key")
            return self.run(key, body, *args, **kwargs)

        return cast(F, _same_kind(fn, run_once))

    def run(self, key: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` once for ``key``; the stored result otherwise."""
        client = _client.get_client()
        handle = client.once(
            key, ttl=self.ttl, keep=self.keep, timeout=self.timeout, retry_failed=True
        )
        if not _defer(self.on_commit, self.using):
            return handle.run(fn, *args, **kwargs)
        return _run_deferred(client, key, self, lambda: fn(*args, **kwargs))


def _run_deferred(client: Any, key: str, options: once, call: Callable[[], Any]) -> Any:
    """``Once.run`` with the outcome stored when the transaction commits.

    Same records and the same lease name as ``client.once(key)``, so both kinds
    of caller share results. The runner claims the record (``running``, by
    compare-and-set) under the lease, runs ``fn``, and leaves the lease held:
    duplicates queue on it. On commit the result is stored by compare-and-set
    against the runner's own version (a successor that took over wins), then the
    lease is released; on rollback only the lease is released, and the next
    caller finds a ``running`` record whose lease has ended, and runs.
    """
    import json

    name = PREFIX + key
    store = client.store
    entry = decode(store.read_record(name).value)
    if entry.state == "done":
        return json.loads(entry.payload)
    lease = client.lock(name, ttl=options.ttl).acquire(options.timeout)
    try:
        while True:
            lease.check()
            record = store.read_record(name)
            entry = decode(record.value)
            if entry.state == "done":
                lease.release()
                return json.loads(entry.payload)
            running = encode_running(lease.fence, client.holder.owner)
            version = store.write_record(name, record.version, running, RUNNING_TTL)
            if version is not None:
                break
        value = call()
        payload = json.dumps(value).encode()
        lease.check()
    except BaseException:
        lease.release()
        raise
    done = encode_done(lease.fence, client.holder.owner, payload)

    def finish(committed: bool) -> None:
        try:
            if committed and store.write_record(name, version, done, options.keep) is None:
                logger.warning("once %r: taken over before the commit; result not stored", key)
        finally:
            _release_quietly(lease)

    _tx.after_transaction(finish, options.using)
    return json.loads(payload)
