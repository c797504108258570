"""Public test kit: a fake clock, the backend harness, the store conformance suite and
a TCP fault proxy (``FaultProxy``) to put between an application and its store.

Third-party backends prove themselves by running the same suite leasehold's own
backends run: provide an ``lh_backend`` pytest fixture that returns a
``BackendHarness`` and ``from leasehold.testing.conformance import *`` in a test
module.
"""

from __future__ import annotations

from leasehold._core.clock import FakeClock
from leasehold.testing.faultproxy import FaultProxy, ProxyMode
from leasehold.testing.harness import BackendHarness
from leasehold.testing.wrappers import CountingStore, FaultyStore

__all__ = [
    "BackendHarness",
    "CountingStore",
    "FakeClock",
    "FaultProxy",
    "FaultyStore",
    "ProxyMode",
]
