"""The event stream's own mechanics: subscribe, filter by client, never raise."""

from __future__ import annotations

import logging

import pytest

import leasehold
from leasehold import events


def _event(client_id: int = 1) -> events.Acquired:
    return events.Acquired(
        primitive="lock", name="x", store="memory", client_id=client_id, fence=3, wait=0.0
    )


def test_nobody_listening_builds_nothing() -> None:
    assert not events.wanted()
    with events.subscribe(lambda e: None):
        assert events.wanted()
    assert not events.wanted()


def test_handlers_see_events_of_their_client_only() -> None:
    everything: list[events.Event] = []
    mine: list[events.Event] = []
    client = leasehold.Client("memory://")
    try:
        with events.subscribe(everything.append), events.subscribe(mine.append, client=client):
            events.emit(_event(client_id=id(client)))
            events.emit(_event(client_id=id(client) + 1))
    finally:
        client.close()
    assert len(everything) == 2
    assert [e.client_id for e in mine] == [id(client)]


def test_a_raising_handler_is_logged_once_and_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[events.Event] = []

    def broken(event: events.Event) -> None:
        raise RuntimeError("boom")

    with (
        caplog.at_level(logging.ERROR, logger="leasehold.events"),
        events.subscribe(broken),
        events.subscribe(seen.append),
    ):
        events.emit(_event())
        events.emit(_event())
    assert len(seen) == 2
    assert sum("raised" in r.getMessage() for r in caplog.records) == 1


def test_subscribe_rejects_non_callables() -> None:
    with pytest.raises(leasehold.InvalidArgument):
        events.subscribe("not a function")  # type: ignore[arg-type]


def test_events_are_immutable() -> None:
    event = _event()
    with pytest.raises(AttributeError):
        event.fence = 4  # type: ignore[misc]
