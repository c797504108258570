"""leasehold: race-free coordination of workers.

Leased locks with fencing tokens and automatic renewal, semaphores, on the embedded
SQLite default, in memory, on Redis and on PostgreSQL. ``Client`` is the sync API,
``AsyncClient`` the asyncio one; both have the same methods.
"""

from leasehold import events, retry  # the public modules leasehold.events, .retry
from leasehold._async.client import AsyncClient
from leasehold._async.election import AsyncElection
from leasehold._async.lease import AsyncLease
from leasehold._async.lock import AsyncLock
from leasehold._async.once import AsyncOnce
from leasehold._async.presence import AsyncPresence
from leasehold._async.store import AsyncStore, AsyncSubscription
from leasehold._core.clock import Clock, FakeClock, SystemClock
from leasehold._core.election import Leader
from leasehold._core.health import Health
from leasehold._core.once import NoResult
from leasehold._core.presence import Epoch, Member, Snapshot
from leasehold._core.records import (
    AcquireRequest,
    Busy,
    Capabilities,
    Granted,
    Holder,
    HolderInfo,
    Record,
    RenewItem,
)
from leasehold._core.stats import Statistics
from leasehold._errors import (
    AcquireTimeout,
    InvalidArgument,
    LeaseholdError,
    LeaseLost,
    MemberGone,
    OnceFailed,
    StaleEpoch,
    StaleFence,
    StoreUnavailable,
)
from leasehold._sync.client import Client
from leasehold._sync.election import Election
from leasehold._sync.lease import Lease
from leasehold._sync.lock import Lock
from leasehold._sync.once import Once
from leasehold._sync.presence import Presence
from leasehold._sync.store import Store, Subscription

__version__ = "0.1.0"

__all__ = [
    "AcquireRequest",
    "AcquireTimeout",
    "AsyncClient",
    "AsyncElection",
    "AsyncLease",
    "AsyncLock",
    "AsyncOnce",
    "AsyncPresence",
    "AsyncStore",
    "AsyncSubscription",
    "Busy",
    "Capabilities",
    "Client",
    "Clock",
    "Election",
    "Epoch",
    "FakeClock",
    "Granted",
    "Health",
    "Holder",
    "HolderInfo",
    "Leader",
    "InvalidArgument",
    "Lease",
    "LeaseLost",
    "LeaseholdError",
    "Member",
    "MemberGone",
    "NoResult",
    "Once",
    "OnceFailed",
    "Presence",
    "StaleEpoch",
    "Lock",
    "Record",
    "RenewItem",
    "Snapshot",
    "StaleFence",
    "Statistics",
    "Store",
    "StoreUnavailable",
    "Subscription",
    "SystemClock",
    "__version__",
    "events",
    "retry",
]
