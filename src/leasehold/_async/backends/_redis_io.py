"""The async half of the Redis backend's tiny shim (its twin: _sync/backends/_redis_io.py).

redis-py's asyncio client sends each command through ``asyncio.wait_for``. On
Python 3.11, ``wait_for`` returns the inner result when a cancellation arrives just
as the inner operation completes, and the cancellation is lost: the command's
caller carries on as if never cancelled (a cancelled lock acquire would keep
waiting). The store counts the task's cancellation requests around each command
and raises a swallowed one again. Threads cannot be cancelled, so the sync twin
does nothing.
"""

from __future__ import annotations

import asyncio


def cancellations() -> int:
    """Cancellation requests of the current task not yet taken back (0 outside a task)."""
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def raise_if_cancelled_since(before: int) -> None:
    """Raise CancelledError if the task was cancelled since ``cancellations()`` was
    ``before`` and the cancellation never reached us."""
    if cancellations() > before:
        raise asyncio.CancelledError("cancelled during a Redis command")
