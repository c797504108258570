"""What a client reports about its own work: statistics, events, log lines, health.

One ``Observer`` per client (``client._observer``). Every primitive reports what
happens to it here, once, so that ``statistics()``, the event stream
(``leasehold.events``), the log and ``health()`` always agree. The counters are
always on (one short lock per report); an event object is built only when
somebody subscribed (``events.wanted()``), so with nobody listening a report costs
a counter update and one attribute check.

Log records carry structured fields (``extra=``) that JSON formatters pick up:

==========================  =====================================================
``leasehold_event``         what happened: ``lost``, ``renewal_failed``,
                            ``renewal_failing`` (a summary), ``renewal_recovered``,
                            ``release_failed``, ``acquire_retry``
``leasehold_primitive``     ``lock``, ``semaphore``, ``election``, ``presence``, ``once``
``leasehold_name``          the lease name (for a batch: the lease closest to loss)
``leasehold_fence``         its fence (an election's term)
``leasehold_owner``         the readable holder label (never the secret token)
``leasehold_reason``        on ``lost``: ``refused``, ``restart``, ``unreachable``,
                            ``deadline`` (see ``leasehold.events.LossReason``)
``leasehold_error``         the store error's text, when there is one
``leasehold_time_left``     seconds until the safe deadline (renewal failures)
``leasehold_leases``        how many leases the renewal call carried
==========================  =====================================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from leasehold import events
from leasehold._core.clock import Clock
from leasehold._core.stats import Counters
from leasehold._errors import StoreUnavailable

logger = logging.getLogger("leasehold")

# After the first renewal failure is logged, further failures of the same outage
# are summed up in at most one line per this many seconds.
SUMMARY_INTERVAL = 5.0


class LeaseView(Protocol):
    """What the observer reads of a lease."""

    @property
    def primitive(self) -> events.Primitive: ...
    @property
    def name(self) -> str: ...
    @property
    def fence(self) -> int: ...
    @property
    def owner(self) -> str: ...
    @property
    def deadline(self) -> float: ...


def lease_fields(lease: LeaseView, event: str, **more: object) -> dict[str, object]:
    """The ``extra=`` of a log record about ``lease``."""
    return {
        "leasehold_event": event,
        "leasehold_primitive": lease.primitive,
        "leasehold_name": lease.name,
        "leasehold_fence": lease.fence,
        "leasehold_owner": lease.owner,
        **{f"leasehold_{key}": _plain(value) for key, value in more.items()},
    }


def _plain(value: object) -> object:
    # JSON formatters serialise what they are given: errors go in as their text.
    return error_text(value) if isinstance(value, BaseException) else value


def log_fields(event: str, primitive: str, name: str, **more: object) -> dict[str, object]:
    """The ``extra=`` of a log record about ``name`` when there is no lease."""
    return {
        "leasehold_event": event,
        "leasehold_primitive": primitive,
        "leasehold_name": name,
        **{f"leasehold_{key}": _plain(value) for key, value in more.items()},
    }


def error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Observer:
    def __init__(self, *, client_id: int, store: str, clock: Clock) -> None:
        self.client_id = client_id
        self.store = store
        self.clock = clock
        self.counters = Counters()
        self._reset()

    def _reset(self) -> None:
        self._guard = threading.Lock()
        # Health facts (local monotonic seconds).
        self.last_renewal: float | None = None
        self.last_answer: float | None = None
        self.last_failure: float | None = None
        self.last_error: str | None = None
        # The renewal outage being logged: when it began, failed attempts in it,
        # failures not yet in a log line, and when the last line was written.
        self._failing_since: float | None = None
        self._failed_attempts = 0
        self._unlogged = 0
        self._last_logged = 0.0
        # Acquire retries: errors since the last line, and when it was written.
        self._acquire_errors = 0
        self._acquire_logged: float | None = None

    def after_fork_in_child(self) -> None:
        self.counters.reset_after_fork()
        self._reset()

    def emit(
        self, kind: Callable[..., events.Event], primitive: str, name: str, **fields: Any
    ) -> None:
        """Build and deliver one event; callers check ``events.wanted()`` first."""
        events.emit(
            kind(
                primitive=primitive, name=name, store=self.store, client_id=self.client_id, **fields
            )
        )

    # -- acquiring ---------------------------------------------------------------

    def acquire_started(self, primitive: events.Primitive, name: str, blocking: bool) -> float:
        """Report the start of an acquire; returns its start time."""
        started = self.clock.monotonic()
        if events._subscriptions:  # events.wanted(), inlined on the hot path
            self.emit(events.AcquireStarted, primitive, name, blocking=blocking)
        return started

    def acquired(
        self,
        primitive: events.Primitive,
        name: str,
        fence: int,
        started: float,
        handed_over: bool,
        *,
        now: float | None = None,
    ) -> None:
        """Granted; ``now``: when the grant was heard of, if the caller read it."""
        if now is None:
            now = self.clock.monotonic()
        self.counters.add_timed("acquired", "wait_time", now - started)
        self.last_answer = now
        if events._subscriptions:
            self.emit(
                events.Acquired,
                primitive,
                name,
                fence=fence,
                wait=now - started,
                handed_over=handed_over,
            )

    def not_acquired(
        self, primitive: events.Primitive, name: str, started: float, *, blocking: bool
    ) -> None:
        """``try_acquire`` found it busy, or ``acquire`` timed out."""
        now = self.clock.monotonic()
        self.counters.add_timed("timed_out" if blocking else "skipped", "wait_time", now - started)
        self.last_answer = now
        if events.wanted():
            if blocking:
                self.emit(events.TimedOut, primitive, name, wait=now - started)
            else:
                self.emit(events.Busy, primitive, name, wait=now - started)

    def acquire_failed(
        self, primitive: events.Primitive, name: str, started: float, exc: BaseException
    ) -> None:
        now = self.clock.monotonic()
        if isinstance(exc, StoreUnavailable):
            self.last_failure = now
            self.last_error = error_text(exc)
        if not events.wanted():
            return
        if isinstance(exc, Exception):
            self.emit(
                events.AcquireFailed,
                primitive,
                name,
                wait=now - started,
                error_type=type(exc).__name__,
                error=error_text(exc),
            )
        else:
            # Cancelled (or KeyboardInterrupt): the caller stopped waiting.
            self.emit(events.TimedOut, primitive, name, wait=now - started, cancelled=True)

    def abandoned(self, primitive: events.Primitive, name: str, started: float) -> None:
        """A wait given up by its owner between attempts (an election's stop())."""
        if events.wanted():
            wait = self.clock.monotonic() - started
            self.emit(events.TimedOut, primitive, name, wait=wait, cancelled=True)

    def acquire_retry(self, name: str, exc: BaseException) -> None:
        """A store error during an acquire that will be retried: logged at most
        once per SUMMARY_INTERVAL per client, with how many were not."""
        now = self.clock.monotonic()
        self.last_failure = now
        self.last_error = error_text(exc)
        with self._guard:
            self._acquire_errors += 1
            logged = self._acquire_logged
            if logged is not None and now - logged < SUMMARY_INTERVAL:
                return
            unlogged, self._acquire_errors = self._acquire_errors - 1, 0
            self._acquire_logged = now
        more = f" ({unlogged} more acquire error(s) since the last line)" if unlogged else ""
        logger.warning(
            "acquire %r: store error (%s); retrying%s",
            name,
            exc,
            more,
            extra={
                "leasehold_event": "acquire_retry",
                "leasehold_name": name,
                "leasehold_error": error_text(exc),
            },
        )

    # -- holding -------------------------------------------------------------------

    def renewed(self, leases: Sequence[LeaseView], duration: float) -> None:
        """The store confirmed the renewal of ``leases`` in one call of ``duration`` s."""
        now = self.clock.monotonic()
        self.counters.add("renewed", len(leases))
        self.last_renewal = self.last_answer = now
        if self._failing_since is not None:
            self._recovered(now)
        if events.wanted():
            for lease in leases:
                self.emit(
                    events.Renewed,
                    lease.primitive,
                    lease.name,
                    fence=lease.fence,
                    duration=duration,
                )

    def answered(self) -> None:
        """The store answered (a refusal, a release): it is reachable."""
        self.last_answer = self.clock.monotonic()

    def renewal_failed(
        self, leases: Sequence[LeaseView], duration: float, exc: BaseException | None
    ) -> None:
        """Renewing ``leases`` failed (``exc``; None: the store gave them no answer)
        and will be retried until their safe deadlines."""
        if not leases:
            return
        now = self.clock.monotonic()
        error = "no answer" if exc is None else error_text(exc)
        error_type = "NoAnswer" if exc is None else type(exc).__name__
        self.counters.add("renewal_failures", len(leases))
        self.last_failure = now
        self.last_error = error
        if events.wanted():
            for lease in leases:
                self.emit(
                    events.RenewalFailed,
                    lease.primitive,
                    lease.name,
                    fence=lease.fence,
                    duration=duration,
                    error_type=error_type,
                    error=error,
                    time_left=max(0.0, lease.deadline - now),
                )
        soonest = min(leases, key=lambda lease: lease.deadline)
        self._log_failure(now, soonest, len(leases), error)

    def _log_failure(self, now: float, soonest: LeaseView, count: int, error: str) -> None:
        with self._guard:
            first = self._failing_since is None
            if first:
                self._failing_since = now
                self._failed_attempts = 0
            self._failed_attempts += 1
            self._unlogged += 1
            if not first and now - self._last_logged < SUMMARY_INTERVAL:
                return
            unlogged, self._unlogged = self._unlogged, 0
            window = now - self._last_logged
            self._last_logged = now
            since = self._failing_since or now
            attempts = self._failed_attempts
        time_left = max(0.0, soonest.deadline - now)
        fields = lease_fields(
            soonest,
            "renewal_failed" if first else "renewal_failing",
            error=error,
            time_left=round(time_left, 3),
            leases=count,
        )
        if first:
            logger.warning(
                "renewing %d lease(s) failed (%s); retrying until their safe deadlines "
                "(the soonest, %r, in %.1f s)",
                count,
                error,
                soonest.name,
                time_left,
                extra=fields,
            )
        else:
            logger.warning(
                "renewals still failing: %d more failed attempt(s) in the last %.1f s, %d "
                "since the failures began %.1f s ago (last error: %s); the soonest safe "
                "deadline (%r) is in %.1f s",
                unlogged,
                window,
                attempts,
                now - since,
                error,
                soonest.name,
                time_left,
                extra=fields,
            )

    def _recovered(self, now: float) -> None:
        with self._guard:
            since, attempts = self._failing_since, self._failed_attempts
            self._failing_since = None
            self._failed_attempts = self._unlogged = 0
        if since is not None:
            logger.info(
                "renewals succeed again after %d failed attempt(s) over %.1f s",
                attempts,
                now - since,
                extra={"leasehold_event": "renewal_recovered"},
            )

    def lost(self, lease: LeaseView, reason: events.LossReason, detail: str, held: float) -> None:
        self.counters.add_timed("lost", "hold_time", held)
        logger.error(
            "lease %r (fence %d) lost [%s]: %s",
            lease.name,
            lease.fence,
            reason,
            detail,
            extra=lease_fields(lease, "lost", reason=reason),
        )
        if events.wanted():
            self.emit(
                events.Lost,
                lease.primitive,
                lease.name,
                fence=lease.fence,
                reason=reason,
                detail=detail,
                held=held,
            )

    def released(self, lease: LeaseView, held: float, answered: float | None) -> None:
        """Released while held; ``answered``: when the store took the release
        (None: it failed)."""
        self.counters.add_timed("released", "hold_time", held)
        if answered is not None:
            self.last_answer = answered
        if events._subscriptions:
            self.emit(events.Released, lease.primitive, lease.name, fence=lease.fence, held=held)

    def release_failed(self, lease: LeaseView, exc: BaseException, ttl: float) -> None:
        self.last_failure = self.clock.monotonic()
        self.last_error = error_text(exc)
        logger.warning(
            "could not release %r (fence %d): %s; it expires by itself within %g s",
            lease.name,
            lease.fence,
            exc,
            ttl,
            extra=lease_fields(lease, "release_failed", error=error_text(exc)),
        )


__all__ = ["SUMMARY_INTERVAL", "LeaseView", "Observer", "lease_fields", "log_fields"]
