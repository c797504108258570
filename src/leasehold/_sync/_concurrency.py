"""The hand-written sync half of the concurrency shim (its twin is _async/_concurrency.py)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")

IS_ASYNC = False

# An idle keeper thread lingers before it ends: starting a thread per acquire
# would cost more than the acquire itself.
KEEPER_LINGER = 30.0


class Event:
    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


class Mutex:
    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def sleep(seconds: float) -> None:
    time.sleep(max(0.0, seconds))


def spawn(fn: Callable[[], None], name: str) -> object:
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


def background_alive(handle: object) -> bool:
    return isinstance(handle, threading.Thread) and handle.is_alive()


def shielded(fn: Callable[[], T], *, restartable: bool = False) -> T:
    return fn()  # a thread is never cancelled midway: nothing to shield


_CALLS: ThreadPoolExecutor | None = None
_CALLS_PID = -1
_CALLS_GUARD = threading.Lock()


def _calls() -> ThreadPoolExecutor:
    global _CALLS, _CALLS_PID, _CALLS_GUARD
    if os.getpid() != _CALLS_PID:
        _CALLS_GUARD = threading.Lock()  # a lock held at fork time stays held in the child
        _CALLS = None
    with _CALLS_GUARD:
        if _CALLS is None:
            _CALLS = ThreadPoolExecutor(4, thread_name_prefix="leasehold-call")
            _CALLS_PID = os.getpid()
        return _CALLS


_CLEANUP: ThreadPoolExecutor | None = None
_CLEANUP_PID = -1
_CLEANUP_GUARD = threading.Lock()


def _cleanup() -> ThreadPoolExecutor:
    global _CLEANUP, _CLEANUP_PID, _CLEANUP_GUARD
    if os.getpid() != _CLEANUP_PID:
        _CLEANUP_GUARD = threading.Lock()  # a lock held at fork time stays held in the child
        _CLEANUP = None
    with _CLEANUP_GUARD:
        if _CLEANUP is None:
            # Apart from the keeper's calls: stalled clean-ups must not delay renewals.
            _CLEANUP = ThreadPoolExecutor(2, thread_name_prefix="leasehold-cleanup")
            _CLEANUP_PID = os.getpid()
        return _CLEANUP


def in_background(fn: Callable[[], object]) -> None:
    """Run ``fn`` on a worker thread and never wait for it: best-effort clean-up
    (releasing a grant nobody will use) that must not hold up a caller whose time
    is up. Worker threads start without the caller's deadline: the store's
    operation timeout bounds it. Its errors are consumed."""

    def consumed() -> None:
        with contextlib.suppress(Exception):
            fn()

    _cleanup().submit(consumed)


class Call(Generic[T]):
    """A store call on a worker thread, so the keeper can act at a deadline while a
    call hangs on a dead network path."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._future = _calls().submit(fn)

    def wait(self, timeout: float) -> bool:
        done, _ = concurrent.futures.wait([self._future], timeout=max(0.0, timeout))
        return bool(done)

    def result(self) -> T:
        return self._future.result()


def run_blocking(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    # Sync callers already run on their own thread; the executor is only for async.
    del executor
    return fn()


def wait_readable(fd: int, timeout: float) -> bool:
    readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
    return bool(readable)


def cancellations() -> int:
    """Threads are never cancelled (see the async twin)."""
    return 0


def resume_cancellation(before: int) -> None:
    """Threads are never cancelled: nothing to resume (see the async twin)."""


# The thread itself (no wrapper: one Python call less per ``with lock:``).
current_actor: Callable[[], object] = threading.current_thread


class BodyGuard:
    """Threads cannot be cancelled from outside: sync code learns of loss through
    ``check()``, the ``on_lost`` callback and the exception raised on exit."""

    def __init__(self) -> None:
        self._interrupted = False

    def interrupt(self) -> None:
        self._interrupted = True

    def absorb(self, exc: BaseException | None) -> bool:
        del exc
        return False

    @property
    def interrupted(self) -> bool:
        return self._interrupted
