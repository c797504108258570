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


class AsyncGates:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._queues: dict[tuple[str, int], deque[AsyncEvent]] = {}

    def join(self, key: tuple[str, int]) -> AsyncEvent:
        """Queue up; the returned event is set when it is this waiter's turn."""
        turn = AsyncEvent()
        with self._guard:
            queue = self._queues.setdefault(key, deque())
            queue.append(turn)
            head = queue[0] is turn
        if head:
            turn.set()
        return turn

    def leave(self, key: tuple[str, int], turn: AsyncEvent) -> None:
        """Leave the queue (granted, gave up or cancelled); the next gets its turn."""
        successor = None
        with self._guard:
            queue = self._queues.get(key)
            if queue is None:
                return
            was_head = bool(queue) and queue[0] is turn
            with contextlib.suppress(ValueError):  # already left
                queue.remove(turn)
            if not queue:
                del self._queues[key]
            elif was_head:
                successor = queue[0]
        if successor is not None:
            successor.set()

    def waiting(self, key: tuple[str, int]) -> int:
        with self._guard:
            return len(self._queues.get(key, ()))
