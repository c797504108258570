"""The lease table as pure state: the memory backend's logic, with ``now`` passed in.

The memory store wraps one of these behind a mutex and turns the returned wake-up
lists into notifications. Kept free of I/O so it can be reasoned about (and tested)
on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Granted,
    Holder,
    HolderInfo,
    Record,
    RenewItem,
    WaiterInfo,
)


@dataclass(slots=True)
class _Grant:
    holder: Holder
    fence: int
    limit: int
    acquired: float
    expires: float


@dataclass(slots=True)
class _Waiter:
    request: AcquireRequest  # the latest attempt: what a hand-over grants
    expires: float


@dataclass(slots=True)
class _Name:
    grants: dict[str, _Grant] = field(default_factory=dict)  # token -> grant, in grant order
    queue: dict[str, _Waiter] = field(default_factory=dict)  # token -> waiter, arrival order


# What release/break tell the store to deliver: (name, token, fence of a hand-over).
HandOvers = list[tuple[str, str, int]]


class LeaseTable:
    def __init__(self) -> None:
        self._names: dict[str, _Name] = {}
        # One sequence for the whole table: strictly increasing per name for free,
        # and nothing per name has to outlive the name's last holder.
        self._last_fence = 0
        self._records: dict[str, tuple[bytes, int, float | None]] = {}

    def read_record(self, key: str, now: float) -> Record:
        entry = self._records.get(key)
        if entry is None or (entry[2] is not None and entry[2] <= now):
            self._records.pop(key, None)
            return Record(key=key, value=None, version=0, now=now)
        return Record(key=key, value=entry[0], version=entry[1], now=now)

    def write_record(
        self, key: str, expected: int, value: bytes | None, ttl: float | None, now: float
    ) -> int | None:
        if self.read_record(key, now).version != expected:
            return None
        self._last_fence += 1
        if value is None:
            self._records.pop(key, None)
        else:
            self._records[key] = (value, self._last_fence, None if ttl is None else now + ttl)
        return self._last_fence

    def _purge(self, name: str, now: float) -> _Name:
        entry = self._names.setdefault(name, _Name())
        for token in [t for t, g in entry.grants.items() if g.expires <= now]:
            del entry.grants[token]
        for token in [t for t, w in entry.queue.items() if w.expires <= now]:
            del entry.queue[token]
        return entry

    def _forget_if_idle(self, name: str) -> None:
        entry = self._names.get(name)
        if entry is not None and not entry.grants and not entry.queue:
            del self._names[name]

    def _grant(self, entry: _Name, request: AcquireRequest, now: float, expires: float) -> int:
        self._last_fence += 1
        entry.queue.pop(request.token, None)
        entry.grants[request.token] = _Grant(
            holder=request.holder,
            fence=self._last_fence,
            limit=request.limit,
            acquired=now,
            expires=expires,
        )
        return self._last_fence

    def _hand_over(self, name: str, entry: _Name, now: float) -> HandOvers:
        """Make the first waiters holders while their own limit leaves a place."""
        handed: HandOvers = []
        while entry.queue:
            token, waiter = next(iter(entry.queue.items()))
            if len(entry.grants) >= waiter.request.limit:
                break
            expires = min(waiter.expires, now + waiter.request.ttl)
            handed.append((name, token, self._grant(entry, waiter.request, now, expires)))
        return handed

    def acquire(self, request: AcquireRequest, now: float) -> AcquireResult:
        entry = self._purge(request.name, now)
        mine = entry.grants.get(request.token)
        if mine is not None:
            mine.expires = now + request.ttl
            return Granted(mine.fence)
        free = request.limit - len(entry.grants)
        queued = list(entry.queue)
        ahead = queued.index(request.token) if request.token in entry.queue else len(queued)
        if free > ahead:
            return Granted(self._grant(entry, request, now, now + request.ttl))
        if request.queue_ttl is not None:
            waiter = entry.queue.get(request.token)
            if waiter is None:
                entry.queue[request.token] = _Waiter(request, now + request.queue_ttl)
            else:
                waiter.request = request
                waiter.expires = now + request.queue_ttl
            position: int | None = ahead
        else:
            position = None
        self._forget_if_idle(request.name)
        soonest = min((g.expires for g in entry.grants.values()), default=None)
        return Busy(retry_after=None if soonest is None else soonest - now, position=position)

    def renew(self, items: list[RenewItem], now: float) -> list[bool]:
        answers = []
        for item in items:
            entry = self._purge(item.name, now)
            grant = entry.grants.get(item.token)
            if grant is None:
                answers.append(False)
                self._forget_if_idle(item.name)
            else:
                grant.expires = now + item.ttl
                answers.append(True)
        return answers

    def release(self, name: str, token: str, now: float) -> tuple[bool, HandOvers]:
        entry = self._purge(name, now)
        held = entry.grants.pop(token, None)
        entry.queue.pop(token, None)
        handed = self._hand_over(name, entry, now)
        self._forget_if_idle(name)
        return held is not None, handed

    def break_lease(self, name: str, now: float) -> tuple[int, HandOvers]:
        entry = self._purge(name, now)
        count = len(entry.grants)
        entry.grants.clear()
        handed = self._hand_over(name, entry, now)
        self._forget_if_idle(name)
        return count, handed

    def holders(self, name: str, now: float) -> list[HolderInfo]:
        entry = self._purge(name, now)
        infos = [self._info(name, g, now) for g in entry.grants.values()]
        self._forget_if_idle(name)
        return infos

    def leases(self, prefix: str, now: float) -> list[HolderInfo]:
        infos: list[HolderInfo] = []
        for name in sorted(n for n in self._names if n.startswith(prefix)):
            infos.extend(self.holders(name, now))
        return infos

    def waiters(self, prefix: str, now: float) -> list[WaiterInfo]:
        infos: list[WaiterInfo] = []
        for name in sorted(n for n in self._names if n.startswith(prefix)):
            entry = self._purge(name, now)
            for position, waiter in enumerate(entry.queue.values()):
                holder = waiter.request.holder
                infos.append(
                    WaiterInfo(
                        name=name,
                        owner=holder.owner,
                        host=holder.host,
                        pid=holder.pid,
                        position=position,
                        expires_in=max(0.0, waiter.expires - now),
                    )
                )
            self._forget_if_idle(name)
        return infos

    @staticmethod
    def _info(name: str, grant: _Grant, now: float) -> HolderInfo:
        return HolderInfo(
            name=name,
            owner=grant.holder.owner,
            host=grant.holder.host,
            pid=grant.holder.pid,
            fence=grant.fence,
            limit=grant.limit,
            held_for=max(0.0, now - grant.acquired),
            expires_in=max(0.0, grant.expires - now),
        )

    def __len__(self) -> int:
        return len(self._names)
