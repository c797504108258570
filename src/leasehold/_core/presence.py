"""Presence rooms as data: the whole state of a room and its transitions, pure.

A room is ONE record in the store. Every operation reads it (with the store's
clock), applies one transition function from this module, and writes the result
back by compare-and-set; a lost race re-reads and re-applies. So each operation is
one atomic step per room, and every decision -- "is anyone still here?", "is the
room idle long enough?" -- is made on the state it will replace.

Nothing here does I/O or reads a clock: ``now`` is the store's clock at the read
(``Record.now``) and ``version`` the version that read returned. Expiry is decided
lazily, inside every transition, by comparing ``now`` with the expiries written
into the state, so correctness never depends on a reaper.

The life of a room::

    (absent) --claim--> CREATING(n) --commit--> OPEN(n) --close_if_idle--> CLOSED(n)
                            |  ^                                              |
                            |  +--claim (takeover after the creator's lease)  |
                            +------------------- claim(m > n) <---------------+

Epoch numbers are the fences of the creation lock (strictly increasing, never
reused). A commit is accepted only while the record still says CREATING with the
committer's number; a takeover writes a higher number first, so a dead creator's
late commit changes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from leasehold._core import validate
from leasehold._core.records import MAX_RECORD_BYTES
from leasehold._errors import InvalidArgument, LeaseholdError, MemberGone, StaleEpoch

R = TypeVar("R")

CREATING = "creating"
OPEN = "open"
CLOSED = "closed"
PHASES = (CREATING, OPEN, CLOSED)

INTENT = "intent"
ACTIVE = "active"
MEMBER_STATES = (INTENT, ACTIVE)

FORMAT = 1
RECORD_PREFIX = "presence:"
CREATE_LOCK_PREFIX = "presence-create:"
MAX_ROOM_LENGTH = validate.MAX_NAME_LENGTH - len(CREATE_LOCK_PREFIX)
MAX_DATA_BYTES = 16 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024
# A closed room's record is kept this long, then expires. Nothing depends on it
# (epoch numbers come from fences, not from the record; an operation on a closed
# or forgotten epoch gets StaleEpoch either way); it is kept for people to look at.
CLOSED_RETENTION = 24 * 3600.0


# -- what users see -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Epoch:
    """One incarnation of a room. ``number`` is strictly greater than every earlier
    epoch's of the same room and never reused: use it as a fence for side effects
    (deleting the meeting, writes to your database). ``payload`` is what ``create``
    returned for this epoch, as JSON gives it back (tuples become lists)."""

    number: int
    payload: Any


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a room.

    In a ``Snapshot``: ``expires_in`` is how long the store will count it present
    (seconds, store clock) and ``deadline`` is None. Returned by ``intend``,
    ``join`` and ``heartbeat``: ``deadline`` is the *acknowledged deadline* on this
    client's clock (send time + ttl - margin) and ``expires_in`` the time left
    until it when the call returned. Until that deadline, ``close_if_idle`` cannot
    close the epoch -- unless the member leaves (or, for an active member, an
    ``observe`` with a newer snapshot removes it).
    """

    id: str
    state: str
    data: Any
    expires_in: float
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The room as one read saw it. ``epoch``: the OPEN epoch's number, or None when
    no epoch is open. ``members``: the live members, by id. ``version``: the record
    version; pass it to ``close_if_idle(expected_version=)`` and
    ``observe(snapshot_version=)``."""

    epoch: int | None
    members: list[Member]
    version: int


# -- the state in the record --------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One member. ``expires``: store clock. ``ttl``: the grant that set ``expires``
    (bounds it when the store clock jumps back). ``changed``: the version that the
    write which last changed this member had *read*; that change is visible in a
    snapshot of version v exactly when ``changed < v``."""

    state: str
    data: Any
    expires: float
    ttl: float
    changed: int


@dataclass(slots=True)
class Gone:
    """A member that left or was removed: remembered for a while so that a stale
    presence feed cannot bring it back (see ``observe``)."""

    changed: int
    forget_at: float


@dataclass(slots=True)
class Room:
    epoch: int
    phase: str
    creator: str | None = None
    payload: Any = None
    members: dict[str, Entry] = field(default_factory=dict)
    gone: dict[str, Gone] = field(default_factory=dict)
    # Store time of the last membership change, including the expiry of a member.
    last_change: float = 0.0

    def copy(self) -> Room:
        return replace(
            self,
            members={k: replace(v) for k, v in self.members.items()},
            gone={k: replace(v) for k, v in self.gone.items()},
        )


@dataclass(frozen=True, slots=True)
class Step(Generic[R]):
    """A transition's answer: the state to write (None: write nothing) and the result."""

    write: Room | None
    result: R


# -- encoding ---------------------------------------------------------------------------


def dump_json(value: object, *, what: str, limit: int) -> bytes:
    """``value`` as compact JSON; InvalidArgument unless it is JSON and small enough."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        encoded = text.encode()
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        raise InvalidArgument(f"{what} must be JSON-serialisable: {exc}") from None
    if len(encoded) > limit:
        raise InvalidArgument(f"{what} is {len(encoded)} bytes as JSON; at most {limit} allowed")
    return encoded


def encode(room: Room) -> bytes:
    doc = {
        "format": FORMAT,
        "epoch": room.epoch,
        "phase": room.phase,
        "creator": room.creator,
        "payload": room.payload,
        "last_change": room.last_change,
        "members": {
            k: {"s": e.state, "d": e.data, "e": e.expires, "t": e.ttl, "c": e.changed}
            for k, e in room.members.items()
        },
        "gone": {k: [g.changed, g.forget_at] for k, g in room.gone.items()},
    }
    value = json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidArgument(
            f"the room's state would take {len(value)} bytes, more than a record holds "
            f"({MAX_RECORD_BYTES}); use fewer members or smaller member data"
        )
    return value


def decode(key: str, value: bytes | None) -> Room | None:
    if value is None:
        return None
    try:
        doc = json.loads(value)
        if doc["format"] != FORMAT or doc["phase"] not in PHASES:
            raise ValueError("unknown format or phase")
        if any(m["s"] not in MEMBER_STATES for m in doc["members"].values()):
            raise ValueError("unknown member state")
        return Room(
            epoch=int(doc["epoch"]),
            phase=doc["phase"],
            creator=doc["creator"],
            payload=doc["payload"],
            last_change=float(doc["last_change"]),
            members={
                k: Entry(m["s"], m["d"], float(m["e"]), float(m["t"]), int(m["c"]))
                for k, m in doc["members"].items()
            },
            gone={k: Gone(int(g[0]), float(g[1])) for k, g in doc["gone"].items()},
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise LeaseholdError(
            f"record {key!r} does not hold a presence room ({exc}); "
            "is another program writing records under that key?"
        ) from None


def record_ttl(room: Room) -> float | None:
    return CLOSED_RETENTION if room.phase == CLOSED else None


# -- argument checks (before any I/O) ----------------------------------------------------


def check_room(value: object) -> str:
    room = validate.name(value, what="room")
    if len(room) > MAX_ROOM_LENGTH:
        raise InvalidArgument(
            f"room is {len(room)} characters long; at most {MAX_ROOM_LENGTH} are allowed"
        )
    return room


def check_member(value: object) -> str:
    return validate.name(value, what="member")


def check_epoch(value: object) -> int:
    if isinstance(value, Epoch):
        value = value.number
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"epoch must be an int (or an Epoch), got {type(value).__name__}")
    if value < 1:
        raise InvalidArgument(f"epoch must be >= 1, got {value}")
    return value


def check_version(value: object, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise InvalidArgument(f"{what} must be >= 0, got {value}")
    return value


def check_grace(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"grace must be a number of seconds, got {type(value).__name__}")
    grace = float(value)
    if math.isnan(grace) or not 0 <= grace <= validate.MAX_TTL:
        raise InvalidArgument(
            f"grace must be between 0 and {validate.MAX_TTL:g} seconds, got {value!r}"
        )
    return grace


def check_data(value: object) -> Any:
    """Member data: JSON, at most MAX_DATA_BYTES; returned as JSON gives it back."""
    return json.loads(dump_json(value, what="data", limit=MAX_DATA_BYTES))


def check_payload(value: object) -> Any:
    return json.loads(
        dump_json(value, what="the payload create() returned", limit=MAX_PAYLOAD_BYTES)
    )


def check_present(value: object) -> frozenset[str]:
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"present_ids must be an iterable of member ids (not a single string), "
            f"got {type(value).__name__}"
        )
    return frozenset(check_member(item) for item in value)


# -- views ------------------------------------------------------------------------------


def current_epoch(room: Room | None) -> Epoch | None:
    if room is None or room.phase != OPEN:
        return None
    return Epoch(room.epoch, room.payload)


def settle(room: Room, now: float) -> Room:
    """A copy with expired members and tombstones dropped.

    Also bounds every remaining time by the ttl that granted it, which matters only
    when the store clock jumped back (SQLite after a reboot, Redis's wall clock):
    then members expire at most one ttl later than they would have, never earlier.
    An expired member's expiry counts as a membership change (the room became
    emptier at that moment), so ``grace`` is measured from it.
    """
    out = room.copy()
    out.last_change = min(out.last_change, now)
    for member_id, entry in list(out.members.items()):
        if now >= entry.expires:
            del out.members[member_id]
            out.last_change = max(out.last_change, entry.expires)
        else:
            entry.expires = min(entry.expires, now + entry.ttl)
    for member_id, gone in list(out.gone.items()):
        if now >= gone.forget_at:
            del out.gone[member_id]
    return out


def clock_went_back(room: Room, now: float) -> bool:
    """True if the state holds times that only a store clock that jumped back
    explains (a remaining time longer than its ttl, a change in the future)."""
    return room.last_change > now or any(
        now < entry.expires and entry.expires > now + entry.ttl for entry in room.members.values()
    )


def snapshot(room: Room | None, now: float, version: int) -> Snapshot:
    if room is None or room.phase != OPEN:
        return Snapshot(epoch=None, members=[], version=version)
    live = settle(room, now)
    members = [
        Member(member_id, entry.state, entry.data, entry.expires - now)
        for member_id, entry in sorted(live.members.items())
    ]
    return Snapshot(epoch=room.epoch, members=members, version=version)


# -- transitions: (state, now, version, arguments) -> Step ---------------------------------

Transition = Callable[[Room | None, float, int], Step[R]]


def _require_open(name: str, room: Room | None, epoch: int) -> Room:
    if room is None or room.phase != OPEN or room.epoch != epoch:
        current = room.epoch if room is not None and room.phase == OPEN else None
        raise StaleEpoch(name, epoch, current)
    return room


def _extend(entry: Entry, now: float, ttl: float) -> None:
    """Expiry only ever moves later: an acknowledged deadline is never shortened."""
    if now + ttl >= entry.expires:
        entry.expires = now + ttl
        entry.ttl = ttl


def claim(
    room: Room | None, now: float, version: int, *, number: int, creator: str
) -> Step[Epoch | None]:
    """Start creating epoch ``number`` (the caller holds the creation lock with that
    fence). If an epoch is OPEN already, nothing is written and it is returned."""
    del version
    opened = current_epoch(room)
    if opened is not None:
        return Step(None, opened)
    if room is not None and room.epoch >= number:
        raise LeaseholdError(
            f"creation fence {number} is not above the room's epoch {room.epoch}: the "
            "store broke its fence order (S1); refusing to reuse an epoch number"
        )
    return Step(Room(epoch=number, phase=CREATING, creator=creator, last_change=now), None)


def commit(room: Room | None, now: float, version: int, *, number: int, payload: Any) -> Step[bool]:
    """Open epoch ``number`` with ``payload`` -- only if the record still says
    CREATING(number). A takeover wrote a higher number first, so a superseded
    creator's commit is refused."""
    del version
    if room is None or room.phase != CREATING or room.epoch != number:
        return Step(None, False)
    return Step(Room(epoch=number, phase=OPEN, payload=payload, last_change=now), True)


def intend(
    room: Room | None, now: float, version: int, *, name: str, member: str, epoch: int, ttl: float
) -> Step[Entry]:
    """Intent to join ("about to join"): the member counts as present for ``ttl``. An active member
    stays active; an expiry never moves earlier."""
    out = settle(_require_open(name, room, epoch), now)
    entry = out.members.get(member)
    if entry is None:
        entry = out.members[member] = Entry(INTENT, None, now + ttl, ttl, version)
    else:
        _extend(entry, now, ttl)
        entry.changed = version
    out.gone.pop(member, None)
    out.last_change = now
    return Step(out, replace(entry))


def join(
    room: Room | None,
    now: float,
    version: int,
    *,
    name: str,
    member: str,
    epoch: int,
    data: Any,
    ttl: float,
) -> Step[Entry]:
    """Intent (or nothing) -> active with ``data``, in one step."""
    out = settle(_require_open(name, room, epoch), now)
    entry = out.members.get(member)
    if entry is None:
        entry = out.members[member] = Entry(ACTIVE, data, now + ttl, ttl, version)
    else:
        entry.state = ACTIVE
        entry.data = data
        entry.changed = version
        _extend(entry, now, ttl)
    out.gone.pop(member, None)
    out.last_change = now
    return Step(out, replace(entry))


def heartbeat(
    room: Room | None,
    now: float,
    version: int,
    *,
    name: str,
    member: str,
    epoch: int,
    ttls: dict[str, float],
) -> Step[Entry]:
    """Extend a live member by its state's ttl; MemberGone if it is not live."""
    out = settle(_require_open(name, room, epoch), now)
    entry = out.members.get(member)
    if entry is None:
        raise MemberGone(name, member, epoch)
    _extend(entry, now, ttls[entry.state])
    entry.changed = version
    out.last_change = now
    return Step(out, replace(entry))


def _remove(out: Room, member: str, now: float, version: int) -> None:
    entry = out.members.pop(member)
    out.gone[member] = Gone(version, now + entry.ttl)
    out.last_change = now


def leave(room: Room | None, now: float, version: int, *, member: str, epoch: int) -> Step[bool]:
    """Remove the member. Idempotent: False (and nothing written) if it was not a
    live member of the OPEN epoch ``epoch`` -- leaving an epoch that is gone has
    nothing left to do, so it is not an error."""
    if room is None or room.phase != OPEN or room.epoch != epoch:
        return Step(None, False)
    out = settle(room, now)
    if member not in out.members:
        return Step(None, False)
    _remove(out, member, now, version)
    return Step(out, True)


def close_if_idle(
    room: Room | None,
    now: float,
    version: int,
    *,
    epoch: int,
    grace: float,
    expected_version: int | None,
) -> Step[bool]:
    """Close epoch ``epoch`` if, in this very state: it is the OPEN epoch, the version
    matches (when given), no intent or active member is live, and the last
    membership change is at least ``grace`` old."""
    if room is None or room.phase != OPEN or room.epoch != epoch:
        return Step(None, False)
    if expected_version is not None and expected_version != version:
        return Step(None, False)
    out = settle(room, now)
    if out.members or now - out.last_change < grace:
        # After the store clock jumped back, write the bounded times down: a
        # bound recomputed at every read would slide along with the clock, and
        # the room would stay open until the clock caught up again.
        return Step(out if clock_went_back(room, now) else None, False)
    closed = Room(epoch=room.epoch, phase=CLOSED, payload=room.payload, last_change=now)
    return Step(closed, True)


def observe(
    room: Room | None,
    now: float,
    version: int,
    *,
    name: str,
    epoch: int,
    present: frozenset[str],
    snapshot_version: int,
    ttl: float,
) -> Step[Room]:
    """Reconcile with an external presence feed that was read *after* the snapshot
    of version ``snapshot_version`` was taken.

    Members in ``present`` become (or stay) active and are refreshed -- except one
    that left after the snapshot (the feed may predate its leaving). An active
    member missing from ``present`` is removed only if its last change is visible in
    that snapshot (``changed < snapshot_version``): anything newer -- a join, a
    heartbeat -- is newer evidence than the feed. Intents are never removed: a
    member mid-handshake is exactly what a feed cannot see yet.
    """
    out = settle(_require_open(name, room, epoch), now)
    if snapshot_version > version:
        raise InvalidArgument(
            f"snapshot_version {snapshot_version} is newer than room {name!r} itself "
            f"(version {version}): pass the version of a snapshot of this room"
        )
    changed = False
    for member in sorted(present):
        entry = out.members.get(member)
        if entry is None:
            gone = out.gone.get(member)
            if gone is not None and gone.changed >= snapshot_version:
                continue
            out.members[member] = Entry(ACTIVE, None, now + ttl, ttl, version)
            out.gone.pop(member, None)
        else:
            entry.state = ACTIVE
            entry.changed = version
            _extend(entry, now, ttl)
        changed = True
    for member, entry in list(out.members.items()):
        if member in present or entry.state != ACTIVE or entry.changed >= snapshot_version:
            continue
        _remove(out, member, now, version)
        changed = True
    if changed:
        out.last_change = now
        return Step(out, out)
    return Step(None, out)
