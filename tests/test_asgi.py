"""leasehold.asgi.lifespan: one client per app, the background loop on the leader only.

The lifespans are driven by hand (no framework needed) and, when Starlette is
installed, through Starlette's TestClient, which runs each app on its own event
loop in its own thread -- two replicas in one process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

import leasehold
from leasehold.testing import BackendHarness

TTL = 1.0


@pytest.fixture(scope="module")
def asgi() -> Any:
    import leasehold.asgi

    return leasehold.asgi


@pytest.fixture
def url(local_backend: BackendHarness) -> str:
    """A store the replicas share, on the real clock."""
    return local_backend.fresh_url()


class Ticks:
    def __init__(self) -> None:
        self.by: dict[str, int] = {}
        self.fences: dict[str, set[int]] = {}

    def ticker(self, tag: str) -> Callable[[leasehold.AsyncLease], Any]:
        self.by[tag] = 0
        self.fences[tag] = set()

        async def tick(lease: leasehold.AsyncLease) -> None:
            lease.check()
            self.by[tag] += 1
            self.fences[tag].add(lease.fence)

        return tick

    def leaders(self) -> list[str]:
        return [tag for tag, n in self.by.items() if n]


async def wait_for(condition: Callable[[], object], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def test_only_the_leader_runs_the_loop_and_shutdown_hands_over(asgi: Any, url: str) -> None:
    ticks = Ticks()

    async def main() -> None:
        replicas = {
            tag: asgi.lifespan(
                url, leader=ticks.ticker(tag), every=0.02, election="closer", ttl=TTL, identity=tag
            )(None)
            for tag in ("a", "b")
        }
        states = {tag: await cm.__aenter__() for tag, cm in replicas.items()}
        try:
            await wait_for(lambda: sum(ticks.by.values()) >= 10, 10, "the leader to tick")
            await asyncio.sleep(0.2)
            assert len(ticks.leaders()) == 1, ticks.by
            (first,) = ticks.leaders()
            second = "b" if first == "a" else "a"
            assert states[first]["leasehold_election"].leading
            assert not states[second]["leasehold_election"].leading
            leader = await states[second]["leasehold_election"].leader()
            assert leader is not None and leader.identity == first
            assert isinstance(states[first]["leasehold"], leasehold.AsyncClient)

            # The leader's app shuts down: it resigns, so the other takes over at
            # once instead of after the TTL.
            await replicas.pop(first).__aexit__(None, None, None)
            stopped_at = ticks.by[first]
            took = await wait_for(lambda: ticks.by[second] > 0, 10, "the handover")
            assert took < TTL, f"handover took {took:.2f} s"
            await asyncio.sleep(0.1)
            assert ticks.by[first] == stopped_at  # the old leader's loop is gone
            assert max(ticks.fences[second]) > max(ticks.fences[first])
        finally:
            for cm in replicas.values():
                await cm.__aexit__(None, None, None)

    asyncio.run(main())


def test_a_crashed_leader_body_is_logged_and_restarted(
    asgi: Any, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    async def fragile(lease: leasehold.AsyncLease) -> None:
        calls.append(lease.fence)
        if len(calls) == 1:
            raise RuntimeError("first run breaks")
        await asyncio.sleep(3600)  # a long-running loop, cancelled at shutdown

    async def main() -> None:
        async with asgi.lifespan(url, leader=fragile, election="fragile", ttl=TTL)(None):
            await wait_for(lambda: len(calls) >= 2, 10, "the restart")

    with caplog.at_level(logging.ERROR, logger="leasehold.asgi"):
        began = time.monotonic()
        asyncio.run(main())
    assert time.monotonic() - began < 5  # shutdown cancels the long-running body
    assert len(calls) == 2 and calls[1] > calls[0]  # a new term
    assert any("first run breaks" in r.exc_text for r in caplog.records if r.exc_text)


def test_a_failing_periodic_call_does_not_stop_the_loop(
    asgi: Any, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def flaky(lease: leasehold.AsyncLease) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise ValueError("odd call")

    async def main() -> None:
        async with asgi.lifespan(url, leader=flaky, every=0.01, election="flaky", ttl=TTL)(None):
            await wait_for(lambda: calls >= 6, 10, "six calls")

    with caplog.at_level(logging.ERROR, logger="leasehold.asgi"):
        asyncio.run(main())
    assert sum("odd call" in (r.exc_text or "") for r in caplog.records) >= 3


def test_without_a_leader_it_just_opens_the_client_and_wraps_inner(asgi: Any, url: str) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def inner(app: Any) -> AsyncIterator[dict[str, Any]]:
        events.append(f"inner up for {app}")
        yield {"db": "connection"}
        events.append("inner down")

    async def main() -> None:
        async with asgi.lifespan(url, inner=inner, state_key="lh")("app") as state:
            assert state["db"] == "connection"
            client = state["lh"]
            assert isinstance(client, leasehold.AsyncClient)
            assert not state["lh_election"].leading  # nobody campaigns without a leader
            assert await client.once("ping").run(lambda: "pong") == "pong"
            events.append("serving")

    asyncio.run(main())
    assert events == ["inner up for app", "serving", "inner down"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"election": ""},
        {"ttl": 0},
        {"leader": 42},
        {"every": 1.0},  # without a leader
        {"leader": lambda lease: None, "every": 0},
        {"url": "memory://", "client": lambda: None},
        {"state_key": "not an identifier"},
    ],
)
def test_bad_arguments_fail_at_definition_time(asgi: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(leasehold.InvalidArgument):
        asgi.lifespan(**kwargs)


# Starlette 1.x prefers httpx2 for its TestClient and only warns when it finds httpx.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_two_starlette_apps_one_leader(asgi: Any, url: str) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    ticks = Ticks()

    async def status(request: Request) -> JSONResponse:
        election = request.state.leasehold_election
        leader = await election.leader()
        return JSONResponse({"leading": election.leading, "leader": leader and leader.identity})

    def app(tag: str) -> Starlette:
        return Starlette(
            routes=[Route("/status", status)],
            lifespan=asgi.lifespan(
                url,
                leader=ticks.ticker(tag),
                every=0.02,
                election="starlette-closer",
                ttl=TTL,
                identity=f"replica-{tag}",
            ),
        )

    def wait(condition: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    with TestClient(app("a")) as a, TestClient(app("b")) as b:
        clients = {"a": a, "b": b}
        wait(lambda: sum(ticks.by.values()) >= 10, "the leader to tick")
        (first,) = ticks.leaders()
        second = "b" if first == "a" else "a"
        for client in clients.values():
            body = client.get("/status").json()
            assert body["leader"] == f"replica-{first}"
        assert clients[first].get("/status").json()["leading"] is True
        assert clients[second].get("/status").json()["leading"] is False
        clients[first].__exit__(None, None, None)  # that replica shuts down
        wait(lambda: ticks.by[second] > 0, "the handover")
        assert clients[second].get("/status").json() == {
            "leading": True,
            "leader": f"replica-{second}",
        }
