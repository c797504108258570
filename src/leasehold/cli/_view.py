"""The store-wide view: what the whole fleet holds and who waits, from one poll.

Process metrics (``leasehold.prometheus``, ``leasehold.otel``) say what one worker
saw; this reads the store itself, so it sees every process of every host: the
holders and queue depth of every name group, the age of the oldest lease, the
leader of each election and the members of each presence room. ``leasehold
exporter`` serves it as Prometheus series, ``leasehold top`` shows it live and
``leasehold ls`` lists it.

The store cannot tell an election from a lock (an election *is* a lock whose
holder is the leader) nor list presence rooms (rooms are records, and records
have no listing operation), so the elections and rooms to report are named by
the caller.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from leasehold._core.presence import Snapshot
from leasehold._core.records import HolderInfo, WaiterInfo
from leasehold._sync.client import Client
from leasehold.naming import NameGrouper, name_group


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """One poll of the store. ``waiters`` is None when the store cannot list its
    queues; ``leaders`` maps each election asked for to its leader (None: nobody
    leads); ``rooms`` each room asked for to its members."""

    leases: list[HolderInfo]
    waiters: list[WaiterInfo] | None
    leaders: dict[str, HolderInfo | None] = field(default_factory=dict)
    rooms: dict[str, Snapshot] = field(default_factory=dict)
    took: float = 0.0


@dataclass(slots=True)
class GroupStats:
    holders: int = 0
    waiters: int = 0
    oldest: float = 0.0  # seconds the oldest live lease of the group has been held


def poll(
    client: Client,
    prefix: str = "",
    elections: Sequence[str] = (),
    rooms: Sequence[str] = (),
) -> StoreSnapshot:
    """Read everything the view shows, one store call per kind (plus one per
    election and room asked for). ``StoreUnavailable`` if the store cannot answer."""
    started = time.monotonic()
    leases = client.leases(prefix)
    waiters = client.waiters(prefix)
    leaders: dict[str, HolderInfo | None] = {}
    for election in elections:
        if is_pattern(election):
            # A pattern reports the matching elections that have a leader now (one
            # nobody leads is not in the store at all: name it to see it at 0).
            for info in leases:
                if fnmatch.fnmatchcase(info.name, election):
                    known = leaders.get(info.name)
                    if known is None or info.fence < known.fence:
                        leaders[info.name] = info
            continue
        holders = client.holders(election)
        # The oldest grant is the leader (see leasehold._core.election.leader_from).
        leaders[election] = min(holders, key=lambda info: info.fence, default=None)
    members = {room: client.presence(room).members() for room in rooms}
    return StoreSnapshot(leases, waiters, leaders, members, time.monotonic() - started)


def is_pattern(election: str) -> bool:
    """``--election`` takes names, or shell patterns (``beat-*``) over the names
    that are held."""
    return any(c in election for c in "*?[")


def by_group(snapshot: StoreSnapshot, grouper: NameGrouper = name_group) -> dict[str, GroupStats]:
    """Holders, queue depth and oldest lease per name group."""
    groups: dict[str, GroupStats] = {}
    for info in snapshot.leases:
        stats = groups.setdefault(grouper(info.name), GroupStats())
        stats.holders += 1
        stats.oldest = max(stats.oldest, info.held_for)
    for waiter in snapshot.waiters or ():
        groups.setdefault(grouper(waiter.name), GroupStats()).waiters += 1
    return groups


def queue_depths(waiters: Sequence[WaiterInfo] | None) -> dict[str, int]:
    depths: dict[str, int] = {}
    for waiter in waiters or ():
        depths[waiter.name] = depths.get(waiter.name, 0) + 1
    return depths


_HOST = socket.gethostname()


def pid_alive(host: str, pid: int) -> bool | None:
    """Whether the process ``pid`` still runs, if ``host`` is this host (else None:
    another host's pids mean nothing here). A hint only: a pid can be reused, and
    a holder in another container of this host may be invisible (reported gone)."""
    if host != _HOST or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


__all__ = [
    "GroupStats",
    "StoreSnapshot",
    "by_group",
    "pid_alive",
    "poll",
    "queue_depths",
]
