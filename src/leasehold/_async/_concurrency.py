"""The hand-written async half of the concurrency shim (its twin is _sync/_concurrency.py).

Everything that differs between asyncio and threads lives here, so the rest of
``_async`` converts to sync code mechanically.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from leasehold import _deadline

T = TypeVar("T")

IS_ASYNC = True

# An idle keeper task lingers a while before it ends: a task started for every
# acquire (and ended by its release) cost ~10 µs and an event-loop pass each time.
# asyncio.run() cancels a lingering keeper when the loop ends; AsyncClient.aclose()
# stops it at once.
KEEPER_LINGER = 5.0


class AsyncEvent:
    """An event that may be set from any thread (a store notification thread, say)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard = threading.Lock()

    def set(self) -> None:
        with self._guard:
            loop = self._loop
        if loop is None:
            self._event.set()
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(self._event.set)

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        with self._guard:
            self._loop = asyncio.get_running_loop()
        if self._event.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return self._event.is_set()
        return True


class AsyncMutex:
    """Guards short critical sections that may await (never held across user code)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


async def sleep(seconds: float) -> None:
    await asyncio.sleep(max(0.0, seconds))


def spawn(fn: Callable[[], Coroutine[Any, Any, None]], name: str) -> object:
    """Start ``fn`` in the background of the running event loop.

    It runs in a copy of the caller's context without the caller's store-call
    deadline (see leasehold._deadline): a keeper started during an acquire must
    not inherit that acquire's deadline for the rest of its life."""
    context = contextvars.copy_context()
    context.run(_deadline.forget)
    task = asyncio.get_running_loop().create_task(fn(), name=name, context=context)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


_BACKGROUND: set[asyncio.Task[Any]] = set()


def background_alive(handle: object) -> bool:
    if not isinstance(handle, asyncio.Task):
        return False
    if handle.done():
        return False
    try:
        return handle.get_loop() is asyncio.get_running_loop()
    except RuntimeError:
        return False


async def shielded(fn: Callable[[], Awaitable[T]], *, restartable: bool = False) -> T:
    """Run ``fn`` to completion even if the caller is cancelled meanwhile.

    The caller still sees its CancelledError, after the work is done or handed to
    the background, so a cancelled release never leaves a lock held.

    ``fn`` runs in a task of its own (a store call is never cancelled: cancelling
    a database query can take seconds), which hands its outcome to the caller's
    future itself: one pass of the event loop less than ``asyncio.shield`` (whose
    outcome travels by two done-callbacks).

    ``restartable``: ``fn`` may be cancelled at any point and run again (a store
    with ``capabilities.cancels_cleanly``; a release is idempotent). It then runs in
    the caller's task, which saves the task's two passes of the event loop; if the
    caller is cancelled meanwhile, ``fn`` starts again in the background.
    """
    if restartable:
        try:
            return await fn()
        except asyncio.CancelledError:
            in_background(fn)
            raise
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[T] = loop.create_future()
    task = loop.create_task(_told(fn, outcome))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return await outcome


async def _told(fn: Callable[[], Awaitable[T]], outcome: asyncio.Future[T]) -> None:
    """Run ``fn`` and put what it returned or raised into ``outcome``, unless its
    waiter has gone (cancelled): then the outcome is nobody's and is dropped."""
    try:
        result = await fn()
    except BaseException as exc:
        if not outcome.done():
            if isinstance(exc, asyncio.CancelledError):
                outcome.cancel()
            else:
                outcome.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
        return
    if not outcome.done():
        outcome.set_result(result)


def in_background(fn: Callable[[], Awaitable[object]]) -> None:
    """Start ``fn`` and never wait for it: best-effort clean-up (releasing a grant
    nobody will use) that must not hold up a caller whose time is up. It runs in a
    fresh context, so the caller's (maybe expired) deadline does not cut it short:
    the store's operation timeout bounds it. Its errors are consumed."""
    task = asyncio.get_running_loop().create_task(
        _consumed(fn), name="leasehold-cleanup", context=contextvars.Context()
    )
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _consumed(fn: Callable[[], Awaitable[object]]) -> None:
    with contextlib.suppress(Exception):
        await fn()


class AsyncCall(Generic[T]):
    """A store call running on its own, so the caller can stop waiting for it at a
    deadline without cancelling it (cancelling a database query can itself take
    seconds, and an abandoned call must still finish or fail cleanly)."""

    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self._task: asyncio.Future[T] = asyncio.ensure_future(fn())
        _BACKGROUND.add(self._task)
        self._task.add_done_callback(_BACKGROUND.discard)
        # An abandoned call's exception is consumed here, not logged as never retrieved.
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def wait(self, timeout: float) -> bool:
        """True once the call has finished; False if ``timeout`` passed first."""
        done, _ = await asyncio.wait({self._task}, timeout=max(0.0, timeout))
        return bool(done)

    def result(self) -> T:
        return self._task.result()


async def run_blocking(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    """Run blocking I/O (sqlite3) off the event loop, in the caller's context (so
    that the operation's deadline bounds the waits there too)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, context.run, fn)


async def wait_readable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` is readable; False on timeout."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        async with asyncio.timeout(timeout):
            await ready
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


def cancellations() -> int:
    """Cancellation requests pending on the running task (``Task.cancelling``): read
    it before an await that may drop one, and pass it to ``resume_cancellation``."""
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def resume_cancellation(before: int) -> None:
    """Raise the CancelledError that an await dropped. Python 3.11's
    ``asyncio.wait_for`` returns its result when that arrives in the same pass of the
    event loop as a cancellation, and the task runs on with the request pending
    (CPython gh-86296, fixed in 3.12). psycopg_pool waits for a connection with it:
    a keeper that gives a connection back and then cancels the body of a lease it
    found lost does exactly that, and the body would run on under the lost lease.
    ``before``: what ``cancellations()`` read before the await."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


def current_actor() -> object:
    """The unit of execution the caller runs in: its task (async) or thread (sync)."""
    return asyncio.current_task()


class AsyncBodyGuard:
    """Cancels the body of ``async with`` when its lease is lost, and tells apart our
    cancellation from the caller's own (``Task.uncancel`` counts them)."""

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._cancelled_by_us = False
        self._loop = asyncio.get_running_loop()

    def interrupt(self) -> None:
        task = self._task
        if task is None or task.done() or self._cancelled_by_us:
            return
        self._cancelled_by_us = True
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            task.cancel(msg="leasehold: lease lost")
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(task.cancel, "leasehold: lease lost")

    def absorb(self, exc: BaseException | None) -> bool:
        """On exit: True if ``exc`` is our own cancellation and nobody else's, which the
        caller then turns into LeaseLost."""
        if not self._cancelled_by_us or self._task is None:
            return False
        remaining = self._task.uncancel()
        return isinstance(exc, asyncio.CancelledError) and remaining == 0

    @property
    def interrupted(self) -> bool:
        return self._cancelled_by_us
