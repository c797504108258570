"""Backends and the one place that maps a URL to a store."""

from __future__ import annotations

import importlib

from leasehold._async.store import AsyncStore
from leasehold._core.clock import Clock
from leasehold._core.url import StoreURL, pop_option
from leasehold._deadline import DEFAULT_OPERATION_TIMEOUT, validate_operation_timeout
from leasehold._errors import InvalidArgument

_MODULES = {
    "memory": ("memory", None),
    "sqlite": ("sqlite", None),
    "redis": ("redis", "redis"),
    "postgres": ("postgres", "postgres"),
    "etcd": ("etcd", "etcd"),
}


def open_store(
    url: StoreURL, clock: Clock, *, operation_timeout: float | None = None
) -> AsyncStore:
    """Build the store for ``url`` without doing any I/O.

    ``operation_timeout`` (seconds) bounds each store call; when None, the URL's
    ``?operation_timeout=`` or the default. Every backend accepts that option."""
    url, given = pop_option(url, "operation_timeout")
    if operation_timeout is None:
        operation_timeout = (
            DEFAULT_OPERATION_TIMEOUT
            if given is None
            else validate_operation_timeout(given, what="the url's operation_timeout")
        )
    module_name, extra = _MODULES[url.backend]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        if extra is None:
            raise
        raise InvalidArgument(
            f"the {url.scheme}:// backend needs an optional dependency that is not "
            f"installed ({exc.name}); install it with: pip install 'leasehold[{extra}]'"
        ) from None
    store: AsyncStore = module.from_url(url, clock)
    if store.operation_timeout_set and store.operation_timeout != operation_timeout:
        # Clients of one process may share one store (PostgreSQL does): the
        # tighter bound keeps both clients' promises.
        operation_timeout = min(store.operation_timeout, operation_timeout)
    store.operation_timeout = operation_timeout
    store.operation_timeout_set = True
    return store
