"""Every store operation under a deadline: the store's operation timeout.

``AsyncStore.__init_subclass__`` wraps the contract's operations of every store
class with ``bounded_operation``, so no backend (or third-party store) can forget
it. How a deadline stops a stalled call is in ``leasehold._deadline``; what this
adds is the bound itself (``store.operation_timeout``, or a caller's shorter one)
and one clear error when it was the deadline that ended the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from leasehold import _deadline
from leasehold._errors import NoAnswer, StoreMisconfigured, StoreUnavailable

F = TypeVar("F", bound=Callable[..., Any])

# The operations of the store contract that talk to the store. ``wait`` is bounded
# by its own timeout plus the operation timeout (it is meant to block).
OPERATIONS = (
    "acquire",
    "renew",
    "release",
    "holders",
    "leases",
    "break_lease",
    "read_record",
    "write_record",
    "ping",
    "server_time",
    "announce",
    "wait",
)


RENEW_ITEM_SECONDS = 0.001


def _limit(store: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    seconds = float(store.operation_timeout)
    if name == "renew":
        # One call renews a whole batch (10,000 leases are seconds of server work
        # under load): a millisecond more per lease.
        items = kwargs.get("items", args[0] if args else ())
        seconds += RENEW_ITEM_SECONDS * len(items)
    elif name == "wait":
        timeout = kwargs.get("timeout", args[2] if len(args) > 2 else 0.0)
        seconds += max(0.0, float(timeout))
    return seconds


def bounded_operation(name: str, fn: F) -> F:
    """``fn`` (a store operation) under the store's operation timeout."""
    if getattr(fn, "__leasehold_bounded__", False):
        return fn
    # Only renew and wait take a bound that depends on their arguments; every
    # other operation takes the store's timeout as it is (the hot path: acquire
    # and release read one attribute, no helper call).
    sized = name in ("renew", "wait")

    @functools.wraps(fn)
    async def operation(self: Any, *args: Any, **kwargs: Any) -> Any:
        seconds = _limit(self, name, args, kwargs) if sized else self.operation_timeout
        with _deadline.bounded(seconds) as deadline:
            try:
                return await fn(self, *args, **kwargs)
            except StoreMisconfigured:
                raise
            except StoreUnavailable as exc:
                if not deadline.expired:
                    raise
                raise NoAnswer(
                    f"{self.url.redacted}: {name} got no answer within "
                    f"{deadline.seconds:g} s; its connection was dropped"
                ) from exc

    operation.__leasehold_bounded__ = True  # type: ignore[attr-defined]
    return operation  # type: ignore[return-value]


def bound_operations(cls: type) -> None:
    """Wrap the operations ``cls`` itself defines (inherited ones already are)."""
    for name in OPERATIONS:
        fn = cls.__dict__.get(name)
        if fn is not None and callable(fn):
            setattr(cls, name, bounded_operation(name, fn))
