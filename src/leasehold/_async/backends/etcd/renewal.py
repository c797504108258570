"""Our keys on the session leases (``leases.py``): renewal rounds, each key's own
expiry (the sweep), and moving keys to another session lease.

A renewal round is one keepalive request for the session leases of the batch
(one, in the common case of one TTL), then one read of every renewed key: a
transaction of ranges, or one range spanning them all when there are more than a
transaction may hold. The read is linearizable, so its Raft term confirms the
keepalive's, and it tells that each key still exists with our create revision on
the session lease that was just refreshed. Why the term: etcd before 3.4.26 /
3.5.9 lets a leader that has lost its quorum (cut off, or frozen and not yet
told) renew leases in its own memory only, and answer success; the real leader
expires them on its own schedule. A read must be confirmed by a quorum, so a
stale leader cannot answer it in its old term: a keepalive answered in another
term than the read after it is not trusted (StoreUnavailable; the caller retries).
A key on another lease (a leader change retired its session lease, a longer TTL,
a key granted through another store object) moves to the current session lease
in one transaction per ``MAX_TXN_OPS`` keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from leasehold._async.backends.etcd.client import b64, unb64
from leasehold._async.backends.etcd.connection import EtcdConnection
from leasehold._async.backends.etcd.leases import Session, Tracked
from leasehold._async.backends.etcd.txn import _compare, _delete, _kvs, _put, _term
from leasehold._core.etcd import session_seconds, token_id
from leasehold._core.records import RenewItem
from leasehold._errors import StoreUnavailable

# etcd's default --max-txn-ops: the most compares, or operations, of one transaction.
MAX_TXN_OPS = 128
# Keys swept lately, by (name, token): a renewal never takes one up again.
MAX_SWEPT = 4096

Pair = tuple[str, str]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class SessionKeys(EtcdConnection):
    """The store's keys on session leases; ``store.py`` builds the contract on it."""

    # -- tracking ---------------------------------------------------------------------

    def _track(self, table: dict[Pair, Tracked], pair: Pair, entry: Tracked) -> None:
        with self._track_guard:
            table[pair] = entry
            self._swept.pop(pair, None)
            self._earliest = min(self._earliest, entry.deadline)

    def _overdue(self, now: float, keep: set[Pair]) -> list[tuple[bytes, Tracked]]:
        """Take every tracked key past its own deadline (but those in ``keep``)
        out of the tables: the caller deletes them."""
        if now < self._earliest:
            return []
        found: list[tuple[bytes, Tracked]] = []
        earliest = float("inf")
        with self._track_guard:
            for table, holder in ((self._held, True), (self._queued, False)):
                for pair, entry in list(table.items()):
                    if entry.deadline > now or pair in keep:
                        earliest = min(earliest, entry.deadline)
                        continue
                    del table[pair]
                    tid = token_id(pair[1])
                    if holder:
                        key = self._keys.holder(pair[0], tid)
                    else:
                        key = self._keys.waiter(pair[0], tid)
                    found.append((key, entry))
                    if holder:
                        self._swept[pair] = None
                        while len(self._swept) > MAX_SWEPT:
                            del self._swept[next(iter(self._swept))]
                    else:
                        self._waits.pop(pair, None)
            self._earliest = earliest
        return found

    async def _sweep(self, now: float, keep: set[Pair]) -> None:
        """Delete our keys whose own deadline passed: their holders stopped
        renewing them, while other keys keep the session lease alive. A key is
        deleted only if its create revision is still the one we tracked."""
        overdue = self._overdue(now, keep)
        with self._track_guard:
            pending, self._unswept = self._unswept + overdue, []
        if not pending:
            return
        try:
            for chunk in _chunks(pending, MAX_TXN_OPS):
                operations = [
                    _delete(key)
                    if not entry.created
                    else {
                        "request_txn": {
                            "compare": [_compare("CREATE", key, "EQUAL", entry.created)],
                            "success": [_delete(key)],
                        }
                    }
                    for key, entry in chunk
                ]
                await self._http.txn([], operations)
        except BaseException as exc:
            # Not known to be deleted: the next round tries again (until then,
            # the session lease's own expiry is the bound). Only an outage is
            # absorbed: the operation that swept goes on.
            with self._track_guard:
                self._unswept.extend(pending)
            if not isinstance(exc, StoreUnavailable):
                raise

    # -- moving keys ---------------------------------------------------------------------

    async def _rehome(
        self, moves: list[tuple[bytes, int]], seconds: int, since: float, ttl: float
    ) -> tuple[Session, set[bytes]]:
        """Attach our keys (key, create revision) to the session lease for
        ``seconds`` of the current Raft term, refreshed after ``since`` (fences
        stay). The session lease and the keys moved; a key missing is gone.

        The move counts only if it commits in the term of the session lease's
        grant: that term's leader then still had its quorum after the refresh.
        Else StoreUnavailable: the caller retries, and the next renewal moves the
        keys again."""
        session = await self._sessions.fresh(seconds, since, ttl)
        moved: set[bytes] = set()
        for chunk in _chunks(moves, MAX_TXN_OPS):
            response = await self._http.txn(
                [_compare("CREATE", key, "EQUAL", created) for key, created in chunk],
                [_put(key, b"", session.lease, ignore_value=True) for key, _ in chunk],
            )
            self._check_term(session, response)
            if response.get("succeeded"):
                moved.update(key for key, _ in chunk)
                continue
            for key, created in chunk:  # one of them is gone: each on its own
                response = await self._http.txn(
                    [_compare("CREATE", key, "EQUAL", created)],
                    [_put(key, b"", session.lease, ignore_value=True)],
                )
                self._check_term(session, response)
                if response.get("succeeded"):
                    moved.add(key)
        return session, moved

    def _check_term(self, session: Session, response: dict[str, Any]) -> None:
        if _term(response) != session.term:
            self._sessions.retire(session)
            raise StoreUnavailable(
                "etcd: the leader changed while our keys moved to a new lease; retrying"
            )

    # -- renewal ------------------------------------------------------------------------

    async def _read_keys(self, keys: list[bytes]) -> tuple[list[dict[str, Any] | None], int]:
        """Each key as it is now (None if gone), and the Raft term of the read."""
        if len(keys) <= MAX_TXN_OPS:
            response = await self._http.txn(
                [], [{"request_range": {"key": b64(key), "keys_only": True}} for key in keys]
            )
            found = [next(iter(_kvs(response, index)), None) for index in range(len(keys))]
            return found, _term(response)
        # More than one transaction holds: one range from the first key to the
        # last (other keys between them are read too, without their values).
        response = await self._http.range(min(keys), max(keys) + b"\x00", keys_only=True)
        by_key = {unb64(kv["key"]): kv for kv in response.get("kvs", [])}
        return [by_key.get(key) for key in keys], _term(response)

    async def renew(self, items: Sequence[RenewItem]) -> list[bool]:
        self._after_fork()
        if not items:
            return []
        started = self._clock.monotonic()
        pairs = [(item.name, item.token) for item in items]
        with self._track_guard:
            before = [self._held.get(pair) for pair in pairs]
            swept = [pair in self._swept for pair in pairs]
        # An item past its own deadline is not renewed: it is swept with the rest.
        keep = {
            pair
            for pair, entry in zip(pairs, before, strict=True)
            if entry is None or entry.deadline > started
        }
        await self._sweep(started, keep)
        keys = [self._keys.holder(item.name, token_id(item.token)) for item in items]
        wanted = [session_seconds(item.ttl) for item in items]
        sessions: dict[int, Session | None] = {s: self._sessions.current(s) for s in wanted}
        live = [session for session in sessions.values() if session is not None]
        sent = self._clock.monotonic()
        terms: set[int] = set()
        remaining = (
            await self._http.keepalive([session.lease for session in live], terms) if live else {}
        )
        found, term = await self._read_keys(keys)
        if terms - {term}:
            raise StoreUnavailable(
                f"etcd {self._http.endpoint}: a renewal answered in another Raft term than "
                "the read after it (a leader change): not trusted, retrying"
            )
        for session in live:
            if remaining.get(session.lease, 0) > 0 and session.term == term:
                session.refreshed = max(session.refreshed, sent)
            else:  # ended, or granted in an earlier term: its keys move
                self._sessions.retire(session)
                sessions[session.seconds] = None
        # lease each key ends on (None: refused), and the keys that must move
        result: list[tuple[int, int] | None] = [None] * len(items)
        moves: dict[int, list[tuple[int, bytes, int]]] = {}
        for index, (pair, entry, kv) in enumerate(zip(pairs, before, found, strict=True)):
            if kv is None or swept[index] or pair not in keep:
                continue
            created = int(kv.get("create_revision", 0))
            if entry is not None and entry.created and entry.created != created:
                continue  # another grant of the same token: ours ended
            kept = sessions[wanted[index]]
            if kept is not None and int(kv.get("lease", 0)) == kept.lease:
                result[index] = (kept.lease, created)
            else:
                moves.setdefault(wanted[index], []).append((index, keys[index], created))
        for seconds, group in moves.items():
            ttl = max(items[index].ttl for index, _, _ in group)
            moved_to, moved = await self._rehome(
                [(key, created) for _, key, created in group], seconds, started, ttl
            )
            for index, key, created in group:
                if key in moved:
                    result[index] = (moved_to.lease, created)
        answers: list[bool] = []
        with self._track_guard:
            for index, (pair, entry) in enumerate(zip(pairs, before, strict=True)):
                outcome = result[index]
                if self._held.get(pair) is not entry or outcome is None:
                    # Swept or replaced meanwhile, or gone: not ours to renew.
                    if outcome is None and self._held.get(pair) is entry:
                        self._held.pop(pair, None)
                    answers.append(False)
                    continue
                lease, created = outcome
                deadline = started + items[index].ttl
                self._held[pair] = Tracked(lease, created, wanted[index], deadline)
                self._earliest = min(self._earliest, deadline)
                answers.append(True)
        return answers
