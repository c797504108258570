"""Local queues: the waiters of one client for one name, in arrival order.

Only the waiter at the head of a client's local queue waits in the store; the
others wait for their turn in-process. A crowd of 1,000 tasks in one process then
costs the store O(1) operations per handoff and one queue refresh per interval,
not 1,000, while the store's own FIFO queue keeps processes fair to each other.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque

from leasehold._async._concurrency import AsyncEvent

# Stands for a waiter that joined an empty queue: it never waits, so it needs no event.
_HEAD = object()


class AsyncGates:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        # A name with one waiter (the common case) maps to _HEAD itself; a deque
        # only once a second waiter joins.
        self._queues: dict[tuple[str, int], object] = {}

    def join(self, key: tuple[str, int]) -> AsyncEvent | None:
        """Queue up. None: it is this waiter's turn already (the common case, which
        then costs no event); else an event that is set when its turn comes."""
        with self._guard:
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = _HEAD
                return None
            if queue is _HEAD:
                queue = self._queues[key] = deque([_HEAD])
            assert isinstance(queue, deque)
            turn = AsyncEvent()
            queue.append(turn)
            return turn

    def leave(self, key: tuple[str, int], turn: AsyncEvent | None) -> None:
        """Leave the queue (granted, gave up or cancelled); the next gets its turn."""
        successor = None
        with self._guard:
            queue = self._queues.get(key)
            if queue is None:
                return
            if queue is _HEAD:
                if turn is None:  # the only waiter leaves
                    del self._queues[key]
                return
            assert isinstance(queue, deque)
            mine = _HEAD if turn is None else turn
            was_head = bool(queue) and queue[0] is mine
            with contextlib.suppress(ValueError):  # already left
                queue.remove(mine)
            if not queue:
                del self._queues[key]
            elif was_head:
                successor = queue[0]
        if isinstance(successor, AsyncEvent):
            successor.set()

    def waiting(self, key: tuple[str, int]) -> int:
        with self._guard:
            queue = self._queues.get(key)
            if queue is None:
                return 0
            return 1 if queue is _HEAD else len(queue)  # type: ignore[arg-type]
