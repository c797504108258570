"""``client.health()``: a typed snapshot of what one client knows about itself.

Pure: the client gathers the facts (no I/O) and ``assess`` decides, given ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from leasehold._core.policy import renew_interval


@dataclass(frozen=True, slots=True)
class LeaseFacts:
    """What ``assess`` needs of one held lease (local monotonic seconds)."""

    name: str
    deadline: float
    term: float
    renewing: bool


@dataclass(frozen=True, slots=True)
class Health:
    """One client's view of itself, without asking the store.

    ``keeper_running``: the background renewer is alive (it stops a few seconds
    after the last lease is gone, so False with no leases is normal).
    ``leases_held``: leases this client holds now. ``at_risk``: names of renewing
    leases within one renewal interval (a third of their ttl) of their safe
    deadline -- at least one renewal was missed, the next failure may lose them.
    ``last_renewal_age``: seconds since the store last confirmed a renewal (None:
    never). ``store_answer_age``: seconds since the store last answered this client
    (an acquire, renewal or release; None: never). ``store_error``: the last store
    error if nothing answered since (None: the store answered after it, or never
    failed).
    """

    keeper_running: bool
    leases_held: int
    at_risk: tuple[str, ...]
    last_renewal_age: float | None
    store_answer_age: float | None
    store_error: str | None

    @property
    def leases_at_risk(self) -> int:
        return len(self.at_risk)

    @property
    def healthy(self) -> bool:
        """No lease at risk, no unanswered store error, and a renewer for held leases."""
        return (
            not self.at_risk
            and self.store_error is None
            and (self.keeper_running or self.leases_held == 0)
        )


def assess(
    now: float,
    leases: Iterable[LeaseFacts],
    *,
    keeper_running: bool,
    last_renewal: float | None,
    last_answer: float | None,
    last_failure: float | None,
    last_error: str | None,
) -> Health:
    held = 0
    at_risk: list[str] = []
    for lease in leases:
        if now >= lease.deadline:
            continue  # lost: the keeper reports it, it is not held any more
        held += 1
        if lease.renewing and lease.deadline - now <= renew_interval(lease.term):
            at_risk.append(lease.name)
    failing = last_failure is not None and (last_answer is None or last_failure >= last_answer)
    return Health(
        keeper_running=keeper_running,
        leases_held=held,
        at_risk=tuple(sorted(at_risk)),
        last_renewal_age=None if last_renewal is None else max(0.0, now - last_renewal),
        store_answer_age=None if last_answer is None else max(0.0, now - last_answer),
        store_error=last_error if failing else None,
    )


__all__ = ["Health", "LeaseFacts", "assess"]
