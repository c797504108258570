"""The exception hierarchy: one root, builtins mixed in where catching gets easier."""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "InvalidArgument",
    "LeaseLost",
    "LeaseholdError",
    "MemberGone",
    "OnceFailed",
    "StaleEpoch",
    "StaleFence",
    "StoreMisconfigured",
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

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Rebuilt from the structured fields, so the error survives pickling
        # (multiprocessing, Celery result backends) with its message intact.
        return (type(self), (self.name, self.timeout))


class LeaseLost(LeaseholdError):
    """The lease is not held any more (expired, taken over, broken, or unreachable store).

    Code protected by the lease must stop: a successor may already be acting.
    """

    def __init__(self, name: str, fence: int, reason: str) -> None:
        super().__init__(f"lease {name!r} (fence {fence}) lost: {reason}")
        self.name = name
        self.fence = fence
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Rebuilt from the structured fields, so the error survives pickling
        # (multiprocessing, Celery result backends) with its message intact.
        return (type(self), (self.name, self.fence, self.reason))


class StoreUnavailable(LeaseholdError, ConnectionError):
    """The store could not be reached or answered with an error.

    Messages never contain credentials.
    """


class StoreMisconfigured(StoreUnavailable):
    """The store answered, and its answer means the configuration is wrong:
    authentication, a missing permission, an unknown database, a failed TLS
    verification, a missing schema with ``create_schema=false``, a read-only replica.

    Raised at once and never retried: waiting does not fix it. A subclass of
    ``StoreUnavailable`` so that code catching that sees it too. Messages never
    contain credentials.
    """


class NoAnswer(StoreUnavailable):
    """A store call ended by its deadline (the operation timeout, or the caller's
    own shorter one): the store did not answer in time and the connection was
    dropped. Not exported: catch ``StoreUnavailable``."""


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

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Rebuilt from the structured fields, so the error survives pickling
        # (multiprocessing, Celery result backends) with its message intact.
        return (type(self), (self.name, self.fence, self.highest))


class StaleEpoch(LeaseholdError):
    """A presence operation named an epoch that is not the room's current OPEN one."""

    def __init__(self, room: str, epoch: int, current: int | None) -> None:
        now = "no open epoch" if current is None else f"the current open epoch is {current}"
        super().__init__(f"epoch {epoch} of room {room!r} is not current: {now}")
        self.room = room
        self.epoch = epoch
        self.current = current

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Rebuilt from the structured fields, so the error survives pickling
        # (multiprocessing, Celery result backends) with its message intact.
        return (type(self), (self.room, self.epoch, self.current))


class MemberGone(LeaseholdError):
    """A presence member's heartbeat came after its membership had expired or ended."""

    def __init__(self, room: str, member: str, epoch: int) -> None:
        super().__init__(f"member {member!r} of room {room!r} (epoch {epoch}) is gone")
        self.room = room
        self.member = member
        self.epoch = epoch

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Rebuilt from the structured fields, so the error survives pickling
        # (multiprocessing, Celery result backends) with its message intact.
        return (type(self), (self.room, self.member, self.epoch))


class OnceFailed(LeaseholdError):
    """A once-only function failed; the recorded failure (type and message) is attached."""

    def __init__(self, key: str, error_type: str, message: str) -> None:
        super().__init__(f"once-only {key!r} failed: {error_type}: {message}")
        self.key = key
        self.error_type = error_type
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Rebuilt from the structured fields, so the error survives pickling
        # (multiprocessing, Celery result backends) with its message intact.
        return (type(self), (self.key, self.error_type, self.message))
