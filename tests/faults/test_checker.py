"""The checker fires: hand-made histories with each kind of violation, a real fenced
ledger, and the sanity control — a naive SET NX PX lock (plain redis-py, no fence, no
renewal check) under the same faults as leasehold — which the checker must catch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.faults.actors import Ledger, NaiveActor
from tests.faults.conftest import record
from tests.faults.history import Bound, History, Hold, Write, check, summary
from tests.faults.scenarios import run_scenario


def kinds(history: History) -> set[str]:
    return {v.kind for v in check(history)}


def hold(client: str, fence: int, start: float, end: float, name: str = "n") -> Hold:
    return Hold(client=client, name=name, fence=fence, start=start, sent=start, deadline=end)


def test_a_clean_history_passes() -> None:
    history = History("s", "b", "async")
    history.hold(hold("A", 1, 0.0, 1.0))
    history.hold(hold("B", 2, 1.01, 2.0))
    history.write(Write("A", 1, 0.5, True, seq=1))
    history.write(Write("B", 2, 1.5, True, seq=2))
    history.write(Write("A", 1, 1.6, False))
    history.bound(Bound("A", "release", 2.5, 0.3))
    history.entry("B", True, 2)
    assert check(history) == []
    data = summary(history)
    assert data["lead_ms"] == [10.0]
    assert data["violations"] == []


def test_overlap_is_found() -> None:
    history = History("s", "b", "async")
    history.hold(hold("A", 1, 0.0, 1.0))
    history.hold(hold("B", 2, 0.9, 2.0))
    assert kinds(history) == {"overlap"}


def test_a_loss_callback_or_release_ends_a_hold_early() -> None:
    history = History("s", "b", "async")
    first = hold("A", 1, 0.0, 5.0)
    first.lost_at = 0.8
    history.hold(first)
    history.hold(hold("B", 2, 0.9, 2.0))
    assert check(history) == []
    first.lost_at = None
    first.released_at = 0.95
    assert kinds(history) == {"overlap"}


def test_fences_must_increase() -> None:
    history = History("s", "b", "async")
    history.hold(hold("A", 5, 0.0, 1.0))
    history.hold(hold("B", 5, 2.0, 3.0))
    history.hold(hold("C", 4, 4.0, 5.0))
    found = [v for v in check(history) if v.kind == "fence-order"]
    assert len(found) == 2


def test_a_ledger_that_accepts_a_lower_fence_is_caught() -> None:
    history = History("s", "b", "async")
    history.write(Write("B", 7, 1.0, True, seq=1))
    history.write(Write("A", 6, 1.1, True, seq=2))
    assert kinds(history) == {"ledger"}


def test_the_real_ledger_refuses_a_lower_fence(tmp_path: Path) -> None:
    history = History("s", "b", "async")
    ledger = Ledger(tmp_path / "ledger.db", history)
    assert ledger.write("B", 7).accepted
    assert not ledger.write("A", 6).accepted
    assert ledger.write("B", 7).accepted
    assert [row[2] for row in ledger.committed()] == [7, 7]
    assert check(history) == []


def test_broken_bounds_dead_leases_and_dead_bodies_are_found() -> None:
    history = History("s", "b", "sync")
    history.bound(Bound("A", "acquire", 1.5, 1.7))
    history.bound(Bound("A", "release", 2.5, None))
    history.hold(hold("A", 1, 2.0, 1.5))  # returned after its own deadline
    history.entry("A", False, 1)
    found = check(history)
    assert sorted(v.kind for v in found) == ["bound", "bound", "dead-body", "dead-lease"]


@pytest.mark.faults
@pytest.mark.parametrize("scenario", ["partition", "slow_replies"])
def test_the_checker_catches_a_naive_set_nx_px_lock(
    scenario: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target: Any = request.getfixturevalue("fault_target_redis")
    history = asyncio.run(
        run_scenario(scenario, target, "sync", tmp_path, ttl=1.0, actor_cls=NaiveActor)
    )
    result = summary(history)
    result["backend"] = "redis (naive SET NX PX control)"
    record(result)
    assert "overlap" in kinds(history), check(history)
