"""What the exporters cost: uncontended acquire + release with nothing listening,
with leasehold.otel and with leasehold.prometheus switched on.

    python -m bench.observability [--seconds 2] [--repeats 5] [--url sqlite:///...]

Each configuration runs in its own forked process (an exporter, once installed,
stays for the life of the process); configurations alternate over the repeats so
drift hits them alike. Reports the median over repeats of each run's p50 and p99,
and, to separate the sinks from the emitters, the cost of delivering one lock's
events (AcquireStarted, Acquired, Released) straight to each sink.
OpenTelemetry runs with the SDK: a MeterProvider with an in-memory reader and a
TracerProvider whose spans go through a BatchSpanProcessor to an in-memory
exporter (what a real exporter's hot path costs, without its network I/O).
"hook" is one subscriber that does nothing: what the primitives themselves pay to
build and deliver their events once anybody listens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

# "hook": one subscriber that does nothing, which isolates what the primitives pay
# to build and deliver their events from what each exporter adds.
CONFIGS = ("nothing", "hook", "otel", "prometheus")


def _switch_on(config: str) -> None:
    if config == "hook":
        from leasehold import events

        events.subscribe(lambda event: None)
    elif config == "otel":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        import leasehold.otel

        tracers = TracerProvider()
        # A queue that never overflows: dropped spans would cost less than real ones.
        tracers.add_span_processor(
            BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=1 << 20)
        )
        leasehold.otel.instrument(MeterProvider(metric_readers=[InMemoryMetricReader()]), tracers)
    elif config == "prometheus":
        from prometheus_client import CollectorRegistry

        import leasehold.prometheus

        leasehold.prometheus.instrument(CollectorRegistry())


def _percentile(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] / 1000


def _locks(config: str, url: str, seconds: float) -> dict[str, float]:
    import leasehold

    _switch_on(config)
    with leasehold.Client(url) as client:
        lock = client.lock("bench:observability", ttl=30)
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            lock.acquire().release()
        samples: list[int] = []
        end = time.perf_counter() + seconds
        clock = time.perf_counter_ns
        while time.perf_counter() < end:
            start = clock()
            lock.acquire().release()
            samples.append(clock() - start)
    samples.sort()
    return {"p50_us": _percentile(samples, 50), "p99_us": _percentile(samples, 99)}


def _events(config: str, rounds: int = 20_000) -> float:
    """Microseconds to deliver one acquire's three events to the sink."""
    from leasehold import events

    _switch_on(config)
    lifetime = [
        events.AcquireStarted(
            primitive="lock", name="job:42", store="sqlite", client_id=1, blocking=True
        ),
        events.Acquired(
            primitive="lock", name="job:42", store="sqlite", client_id=1, fence=1, wait=0.0
        ),
        events.Released(
            primitive="lock", name="job:42", store="sqlite", client_id=1, fence=1, held=0.001
        ),
    ]
    started = time.perf_counter()
    for _ in range(rounds):
        if events.wanted():
            for event in lifetime:
                events.emit(event)
    return (time.perf_counter() - started) / rounds * 1e6


def _in_child(job: Any) -> Any:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            os.write(write, json.dumps(job()).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--url", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = [args.url] if args.url else ["memory://", f"sqlite:///{tmp}/bench.db"]
        results: dict[str, Any] = {}
        for url in urls:
            runs: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
            for _ in range(args.repeats):
                for config in CONFIGS:
                    runs[config].append(
                        _in_child(lambda c=config, u=url: _locks(c, u, args.seconds))
                    )
            results[url.split("://")[0]] = {
                config: {
                    key: round(statistics.median(r[key] for r in found), 1)
                    for key in ("p50_us", "p99_us")
                }
                for config, found in runs.items()
            }
        results["events_us_per_acquire"] = {
            config: round(
                statistics.median(_in_child(lambda c=config: _events(c)) for _ in range(3)), 2
            )
            for config in CONFIGS
        }
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
