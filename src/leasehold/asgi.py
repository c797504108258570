"""A lifespan for Starlette, FastAPI and other ASGI frameworks that take one.

``lifespan(...)`` opens an ``AsyncClient`` when the app starts and closes it when
the app stops; with ``leader=``, every replica campaigns in one election and only
the leader runs the background loop (the periodic-closer pattern: one replica,
not all of them, closes idle rooms). No dependency on Starlette: the result is a
function ``app -> async context manager`` yielding the lifespan state, which is
what ``Starlette(lifespan=...)`` and ``FastAPI(lifespan=...)`` expect::

    from fastapi import FastAPI, Request
    from leasehold.asgi import lifespan

    async def close_idle_rooms(lease):
        ...  # pass lease.fence to fenced writes

    app = FastAPI(lifespan=lifespan(leader=close_idle_rooms, every=10.0, election="closer"))

    @app.get("/leader")
    async def who_leads(request: Request):
        leader = await request.state.leasehold_election.leader()
        return {"leader": leader and leader.identity}

``readiness(client)`` and ``readiness_app()`` tell a load balancer or Kubernetes
whether this replica can use its store (see docs/fastapi.md, "Readiness")::

    from leasehold.asgi import readiness_app

    app.mount("/ready", readiness_app())   # 200 when ready, else 503 (JSON body)

See docs/fastapi.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from leasehold import retry
from leasehold._async._concurrency import AsyncCall
from leasehold._async.client import AsyncClient
from leasehold._async.election import AsyncElection, LeaderBody
from leasehold._async.lease import AsyncLease
from leasehold._core import validate
from leasehold._core.health import Health
from leasehold._errors import InvalidArgument, LeaseholdError, LeaseLost

__all__ = ["LeaderFunction", "Lifespan", "Readiness", "lifespan", "readiness", "readiness_app"]

logger = logging.getLogger("leasehold.asgi")

LeaderFunction = Callable[[AsyncLease], Awaitable[object]]
Lifespan = Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]
InnerLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]

# After the leader body crashes, campaign again after a full-jitter pause.
RESTART_INITIAL = 0.5
RESTART_MAXIMUM = 30.0
# How long shutdown waits for the leader body to unwind after it was cancelled.
SHUTDOWN_GRACE = 10.0
# How long a readiness check waits for the store to answer.
READY_TIMEOUT = 2.0


def lifespan(
    url: str | None = None,
    *,
    leader: LeaderFunction | None = None,
    every: float | None = None,
    election: str = "asgi-leader",
    ttl: float = 30.0,
    identity: str | None = None,
    state_key: str = "leasehold",
    inner: InnerLifespan | None = None,
    client: Callable[[], AsyncClient] | None = None,
) -> Lifespan:
    """A lifespan that opens a leasehold client and, with ``leader``, runs
    ``await leader(lease)`` on exactly one replica at a time.

    ``url``: the store (default ``$LEASEHOLD_URL``); or ``client``, a factory
    returning an ``AsyncClient``. ``leader``: an async function taking the
    leadership lease. Without ``every`` it is a long-running loop of its own;
    with ``every`` it is called every ``every`` seconds while this replica leads
    (an exception is logged and the next call happens on schedule). ``election``
    and ``ttl``: the election every replica campaigns in; a replica that dies is
    replaced within about ``ttl``, one that shuts down hands over at once.
    ``identity``: how this replica is shown as leader (default host:pid).

    The state yielded to the framework has ``state_key`` (the client) and
    ``state_key + "_election"`` (this replica's candidate), so handlers reach
    them as ``request.state.leasehold`` and ``request.state.leasehold_election``.
    ``inner``: your own lifespan, entered inside this one (the client is already
    open); its state is merged in.

    The leader body is cancelled when leadership is lost (``LeaseLost`` is logged,
    and the replica campaigns again), and on shutdown. If it raises, the error
    is logged and the replica campaigns again after a jittered pause.
    """
    election = validate.name(election, what="election")
    validate.ttl(ttl)
    if identity is not None:
        validate.name(identity, what="identity")
    if leader is not None and not callable(leader):
        raise InvalidArgument("leader must be an async function taking the leadership lease")
    if every is not None:
        if leader is None:
            raise InvalidArgument("every needs a leader function to call")
        validate.ttl(every, what="every")
    if client is not None and url is not None:
        raise InvalidArgument("pass either url or client, not both")
    if not isinstance(state_key, str) or not state_key.isidentifier():
        raise InvalidArgument(f"state_key must be an identifier, got {state_key!r}")

    body: LeaderBody | None = None
    if leader is not None:
        body = _continuous(leader) if every is None else _periodic(leader, every)

    @asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        opened = client() if client is not None else AsyncClient(url)
        candidate = opened.election(election, ttl=ttl, identity=identity)
        runner: asyncio.Task[None] | None = None
        stopping = asyncio.Event()
        try:
            if body is not None:
                runner = asyncio.create_task(
                    _supervise(candidate, body, stopping), name="leasehold-leader"
                )
            state: dict[str, Any] = {state_key: opened, f"{state_key}_election": candidate}
            if inner is None:
                yield state
            else:
                async with inner(app) as inner_state:
                    yield {**state, **(inner_state or {})}
        finally:
            stopping.set()
            candidate.stop()
            if runner is not None:
                await _finish(runner)
            await opened.aclose()

    return _lifespan


async def _call(fn: LeaderFunction, lease: AsyncLease) -> None:
    result = fn(lease)
    if inspect.isawaitable(result):
        await result


def _continuous(fn: LeaderFunction) -> LeaderBody:
    async def body(lease: AsyncLease) -> None:
        await _call(fn, lease)

    return body


def _periodic(fn: LeaderFunction, every: float) -> LeaderBody:
    async def body(lease: AsyncLease) -> None:
        while True:
            lease.check()
            try:
                await _call(fn, lease)
            except LeaseLost:
                raise
            except Exception:
                logger.exception(
                    "leader task %s failed; next run in %g s", getattr(fn, "__name__", fn), every
                )
            await asyncio.sleep(every)

    return body


async def _supervise(candidate: AsyncElection, body: LeaderBody, stopping: asyncio.Event) -> None:
    failures = 0
    while not stopping.is_set():
        try:
            await candidate.run(body)
            return
        except Exception:
            failures += 1
            pause = retry.delay(
                min(failures - 1, 64), initial=RESTART_INITIAL, maximum=RESTART_MAXIMUM
            )
            logger.exception(
                "leader body of election %r failed; campaigning again in %.2f s",
                candidate.name,
                pause,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)


async def _finish(runner: asyncio.Task[None]) -> None:
    """Let ``run()`` step down (stop() cancels the body and resigns); cancel the
    supervisor only if the body refuses to end."""
    done, _ = await asyncio.wait({runner}, timeout=SHUTDOWN_GRACE)
    if not done:
        logger.warning("the leader body did not end within %g s of shutdown", SHUTDOWN_GRACE)
        runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner


# -- readiness -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether this replica can use its store now. ``ready``: the store answered a
    ping within the timeout; ``reason``: why not (None when ready); ``health``: the
    client's own view (``AsyncClient.health()``), for the response body."""

    ready: bool
    reason: str | None
    health: Health

    def as_dict(self) -> dict[str, Any]:
        health = self.health
        return {
            "ready": self.ready,
            "reason": self.reason,
            "keeper_running": health.keeper_running,
            "leases_held": health.leases_held,
            "leases_at_risk": list(health.at_risk),
            "last_renewal_age": health.last_renewal_age,
            "store_answer_age": health.store_answer_age,
        }


async def readiness(client: AsyncClient, *, timeout: float = READY_TIMEOUT) -> Readiness:
    """Ping the client's store (bounded by ``timeout`` seconds, never cancelling the
    call itself) and report whether the replica is ready. A store that refuses,
    fails or does not answer in time makes it not ready; so does a closed client."""
    validate.ttl(timeout, what="timeout")
    observer = client._context.observer
    if client._context.closed:
        return Readiness(False, "the leasehold client is closed", client.health())
    call = AsyncCall(client.store.ping)
    reason: str | None = None
    if not await call.wait(timeout):
        reason = f"the store did not answer within {timeout:g} s"
    else:
        try:
            call.result()
        except LeaseholdError as exc:
            reason = f"the store is unusable: {exc}"
    if reason is None:
        observer.answered()
    else:
        observer.last_failure = client.clock.monotonic()
        observer.last_error = reason
    return Readiness(reason is None, reason, client.health())


ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def readiness_app(
    state_key: str = "leasehold",
    *,
    client: AsyncClient | None = None,
    timeout: float = READY_TIMEOUT,
) -> ASGIApp:
    """A tiny ASGI app answering every HTTP request with 200 when ``readiness()``
    says ready, else 503, and the ``Readiness`` as a JSON body. It uses ``client``,
    or the one ``lifespan()`` put in the lifespan state under ``state_key`` (Starlette
    and FastAPI pass that state to mounted apps as ``scope["state"]``)::

        app = FastAPI(lifespan=lifespan(...))
        app.mount("/ready", readiness_app())
    """
    if not isinstance(state_key, str) or not state_key.isidentifier():
        raise InvalidArgument(f"state_key must be an identifier, got {state_key!r}")
    validate.ttl(timeout, what="timeout")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            raise InvalidArgument("readiness_app serves HTTP requests only")
        target = client
        if target is None:
            state = scope.get("state") or {}
            found = state.get(state_key)
            if not isinstance(found, AsyncClient):
                body = {
                    "ready": False,
                    "reason": f"no leasehold client in the state ({state_key!r})",
                }
                await _respond(send, 503, body)
                return
            target = found
        result = await readiness(target, timeout=timeout)
        await _respond(send, 200 if result.ready else 503, result.as_dict())

    return app


async def _respond(send: Any, status: int, body: Mapping[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
