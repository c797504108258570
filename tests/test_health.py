"""client.health() and the ASGI readiness check, on real stores."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest

import leasehold
import leasehold.asgi
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.health import LeaseFacts, assess
from leasehold._core.url import parse
from leasehold._sync.backends import open_store
from leasehold.testing.wrappers import FaultyStore


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_assess_is_a_pure_decision() -> None:
    leases = [
        LeaseFacts("fresh", deadline=10.0, term=9.0, renewing=True),
        LeaseFacts("late", deadline=2.0, term=9.0, renewing=True),  # 2 s left < 3 s interval
        LeaseFacts("fixed", deadline=1.0, term=9.0, renewing=False),  # does not renew: not at risk
        LeaseFacts("gone", deadline=0.5, term=9.0, renewing=True),  # past: not held
    ]
    health = assess(
        0.9,
        leases,
        keeper_running=True,
        last_renewal=0.4,
        last_answer=0.5,
        last_failure=0.7,
        last_error="boom",
    )
    assert health.leases_held == 3 and health.at_risk == ("late",)
    assert health.last_renewal_age == pytest.approx(0.5)
    assert health.store_error == "boom" and not health.healthy
    recovered = assess(
        0.9, [], keeper_running=False, last_renewal=None, last_answer=0.8,
        last_failure=0.7, last_error="boom",
    )  # fmt: skip
    assert recovered.store_error is None and recovered.healthy


def test_health_of_a_client_through_an_outage() -> None:
    store = FaultyStore(open_store(parse(f"memory://{uuid.uuid4().hex}"), SYSTEM_CLOCK))
    client = leasehold.Client(store=store)
    try:
        idle = client.health()
        assert (idle.leases_held, idle.at_risk, idle.healthy) == (0, (), True)
        assert idle.last_renewal_age is None
        lease = client.lock("h", ttl=3).acquire()
        wait_until(lambda: client.health().last_renewal_age is not None)
        held = client.health()
        assert held.keeper_running and held.leases_held == 1 and held.healthy
        assert held.store_answer_age is not None and held.store_answer_age < 3
        store.fail("renew", times=None)
        wait_until(lambda: client.health().at_risk == ("h",))
        failing = client.health()
        assert not failing.healthy and failing.store_error is not None
        assert lease.held, "at risk, not lost yet"
        store.heal()
        wait_until(lambda: client.health().healthy)
        assert lease.held
        lease.release()
        assert client.health().leases_held == 0
    finally:
        client.close()


def test_async_health() -> None:
    async def main() -> leasehold.Health:
        async with leasehold.AsyncClient(f"memory://{uuid.uuid4().hex}") as client:
            async with client.lock("a", ttl=0.3):
                await asyncio.sleep(0.3)
                return client.health()

    health = asyncio.run(main())
    assert health.keeper_running and health.leases_held == 1
    assert health.last_renewal_age is not None and health.healthy


async def call_app(app: Any, state: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/"}
    if state is not None:
        scope["state"] = state
    await app(scope, receive, send)
    start, body = sent
    return start["status"], json.loads(body["body"])


def test_readiness_follows_the_store(redis_server: Any) -> None:
    from tests.servers.redis import RedisServer

    async def main(server: RedisServer) -> list[tuple[int, dict[str, Any]]]:
        seen = []
        lifespan = leasehold.asgi.lifespan(server.url)
        async with lifespan(None) as state:
            app = leasehold.asgi.readiness_app()
            seen.append(await call_app(app, state))
            await asyncio.to_thread(server.stop)
            seen.append(await call_app(app, state))
            await asyncio.to_thread(server.start)
            seen.append(await call_app(app, state))
            client = state["leasehold"]
            ready = await leasehold.asgi.readiness(client)
            assert ready.ready and ready.reason is None
        seen.append(await call_app(leasehold.asgi.readiness_app(client=client), None))
        seen.append(await call_app(leasehold.asgi.readiness_app(), {}))
        return seen

    with RedisServer() as server:
        up, down, again, closed, missing = asyncio.run(main(server))
    assert up[0] == 200 and up[1]["ready"] is True
    assert down[0] == 503 and "unusable" in down[1]["reason"]
    assert again[0] == 200
    assert closed[0] == 503 and "closed" in closed[1]["reason"]
    assert missing[0] == 503 and "no leasehold client" in missing[1]["reason"]


def test_readiness_of_a_store_that_hangs() -> None:
    async def main() -> leasehold.asgi.Readiness:
        async with leasehold.AsyncClient(f"memory://{uuid.uuid4().hex}") as client:

            async def hang() -> None:
                await asyncio.sleep(5)

            client.store.ping = hang  # type: ignore[method-assign]
            started = time.monotonic()
            result = await leasehold.asgi.readiness(client, timeout=0.2)
            assert time.monotonic() - started < 2
            return result

    result = asyncio.run(main())
    assert not result.ready and "did not answer" in (result.reason or "")
