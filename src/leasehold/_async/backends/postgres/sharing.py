"""One PostgreSQL store per process, URL, clock and event loop, shared by the
clients that ask for it, so a process holds one operation connection and one
LISTEN connection per database however many clients it makes. Counted: the store
closes when its last client does.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from leasehold._async._concurrency import IS_ASYNC
from leasehold._core.clock import Clock
from leasehold._core.url import StoreURL


class Shareable(Protocol):
    _users: int
    _share_key: tuple[Any, ...] | None
    _closed: bool


S = TypeVar("S", bound=Shareable)

_SHARED: dict[tuple[Any, ...], Any] = {}
_GUARD = threading.Lock()


def _after_fork_in_child() -> None:
    global _GUARD
    _GUARD = threading.Lock()  # may have been held at fork time


os.register_at_fork(after_in_child=_after_fork_in_child)


def share_key(url: StoreURL, clock: Clock) -> tuple[Any, ...] | None:
    """What identifies a shareable store; None: make one of its own. The pid keeps
    a forked child off its parent's stores."""
    loop: object = None
    if IS_ASYNC:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # no loop yet to bind a pool to
    return (os.getpid(), url.raw, id(clock), loop)


def shared(key: tuple[Any, ...] | None, make: Callable[[], S]) -> S:
    """The open store for ``key`` with one more user, or a new one from ``make``."""
    if key is None:
        return make()
    with _GUARD:
        store: S | None = _SHARED.get(key)
        if store is not None and not store._closed:
            store._users += 1
            return store
        store = make()
        store._share_key = key
        _SHARED[key] = store
        return store


def leave(store: Shareable) -> bool:
    """One user fewer; True when that was the last (the caller closes the store)."""
    with _GUARD:
        store._users -= 1
        if store._users > 0:
            return False
        key = store._share_key
        if key is not None and _SHARED.get(key) is store:
            del _SHARED[key]
        return True
