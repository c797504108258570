"""The etcd leases a store attaches its keys to, the spare ones it reuses, and the
Raft term each was granted in.

Every holder key and every waiter key has an etcd lease of its own, so that etcd
decides its expiry and a renewal is a keepalive of that lease. Granting a lease is
a round trip; a lease whose key was released is kept as a *spare* (one per TTL)
and taken by the next acquire with that TTL. Taking refreshes it with a keepalive
*inside* the acquire, so its expiry is counted from a moment after the acquire was
sent, like a fresh grant's: the client's safe deadline (send time + TTL - margin)
stays before etcd's expiry.

**A lease is trusted only in the Raft term it was granted in.** etcd before 3.4.31
/ 3.5.13 (etcd issue 15247) lets a leader that stalled (frozen, slow disk, CPU
starved) and wakes after its followers elected another revoke every lease whose
expiry passed on *its* clock while it stood still: its lessor still thinks it is
primary, and the revoke proposal is forwarded to the new leader, which commits it.
The new leader had those leases renewed; their keys vanish under their holders.
Measured here: a spare lease granted before a 3 s SIGSTOP of the leader, refreshed
by the new leader and attached to a grant, was revoked 44 ms later by the old
leader's request. The threat is confined to leases an old leader knew as primary,
so a lease is used (and its renewals counted) only while etcd answers in the term
of its grant; after a leader change a holder's key moves to a lease granted in the
new term (``AsyncEtcdStore._rehome``), which no earlier leader ever held.
"""

from __future__ import annotations

import os

from leasehold._async.backends.etcd.client import AsyncEtcdHTTP
from leasehold._errors import StoreUnavailable

# Lease -> grant term entries kept; a lease missing here is merely untrusted (its
# key is moved to a new lease at its next renewal), so forgetting is always safe.
MAX_TERMS = 4096
GRANT_ATTEMPTS = 3


class AsyncLeasePool:
    def __init__(self, http: AsyncEtcdHTTP, probe: bytes) -> None:
        self._http = http
        self._probe = probe  # a key to read: its answer tells the current term
        self._spare: dict[int, int] = {}  # requested seconds -> a lease without keys
        self._terms: dict[int, int] = {}  # lease -> the Raft term it was granted in
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        if self._pid != os.getpid():
            self._spare = {}  # the parent's: it may be using them right now
            self._pid = os.getpid()

    def term(self, lease: int) -> int | None:
        """The Raft term ``lease`` was granted in; None if unknown (untrusted)."""
        return self._terms.get(lease)

    def drop(self, lease: int) -> None:
        """``lease`` holds nothing of ours any more."""
        self._terms.pop(lease, None)

    async def take(self, seconds: int) -> tuple[int, int]:
        """A lease with at least ``seconds`` to live from now, without keys, and
        the Raft term it was granted in. A spare is reused only if its keepalive
        is answered in that term; the caller trusts the lease only once a quorum
        answer in that same term (its transaction's) comes after this call."""
        self._after_fork()
        spare = self._spare.pop(seconds, None)
        if spare is not None:
            granted_in = self._terms.get(spare)
            if granted_in is not None:
                terms: set[int] = set()
                remaining = (await self._http.keepalive([spare], terms)).get(spare, 0)
                if remaining >= seconds and terms == {granted_in}:
                    return spare, granted_in
            self.drop(spare)  # another leader's by now: let it expire
        for _attempt in range(GRANT_ATTEMPTS):
            # The term is read before the grant is sent: a grant answered in that
            # same term was committed and applied by that term's leader, so no
            # earlier leader can hold it as primary (answers carry the term of the
            # answering member, which may have moved on since the commit).
            before = await self._http.range(self._probe, count_only=True)
            term = int(before.get("header", {}).get("raft_term", 0))
            lease, granted_in = await self._http.grant(seconds)
            if granted_in == term:
                if len(self._terms) >= MAX_TERMS:
                    self._terms.clear()
                self._terms[lease] = term
                return lease, term
        raise StoreUnavailable("etcd: the leader changed during every lease grant; retrying")

    def give_back(self, seconds: int, lease: int) -> None:
        """Keep ``lease`` (whose keys are gone) for the next ``take(seconds)``; a
        second spare of one TTL, or one of unknown term, is simply left to expire."""
        self._after_fork()
        if lease in self._terms and seconds not in self._spare:
            self._spare[seconds] = lease
        else:
            self.drop(lease)

    def forget(self) -> None:
        """After etcd lost its data, every lease we know of is gone."""
        self._spare = {}
        self._terms = {}
