"""The etcd leases a store attaches its keys to: one *session lease* per TTL (in
etcd's whole seconds) and Raft term, shared by every holder and waiter key of
this store object in this process, as etcd's own Go ``concurrency.Session`` does.

A renewal round is then one keepalive of the session lease (whatever the number
of keys on it) and one read that confirms the term and that each key still
exists (``store.py``). Two promises need more than the lease:

* **Each key's own expiry.** A key whose holder stops renewing it must not live
  on because the other keys keep the session lease alive. The store tracks each
  key's own deadline (``Tracked.deadline``: the send time of its last refresh
  plus its TTL, on the injected monotonic clock) and deletes it, comparing its
  create revision, in the first renewal round or acquire after that deadline
  (``AsyncEtcdStore._sweep``). Bound: while its process lives and refreshes the
  session lease for other keys, a key outlives its own deadline by at most one
  renewal interval; with no refresh at all the session lease itself ends at most
  its TTL after its last keepalive, which came before the key's deadline. Safety
  is unaffected: the holder's safe deadline (send time + TTL - margin) is never
  later than the tracked deadline.
* **The client's safe deadline before etcd's expiry.** A key on a session lease
  last refreshed at K (the keepalive's *send* time) may vanish at K + its length.
  So a grant is only attached to a session lease refreshed (or granted) late
  enough that this comes after the acquire's send time + TTL (``fresh``), like a
  lease of its own. A session lease is a tenth longer than its keys' TTL (above a
  9 s TTL, ``session_seconds``), so a refresh sent that much before the acquire
  began is late enough, and a process acquiring in a loop does not send a
  keepalive per acquire.

**A lease is trusted only in the Raft term it was granted in.** etcd before 3.4.31
/ 3.5.13 (etcd issue 15247) lets a leader that stalled (frozen, slow disk, CPU
starved) and wakes after its followers elected another revoke every lease whose
expiry passed on *its* clock while it stood still: its lessor still thinks it is
primary, and the revoke proposal is forwarded to the new leader, which commits it.
The new leader had those leases renewed; their keys vanish under their holders.
Measured here: a spare lease granted before a 3 s SIGSTOP of the leader, refreshed
by the new leader and attached to a grant, was revoked 44 ms later by the old
leader's request. The threat is confined to leases an old leader knew as primary,
so a session lease is used (and its renewals counted) only while etcd answers in
the term of its grant; after a leader change the store grants a session lease in
the new term and moves every key to it in a few transactions
(``AsyncEtcdStore._rehome``): no earlier leader ever held that lease.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from leasehold import _deadline
from leasehold._async.backends.etcd.client import AsyncEtcdHTTP
from leasehold._core.clock import Clock
from leasehold._errors import StoreUnavailable

GRANT_ATTEMPTS = 3
# How long close() may spend revoking the session leases (a dead etcd must not
# hold a closing program up; unrevoked leases expire by themselves).
REVOKE_WAIT = 1.0
MAX_RETIRED = 16


@dataclass(slots=True)
class Session:
    """A session lease: etcd's lease id, its TTL asked for, the Raft term it was
    granted in, and the send time (local monotonic) of its latest keepalive
    answered in that term (or of its grant)."""

    lease: int
    seconds: int
    term: int
    refreshed: float


@dataclass(slots=True)
class Tracked:
    """One of our keys: the lease it is attached to, its create revision (0 when
    unknown: an acquire whose answer was lost), the lease seconds and its own
    deadline (local monotonic): past it, the store deletes the key."""

    lease: int
    created: int
    seconds: int
    deadline: float


class SessionLeases:
    def __init__(self, http: AsyncEtcdHTTP, probe: bytes, clock: Clock) -> None:
        self._http = http
        self._probe = probe  # a key to read: its answer tells the current term
        self._clock = clock
        self._current: dict[int, Session] = {}  # seconds -> this term's session lease
        # Session leases replaced (a leader change) whose keys may not all have
        # moved yet: revoked on close too. Bounded; a forgotten one just expires.
        self._retired: list[int] = []
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        if self._pid != os.getpid():
            # The parent's: it renews them; a child granting its own keeps the
            # parent's keys from living on through the child's renewals.
            self._current = {}
            self._retired = []
            self._pid = os.getpid()

    def current(self, seconds: int) -> Session | None:
        self._after_fork()
        return self._current.get(seconds)

    def retire(self, session: Session) -> None:
        """``session`` is not to be used for new keys any more (another term, or
        ended); the keys still on it are moved by the next renewal."""
        if self._current.get(session.seconds) is session:
            del self._current[session.seconds]
            self._retired = [*self._retired[-(MAX_RETIRED - 1) :], session.lease]

    async def grant(self, seconds: int) -> tuple[int, int]:
        """A new lease of ``seconds`` and the Raft term it was granted in."""
        for _attempt in range(GRANT_ATTEMPTS):
            # The term is read before the grant is sent: a grant answered in that
            # same term was committed and applied by that term's leader, so no
            # earlier leader can hold it as primary (answers carry the term of the
            # answering member, which may have moved on since the commit).
            before = await self._http.range(self._probe, count_only=True)
            term = int(before.get("header", {}).get("raft_term", 0))
            lease, granted_in = await self._http.grant(seconds)
            if granted_in == term:
                return lease, term
        raise StoreUnavailable("etcd: the leader changed during every lease grant; retrying")

    async def fresh(self, seconds: int, since: float, ttl: float) -> Session:
        """The session lease for ``seconds`` whose etcd expiry is surely after
        ``since + ttl``: refreshed by a keepalive sent at or after ``since + ttl -
        seconds`` (or granted after it). Its keepalive answered in its grant's
        term; the caller trusts it once a quorum answer in that term comes after
        this call."""
        self._after_fork()
        session = self._current.get(seconds)
        if session is not None:
            if session.refreshed + seconds >= since + ttl:
                return session
            sent = self._clock.monotonic()
            terms: set[int] = set()
            remaining = (await self._http.keepalive([session.lease], terms)).get(session.lease, 0)
            if remaining > 0 and terms == {session.term}:
                session.refreshed = max(session.refreshed, sent)
                return session
            self.retire(session)  # ended, or another leader's by now
        sent = self._clock.monotonic()
        lease, term = await self.grant(seconds)
        session = Session(lease, seconds, term, sent)
        replaced = self._current.get(seconds)
        if replaced is None or replaced.term <= term:
            self._current[seconds] = session
        return session

    def forget(self) -> None:
        """After etcd lost its data, every lease we know of is gone."""
        self._current = {}
        self._retired = []

    async def aclose(self) -> None:
        """Revoke our session leases: their keys (ours) go with them."""
        if self._pid != os.getpid():
            return  # the parent's
        leases = [session.lease for session in self._current.values()] + self._retired
        self._current, self._retired = {}, []
        with _deadline.bounded(REVOKE_WAIT):
            for lease in leases:
                with contextlib.suppress(StoreUnavailable):
                    await self._http.revoke(lease)
