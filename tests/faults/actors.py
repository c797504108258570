"""The clients of a fault trial: leasehold (sync or asyncio) or a naive SET NX PX lock.

An actor is one client on its own path to the store (usually its own FaultProxy).
Scenarios are written once against ``Actor`` and run with ``api="async"`` (an
``AsyncClient`` on the scenario's loop) or ``api="sync"`` (a ``Client`` whose every
call runs on a thread of its own, so a call that hangs cannot block the scenario). Every
call is timed against its bound; a call still running after ``cap`` seconds is recorded
as "never returned" and left behind (the scenario heals the network, which ends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import leasehold
import leasehold.fence
from tests.faults.history import Bound, History, Hold, Write

HUNG = object()  # the value of a call that outlived its cap


def call_bound(timeout: float) -> float:
    """The promise of issue #21 for a call with a timeout: T + max(0.5 s, 10 % of T)."""
    return timeout + max(0.5, 0.1 * timeout)


def supports_operation_timeout() -> bool:
    return "operation_timeout" in inspect.signature(leasehold.AsyncClient.__init__).parameters


def in_thread(fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """Run blocking ``fn`` on a new daemon thread; its result as a future of this loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value, error = fn(), None
        except BaseException as exc:
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop may be gone by now
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="fault-actor-call", daemon=True).start()
    return future


class Ledger:
    """A fenced resource: a SQLite table written under ``leasehold.fence.check``."""

    def __init__(self, path: Path, history: History) -> None:
        self.path = path
        self.history = history
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS writes "
                "(seq INTEGER PRIMARY KEY AUTOINCREMENT, client TEXT, fence INTEGER)"
            )

    def write(self, client: str, fence: int, name: str = "ledger") -> Write:
        at = time.monotonic()
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            with conn:
                leasehold.fence.check(conn, name, fence)
                cursor = conn.execute(
                    "INSERT INTO writes (client, fence) VALUES (?, ?)", (client, fence)
                )
                write = Write(client, fence, at, accepted=True, seq=cursor.lastrowid)
        except leasehold.StaleFence:
            write = Write(client, fence, at, accepted=False)
        finally:
            conn.close()
        self.history.write(write)
        return write

    def committed(self) -> list[tuple[int, str, int]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return list(conn.execute("SELECT seq, client, fence FROM writes ORDER BY seq"))


class Actor:
    """One leasehold client (see the module docstring)."""

    naive = False

    def __init__(
        self,
        name: str,
        api: str,
        url: str,
        history: History,
        *,
        operation_timeout: float,
    ) -> None:
        self.name = name
        self.api = api
        self.history = history
        self.operation_timeout = operation_timeout
        options: dict[str, Any] = {"identity": name}
        if supports_operation_timeout():
            options["operation_timeout"] = operation_timeout
        self.client: Any = (
            leasehold.AsyncClient(url, **options)
            if api == "async"
            else leasehold.Client(url, **options)
        )
        self._holds: dict[int, Hold] = {}
        self._leases: list[Any] = []  # kept alive, so that ids stay unique
        self.stragglers: list[asyncio.Future[Any]] = []

    @property
    def op_bound(self) -> float:
        return call_bound(self.operation_timeout)

    # -- calls ---------------------------------------------------------------------

    async def timed(
        self,
        call: str,
        limit: float,
        fn: Callable[[], Any],
        *,
        cap: float | None = None,
        record: bool = True,
    ) -> tuple[Any, BaseException | None, float | None]:
        """Run ``fn`` (a coroutine function for async actors, a blocking one for sync
        actors) and time it against ``limit``. Returns (value, error, seconds)."""
        cap = limit + 6.0 if cap is None else cap
        started = time.monotonic()
        if self.api == "async":
            future: asyncio.Future[Any] = asyncio.ensure_future(fn())
        else:
            future = in_thread(fn)
        done, _ = await asyncio.wait({future}, timeout=cap)
        if not done:
            self.stragglers.append(future)
            if record:
                self.history.bound(Bound(self.name, call, limit, None, "hung"))
            return HUNG, None, None
        took = time.monotonic() - started
        error = future.exception()
        outcome = "ok" if error is None else type(error).__name__
        if record:
            self.history.bound(Bound(self.name, call, limit, took, outcome))
        return (None if error else future.result()), error, took

    def _on_lost(self, lease: Any) -> None:
        hold = self._holds.get(id(lease))
        if hold is not None and hold.lost_at is None:
            hold.lost_at = time.monotonic()
            hold.lost_reason = "on_lost"

    def lock(self, lock_name: str, ttl: float, *, renew: bool = True) -> Any:
        return self.client.lock(lock_name, ttl, renew=renew, on_lost=self._on_lost)

    def _track(self, lease: Any) -> Hold:
        hold = Hold(
            client=self.name,
            name=lease.name,
            fence=lease.fence,
            start=time.monotonic(),
            sent=lease.last_sent,
            deadline=lease.deadline,
        )
        self._holds[id(lease)] = hold
        self._leases.append(lease)
        self.history.hold(hold)
        return hold

    async def acquire(
        self,
        lock_name: str,
        ttl: float,
        timeout: float,
        *,
        renew: bool = True,
        cap: float | None = None,
        record: bool = True,
        track: bool = True,
    ) -> Any:
        """``lock.acquire(timeout)``, bounded by T + max(0.5, 10 % T). The lease, or
        None on AcquireTimeout / StoreUnavailable / never returned."""
        lock = self.lock(lock_name, ttl, renew=renew)
        value, error, _ = await self.timed(
            "acquire", call_bound(timeout), lambda: lock.acquire(timeout), cap=cap, record=record
        )
        if error is not None or value is HUNG or value is None:
            return None
        if track:  # set-up (warm-up) leases are not part of the history
            self._track(value)
        return value

    async def try_acquire(
        self, lock_name: str, ttl: float, *, record: bool = True, track: bool = True
    ) -> Any:
        lock = self.lock(lock_name, ttl)
        value, error, _ = await self.timed(
            "try_acquire", self.op_bound, lock.try_acquire, record=record
        )
        if error is not None or value is HUNG or value is None:
            return None
        if track:  # set-up (warm-up) leases are not part of the history
            self._track(value)
        return value

    def finish(self, lease: Any) -> None:
        """Fix the hold's final deadline (renewals moved it while it was held)."""
        hold = self._holds.get(id(lease))
        if hold is not None and hold.deadline is not None:
            hold.deadline = lease.deadline

    async def release(self, lease: Any, *, record: bool = True) -> Any:
        hold = self._holds.get(id(lease))
        if hold is not None and lease.held:
            hold.released_at = time.monotonic()
        value, _error, _ = await self.timed("release", self.op_bound, lease.release, record=record)
        self.finish(lease)
        return value

    async def extend(self, lease: Any) -> Any:
        _value, error, _ = await self.timed("extend", self.op_bound, lease.extend)
        self.finish(lease)
        return error

    async def holders(self, lock_name: str, *, record: bool = True) -> Any:
        value, _error, _ = await self.timed(
            "holders", self.op_bound, lambda: self.client.holders(lock_name), record=record
        )
        return value

    async def warm_up(self, lock_name: str, ttl: float) -> None:
        """Acquire, renew and release the name before the fault, as a client that has
        been running would have: connections open (on a cluster, to the name's node),
        scripts loaded. Not part of the history."""
        lease = await self.acquire(lock_name, ttl, timeout=5.0, record=False, track=False)
        if lease is not None:
            await self.timed("extend", self.op_bound, lease.extend, record=False)
            await self.release(lease, record=False)

    def held(self, lease: Any) -> bool:
        return bool(lease is not None and lease.held)

    async def wait_lost(self, lease: Any, timeout: float) -> bool:
        """Wait (polling ``held``) until the lease is no longer held; False on timeout."""
        deadline = time.monotonic() + timeout
        while lease.held:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        self.finish(lease)
        return True

    async def write(self, ledger: Ledger, lease: Any) -> Write | None:
        """A fenced write, made only while the lease says it is held."""
        if not lease.held:
            return None
        return await asyncio.get_running_loop().run_in_executor(
            None, ledger.write, self.name, lease.fence
        )

    async def close(self) -> None:
        for future in self.stragglers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(future), 15)
        for lease in self._leases:
            self.finish(lease)  # renewals moved deadlines since the scenario looked
        if self.api == "async":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.aclose(), 30)
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(in_thread(self.client.close), 30)


class NaiveLease:
    """What a hand-rolled ``SET NX PX`` lock knows: it got the key, nothing more."""

    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.token = token
        self.fence = 0  # no fencing token at all
        self.held = True
        self.last_sent = time.monotonic()
        self.deadline = None


class NaiveActor(Actor):
    """The sanity control: plain redis-py, ``SET key token NX PX ttl``, no fence, no
    renewal, no check that the key is still ours. It believes it holds the lock until it
    releases it. The checker must catch it under the same faults."""

    naive = True

    def __init__(
        self, name: str, api: str, url: str, history: History, *, operation_timeout: float
    ) -> None:
        import redis

        self.name = name
        self.api = "sync"
        self.history = history
        self.operation_timeout = operation_timeout
        self.redis = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
        self._holds = {}
        self._leases = []
        self.stragglers = []

    async def acquire(
        self,
        lock_name: str,
        ttl: float,
        timeout: float,
        *,
        renew: bool = True,
        cap: float | None = None,
        record: bool = True,
        track: bool = True,
    ) -> Any:
        token = uuid.uuid4().hex

        def attempt() -> NaiveLease | None:
            deadline = time.monotonic() + timeout
            while True:
                sent = time.monotonic()
                if self.redis.set(f"naive:{lock_name}", token, nx=True, px=int(ttl * 1000)):
                    lease = NaiveLease(lock_name, token)
                    lease.last_sent = sent
                    return lease
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.02)

        value, error, _ = await self.timed(
            "acquire", call_bound(timeout), attempt, cap=cap, record=False
        )
        if error is not None or value is HUNG or value is None:
            return None
        if track:  # set-up (warm-up) leases are not part of the history
            self._track(value)
        return value

    async def try_acquire(
        self, lock_name: str, ttl: float, *, record: bool = True, track: bool = True
    ) -> Any:
        return await self.acquire(lock_name, ttl, 0.0, record=record, track=track)

    async def release(self, lease: Any, *, record: bool = True) -> Any:
        hold = self._holds.get(id(lease))
        if hold is not None and hold.released_at is None:
            hold.released_at = time.monotonic()
        lease.held = False

        def delete() -> bool:
            key = f"naive:{lease.name}"
            if self.redis.get(key) == lease.token.encode():
                self.redis.delete(key)
                return True
            return False

        # Left running if the network is cut: the scenario heals it later.
        value, _error, _ = await self.timed("release", 60.0, delete, cap=0.5, record=False)
        return value

    def finish(self, lease: Any) -> None:
        pass

    async def wait_lost(self, lease: Any, timeout: float) -> bool:
        await asyncio.sleep(timeout)  # it never learns of a loss
        return False

    async def close(self) -> None:
        for future in self.stragglers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(future), 35)
        self.redis.close()


ActorFactory = Callable[..., Actor]
Waitable = Awaitable[Any]
