"""docs/observability.md documents every series the exporters produce, and the
Grafana dashboard imports as is and uses only documented series."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import leasehold.prometheus
from leasehold import events
from leasehold._core.presence import Snapshot
from leasehold._core.records import HolderInfo
from leasehold.cli import _view
from leasehold.cli.exporter import StoreCollector
from tests._obs import a_lifetime, ev

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "observability.md").read_text()
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def documented() -> set[str]:
    """Series names in the doc's tables (first column, in backticks)."""
    return set(re.findall(r"^\| `(leasehold_[a-z_]+)` \|", DOC, flags=re.MULTILINE))


def process_series() -> set[str]:
    registry = CollectorRegistry()
    instrumentation = leasehold.prometheus.instrument(registry)
    try:
        for event in a_lifetime():
            events.emit(event)
        events.emit(ev(events.ElectionWon, "beat", "election", term=1, identity="me"))
        text = generate_latest(registry).decode()
    finally:
        instrumentation.close()
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")
    }


def store_series() -> set[str]:
    collector = StoreCollector(interval=15)
    leader = HolderInfo("beat", "me", "h", 1, 3, 1, 5.0, 10.0)
    collector.record(
        _view.StoreSnapshot(
            leases=[leader],
            waiters=[],
            leaders={"beat": leader},
            rooms={"lobby": Snapshot(1, [], 1)},
        )
    )
    return {family.name for family in collector.collect()}


def dashboard_expressions(node: Any) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            else:
                found += dashboard_expressions(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_expressions(item)
    return found


def undocumented(expressions: list[str]) -> set[str]:
    """Series named in the expressions that the doc does not document (histogram
    sample suffixes removed)."""
    known = documented()
    used = set()
    for expression in expressions:
        names = re.findall(r"\bleasehold_[a-z_]+", expression)
        assert names, expression
        for name in names:
            for suffix in SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in known:
                    name = name.removesuffix(suffix)
            used.add(name)
    return used - known


def test_every_series_the_exporters_produce_is_documented() -> None:
    produced = process_series() | store_series()
    assert len(produced) == 9 + 9
    assert produced - documented() == set()
    assert documented() - produced == set()  # and nothing documented that does not exist


def test_the_dashboard_uses_only_documented_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())  # well-formed JSON
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    assert "id" not in dashboard or dashboard["id"] is None  # imports as a new dashboard
    expressions = dashboard_expressions(dashboard["panels"])
    assert len(expressions) >= 15
    assert undocumented(expressions) == set()
    # Every panel has a unique id, a position and a data source from the variable.
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "name_group"}


def test_the_checker_fires_on_an_undocumented_series() -> None:
    """Control: the dashboard check would catch a series that is not documented."""
    assert undocumented(["sum(rate(leasehold_store_frobs_total[5m]))"]) == {
        "leasehold_store_frobs_total"
    }
    assert undocumented(["rate(leasehold_hold_seconds_bucket[5m])"]) == set()
    assert undocumented(["rate(leasehold_hold_bucket[5m])"]) == {"leasehold_hold_bucket"}
