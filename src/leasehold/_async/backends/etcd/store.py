"""``etcd://`` and ``etcds://``: the store contract on etcd's v3 JSON gateway.

How each operation maps onto etcd (key layout: ``leasehold._core.etcd``):

* **acquire**: one transaction grants an idle name (nothing held or queued)
  outright; otherwise its failure branch returns the name's keys at one revision
  R, the pure ``decide`` picks grant or wait, and the grant is a second
  transaction that commits only if no key of the name was written after R. The
  holder key's create revision is the fence: strictly increasing across the whole
  cluster, never reused, through leader changes. The key goes on this store's
  *session lease* for its TTL (``leases.py``), refreshed by a keepalive sent
  after the acquire began (so the grant's etcd expiry comes after the caller's
  send time + TTL) and trusted when the transaction commits in its grant's term.
* **renew**: one keepalive of the session lease(s) of the batch, however many
  keys, then one read of every renewed key that confirms the Raft term and that
  each key still exists with our create revision (``renewal.py``). A key on
  another lease (a leader change: an old leader may still revoke the leases it
  knew, see ``leases.py``) moves to the current session lease in a few
  transactions. Keys not renewed are deleted once their own deadline passed
  (the sweep), so other keys keeping the session lease alive never keep them.
* **release**: one transaction deletes the token's holder and waiter keys; the
  session lease stays (it is revoked by ``close``).
* **break_lease** deletes the holder keys (a session lease carries others).
* **wait**: a watch from the revision of the acquire's read, on the waiter just
  ahead, or at the head of the queue on the holders: a release wakes one waiter.
  Nothing committed after that read is missed, even before ``wait`` is called.
  When the waiter ahead leaves (granted, usually), one read tells whether a holder
  still stands in the way; if so the wait goes on, on the holders, instead of
  waking its caller for an attempt that would fail.
* **records**: a key per record; compare-and-set on its mod revision.

Expiry is etcd's: a lease ends on the leader's clock (and a key whose holder
stopped renewing it, in the renewal round after its own deadline). No hand-over: a released
place goes to the woken head waiter at its next acquire.
"""

from __future__ import annotations

from typing import Any

from leasehold._async._concurrency import sleep
from leasehold._async.backends.etcd.client import revision, unb64
from leasehold._async.backends.etcd.connection import Watch
from leasehold._async.backends.etcd.leases import Session, Tracked
from leasehold._async.backends.etcd.renewal import SessionKeys
from leasehold._async.backends.etcd.txn import _compare, _delete, _kvs, _put, _range, _term
from leasehold._core import validate
from leasehold._core.etcd import (
    Entry,
    decide,
    holder_info,
    holder_value,
    lease_seconds,
    prefix_end,
    session_seconds,
    session_slack,
    token_id,
    waiter_info,
)
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Capabilities,
    Granted,
    HolderInfo,
    Record,
    WaiterInfo,
    WaitResult,
)
from leasehold._errors import StoreUnavailable

# Attempts of one acquire whose grant transaction lost a race (each loss means
# another client changed the name meanwhile, so this bounds nothing but bad luck).
ACQUIRE_ATTEMPTS = 32
# How many names acquire remembers as having had waiters (see _note_crowd).
_CROWDED_NAMES = 1024


class AsyncEtcdStore(SessionKeys):
    capabilities = Capabilities(
        server_clock=True,
        durable=True,
        cross_host=True,
        notifications=True,
        fence_survives_data_loss=True,
        hand_over=False,
        notes=(
            "fences are etcd revisions: never reused, through leader changes and failover",
            "keys share one etcd lease per TTL and Raft term (a session lease): renewal is "
            "one keepalive and one read however many leases; a key not renewed is deleted "
            "at most one renewal interval after its own TTL; a lease is trusted only in the "
            "term it was granted in (keys move to a new lease after a leader change); expiry "
            "by etcd leases (whole seconds, rounded up; above a 9 s TTL, plus a tenth so "
            "that most acquires need no keepalive: a dead holder's keys go that much later)",
            "a release wakes the head waiter by a watch on its predecessor",
            "fences stay increasing after etcd loses its data unless the server clock "
            "stepped back across it",
        ),
        announcements=True,
        failover_safe=True,
        # An HTTP request cancelled midway closes its connection; release is one txn.
        cancels_cleanly=True,
    )

    # -- acquire ------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        validate.name(request.name)
        self._after_fork()
        # No later than the caller's send time: a grant's etcd expiry must come
        # after this + ttl (the session lease is refreshed after it, ``fresh``).
        started = self._clock.monotonic()
        name, token = request.name, request.token
        pair = (name, token)
        keys = self._keys
        tid = token_id(token)
        seconds = session_seconds(request.ttl)
        name_key = keys.name(name)
        name_end = prefix_end(name_key)
        holder_key = keys.holder(name, tid)
        waiter_key = keys.waiter(name, tid)
        session: Session | None = None
        # Our keys past their own deadline go before the session lease is refreshed.
        await self._sweep(started, set())
        try:
            state: dict[str, Any] | None = None
            for _attempt in range(ACQUIRE_ATTEMPTS):
                epoch = await self._get_epoch()
                value = holder_value(
                    request.holder, request.limit, request.ttl, self._http.server_seconds or 0.0
                )
                failure = [_range(name_key, name_end), _range(keys.epoch)]
                if state is None and name in self._crowded and pair not in self._queued:
                    # Waiters were queued for this name at our last look, so a
                    # newcomer's one-step grant would likely fail, and a failed
                    # transaction that could have written is still a Raft entry (a
                    # WAL write): read instead (a transaction of reads only, which
                    # etcd serves without one), then grant or queue as below.
                    state = await self._http.txn([], failure)
                if state is None:
                    # An idle name (no holder, no waiter) is granted in one step; so
                    # is an exclusive lock to the head of its queue when nobody holds.
                    if session is None:
                        session = await self._sessions.fresh(seconds, started, request.ttl)
                    response = await self._http.txn(
                        self._fast_guards(request, epoch),
                        [_put(holder_key, value, session.lease), _delete(waiter_key)],
                        failure,
                    )
                    if response.get("succeeded"):
                        created = await self._granted(request, session, started, response)
                        return Granted(epoch + created)
                    state = response
                if self._epoch_lost(epoch, _kvs(state, 1)):
                    state = None
                    session = None
                    continue
                seen = revision(state)
                entries = self._entries(_kvs(state, 0))
                self._note_crowd(name, entries)
                decision = decide(keys, name, entries, tid, request.limit)
                if decision.mine is not None:
                    if not await self._refresh(request, decision.mine, started):
                        state = None  # our key ended meanwhile: look again
                        continue
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
                    if session is None:
                        session = await self._sessions.fresh(seconds, started, request.ttl)
                    response = await self._http.txn(
                        guards,
                        [_put(holder_key, value, session.lease), _delete(waiter_key)],
                        failure,
                    )
                    if response.get("succeeded"):
                        self._waits.pop(pair, None)
                        created = await self._granted(request, session, started, response)
                        return Granted(epoch + created)
                    state = response
                    continue
                position: int | None = None
                if request.queue_ttl is not None:
                    queued_at = await self._queue(
                        pair,
                        value,
                        decision.queued,
                        queue_ttl=request.queue_ttl,
                        epoch=epoch,
                        started=started,
                    )
                    if queued_at is None:
                        with self._track_guard:
                            self._queued.pop(pair, None)
                        state = None
                        continue
                    position = decision.position
                    if decision.watch is not None:
                        watch_key, watch_end, expected = decision.watch
                        self._waits[pair] = (watch_key, watch_end, expected, request.limit)
                return Busy(retry_after=None, position=position)
            raise StoreUnavailable(
                f"etcd: acquire {name!r} lost {ACQUIRE_ATTEMPTS} races in a row; try again"
            )
        except BaseException:
            # A transaction whose answer was lost may have put our holder key on
            # the session lease: which revision is unknown, so it stays tracked
            # without one. Renewed, a renewal takes it up; else it is swept once
            # its deadline passes, and never outlives it on our renewals.
            lease = session.lease if session is not None else 0
            self._track(self._held, pair, Tracked(lease, 0, seconds, started + request.ttl))
            raise

    async def _granted(
        self,
        request: AcquireRequest,
        session: Session,
        started: float,
        response: dict[str, Any],
    ) -> int:
        """Remember a grant; its create revision (the txn's revision).

        A grant committed in the term its session lease was granted (and
        refreshed) in is trusted: that term's leader still had its quorum after
        the refresh. Otherwise the leader changed meanwhile and an old leader may
        still revoke the lease: the key moves to a session lease of the current
        term. StoreUnavailable (the lock retries; our grant is found) if that fails."""
        pair = (request.name, request.token)
        created = revision(response)
        seconds = session.seconds
        deadline = started + request.ttl
        self._track(self._held, pair, Tracked(session.lease, created, seconds, deadline))
        with self._track_guard:
            self._queued.pop(pair, None)
        if session.term == _term(response):
            return created
        self._sessions.retire(session)
        key = self._keys.holder(request.name, token_id(request.token))
        moved_to, moved = await self._rehome([(key, created)], seconds, started, request.ttl)
        if key not in moved:
            with self._track_guard:
                self._held.pop(pair, None)
            raise StoreUnavailable("etcd: a grant's lease ended during a leader change")
        self._track(self._held, pair, Tracked(moved_to.lease, created, seconds, deadline))
        return created

    def _note_crowd(self, name: str, entries: list[Entry]) -> None:
        """Remember whether ``name`` had waiters at this look (see acquire). A
        hint only, for at most _CROWDED_NAMES names: a wrong guess costs one read
        (a name no longer crowded: one round trip more) or one failed transaction."""
        crowded = self._crowded
        if any(entry.kind == "q" for entry in entries):
            if name not in crowded:
                if len(crowded) >= _CROWDED_NAMES:
                    del crowded[next(iter(crowded))]  # the longest known
                crowded[name] = None
        else:
            crowded.pop(name, None)

    def _fast_guards(self, request: AcquireRequest, epoch: int) -> list[dict[str, Any]]:
        keys, name = self._keys, request.name
        queued = self._queued.get((name, request.token))
        queued_at = queued.created if queued is not None else 0
        if not queued_at or request.limit != 1:
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

    async def _refresh(self, request: AcquireRequest, mine: Entry, started: float) -> bool:
        """The token already holds (a retried acquire): its expiry now + ttl, on
        the session lease of the current term. False if the key is gone."""
        pair = (request.name, request.token)
        seconds = session_seconds(request.ttl)
        key = self._keys.holder(request.name, mine.tid)
        session = await self._sessions.fresh(seconds, started, request.ttl)
        if mine.lease == session.lease:
            # Still ours, answered in the session lease's term after its refresh.
            response = await self._http.txn(
                [_compare("CREATE", key, "EQUAL", mine.create_revision)], []
            )
            self._check_term(session, response)
            held = bool(response.get("succeeded"))
        else:
            session, moved = await self._rehome(
                [(key, mine.create_revision)], seconds, started, request.ttl
            )
            held = key in moved
        if not held:
            with self._track_guard:
                self._held.pop(pair, None)
            return False
        deadline = started + request.ttl
        self._track(
            self._held, pair, Tracked(session.lease, mine.create_revision, seconds, deadline)
        )
        return True

    async def _queue(
        self,
        pair: tuple[str, str],
        value: bytes,
        queued: Entry | None,
        *,
        queue_ttl: float,
        epoch: int,
        started: float,
    ) -> int | None:
        """Keep our place (its own deadline moves on) or take one at the end; our
        waiter key's create revision. None if our place ended meanwhile or the
        epoch changed: the caller looks again.

        Each attempt of the waiter refreshes its session lease (unless something
        else did since the attempt began), so that the place lasts ``queue_ttl``
        from now, as it did on a lease of its own."""
        seconds = session_seconds(queue_ttl)
        key = self._keys.waiter(pair[0], token_id(pair[1]))
        deadline = started + queue_ttl
        if queued is not None:
            session = self._sessions.current(seconds)
            if session is not None and queued.lease == session.lease:
                session = await self._sessions.fresh(seconds, started, queue_ttl)
            if session is None or queued.lease != session.lease:
                # Another lease (a leader change, another store object): kept alive
                # as it is, so the place is not lost.
                remaining = (await self._http.keepalive([queued.lease])).get(queued.lease, 0)
                if remaining <= 0:
                    return None
            self._track(
                self._queued, pair, Tracked(queued.lease, queued.create_revision, seconds, deadline)
            )
            return queued.create_revision
        session = await self._sessions.fresh(seconds, started, queue_ttl)
        # Tracked before it is sent: a place whose answer is lost is swept too.
        self._track(self._queued, pair, Tracked(session.lease, 0, seconds, deadline))
        response = await self._http.txn(
            [self._epoch_guard(epoch), _compare("CREATE", key, "EQUAL", 0)],
            [_put(key, value, session.lease)],
            [_range(self._keys.epoch)],
        )
        if response.get("succeeded"):
            created = revision(response)
            self._track(self._queued, pair, Tracked(session.lease, created, seconds, deadline))
            return created
        self._epoch_lost(epoch, _kvs(response, 0))
        return None

    # -- release, break -------------------------------------------------------------

    async def release(self, name: str, token: str) -> bool:
        self._after_fork()
        tid = token_id(token)
        pair = (name, token)
        with self._track_guard:
            held = self._held.pop(pair, None)
            queued = self._queued.pop(pair, None)
        self._waits.pop(pair, None)
        try:
            response = await self._http.txn(
                [], [_delete(self._keys.holder(name, tid)), _delete(self._keys.waiter(name, tid))]
            )
        except BaseException:
            # Not known to be deleted: the keys stay tracked, due now, so the next
            # renewal round or acquire deletes them (the session lease, kept alive
            # for other keys, must not keep them).
            self._due_now(pair, held, queued)
            raise
        responses = response.get("responses", [{}])
        deleted = responses[0].get("response_delete_range", {})
        return int(deleted.get("deleted", 0)) > 0

    def _due_now(self, pair: tuple[str, str], held: Tracked | None, queued: Tracked | None) -> None:
        now = self._clock.monotonic()
        for table, entry in ((self._held, held), (self._queued, queued)):
            if entry is not None:
                with self._track_guard:
                    if pair in table:
                        continue  # granted again meanwhile
                self._track(table, pair, Tracked(entry.lease, entry.created, entry.seconds, now))

    async def break_lease(self, name: str) -> int:
        """Delete the name's holder keys (not revoke their leases: a session
        lease carries its process's other keys too). Their holders learn it at
        their next renewal, which reads each key."""
        self._after_fork()
        start = self._keys.holders(name)
        response = await self._http.txn([], [_delete(start, prefix_end(start))])
        deleted = response.get("responses", [{}])[0].get("response_delete_range", {})
        return int(deleted.get("deleted", 0))

    # -- views ----------------------------------------------------------------------

    async def _infos(self, kvs: list[dict[str, Any]]) -> list[HolderInfo]:
        epoch = await self._get_epoch()
        now = self._http.server_seconds or 0.0
        known: dict[int, int] = {}  # keys share session leases: ask once per lease
        infos = []
        for kv in kvs:
            parts = self._keys.split_name_key(unb64(kv["key"]))
            if parts is None or parts[1] != "h":
                continue
            entry = self._entries([kv])[0]
            expires_in = await self._time_to_live(entry.lease, known)
            if expires_in < 0:
                continue  # ended since the read
            infos.append(holder_info(parts[0], entry, epoch, now, float(expires_in)))
        return infos

    async def _time_to_live(self, lease: int, known: dict[int, int]) -> int:
        """The time to live of a key on ``lease``, -1 if the lease has ended: its
        session lease's, less the session lease's slack (the key's own deadline
        came that much earlier; it may come earlier still, see ``leases.py``)."""
        if not lease:
            return 0
        if lease not in known:
            remaining, granted = await self._http.lease_times(lease)
            known[lease] = (
                remaining if remaining < 0 else max(0, remaining - session_slack(granted))
            )
        return known[lease]

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

    async def waiters(self, prefix: str = "") -> list[WaiterInfo]:
        """Queue keys ("q") under the names, in arrival (create revision) order; a
        place's expiry is its etcd lease's time to live."""
        self._after_fork()
        start = self._keys.names(prefix)
        kvs = (await self._http.range(start, prefix_end(start))).get("kvs", [])
        queued: dict[str, list[Entry]] = {}
        for kv in kvs:
            parts = self._keys.split_name_key(unb64(kv["key"]))
            if parts is not None and parts[1] == "q":
                queued.setdefault(parts[0], []).extend(self._entries([kv]))
        infos: list[WaiterInfo] = []
        known: dict[int, int] = {}
        for name in sorted(queued):
            position = 0
            for entry in sorted(queued[name], key=lambda e: e.create_revision):
                expires_in = await self._time_to_live(entry.lease, known)
                if expires_in < 0:
                    continue  # ended since the read
                info = waiter_info(name, entry, position, float(expires_in))
                infos.append(info)
                position += 1
        return infos

    # -- waiting ----------------------------------------------------------------------

    async def wait(self, name: str, token: str, timeout: float) -> WaitResult:
        self._after_fork()
        pair = (name, token)
        watch = self._waits.get(pair)
        if watch is None:
            await sleep(timeout)
            return False
        deadline = self._clock.monotonic() + timeout
        while True:
            key, range_end, expected, limit = watch
            remaining = max(0.0, deadline - self._clock.monotonic())
            try:
                woken = await self._http.watch_once(key, range_end, remaining, ["NOPUT"], expected)
            except StoreUnavailable:
                # The caller's next acquire meets the outage and retries it with backoff.
                await sleep(min(remaining, 0.05))
                return True
            if not woken:
                return False
            self._waits.pop(pair, None)
            if range_end is not None or self._clock.monotonic() >= deadline:
                return True  # the holders changed: the caller looks again
            # Our predecessor in the queue left: granted (it holds now, the common
            # case under contention) or gone. While a holder still stands in our
            # way, an attempt would fail, and a failed attempt is a transaction etcd
            # commits through Raft (a WAL write); one read tells instead, and we
            # watch what stands in the way (test_etcd_backend: a waiter whose
            # predecessor was granted waits for the release).
            watch = await self._next_watch(name, token, limit)
            if watch is None:
                return True
            self._waits[pair] = watch

    async def _next_watch(self, name: str, token: str, limit: int) -> Watch | None:
        """What a queued waiter watches once its predecessor left; None when it may
        have a place (or lost its own), so that its caller attempts at once. A
        linearizable read; the watch it returns checks that the keys seen still
        exist once in place, so no change after the read is missed."""
        start = self._keys.name(name)
        try:
            kvs = (await self._http.range(start, prefix_end(start))).get("kvs", [])
        except StoreUnavailable:
            return None
        decision = decide(self._keys, name, self._entries(kvs), token_id(token), limit)
        if decision.grant or decision.queued is None or decision.watch is None:
            return None
        key, range_end, expected = decision.watch
        return (key, range_end, expected, limit)

    # -- records ----------------------------------------------------------------------

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
                # A record's own lease (its expiry is its TTL, renewed by nobody).
                lease, _granted_in = await self._sessions.grant(lease_seconds(ttl))
            operation = _put(record_key, value, lease)
        response = await self._http.txn(
            [self._epoch_guard(epoch), compare],
            [operation],
            [_range(self._keys.epoch)],
            again=False,  # a second sending would fail on our own write
        )
        if not response.get("succeeded"):
            # A lease granted for the record holds nothing: it expires by itself.
            self._epoch_lost(epoch, _kvs(response, 0))
            return None
        return epoch + revision(response)
