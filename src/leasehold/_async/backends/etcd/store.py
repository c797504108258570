"""``etcd://`` and ``etcds://``: the store contract on etcd's v3 JSON gateway.

How each operation maps onto etcd (key layout: ``leasehold._core.etcd``):

* **acquire**: one transaction grants an idle name (nothing held or queued)
  outright; otherwise its failure branch returns the name's keys at one revision
  R, the pure ``decide`` picks grant or wait, and the grant is a second
  transaction that commits only if no key of the name was written after R. The
  holder key's create revision is the fence: strictly increasing across the whole
  cluster, never reused, through leader changes.
* **renew**: one keepalive request for every lease of the batch (the gateway
  streams one answer per lease), trusted once a read answers in the same Raft term
  (``confirmed_keepalive``). A holder key is removed only by its lease ending
  (expiry, ``break_lease`` revokes it) or by its own release, so a lease that is
  still alive proves its key still holds.
* **release**: one transaction deletes the token's holder and waiter keys; the
  released lease is kept as a spare for the next acquire (``leases.py``).
* **wait**: a watch from the revision of the acquire's read, on the waiter just
  ahead, or at the head of the queue on the holders: a release wakes one waiter.
  Nothing committed after that read is missed, even before ``wait`` is called.
* **records**: a key per record; compare-and-set on its mod revision.

Expiry is etcd's: a lease ends on the leader's clock. No hand-over: a released
place goes to the woken head waiter at its next acquire.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from leasehold._async._concurrency import sleep
from leasehold._async.backends.etcd.client import (
    AsyncEtcdHTTP,
    EtcdError,
    b64,
    revision,
    unb64,
)
from leasehold._async.backends.etcd.leases import AsyncLeasePool
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
from leasehold._core.etcd import (
    Entry,
    EtcdOptions,
    Keys,
    decide,
    epoch_for,
    holder_info,
    holder_value,
    lease_seconds,
    prefix_end,
    token_id,
)
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Capabilities,
    Granted,
    HolderInfo,
    Record,
    RenewItem,
    WaitResult,
)
from leasehold._core.url import StoreURL
from leasehold._errors import StoreUnavailable

# Attempts of one acquire whose grant transaction lost a race (each loss means
# another client changed the name meanwhile, so this bounds nothing but bad luck).
ACQUIRE_ATTEMPTS = 32
ANNOUNCE_LEASE_TTL = 60
# Records carry the server's clock (``Record.now``); etcd tells it in whole seconds.
CLOCK_PRECISION = 0.02
CLOCK_PROBE_INTERVAL = 0.01
CLOCK_PROBES = 150


def _put(key: bytes, value: bytes, lease: int = 0, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value), **extra}
    if lease:
        body["lease"] = lease
    return {"request_put": body}


def _delete(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "prev_kv": True}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_delete_range": body}


def _range(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_range": body}


def _compare(
    target: str, key: bytes, result: str, value: int | bytes, range_end: bytes | None = None
) -> dict[str, Any]:
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value"}[target]
    body: dict[str, Any] = {
        "target": target,
        "key": b64(key),
        "result": result,
        field: b64(value) if isinstance(value, bytes) else value,
    }
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return body


def _kvs(response: dict[str, Any], index: int) -> list[dict[str, Any]]:
    responses = response.get("responses", [])
    if index >= len(responses):
        return []
    kvs: list[dict[str, Any]] = responses[index].get("response_range", {}).get("kvs", [])
    return kvs


class AsyncEtcdStore(AsyncStore):
    capabilities = Capabilities(
        server_clock=True,
        durable=True,
        cross_host=True,
        notifications=True,
        fence_survives_data_loss=True,
        hand_over=False,
        notes=(
            "fences are etcd revisions: never reused, through leader changes and failover",
            "renewal is one keepalive request per batch of up to about 15 leases and a read "
            "that confirms the leader's term; expiry by etcd leases (whole seconds, rounded up)",
            "a release wakes the head waiter by a watch on its predecessor",
            "fences stay increasing after etcd loses its data unless the server clock "
            "stepped back across it",
        ),
        announcements=True,
        failover_safe=True,
    )

    def __init__(self, url: StoreURL, options: EtcdOptions, clock: Clock) -> None:
        self.url = url
        self._options = options
        self._clock = clock
        self._http = AsyncEtcdHTTP(options, clock)
        self._keys = Keys(options.prefix)
        self._pool = AsyncLeasePool(self._http)
        self._epoch: int | None = None
        # (name, token) -> (lease, create revision, lease seconds) of our grants.
        self._held: dict[tuple[str, str], tuple[int, int, int]] = {}
        # (name, token) -> what a queued waiter watches: a key or range, and the
        # keys in it whose deletion (seen or missed) lets the waiter look again.
        self._waits: dict[tuple[str, str], tuple[bytes, bytes | None, tuple[bytes, ...]]] = {}
        # (name, token) -> create revision of our waiter key, while queued.
        self._queued: dict[tuple[str, str], int] = {}
        self._announce_lease = 0
        self._data_losses = 0  # epochs seen to change: etcd lost its data
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
        self._queued = {}
        self._announce_lease = 0
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
        self._pool.forget()
        return True

    # -- acquire ------------------------------------------------------------------

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

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        validate.name(request.name)
        name, token = request.name, request.token
        keys = self._keys
        tid = token_id(token)
        seconds = lease_seconds(request.ttl)
        name_key = keys.name(name)
        name_end = prefix_end(name_key)
        holder_key = keys.holder(name, tid)
        waiter_key = keys.waiter(name, tid)
        lease: int | None = None
        lease_term: int | None = None
        try:
            state: dict[str, Any] | None = None
            for _attempt in range(ACQUIRE_ATTEMPTS):
                epoch = await self._get_epoch()
                if lease is None:
                    lease, lease_term = await self._pool.take(seconds)
                value = holder_value(
                    request.holder, request.limit, request.ttl, self._http.server_seconds or 0.0
                )
                failure = [_range(name_key, name_end), _range(keys.epoch)]
                if state is None:
                    # An idle name (no holder, no waiter) is granted in one step; so
                    # is an exclusive lock to the head of its queue when nobody holds.
                    response = await self._http.txn(
                        self._fast_guards(request, epoch),
                        [_put(holder_key, value, lease), _delete(waiter_key)],
                        failure,
                    )
                    if response.get("succeeded"):
                        granted = self._granted(name, token, lease, seconds, response)
                        held_lease, lease = lease, None  # it holds our key now
                        await self._confirm(held_lease, lease_term, response)
                        return Granted(epoch + granted)
                    state = response
                if self._epoch_lost(epoch, _kvs(state, 1)):
                    state = None
                    lease = None
                    continue
                seen = revision(state)
                decision = decide(keys, name, self._entries(_kvs(state, 0)), tid, request.limit)
                if decision.mine is not None:
                    result = await self._refresh(name, token, decision.mine, seconds, lease)
                    if result is None:
                        state = None  # our key ended meanwhile: look again
                        continue
                    lease = None if result < 0 else result
                    return Granted(epoch + decision.mine.create_revision)
                if decision.grant:
                    # Nothing granted since the read; and, for a token not yet
                    # queued, nobody queued either (a waiter queued meanwhile would
                    # be ahead of it). Waiters queueing behind a queued token cannot
                    # change its turn, so they do not make its grant retry.
                    holders_key = keys.holders(name)
                    guards = [
                        self._epoch_guard(epoch),
                        _compare("MOD", holders_key, "LESS", seen + 1, prefix_end(holders_key)),
                    ]
                    if decision.queued is None:
                        queue_key = keys.waiters(name)
                        guards.append(
                            _compare("MOD", queue_key, "LESS", seen + 1, prefix_end(queue_key))
                        )
                    response = await self._http.txn(
                        guards,
                        [_put(holder_key, value, lease), _delete(waiter_key)],
                        failure,
                    )
                    if response.get("succeeded"):
                        if decision.queued is not None and request.queue_ttl is not None:
                            self._pool.give_back(
                                lease_seconds(request.queue_ttl), decision.queued.lease
                            )
                        self._waits.pop((name, token), None)
                        granted = self._granted(name, token, lease, seconds, response)
                        held_lease, lease = lease, None
                        await self._confirm(held_lease, lease_term, response)
                        return Granted(epoch + granted)
                    state = response
                    continue
                position: int | None = None
                if request.queue_ttl is not None:
                    queued_at = await self._queue(
                        waiter_key, value, decision.queued, request.queue_ttl, epoch
                    )
                    if queued_at is None:
                        self._queued.pop((name, token), None)
                        state = None
                        continue
                    self._queued[(name, token)] = queued_at
                    position = decision.position
                    if decision.watch is not None:
                        watch_key, watch_end, expected = decision.watch
                        self._waits[(name, token)] = (watch_key, watch_end, expected)
                return Busy(retry_after=None, position=position)
            raise StoreUnavailable(
                f"etcd: acquire {name!r} lost {ACQUIRE_ATTEMPTS} races in a row; try again"
            )
        except BaseException:
            # A transaction whose answer was lost may have attached our key to the
            # lease: it must never be handed to another key (a later break_lease
            # revoking it would end both). It expires by itself, or holds our key.
            # Which lease holds our key is unknown now: renew looks it up.
            lease = None
            self._held.pop((name, token), None)
            raise
        finally:
            if lease is not None:
                self._pool.give_back(seconds, lease)

    async def _confirm(self, lease: int, term: int | None, response: dict[str, Any]) -> None:
        """A spare lease refreshed by a keepalive in another Raft term than the grant
        may have been renewed by a stale leader only: renew it again, confirmed.
        StoreUnavailable (the lock retries; our grant is found and refreshed) if
        that fails."""
        if term is None or term == int(response.get("header", {}).get("raft_term", 0)):
            return
        remaining = await self._http.confirmed_keepalive([lease], self._keys.epoch)
        if remaining.get(lease, 0) <= 0:
            raise StoreUnavailable("etcd: a grant's lease ended during a leader change")

    def _fast_guards(self, request: AcquireRequest, epoch: int) -> list[dict[str, Any]]:
        keys, name = self._keys, request.name
        queued_at = self._queued.get((name, request.token))
        if queued_at is None or request.limit != 1:
            start = keys.name(name)
            return [
                self._epoch_guard(epoch),
                _compare("CREATE", start, "LESS", 1, prefix_end(start)),
            ]
        holders, waiters = keys.holders(name), keys.waiters(name)
        own = keys.waiter(name, token_id(request.token))
        return [
            self._epoch_guard(epoch),
            _compare("CREATE", holders, "LESS", 1, prefix_end(holders)),  # nobody holds
            _compare("CREATE", own, "EQUAL", queued_at),  # still queued, at our place
            # and nobody queued before us: every waiter's create revision >= ours
            _compare("CREATE", waiters, "GREATER", queued_at - 1, prefix_end(waiters)),
        ]

    def _granted(
        self,
        name: str,
        token: str,
        lease: int,
        seconds: int,
        response: dict[str, Any],
    ) -> int:
        """Remember a grant; its create revision (the txn's revision)."""
        created = revision(response)
        self._held[(name, token)] = (lease, created, seconds)
        self._queued.pop((name, token), None)
        return created

    async def _refresh(
        self, name: str, token: str, mine: Entry, seconds: int, spare: int
    ) -> int | None:
        """The token already holds: renew its lease to the requested TTL. Returns
        the spare lease left unused (-1 if it was used), None if the key is gone."""
        confirmed = await self._http.confirmed_keepalive([mine.lease], self._keys.epoch)
        remaining = confirmed.get(mine.lease, 0)
        if remaining <= 0:
            self._held.pop((name, token), None)
            return None
        if remaining >= seconds:
            self._held[(name, token)] = (mine.lease, mine.create_revision, seconds)
            return spare
        moved = await self._move(self._keys.holder(name, mine.tid), mine.create_revision, spare)
        if not moved:
            return None
        self._held[(name, token)] = (spare, mine.create_revision, seconds)
        return -1

    async def _move(self, key: bytes, created: int, lease: int) -> bool:
        """Attach our holder key to another (longer) lease; its fence stays. The
        lease is renewed again, confirmed (``confirmed_keepalive``), once it holds
        the key: its refresh by ``take`` may have been a stale leader's."""
        response = await self._http.txn(
            [_compare("CREATE", key, "EQUAL", created)],
            [_put(key, b"", lease, ignore_value=True)],
        )
        if not response.get("succeeded"):
            return False
        confirmed = await self._http.confirmed_keepalive([lease], self._keys.epoch)
        return confirmed.get(lease, 0) > 0

    async def _queue(
        self, key: bytes, value: bytes, queued: Entry | None, queue_ttl: float, epoch: int
    ) -> int | None:
        """Keep our place (refreshing its expiry) or take one at the end; our waiter
        key's create revision. None if our place ended meanwhile or the epoch
        changed: the caller looks again."""
        seconds = lease_seconds(queue_ttl)
        if queued is not None:
            remaining = (await self._http.keepalive([queued.lease])).get(queued.lease, 0)
            return queued.create_revision if remaining > 0 else None
        lease, _term = await self._pool.take(seconds)  # a queue place: not a grant
        response = await self._http.txn(
            [self._epoch_guard(epoch), _compare("CREATE", key, "EQUAL", 0)],
            [_put(key, value, lease)],
            [_range(self._keys.epoch)],
        )
        if response.get("succeeded"):
            return revision(response)
        self._pool.give_back(seconds, lease)
        self._epoch_lost(epoch, _kvs(response, 0))
        return None

    # -- renew, release, break ----------------------------------------------------

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        self._after_fork()
        keys = self._keys
        unknown = [item for item in items if (item.name, item.token) not in self._held]
        if unknown:
            # Not granted through this store object: find the leases by key.
            response = await self._http.txn(
                [], [_range(keys.holder(i.name, token_id(i.token))) for i in unknown]
            )
            for index, item in enumerate(unknown):
                kvs = _kvs(response, index)
                if kvs:
                    self._held[(item.name, item.token)] = (
                        int(kvs[0].get("lease", 0)),
                        int(kvs[0]["create_revision"]),
                        0,
                    )
        known = [self._held.get((i.name, i.token)) for i in items]
        leases = [entry[0] for entry in known if entry is not None]
        remaining = await self._http.confirmed_keepalive(leases, keys.epoch) if leases else {}
        answers: list[bool] = []
        for item, entry in zip(items, known, strict=True):
            if entry is None or remaining.get(entry[0], 0) <= 0:
                self._held.pop((item.name, item.token), None)
                answers.append(False)
                continue
            lease, created, _seconds = entry
            wanted = lease_seconds(item.ttl)
            if remaining[lease] < wanted:
                # A longer TTL than the lease has: move the key to a new lease.
                spare, _term = await self._pool.take(wanted)
                key = keys.holder(item.name, token_id(item.token))
                try:
                    moved = await self._move(key, created, spare)
                except BaseException:
                    # Its answer lost, the move may have happened: look the lease up
                    # next time rather than keep the old one alive for nothing.
                    self._held.pop((item.name, item.token), None)
                    raise
                if not moved:
                    self._pool.give_back(wanted, spare)
                    self._held.pop((item.name, item.token), None)
                    answers.append(False)
                    continue
                self._held[(item.name, item.token)] = (spare, created, wanted)
            answers.append(True)
        return answers

    async def release(self, name: str, token: str) -> bool:
        self._after_fork()
        tid = token_id(token)
        held = self._held.pop((name, token), None)
        self._waits.pop((name, token), None)
        self._queued.pop((name, token), None)
        response = await self._http.txn(
            [], [_delete(self._keys.holder(name, tid)), _delete(self._keys.waiter(name, tid))]
        )
        responses = response.get("responses", [{}])
        deleted = responses[0].get("response_delete_range", {})
        released = int(deleted.get("deleted", 0)) > 0
        if released and held is not None and held[2] > 0:
            previous = deleted.get("prev_kvs", [{}])[0]
            if int(previous.get("lease", 0)) == held[0]:
                self._pool.give_back(held[2], held[0])
        return released

    async def break_lease(self, name: str) -> int:
        self._after_fork()
        start = self._keys.holders(name)
        kvs = (await self._http.range(start, prefix_end(start))).get("kvs", [])
        count = 0
        # Revoking (not deleting) keeps "lease alive" meaning "key held" for renew.
        for lease in dict.fromkeys(int(kv.get("lease", 0)) for kv in kvs):
            if lease and await self._http.revoke(lease):
                count += 1
        return count

    # -- views ----------------------------------------------------------------------

    async def _infos(self, kvs: list[dict[str, Any]]) -> list[HolderInfo]:
        epoch = await self._get_epoch()
        now = self._http.server_seconds or 0.0
        infos = []
        for kv in kvs:
            parts = self._keys.split_name_key(unb64(kv["key"]))
            if parts is None or parts[1] != "h":
                continue
            entry = self._entries([kv])[0]
            expires_in = await self._http.time_to_live(entry.lease) if entry.lease else 0
            if expires_in < 0:
                continue  # ended since the read
            infos.append(holder_info(parts[0], entry, epoch, now, float(expires_in)))
        return infos

    async def holders(self, name: str) -> list[HolderInfo]:
        self._after_fork()
        start = self._keys.holders(name)
        kvs = (await self._http.range(start, prefix_end(start))).get("kvs", [])
        kvs.sort(key=lambda kv: int(kv.get("create_revision", 0)))
        return await self._infos(kvs)

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        self._after_fork()
        start = self._keys.names(prefix)
        kvs = (await self._http.range(start, prefix_end(start))).get("kvs", [])
        infos = await self._infos(kvs)
        infos.sort(key=lambda info: (info.name, info.fence))
        return infos

    # -- waiting ----------------------------------------------------------------------

    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        self._after_fork()
        watch = self._waits.get((name, token))
        if watch is None:
            await sleep(timeout)
            return False
        key, range_end, expected = watch
        try:
            woken = await self._http.watch_once(key, range_end, timeout, ["NOPUT"], expected)
        except StoreUnavailable:
            # The caller's next acquire meets the outage and retries it with backoff.
            await sleep(min(timeout, 0.05))
            return True
        if woken:
            self._waits.pop((name, token), None)
        return woken

    # -- records ----------------------------------------------------------------------

    async def _calibrate(self) -> None:
        """Ask until the server clock estimate is good to CLOCK_PRECISION: at most
        once a store's life takes up to a second (waiting for a Date header to
        change its second), later answers keep it narrow."""
        for _attempt in range(CLOCK_PROBES):
            if not self._http.clock_calibrating(CLOCK_PRECISION):
                return
            await self._http.range(self._keys.epoch, count_only=True)
            await sleep(CLOCK_PROBE_INTERVAL)

    async def read_record(self, key: str) -> Record:
        self._after_fork()
        epoch = await self._get_epoch()
        await self._calibrate()
        kvs = (await self._http.range(self._keys.record(key))).get("kvs", [])
        now = self._http.server_seconds or 0.0
        if not kvs:
            return Record(key=key, value=None, version=0, now=now)
        kv = kvs[0]
        return Record(
            key=key,
            value=unb64(kv.get("value", "")),
            version=epoch + int(kv["mod_revision"]),
            now=now,
        )

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        self._after_fork()
        epoch = await self._get_epoch()
        record_key = self._keys.record(key)
        if expected_version == 0:
            compare = _compare("CREATE", record_key, "EQUAL", 0)
        elif expected_version - epoch <= 0:
            return None  # a version of an earlier epoch: etcd lost that record
        else:
            compare = _compare("MOD", record_key, "EQUAL", expected_version - epoch)
        lease = 0
        if value is None:
            operation = _delete(record_key)
        else:
            if ttl is not None:
                lease, _term = await self._pool.take(lease_seconds(ttl))
            operation = _put(record_key, value, lease)
        response = await self._http.txn(
            [self._epoch_guard(epoch), compare],
            [operation],
            [_range(self._keys.epoch)],
            again=False,  # a second sending would fail on our own write
        )
        if not response.get("succeeded"):
            if lease:
                self._pool.give_back(lease_seconds(ttl or 0), lease)
            self._epoch_lost(epoch, _kvs(response, 0))
            return None
        return epoch + revision(response)

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
        await self._slot.aclose()
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted!r})"
