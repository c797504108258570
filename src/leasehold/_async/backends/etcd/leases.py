"""The etcd leases a store attaches its keys to, and the spare ones it reuses.

Every holder key and every waiter key has an etcd lease of its own, so that etcd
decides its expiry and a renewal is a keepalive of that lease. Granting a lease is
a round trip; a lease whose key was released is kept as a *spare* (one per TTL)
and taken by the next acquire with that TTL. Taking refreshes it with a keepalive
*inside* the acquire, so its expiry is counted from a moment after the acquire was
sent, like a fresh grant's: the client's safe deadline (send time + TTL - margin)
stays before etcd's expiry.
"""

from __future__ import annotations

import os

from leasehold._async.backends.etcd.client import AsyncEtcdHTTP


class AsyncLeasePool:
    def __init__(self, http: AsyncEtcdHTTP) -> None:
        self._http = http
        self._spare: dict[int, int] = {}  # requested seconds -> a lease without keys
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        if self._pid != os.getpid():
            self._spare = {}  # the parent's: it may be using them right now
            self._pid = os.getpid()

    async def take(self, seconds: int) -> tuple[int, int | None]:
        """A lease with at least ``seconds`` to live from now, without keys, and
        the Raft term its keepalive was answered in (None for a new grant, which
        goes through Raft itself): a caller that attaches a key compares it with
        its transaction's term (see ``AsyncEtcdHTTP.confirmed_keepalive``)."""
        self._after_fork()
        spare = self._spare.pop(seconds, None)
        if spare is not None:
            terms: set[int] = set()
            remaining = (await self._http.keepalive([spare], terms)).get(spare, 0)
            if remaining >= seconds:
                return spare, max(terms, default=0)
        lease, _granted = await self._http.grant(seconds)
        return lease, None

    def give_back(self, seconds: int, lease: int) -> None:
        """Keep ``lease`` (whose keys are gone) for the next ``take(seconds)``; a
        second spare of one TTL is simply left to expire."""
        self._after_fork()
        self._spare.setdefault(seconds, lease)

    def forget(self) -> None:
        """After etcd lost its data, every lease we know of is gone."""
        self._spare = {}
