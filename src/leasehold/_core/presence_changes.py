"""What one presence write changed, as events: opened, closed, joined, left, expired.

Computed from the room before and after a write that the store accepted, so each
change is reported exactly once across the fleet: by the client whose write made
it (a member that expired is reported by whoever wrote the room next).
"""

from __future__ import annotations

from typing import Literal

from leasehold._core.presence import ACTIVE, CLOSED, INTENT, OPEN, Entry, Room

Change = Literal["opened", "closed", "joined", "left", "intent_expired"]


def changes(before: Room | None, after: Room, now: float) -> list[tuple[Change, str | None]]:
    """``(change, member)`` pairs (member None for the room itself), in order."""
    out: list[tuple[Change, str | None]] = []
    same_epoch = before is not None and before.epoch == after.epoch
    was_open = before is not None and before.phase == OPEN
    if after.phase == OPEN and not (was_open and same_epoch):
        out.append(("opened", None))
    prior: dict[str, Entry] = before.members if was_open and before is not None else {}
    current: dict[str, Entry] = after.members if after.phase == OPEN else {}
    if not same_epoch:
        prior = {}
    for member, entry in sorted(prior.items()):
        expired = now >= entry.expires
        if member in current and not expired:
            continue
        out.append(("intent_expired" if expired and entry.state == INTENT else "left", member))
    for member, entry in sorted(current.items()):
        if entry.state != ACTIVE:
            continue
        old = prior.get(member)
        if old is None or old.state != ACTIVE or now >= old.expires:
            out.append(("joined", member))
    if after.phase == CLOSED and was_open and same_epoch:
        out.append(("closed", None))
    return out


__all__ = ["Change", "changes"]
