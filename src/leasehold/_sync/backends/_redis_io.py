"""The sync half of the Redis backend's tiny shim (its twin: _async/backends/_redis_io.py).

Threads cannot be cancelled, so there is no swallowed cancellation to raise again.
"""

from __future__ import annotations


def cancellations() -> int:
    return 0


def raise_if_cancelled_since(before: int) -> None:
    del before
