"""The etcd backend: ``etcd://host:2379[,host:2379...]`` and ``etcds://`` (TLS).

Modules: ``client`` (HTTP, endpoints, auth, errors), ``leases`` (the etcd leases
keys are attached to), ``watches`` (announcements), ``store`` (the contract).
"""

from __future__ import annotations

from leasehold._async.backends.etcd.store import AsyncEtcdStore
from leasehold._core.clock import Clock
from leasehold._core.etcd import parse_options
from leasehold._core.url import StoreURL

__all__ = ["AsyncEtcdStore", "from_url"]


def from_url(url: StoreURL, clock: Clock) -> AsyncEtcdStore:
    """Validate the URL's options now; connect on first use."""
    return AsyncEtcdStore(url, parse_options(url.raw), clock)
