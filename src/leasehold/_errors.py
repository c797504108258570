"""The exception hierarchy: one root, builtins mixed in where catching gets easier."""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "InvalidArgument",
    "LeaseLost",
    "LeaseholdError",
    "StaleFence",
    "StoreUnavailable",
]


class LeaseholdError(Exception):
    """Root of every error leasehold raises on purpose."""


class InvalidArgument(LeaseholdError, ValueError):
    """Bad input, reported before any I/O. The message says what is allowed."""


class AcquireTimeout(LeaseholdError, TimeoutError):
    """The lease could not be acquired within the given timeout."""

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"could not acquire {name!r} within {timeout:g} s")
        self.name = name
        self.timeout = timeout


class LeaseLost(LeaseholdError):
    """The lease is not held any more (expired, taken over, broken, or unreachable store).

    Code protected by the lease must stop: a successor may already be acting.
    """

    def __init__(self, name: str, fence: int, reason: str) -> None:
        super().__init__(f"lease {name!r} (fence {fence}) lost: {reason}")
        self.name = name
        self.fence = fence
        self.reason = reason


class StoreUnavailable(LeaseholdError, ConnectionError):
    """The store could not be reached or answered with an error.

    Messages never contain credentials.
    """


class StaleFence(LeaseholdError):
    """A fenced write carried a fence lower than one the resource has already seen."""

    def __init__(self, name: str, fence: int, highest: int) -> None:
        super().__init__(
            f"stale fence for {name!r}: {fence} < highest seen {highest}; "
            "a newer holder has taken over, so this write was rejected"
        )
        self.name = name
        self.fence = fence
        self.highest = highest
