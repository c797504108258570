"""Prometheus metrics for every leasehold client of the process.

::

    pip install 'leasehold[prometheus]'      # prometheus_client

    import leasehold.prometheus
    leasehold.prometheus.instrument()         # once, at startup; idempotent

Series (labels ``primitive``, ``store``, ``name_group`` on all of them; see
docs/observability.md for meanings, PromQL and alerts):

* ``leasehold_acquire_wait_seconds`` histogram (+ ``outcome``), buckets 1 ms to 5 min
* ``leasehold_hold_seconds`` and ``leasehold_renewal_duration_seconds`` histograms
* ``leasehold_acquisitions_total`` (``outcome``: granted, busy, timeout, error,
  cancelled),
  ``leasehold_renewals_total`` (``result``: renewed, failed, refused),
  ``leasehold_losses_total`` (``reason``: refused, restart, unreachable, deadline)
* gauges ``leasehold_held``, ``leasehold_waiting``, ``leasehold_leader``

Several worker processes (Celery prefork, gunicorn): use prometheus_client's
multiprocess mode as its documentation describes -- ``PROMETHEUS_MULTIPROC_DIR``
set (to an empty directory) before the parent process starts, ``instrument()`` in
the parent or each worker, ``prometheus_client.multiprocess.mark_process_dead(pid)``
when a worker exits (gunicorn's ``child_exit`` hook; Celery's
``worker_process_shutdown`` signal) and a ``MultiProcessCollector`` where you serve
``/metrics``. Counters and histograms add up over every worker that ever ran;
``leasehold_held`` and ``leasehold_waiting`` are summed over live workers
(``livesum``); ``leasehold_leader`` is the maximum over live workers (``livemax``):
1 while some live worker of this host leads an election of the group, so a leader
that died stops counting at once (``max`` would keep its 1 forever).
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from leasehold import events
from leasehold._measure import Common, Extra, Instrument, Measurer
from leasehold.naming import NameGrouper, resolve

COMMON = ("primitive", "store", "name_group")
# 1 ms to 5 min: an uncontended acquire takes well under a millisecond (it lands in
# the first bucket), a contended one as long as the holder holds.
WAIT_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
WAIT_BUCKETS += (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HOLD_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
RENEWAL_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
RENEWAL_BUCKETS += (2.5, 5.0, 10.0)

_guard = threading.Lock()
_installed: dict[int, Instrumentation] = {}


class Instrumentation:
    """The subscription that feeds one registry; ``close()`` stops it and removes
    its series from the registry."""

    def __init__(self, registry: CollectorRegistry, grouper: NameGrouper) -> None:
        self.registry = registry
        self._measurer = Measurer(grouper)
        r = registry
        self._metrics: dict[str, Any] = {
            "acquire_wait": Histogram(
                "leasehold_acquire_wait_seconds",
                "Time an acquire call took, by outcome",
                [*COMMON, "outcome"],
                buckets=WAIT_BUCKETS,
                registry=r,
            ),
            "hold": Histogram(
                "leasehold_hold_seconds",
                "Time from grant to release or loss",
                COMMON,
                buckets=HOLD_BUCKETS,
                registry=r,
            ),
            "renewal_duration": Histogram(
                "leasehold_renewal_duration_seconds",
                "Round trip of a renewal call (one call may renew many leases)",
                COMMON,
                buckets=RENEWAL_BUCKETS,
                registry=r,
            ),
            "acquisitions": Counter(
                "leasehold_acquisitions",
                "Acquire calls, by outcome",
                [*COMMON, "outcome"],
                registry=r,
            ),
            "renewals": Counter(
                "leasehold_renewals",
                "Renewals of held leases, by result",
                [*COMMON, "result"],
                registry=r,
            ),
            "losses": Counter(
                "leasehold_losses",
                "Leases lost while held, by reason",
                [*COMMON, "reason"],
                registry=r,
            ),
            "held": Gauge(
                "leasehold_held",
                "Leases held now",
                COMMON,
                multiprocess_mode="livesum",
                registry=r,
            ),
            "waiting": Gauge(
                "leasehold_waiting",
                "Acquire calls in progress",
                COMMON,
                multiprocess_mode="livesum",
                registry=r,
            ),
            "leader": Gauge(
                "leasehold_leader",
                "1 while this process leads an election of the group",
                COMMON,
                multiprocess_mode="livemax",
                registry=r,
            ),
        }
        # Labelled children by (instrument, common labels, extra): labels() costs
        # more than the measurement itself.
        self._children: dict[tuple[Instrument, Common, Extra], Any] = {}
        self._subscription = events.subscribe(self._on_event)

    def close(self) -> None:
        self._subscription.close()
        for metric in self._metrics.values():
            self.registry.unregister(metric)
        with _guard:
            if _installed.get(id(self.registry)) is self:
                del _installed[id(self.registry)]

    def _on_event(self, event: events.Event) -> None:
        common, measurements = self._measurer.measure(event)
        children = self._children
        for kind, instrument, value, extra in measurements:
            key = (instrument, common, extra)
            child = children.get(key)
            if child is None:
                labels = common if extra is None else (*common, extra[1])
                child = children[key] = self._metrics[instrument].labels(*labels)
            if kind == "observe":
                child.observe(value)
            elif kind == "set":
                child.set(value)
            else:
                child.inc(value)


def instrument(
    registry: CollectorRegistry | None = None, name_group: NameGrouper | None = None
) -> Instrumentation:
    """Report every client's events in this process as Prometheus series in
    ``registry`` (default: prometheus_client's default registry).

    Idempotent: a second call for the same registry returns the instrumentation
    already installed and changes nothing, whatever its ``name_group``.
    ``name_group``: a function from lease name to label (default
    ``leasehold.naming.name_group``)."""
    target = REGISTRY if registry is None else registry
    grouper = resolve(name_group)
    with _guard:
        found = _installed.get(id(target))
        if found is None:
            found = _installed[id(target)] = Instrumentation(target, grouper)
    return found


__all__ = ["Instrumentation", "instrument"]
