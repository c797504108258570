"""leasehold.prometheus: series as documented, right counts, and aggregation over
real forked workers through prometheus_client's multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import leasehold.prometheus
from leasehold import events
from tests._obs import a_lifetime, ev

ROOT = Path(__file__).resolve().parent.parent

SERIES = {
    "leasehold_acquire_wait_seconds": "histogram",
    "leasehold_hold_seconds": "histogram",
    "leasehold_renewal_duration_seconds": "histogram",
    "leasehold_acquisitions": "counter",
    "leasehold_renewals": "counter",
    "leasehold_losses": "counter",
    "leasehold_held": "gauge",
    "leasehold_waiting": "gauge",
    "leasehold_leader": "gauge",
}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape by (sample name, labels), parsed by prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return sum(v for (n, ls), v in scrape.items() if n == name and set(labels.items()) <= ls)


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    instrumentation = leasehold.prometheus.instrument(registry)
    yield registry
    instrumentation.close()


def test_series_are_named_and_typed_as_documented(registry: CollectorRegistry) -> None:
    for event in a_lifetime():
        events.emit(event)
    events.emit(ev(events.ElectionWon, "beat", "election", term=1, identity="me"))
    text = generate_latest(registry).decode()
    # prometheus_client also exports <counter/histogram>_created timestamps.
    families = {
        f.name: f.type
        for f in text_string_to_metric_families(text)
        if not f.name.endswith("_created")
    }
    assert families == SERIES
    assert "leasehold_acquisitions_total{" in text
    assert 'le="0.001"' in text and 'le="300.0"' in text  # wait buckets: 1 ms .. 5 min


def test_counts_follow_the_events(registry: CollectorRegistry) -> None:
    for event in a_lifetime():
        events.emit(event)
    got = samples(generate_latest(registry).decode())
    common = {"primitive": "lock", "store": "redis", "name_group": "job:*"}
    assert value(got, "leasehold_acquisitions_total", outcome="granted", **common) == 2
    for outcome in ("busy", "timeout", "error"):
        assert value(got, "leasehold_acquisitions_total", outcome=outcome) == 1
        assert value(got, "leasehold_acquire_wait_seconds_count", outcome=outcome) == 1
    assert value(got, "leasehold_acquire_wait_seconds_sum", outcome="timeout") == pytest.approx(1.5)
    assert value(got, "leasehold_acquire_wait_seconds_bucket", outcome="granted", le="0.001") == 1
    assert value(got, "leasehold_renewals_total", result="renewed") == 1
    assert value(got, "leasehold_renewals_total", result="failed") == 1
    assert value(got, "leasehold_renewals_total", result="refused") == 1
    assert value(got, "leasehold_losses_total", reason="refused") == 1
    assert value(got, "leasehold_hold_seconds_count") == 2
    assert value(got, "leasehold_hold_seconds_sum") == pytest.approx(6.0)
    assert value(got, "leasehold_held") == 0
    assert value(got, "leasehold_waiting") == 0
    assert not any("job:42" in dict(labels).values() for _, labels in got)


def test_instrument_is_idempotent_per_registry(registry: CollectorRegistry) -> None:
    assert leasehold.prometheus.instrument(registry) is leasehold.prometheus.instrument(registry)
    events.emit(ev(events.AcquireStarted, blocking=True))
    got = samples(generate_latest(registry).decode())
    assert value(got, "leasehold_waiting") == 1  # counted once


def test_the_default_registry_unless_one_is_passed() -> None:
    from prometheus_client import REGISTRY

    instrumentation = leasehold.prometheus.instrument()
    try:
        assert instrumentation.registry is REGISTRY
        events.emit(ev(events.ElectionWon, "cron:7", "election", term=2, identity="me"))
        got = samples(generate_latest(REGISTRY).decode())
        assert value(got, "leasehold_leader", name_group="cron:*") == 1
    finally:
        instrumentation.close()
    assert "leasehold_leader" not in generate_latest(REGISTRY).decode()


def test_a_user_name_group() -> None:
    registry = CollectorRegistry()
    instrumentation = leasehold.prometheus.instrument(
        registry, name_group=lambda n: n.split(":")[0]
    )
    try:
        events.emit(ev(events.AcquireStarted, "tenant:acme", blocking=True))
        got = samples(generate_latest(registry).decode())
        assert value(got, "leasehold_waiting", name_group="tenant") == 1
    finally:
        instrumentation.close()


def run_workers(tmp_path: Path, workers: int, mode: str, url: str = "") -> tuple[dict, dict]:  # type: ignore[type-arg]
    directory = tmp_path / "multiproc"
    directory.mkdir()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "tests._prom_workers", str(workers), mode, url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    live, after = proc.stdout.split("\n----\n")
    assert len(list(directory.iterdir())) >= workers  # one file per process and kind
    return samples(live), samples(after)


def test_forked_workers_aggregate_in_one_scrape(tmp_path: Path) -> None:
    live, after = run_workers(tmp_path, 3, "events")
    # Worker i acquired i + 1 times and then once more; counters add up over workers.
    assert value(live, "leasehold_acquisitions_total", outcome="granted") == (1 + 2 + 3) + 3
    assert value(live, "leasehold_hold_seconds_count") == 1 + 2 + 3
    # Gauges: held is summed over live workers, leader is the max (one leads).
    assert value(live, "leasehold_held") == 3
    assert value(live, "leasehold_held", name_group="job:*") == 3
    assert value(live, "leasehold_leader", name_group="beat") == 1
    # After the workers exit and are marked dead: counters stay, live gauges go.
    assert value(after, "leasehold_acquisitions_total", outcome="granted") == 9
    assert value(after, "leasehold_held") == 0
    assert value(after, "leasehold_leader") == 0


def test_a_cancelled_acquire_is_not_a_timeout(registry: CollectorRegistry) -> None:
    events.emit(ev(events.AcquireStarted, blocking=True))
    events.emit(ev(events.TimedOut, wait=2.0, cancelled=True))
    events.emit(ev(events.AcquireStarted, blocking=True))
    events.emit(ev(events.TimedOut, wait=1.0))
    got = samples(generate_latest(registry).decode())
    assert value(got, "leasehold_acquisitions_total", outcome="cancelled") == 1
    assert value(got, "leasehold_acquisitions_total", outcome="timeout") == 1
    assert value(got, "leasehold_acquire_wait_seconds_sum", outcome="cancelled") == 2.0
    assert value(got, "leasehold_waiting") == 0
