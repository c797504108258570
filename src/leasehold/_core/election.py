"""Leadership as data, and when to look again: the pure half of elections.

An election is a lock with limit 1; the leader is its holder, the term is the
holder's fence. Nothing here does I/O or reads a clock: times are parameters.
"""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from leasehold._core.backoff import Backoff
from leasehold._core.records import HolderInfo

# An observer looks again this soon after a change (changes come in clusters: a
# vacancy is followed by the next leader) and backs off from there.
OBSERVE_FAST = 0.02
# Look again this long after the leader's expiry in the store: a leader that stopped
# renewing is gone then, and nothing else announces it.
EXPIRY_SLACK = 0.005
# After losing leadership, a candidate waits min(REJOIN_MAX, ttl/4), jittered, before
# campaigning again, so that a crowd of ex-leaders does not stampede the store.
REJOIN_MAX = 1.0
# Where the store announces changes, an observer still looks unprompted every
# ttl/3 (at least this fraction of it, jittered): a safety net for changes nobody
# announced (a crashed announcer, a lease released directly, a lost message).
SAFETY_POLL_JITTER = 0.2
# Announcement topics of elections: "election:<name>".
TOPIC_PREFIX = "election:"


@dataclass(frozen=True, slots=True)
class Leader:
    """Who leads an election right now.

    ``identity``: the label the leader campaigned with. ``term``: the fence of its
    leadership lease, strictly increasing from one leader to the next (also across
    expiry and store restarts), so it can fence writes. ``since``: when the term
    began, estimated on this machine's wall clock from the store's ``held_for``, for
    display only: leasehold never decides anything by comparing it. Two reads of
    the same term compare equal (``since`` is left out of comparisons, since each
    read estimates it anew).
    """

    identity: str
    term: int
    since: datetime = field(compare=False)


def current_holder(holders: Sequence[HolderInfo]) -> HolderInfo | None:
    """The leader among an election name's live holders. There is at most one unless
    someone misuses the name with a semaphore; then the oldest grant counts."""
    return min(holders, key=lambda info: info.fence, default=None)


def leader_from(info: HolderInfo, wall_now: float) -> Leader:
    since = datetime.fromtimestamp(wall_now - info.held_for, tz=UTC)
    return Leader(identity=info.owner, term=info.fence, since=since)


def observe_delay(
    ttl: float,
    quiet_polls: int,
    expires_in: float | None,
    rng: random.Random | None = None,
) -> float:
    """How long an observer waits before polling ``holders()`` again.

    Fast right after a change, backing off (jittered) while nothing changes, never
    slower than ``ttl / 3``; and just after the current leader's expiry if that comes
    sooner, since a leader that stopped renewing disappears exactly then.
    """
    ceiling = ttl / 3.0
    delay = Backoff(initial=min(OBSERVE_FAST, ceiling), maximum=ceiling).delay(quiet_polls, rng)
    if expires_in is not None:
        delay = min(delay, expires_in + EXPIRY_SLACK)
    return max(0.0, delay)


def watch_delay(ttl: float, expires_in: float | None, rng: random.Random | None = None) -> float:
    """How long an observer on a store with announcements waits for one before it
    looks again anyway: the safety poll (``ttl / 3``, jittered down a little so that
    many observers spread out), or just after the current leader's expiry in the
    store if that comes sooner -- a leader that stopped renewing disappears then and
    nobody announces it."""
    delay = ttl / 3.0 * (1.0 - SAFETY_POLL_JITTER * (rng or random).random())
    if expires_in is not None:
        delay = min(delay, expires_in + EXPIRY_SLACK)
    return max(0.0, delay)


def topic(name: str) -> str:
    """The announcement topic of the election ``name`` (see ``AsyncStore.announce``)."""
    return TOPIC_PREFIX + name


def rejoin_delay(ttl: float, rng: random.Random | None = None) -> float:
    """The pause between losing (or giving up) leadership and campaigning again."""
    ceiling = min(REJOIN_MAX, ttl / 4.0)
    return ceiling * (0.5 + (rng or random).random() / 2)


class _Wakeable(Protocol):
    def set(self) -> None: ...


class LocalChanges:
    """Wakes observers in this process when an election object here changes leader.

    Observers register an event per election name; held weakly, so an abandoned
    ``observe()`` iterator costs nothing once collected. Waking an observer of the
    same name on another store is harmless: it merely polls once more.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._by_name: dict[str, weakref.WeakSet[_Wakeable]] = {}

    def subscribe(self, name: str, event: _Wakeable) -> None:
        with self._guard:
            self._by_name.setdefault(name, weakref.WeakSet()).add(event)

    def unsubscribe(self, name: str, event: _Wakeable) -> None:
        with self._guard:
            events = self._by_name.get(name)
            if events is None:
                return
            events.discard(event)
            if not events:
                del self._by_name[name]

    def announce(self, name: str) -> None:
        with self._guard:
            events = list(self._by_name.get(name, ()))
        for event in events:
            event.set()


CHANGES = LocalChanges()

__all__ = [
    "CHANGES",
    "Leader",
    "LocalChanges",
    "current_holder",
    "leader_from",
    "observe_delay",
    "rejoin_delay",
    "topic",
    "watch_delay",
]
