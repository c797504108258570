"""The etcd store's base: its state, fork safety, the epoch (fences after etcd lost
its data), the server clock, announcements and closing. The operations of the
store contract are in ``store.py``."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, TypeAlias

from leasehold import _deadline
from leasehold._async._concurrency import sleep
from leasehold._async.backends.etcd.client import AsyncEtcdHTTP, EtcdError, b64, unb64
from leasehold._async.backends.etcd.leases import SessionLeases, Tracked
from leasehold._async.backends.etcd.txn import _compare, _kvs, _put, _range
from leasehold._async.backends.etcd.watches import AsyncAnnouncementListener
from leasehold._async.store import (
    AsyncStore,
    AsyncSubscription,
    HubSubscription,
    ListenerSlot,
    TopicHub,
)
from leasehold._core import validate
from leasehold._core.clock import Clock
from leasehold._core.etcd import Entry, EtcdOptions, Keys, epoch_for
from leasehold._core.url import StoreURL
from leasehold._errors import StoreUnavailable

# What a queued waiter watches (see ``_waits``): a key or a range (key, range end),
# the keys in it that must still exist, and the waiter's limit.
Watch: TypeAlias = tuple[bytes, bytes | None, tuple[bytes, ...], int]

logger = logging.getLogger("leasehold")

ANNOUNCE_LEASE_TTL = 60
# Records carry the server's clock (``Record.now``); etcd tells it in whole seconds.
CLOCK_PRECISION = 0.02
CLOCK_PROBE_INTERVAL = 0.01
CLOCK_PROBES = 150
# A probe in flight longer than this no longer stops others from probing.
CLOCK_PROBE_HOLD = 0.5


class EtcdConnection(AsyncStore):
    def __init__(self, url: StoreURL, options: EtcdOptions, clock: Clock) -> None:
        self.url = url
        self._options = options
        self._clock = clock
        self._http = AsyncEtcdHTTP(options, clock)
        self._keys = Keys(options.prefix)
        self._sessions = SessionLeases(self._http, self._keys.epoch, clock)
        self._epoch: int | None = None
        # (name, token) -> our holder key: its lease, create revision, deadline.
        self._held: dict[tuple[str, str], Tracked] = {}
        # (name, token) -> what a queued waiter watches: a key or range, the keys in
        # it whose deletion (seen or missed) lets the waiter look again, and the
        # waiter's limit (to tell, after its predecessor left, whether it has a place).
        self._waits: dict[tuple[str, str], Watch] = {}
        # Names that had waiters at our last look (a hint for acquire: insertion
        # order, at most _CROWDED_NAMES).
        self._crowded: dict[str, None] = {}
        # (name, token) -> our waiter key (its create revision: our place), while queued.
        self._queued: dict[tuple[str, str], Tracked] = {}
        # Guards the two maps above across threads (a sync store is shared by the
        # keeper's thread and the caller's): a renewal, an acquire and a sweep
        # each check and change an entry in one step; never held across I/O.
        self._track_guard = threading.Lock()
        # No tracked key's deadline is before this (a hint: a sweep looks only after it).
        self._earliest = float("inf")
        # (name, token) of holder keys swept lately: a renewal never takes one up again.
        self._swept: dict[tuple[str, str], None] = {}
        # Keys past their deadline that a sweep could not delete yet: (key, entry).
        self._unswept: list[tuple[bytes, Tracked]] = []
        self._announce_lease = 0
        self._data_losses = 0  # epochs seen to change: etcd lost its data
        self._clock_warned = False
        self._topics = TopicHub()
        self._slot = ListenerSlot(
            lambda: AsyncAnnouncementListener(self._http, self._keys, self._topics),
            retry=1.0,
            what=f"etcd store {url.redacted}",
        )
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        if self._pid == os.getpid():
            return
        # The parent's grants stay the parent's: a child never renews or releases them.
        self._held = {}
        self._waits = {}
        self._crowded = {}
        self._queued = {}
        self._track_guard = threading.Lock()
        self._earliest = float("inf")
        self._swept = {}
        self._unswept = []
        self._announce_lease = 0
        self._sessions._after_fork()
        self._topics.after_fork_in_child()
        self._pid = os.getpid()

    # -- the epoch: fences after etcd lost its data --------------------------------

    async def _get_epoch(self) -> int:
        self._after_fork()
        if self._epoch is not None:
            return self._epoch
        key = self._keys.epoch
        kvs = (await self._http.range(key)).get("kvs", [])
        if not kvs:
            seconds = self._http.server_seconds
            if seconds is None:
                raise StoreUnavailable("etcd: the gateway sent no Date header")
            candidate = epoch_for(seconds)
            response = await self._http.txn(
                [_compare("CREATE", key, "EQUAL", 0)],
                [_put(key, str(candidate).encode())],
                [_range(key)],
            )
            if response.get("succeeded"):
                self._epoch = candidate
                return candidate
            kvs = _kvs(response, 0)
        try:
            self._epoch = int(unb64(kvs[0]["value"]))
        except (KeyError, IndexError, ValueError):
            raise StoreUnavailable("etcd: the epoch key holds no number") from None
        return self._epoch

    def _epoch_guard(self, epoch: int) -> dict[str, Any]:
        return _compare("VALUE", self._keys.epoch, "EQUAL", str(epoch).encode())

    def _epoch_lost(self, epoch: int, kvs: list[dict[str, Any]]) -> bool:
        """True (and every cached lease forgotten) when the epoch key read in a
        failed transaction is not ours: etcd lost its data, or was reset."""
        if kvs and kvs[0].get("value") == b64(str(epoch).encode()):
            return False
        self._data_losses += 1
        self._epoch = None
        self._held.clear()
        self._queued.clear()
        self._sessions.forget()
        return True

    # -- keys read back ------------------------------------------------------------

    def _entries(self, kvs: list[dict[str, Any]]) -> list[Entry]:
        entries = []
        for kv in kvs:
            parts = self._keys.split_name_key(unb64(kv["key"]))
            if parts is None:
                continue
            entries.append(
                Entry(
                    kind=parts[1],
                    tid=parts[2],
                    create_revision=int(kv.get("create_revision", 0)),
                    lease=int(kv.get("lease", 0)),
                    value=unb64(kv.get("value", "")),
                )
            )
        return entries

    # -- the server clock -----------------------------------------------------------

    async def _calibrate(self) -> None:
        """Ask until the server clock estimate is good to CLOCK_PRECISION or has
        seen a Date header change its second: at most once in a process's life
        (the estimate is shared) this takes up to a second; later answers keep it
        narrow. One caller probes at a time, the others wait for its answers.

        Never at the cost of the operation: with less than half of its time left
        it goes on with the estimate it has (and says so once)."""
        deadline = _deadline.current()
        for _attempt in range(CLOCK_PROBES):
            if not self._http.clock_calibrating(CLOCK_PRECISION):
                return
            if deadline is not None and deadline.remaining() < deadline.seconds / 2:
                break
            if self._http.claim_clock_probe(CLOCK_PROBE_HOLD):
                try:
                    await self._http.range(self._keys.epoch, count_only=True)
                finally:
                    self._http.clock_probe_done()
            await sleep(CLOCK_PROBE_INTERVAL)
        if not self._clock_warned:
            self._clock_warned = True
            logger.warning(
                "etcd %s: the server's clock is known only to within %.2f s (its answers "
                "came too slowly to calibrate it); presence and once expiry may be off "
                "by half that until later answers narrow it",
                self._http.endpoint,
                self._http.clock_width(),
            )

    # -- the rest ---------------------------------------------------------------------

    async def ping(self) -> None:
        await self._get_epoch()
        await self._http.range(self._keys.epoch, count_only=True)

    async def server_time(self) -> float | None:
        await self._calibrate()
        await self._http.range(self._keys.epoch, count_only=True)
        return self._http.server_seconds

    async def announce(self, topic: str) -> None:
        validate.topic(topic)
        self._after_fork()
        key = self._keys.topic(topic)
        for _attempt in range(2):
            if not self._announce_lease:
                self._announce_lease, _ = await self._http.grant(ANNOUNCE_LEASE_TTL)
            try:
                put = _put(key, b"1", self._announce_lease)["request_put"]
                await self._http.call("kv/put", put)
            except EtcdError as exc:
                if not exc.lease_not_found:
                    raise
                self._announce_lease = 0
                continue
            return

    def subscribe(self, topic: str) -> AsyncSubscription:
        return HubSubscription(validate.topic(topic), self._topics, self._slot)

    def restarts(self, name: str) -> int:
        """Times this store saw etcd's epoch change (etcd lost its data): a lease
        granted before then and refused after was lost to it. A leader change is
        not a restart: grants survive it."""
        del name
        return self._data_losses

    async def aclose(self) -> None:
        if self._pid == os.getpid():
            # Every key of ours goes with our session leases (a child leaves the
            # parent's alone).
            await self._sessions.aclose()
        await self._slot.aclose()
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted!r})"
