"""leasehold.otel against the OpenTelemetry SDK's in-memory reader and span exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import leasehold.otel
from leasehold import events
from tests._obs import a_lifetime, ev


class Sdk:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        found += list(m.data.data_points)
        return found

    def value(self, metric: str, **attributes: str) -> float:
        """Sum (or gauge value, or histogram count) of the points matching attributes."""
        total = 0.0
        for point in self.points(metric):
            attrs = {k.removeprefix("leasehold."): v for k, v in point.attributes.items()}
            if all(attrs.get(k) == v for k, v in attributes.items()):
                total += point.count if hasattr(point, "bucket_counts") else point.value
        return total


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    found = Sdk()
    instrumentation = leasehold.otel.instrument(found.meters, found.tracers)
    yield found
    instrumentation.close()
    found.meters.shutdown()
    found.tracers.shutdown()


def test_instruments_are_named_as_documented(sdk: Sdk) -> None:
    for event in a_lifetime():
        events.emit(event)
    names = {
        m.name: (type(m.data).__name__, m.unit)
        for r in sdk.reader.get_metrics_data().resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
    }
    assert names == {
        "leasehold.acquire.wait": ("Histogram", "s"),
        "leasehold.hold": ("Histogram", "s"),
        "leasehold.renewal.duration": ("Histogram", "s"),
        "leasehold.acquisitions": ("Sum", "{acquisition}"),
        "leasehold.renewals": ("Sum", "{renewal}"),
        "leasehold.losses": ("Sum", "{loss}"),
        "leasehold.held": ("Sum", "{lease}"),
        "leasehold.waiting": ("Sum", "{call}"),
    }  # leasehold.leader appears with the first election event


def test_counts_follow_the_events(sdk: Sdk) -> None:
    for event in a_lifetime():
        events.emit(event)
    common = {"primitive": "lock", "store": "redis", "name_group": "job:*"}
    for outcome in ("granted", "busy", "timeout", "error"):
        expected = 2 if outcome == "granted" else 1
        assert sdk.value("leasehold.acquisitions", outcome=outcome, **common) == expected
        assert sdk.value("leasehold.acquire.wait", outcome=outcome) == expected
    assert sdk.value("leasehold.renewals", result="renewed") == 1
    assert sdk.value("leasehold.renewals", result="failed") == 1
    assert sdk.value("leasehold.renewals", result="refused") == 1
    assert sdk.value("leasehold.losses", reason="refused") == 1
    assert sdk.value("leasehold.hold") == 2  # the release and the loss
    assert sdk.value("leasehold.renewal.duration") == 2
    assert sdk.value("leasehold.held") == 0  # two grants, one release, one loss
    assert sdk.value("leasehold.waiting") == 0
    (wait,) = [
        p
        for p in sdk.points("leasehold.acquire.wait")
        if p.attributes["leasehold.outcome"] == "timeout"
    ]
    assert wait.sum == pytest.approx(1.5)
    # The name itself is never an attribute of a metric.
    for metric in ("leasehold.acquisitions", "leasehold.hold", "leasehold.held"):
        assert all("leasehold.name" not in p.attributes for p in sdk.points(metric))


def test_held_and_waiting_go_up_and_down(sdk: Sdk) -> None:
    events.emit(ev(events.AcquireStarted, "a:1", blocking=True))
    events.emit(ev(events.AcquireStarted, "a:2", blocking=True))
    assert sdk.value("leasehold.waiting", name_group="a:*") == 2
    events.emit(ev(events.Acquired, "a:1", fence=1, wait=0.1))
    assert sdk.value("leasehold.waiting") == 1
    assert sdk.value("leasehold.held") == 1


def test_leader_gauge_per_election_group(sdk: Sdk) -> None:
    events.emit(ev(events.ElectionWon, "beat:1", "election", term=3, identity="me"))
    events.emit(ev(events.ElectionWon, "beat:2", "election", term=4, identity="me"))
    assert sdk.value("leasehold.leader", name_group="beat:*", primitive="election") == 1
    events.emit(
        ev(events.ElectionEnded, "beat:1", "election", term=3, identity="me", resigned=True)
    )
    assert sdk.value("leasehold.leader", name_group="beat:*") == 1  # still leads beat:2
    events.emit(
        ev(events.ElectionEnded, "beat:2", "election", term=4, identity="me", resigned=False)
    )
    assert sdk.value("leasehold.leader", name_group="beat:*") == 0


def test_one_span_per_acquire_starting_when_the_call_began(sdk: Sdk) -> None:
    for event in a_lifetime():
        events.emit(event)
    spans = [s for s in sdk.spans.get_finished_spans() if s.name == "leasehold.acquire"]
    assert [s.attributes["leasehold.outcome"] for s in spans] == [
        "granted",
        "busy",
        "timeout",
        "error",
        "granted",
    ]
    first = spans[0]
    assert first.attributes["leasehold.name"] == "job:42"
    assert first.attributes["leasehold.fence"] == 5
    assert first.end_time - first.start_time == pytest.approx(0.25e9, rel=0.01)
    assert spans[3].status.status_code == trace.StatusCode.ERROR


def test_a_loss_is_an_event_on_the_current_span_or_on_a_short_span(sdk: Sdk) -> None:
    lost = ev(
        events.Lost, "job:1", fence=3, reason="unreachable", detail="3 renewals failed", held=9.0
    )
    tracer = sdk.tracers.get_tracer("app")
    with tracer.start_as_current_span("request"):
        events.emit(lost)
    events.emit(lost)  # no span current, as on the keeper's thread
    finished = {s.name: s for s in sdk.spans.get_finished_spans()}
    (on_request,) = finished["request"].events
    assert on_request.name == "leasehold.lost"
    assert on_request.attributes["leasehold.reason"] == "unreachable"
    (own,) = finished["leasehold.loss"].events
    assert own.attributes["leasehold.fence"] == 3


def test_instrument_is_idempotent(sdk: Sdk) -> None:
    again = leasehold.otel.instrument(sdk.meters, sdk.tracers)
    assert again is leasehold.otel.instrument(sdk.meters, sdk.tracers)
    events.emit(ev(events.AcquireStarted, blocking=True))
    events.emit(ev(events.Acquired, fence=1, wait=0.0))
    assert sdk.value("leasehold.acquisitions") == 1  # counted once, not twice


def test_a_user_name_group() -> None:
    found = Sdk()
    instrumentation = leasehold.otel.instrument(
        found.meters, found.tracers, name_group=lambda n: "all"
    )
    try:
        events.emit(ev(events.AcquireStarted, "x:1", blocking=True))
        assert found.value("leasehold.waiting", name_group="all") == 1
    finally:
        instrumentation.close()


def test_global_providers_by_default() -> None:
    found = Sdk()
    # The API's global providers can be set only once per process: this is the one
    # test that sets them.
    trace.set_tracer_provider(found.tracers)
    from opentelemetry import metrics

    metrics.set_meter_provider(found.meters)
    instrumentation = leasehold.otel.instrument()
    try:
        events.emit(ev(events.AcquireStarted, blocking=True))
        events.emit(ev(events.Busy, wait=0.0))
        assert found.value("leasehold.acquisitions", outcome="busy") == 1
        assert [s.name for s in found.spans.get_finished_spans()] == ["leasehold.acquire"]
    finally:
        instrumentation.close()


def test_a_cancelled_acquire_span_says_so(sdk: Sdk) -> None:
    events.emit(ev(events.AcquireStarted, blocking=True))
    events.emit(ev(events.TimedOut, wait=0.5, cancelled=True))
    (span,) = sdk.spans.get_finished_spans()
    assert span.attributes["leasehold.outcome"] == "cancelled"
    assert sdk.value("leasehold.acquisitions", outcome="cancelled") == 1
