"""Why a lease was lost: the reason (a small closed set) and the words for people.

Pure: the lease and the keeper know the facts, these functions name them. The
reasons are ``leasehold.events.LossReason``; the texts go into ``LeaseLost``,
``Lost.detail`` and the ERROR log line, so they say what happened and what it
suggests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leasehold.events import LossReason

REFUSED = "the store says it is no longer held (expired, broken or taken over)"
RESTARTED = (
    "the store restarted or failed over since the grant (its run id changed), so the lease is gone"
)


def refusal(restarted: bool) -> tuple[LossReason, str]:
    """A renewal or extend the store answered with "not held"."""
    return ("restart", RESTARTED) if restarted else ("refused", REFUSED)


def deadline_loss(renewing: bool, failures: int, last_error: str | None) -> tuple[LossReason, str]:
    """The safe deadline passed before a renewal succeeded."""
    if failures:
        return (
            "unreachable",
            f"{failures} renewal attempt(s) failed until its safe deadline; "
            f"the last error: {last_error}",
        )
    if not renewing:
        return "deadline", "its ttl ran out before it was released (the lease does not renew)"
    return (
        "deadline",
        "its safe deadline passed before a renewal was tried (was the process or its "
        "event loop paused or blocked?)",
    )


def unanswered(failures: int, last_error: str | None) -> tuple[LossReason, str]:
    """A renewal call still had not answered at the safe deadline."""
    earlier = "" if not failures else f" after {failures} failed attempt(s) (last: {last_error})"
    return "unreachable", f"the store did not answer a renewal before the safe deadline{earlier}"


__all__ = ["REFUSED", "RESTARTED", "deadline_loss", "refusal", "unanswered"]
