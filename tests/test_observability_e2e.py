"""End to end: real locks and elections through a Client, seen by the exporters.

These need the primitives to emit their events (leasehold.events), so they pass
once the emitters are in place; the exporters' own logic is tested with events fed
directly in test_otel.py and test_prometheus.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

import leasehold
import leasehold.otel
import leasehold.prometheus
from tests.test_prometheus import run_workers, samples, value


def test_a_real_lock_in_prometheus(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    instrumentation = leasehold.prometheus.instrument(registry)
    try:
        with leasehold.Client(f"sqlite:///{tmp_path / 'e2e.db'}") as client:
            with client.lock("invoice:1234", ttl=10) as lease:
                assert lease.held
                during = samples(generate_latest(registry).decode())
            again = client.lock("invoice:1234").try_acquire()
            assert again is not None
            again.release()
            other = client.lock("invoice:99", ttl=10).acquire(timeout=5)
            busy = client.lock("invoice:99").try_acquire()
            other.release()
        after = samples(generate_latest(registry).decode())
    finally:
        instrumentation.close()
    assert busy is None
    common = {"primitive": "lock", "store": "sqlite", "name_group": "invoice:*"}
    assert value(during, "leasehold_held", **common) == 1
    assert value(after, "leasehold_held", **common) == 0
    assert value(after, "leasehold_acquisitions_total", outcome="granted", **common) == 3
    assert value(after, "leasehold_acquisitions_total", outcome="busy", **common) == 1
    assert value(after, "leasehold_hold_seconds_count", **common) == 3
    assert value(after, "leasehold_waiting") == 0


def test_a_real_lock_in_opentelemetry(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    spans = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(spans))
    instrumentation = leasehold.otel.instrument(meters, tracers)
    try:
        with leasehold.Client("memory://") as client:
            with client.lock("job:42", ttl=10) as lease:
                fence = lease.fence
        data = reader.get_metrics_data()
    finally:
        instrumentation.close()
    (span,) = [s for s in spans.get_finished_spans() if s.name == "leasehold.acquire"]
    assert span.attributes["leasehold.fence"] == fence
    assert span.attributes["leasehold.outcome"] == "granted"
    assert span.attributes["leasehold.store"] == "memory"
    names = {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert {"leasehold.acquisitions", "leasehold.hold", "leasehold.held"} <= names


@pytest.mark.slow
def test_forked_workers_with_real_locks_aggregate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    live, after = run_workers(tmp_path, 3, "locks", url)
    assert value(live, "leasehold_acquisitions_total", outcome="granted", primitive="lock") == 9
    assert value(live, "leasehold_held", primitive="lock") == 3
    assert value(live, "leasehold_leader", primitive="election") == 1
    assert value(after, "leasehold_held") == 0
    assert value(after, "leasehold_leader") == 0
    assert value(after, "leasehold_hold_seconds_count", primitive="lock") == 9
