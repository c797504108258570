"""Backends and the one place that maps a URL to a store."""

from __future__ import annotations

import importlib

from leasehold._async.store import AsyncStore
from leasehold._core.clock import Clock
from leasehold._core.url import StoreURL
from leasehold._errors import InvalidArgument

_MODULES = {
    "memory": ("memory", None),
    "sqlite": ("sqlite", None),
    "redis": ("redis", "redis"),
    "postgres": ("postgres", "postgres"),
    "etcd": ("etcd", "etcd"),
}


def open_store(url: StoreURL, clock: Clock) -> AsyncStore:
    """Build the store for ``url`` without doing any I/O."""
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
    return store
