"""OpenTelemetry metrics and traces for every leasehold client of the process.

::

    pip install 'leasehold[otel]'      # opentelemetry-api only

    import leasehold.otel
    leasehold.otel.instrument()         # once, at startup; idempotent

Uses the global meter and tracer providers (configure the OpenTelemetry SDK, or
any distribution, as usual), or the ones passed in. Instruments (all in seconds
where they measure time; see docs/observability.md):

* histograms ``leasehold.acquire.wait`` (attribute ``leasehold.outcome``),
  ``leasehold.hold``, ``leasehold.renewal.duration``;
* counters ``leasehold.acquisitions`` (``leasehold.outcome``: granted, busy,
  timeout, error; cancelled when the caller stopped waiting),
  ``leasehold.renewals`` (``leasehold.result``: renewed, failed, refused),
  ``leasehold.losses`` (``leasehold.reason``: refused, restart, unreachable,
  deadline);
* up-down counters ``leasehold.held`` and ``leasehold.waiting``;
* gauge ``leasehold.leader``: 1 while this process leads an election of the group.

Every measurement carries ``leasehold.primitive``, ``leasehold.store`` (URL scheme)
and ``leasehold.name_group`` (never the name itself: see ``leasehold.naming``).

Traces: one span ``leasehold.acquire`` per acquire call, from the call's start to
its end, with the name, fence and outcome (a child of the span current where the
call was made); a loss adds the event ``leasehold.lost`` to the current span, or to
a short span ``leasehold.loss`` when none is recording (the keeper's thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.util.types import Attributes

from leasehold import __version__, events
from leasehold._measure import Common, Extra, Measurer, outcome_of
from leasehold.naming import NameGrouper, resolve

SCOPE = "leasehold"

_guard = threading.Lock()
# One instrumentation per (meter provider, tracer provider) pair: instrument() again
# with the same providers returns it.
_installed: dict[tuple[int, int], Instrumentation] = {}


class Instrumentation:
    """The subscription that feeds OpenTelemetry; ``close()`` stops it."""

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None,
        tracer_provider: trace.TracerProvider | None,
        grouper: NameGrouper,
    ) -> None:
        meter = metrics.get_meter(SCOPE, __version__, meter_provider)
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        self._grouper = grouper
        self._measurer = Measurer(grouper)
        seconds = "s"
        self._histograms: dict[str, Any] = {
            "acquire_wait": meter.create_histogram(
                "leasehold.acquire.wait", seconds, "Time an acquire call took, by outcome"
            ),
            "hold": meter.create_histogram(
                "leasehold.hold", seconds, "Time from grant to release or loss"
            ),
            "renewal_duration": meter.create_histogram(
                "leasehold.renewal.duration", seconds, "Round trip of a renewal call"
            ),
        }
        # Counters, up-down counters and the gauge are observable: an event only adds
        # to a total here, and the SDK reads the totals when it collects. A
        # synchronous add costs the SDK several microseconds (it checks and hashes
        # the attributes every time) and an acquire with its release makes five.
        self._guard = threading.Lock()
        self._closed = False
        self._totals: dict[str, dict[tuple[Common, Extra], float]] = {
            instrument: {}
            for instrument in ("acquisitions", "renewals", "losses", "held", "waiting", "leader")
        }
        observe = self._observer
        meter.create_observable_counter(
            "leasehold.acquisitions",
            [observe("acquisitions")],
            "{acquisition}",
            "Acquire calls, by outcome",
        )
        meter.create_observable_counter(
            "leasehold.renewals",
            [observe("renewals")],
            "{renewal}",
            "Renewals of held leases, by result",
        )
        meter.create_observable_counter(
            "leasehold.losses", [observe("losses")], "{loss}", "Leases lost while held, by reason"
        )
        meter.create_observable_up_down_counter(
            "leasehold.held", [observe("held")], "{lease}", "Leases held by this process now"
        )
        meter.create_observable_up_down_counter(
            "leasehold.waiting",
            [observe("waiting")],
            "{call}",
            "Acquire calls in progress in this process",
        )
        meter.create_observable_gauge(
            "leasehold.leader",
            [observe("leader")],
            "1",
            "1 while this process leads an election of the group",
        )
        # Attribute dicts by (common labels, extra), built once each.
        self._attributes: dict[tuple[Common, Extra], dict[str, str]] = {}
        self._subscription = events.subscribe(self._on_event)

    def close(self) -> None:
        """Unsubscribe: no more measurements or spans (instruments stay registered
        with their provider, as OpenTelemetry has no way to remove them)."""
        self._subscription.close()
        with self._guard:
            self._closed = True
        with _guard:
            for key, value in list(_installed.items()):
                if value is self:
                    del _installed[key]

    def _on_event(self, event: events.Event) -> None:
        common, measurements = self._measurer.measure(event)
        for kind, instrument, value, extra in measurements:
            key = (common, extra)
            if kind == "observe":
                attributes = self._attributes.get(key)
                if attributes is None:
                    attributes = self._attributes[key] = _attributes(common, extra)
                self._histograms[instrument].record(value, attributes)
                continue
            with self._guard:
                totals = self._totals[instrument]
                totals[key] = value if kind == "set" else totals.get(key, 0.0) + value
        outcome = outcome_of(event)
        if outcome is not None:
            self._acquire_span(event, outcome)
        elif isinstance(event, events.Lost):
            self._loss_event(event)

    def _observer(self, instrument: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            del options
            with self._guard:
                if self._closed:
                    return []
                found = list(self._totals[instrument].items())
            return [Observation(value, _attributes(*key)) for key, value in found]

        return observe

    def _common(self, event: events.Event) -> dict[str, str | int]:
        return {
            "leasehold.primitive": event.primitive,
            "leasehold.store": event.store,
            "leasehold.name_group": self._grouper(event.name),
            "leasehold.name": event.name,
        }

    def _acquire_span(self, event: events.Event, outcome: str) -> None:
        # Span times are wall-clock nanoseconds by OpenTelemetry's definition; they
        # are only reported, never compared with anything leasehold decides on.
        end = time.time_ns()
        wait: float = getattr(event, "wait", 0.0)
        attributes = self._common(event)
        attributes["leasehold.outcome"] = outcome
        if isinstance(event, events.Acquired):
            attributes["leasehold.fence"] = event.fence
        span = self._tracer.start_span(
            "leasehold.acquire",
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
            start_time=end - max(0, int(wait * 1e9)),
        )
        if isinstance(event, events.AcquireFailed):
            span.set_status(trace.Status(trace.StatusCode.ERROR, event.error_type))
            span.set_attribute("error.type", event.error_type)
        span.end(end_time=end)

    def _loss_event(self, event: events.Lost) -> None:
        attributes: Attributes = {
            **self._common(event),
            "leasehold.fence": event.fence,
            "leasehold.reason": event.reason,
            "leasehold.detail": event.detail,
            "leasehold.held": event.held,
        }
        current = trace.get_current_span()
        if current.is_recording():
            current.add_event("leasehold.lost", attributes)
            return
        with self._tracer.start_as_current_span("leasehold.loss") as span:
            span.add_event("leasehold.lost", attributes)
            span.set_status(trace.Status(trace.StatusCode.ERROR, event.reason))


def _attributes(common: Common, extra: Extra) -> dict[str, str]:
    primitive, store, group = common
    attributes = {
        "leasehold.primitive": primitive,
        "leasehold.store": store,
        "leasehold.name_group": group,
    }
    if extra is not None:
        attributes[f"leasehold.{extra[0]}"] = extra[1]
    return attributes


def instrument(
    meter_provider: metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    name_group: NameGrouper | None = None,
) -> Instrumentation:
    """Report every client's events in this process to OpenTelemetry.

    Idempotent: a second call with the same providers (the global ones when None)
    returns the instrumentation already installed and changes nothing, whatever its
    ``name_group``. ``name_group``: a function from lease name to label (default
    ``leasehold.naming.name_group``)."""
    grouper = resolve(name_group)
    key = (id(meter_provider), id(tracer_provider))
    with _guard:
        found = _installed.get(key)
        if found is None:
            found = _installed[key] = Instrumentation(meter_provider, tracer_provider, grouper)
    return found


__all__ = ["Instrumentation", "instrument"]
