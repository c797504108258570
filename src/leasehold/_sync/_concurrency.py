"""The hand-written sync half of the concurrency shim (its twin is _async/_concurrency.py)."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

IS_ASYNC = False


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


def shielded(fn: Callable[[], T]) -> T:
    return fn()


def run_blocking(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    # Sync callers already run on their own thread; the executor is only for async.
    del executor
    return fn()


def wait_for_deadline(fn: Callable[[], T], timeout: float | None) -> T:
    # A thread cannot be interrupted; stores bound each call with socket timeouts.
    del timeout
    return fn()


def wait_readable(fd: int, timeout: float) -> bool:
    readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
    return bool(readable)


def current_actor() -> object:
    return threading.current_thread()


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
