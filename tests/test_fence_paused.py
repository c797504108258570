"""The paused holder, with real processes: the resource must reject its late write.

Holder A (a process) acquires a lease with renewal off, checks it is held, and is
then frozen with SIGSTOP past its TTL. Holder B (another process) acquires the
same name and writes through the fence helper. A is resumed with SIGCONT and
writes with its old fence. Every trial, A must get StaleFence and B's value stays.

Every lock backend available (SQLite always, Redis and PostgreSQL with their
servers) is combined with every protected store (SQLite file, PostgreSQL table,
Redis key). All combinations run at once, each with its own pair of long-lived
worker processes driven over pipes, so the file takes about TRIALS x (TTL + a
little) seconds however many combinations there are.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

import leasehold
from leasehold import fence

TRIALS = 50
TTL = 0.5
REPLY_TIMEOUT = 30.0

LOCK_BACKENDS = ["sqlite", "redis", "postgres"]
STORES = ["sqlite", "postgres", "redis"]

DATA_DDL = "CREATE TABLE IF NOT EXISTS {data} (k TEXT PRIMARY KEY, v TEXT NOT NULL)"


@dataclass(frozen=True)
class StoreSpec:
    kind: str  # sqlite | postgres | redis
    location: str  # file path or server URL
    table: str  # fence table (SQL) or key prefix (Redis)
    data: str  # data table (SQL) or data key (Redis)


# -- inside the worker processes ----------------------------------------------------


class _Store:
    """A protected store as one worker process sees it."""

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec
        self.conn: Any = None
        if spec.kind == "sqlite":
            self.conn = sqlite3.connect(spec.location, timeout=30)
        elif spec.kind == "postgres":
            import psycopg

            self.conn = psycopg.connect(spec.location)
        else:
            import redis

            self.conn = redis.Redis.from_url(spec.location)

    def begin(self) -> None:
        if self.spec.kind == "postgres":
            # Open the transaction before the pause: the stale writer's transaction
            # then started before the successor's, and must fail all the same.
            self.conn.execute("SELECT 1")

    def write(self, name: str, fence_value: int, value: str) -> tuple[str, int]:
        spec = self.spec
        try:
            if spec.kind == "redis":
                fence.redis_write(
                    self.conn, name, fence_value, [("SET", spec.data, value)], key_prefix=spec.table
                )
                return ("written", fence_value)
            fence.check(self.conn, name, fence_value, table=spec.table)
            placeholder = "?" if spec.kind == "sqlite" else "%s"
            self.conn.execute(
                f"INSERT INTO {spec.data} (k, v) VALUES ('k', {placeholder}) "
                "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                (value,),
            )
            self.conn.commit()
            return ("written", fence_value)
        except leasehold.StaleFence as exc:
            if spec.kind != "redis":
                self.conn.rollback()
            return ("stale", exc.highest)

    def read(self) -> str | None:
        spec = self.spec
        if spec.kind == "redis":
            raw = self.conn.get(spec.data)
            return None if raw is None else raw.decode()
        if spec.kind == "postgres":
            self.conn.rollback()  # read the latest commit, not an old snapshot
        row = self.conn.execute(f"SELECT v FROM {spec.data} WHERE k = 'k'").fetchone()
        if spec.kind == "postgres":
            self.conn.rollback()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self.conn.close()


def _acquire_held(lock: Any) -> Any:
    """Acquire, and make sure the lease is still held when we return it.

    On a loaded machine the acquire round trip itself can outlast a short TTL; such
    a grant is useless for the scenario (it is already expired), so try again.
    """
    for _ in range(10):
        lease = lock.acquire(timeout=10)
        try:
            # Held right now; checking before side effects cannot close the
            # window that opens the moment after.
            lease.check()
        except leasehold.LeaseLost:
            lease.release()
            continue
        return lease
    raise RuntimeError(f"every grant expired before it could be used; TTL {TTL} s is too short")


def paused_worker(pipe: Connection, lock_url: str, lock_name: str, spec: StoreSpec) -> None:
    """A lease holder driven over ``pipe``: acquire, write, read, stop.

    Top-level so that spawned processes can import it.
    """
    client = leasehold.Client(lock_url)
    store = _Store(spec)
    lock = client.lock(lock_name, ttl=TTL, renew=False)
    lease: Any = None
    try:
        while True:
            command = pipe.recv()
            try:
                if command[0] == "acquire":
                    lease = _acquire_held(lock)
                    store.begin()
                    pipe.send(("acquired", lease.fence))
                elif command[0] == "write":
                    # Deliberately not lease.fence_sql() or lease.check(): this is
                    # the holder that does not know it was paused; only the
                    # resource can stop it.
                    outcome = store.write(lease.name, lease.fence, command[1])
                    lease.release()
                    pipe.send(outcome)
                elif command[0] == "read":
                    pipe.send(("value", store.read()))
                else:
                    break
            except Exception:
                pipe.send(("error", traceback.format_exc()))
    finally:
        store.close()
        client.close()
        pipe.close()


# -- in the test process ------------------------------------------------------------


@dataclass
class Trial:
    fence_a: int
    fence_b: int
    outcome_a: tuple[str, Any]
    value: str | None
    expected: str


@dataclass
class ComboResult:
    trials: list[Trial] = field(default_factory=list)
    error: str | None = None

    def violations(self) -> list[tuple[int, Trial]]:
        return [
            (i, t)
            for i, t in enumerate(self.trials)
            if not (
                t.fence_b > t.fence_a
                and t.outcome_a == ("stale", t.fence_b)
                and t.value == t.expected
            )
        ]


class _Worker:
    def __init__(self, context: Any, lock_url: str, lock_name: str, spec: StoreSpec) -> None:
        self.pipe, child = context.Pipe()
        self.process = context.Process(
            target=paused_worker, args=(child, lock_url, lock_name, spec), daemon=True
        )
        self.process.start()
        child.close()

    def ask(self, *command: Any) -> tuple[str, Any]:
        self.pipe.send(command)
        if not self.pipe.poll(REPLY_TIMEOUT):
            raise TimeoutError(f"worker gave no reply to {command[0]!r} in {REPLY_TIMEOUT} s")
        reply: tuple[str, Any] = self.pipe.recv()
        if reply[0] == "error":
            raise RuntimeError(f"worker failed on {command[0]!r}:\n{reply[1]}")
        return reply

    def stop(self) -> None:
        pid = self.process.pid
        if pid is not None and self.process.is_alive():
            os.kill(pid, signal.SIGCONT)  # in case a failure left it frozen
        with contextlib.suppress(OSError):
            self.pipe.send(("stop",))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self.pipe.close()
        self.process.close()


def run_combo(lock_url: str, spec: StoreSpec, result: ComboResult) -> None:
    context = multiprocessing.get_context("spawn")
    lock_name = f"paused-{uuid.uuid4().hex[:12]}"
    a = _Worker(context, lock_url, lock_name, spec)
    b = _Worker(context, lock_url, lock_name, spec)
    try:
        for trial in range(TRIALS):
            _, fence_a = a.ask("acquire")
            assert a.process.pid is not None
            os.kill(a.process.pid, signal.SIGSTOP)
            try:
                # B waits until A's lease has expired in the lock store, then writes.
                _, fence_b = b.ask("acquire")
                expected = f"B-{trial}-{fence_b}"
                b_outcome = b.ask("write", expected)
                assert b_outcome == ("written", fence_b), b_outcome
            finally:
                os.kill(a.process.pid, signal.SIGCONT)
            outcome_a = a.ask("write", f"A-{trial}-{fence_a}")
            _, value = b.ask("read")
            result.trials.append(Trial(fence_a, fence_b, outcome_a, value, expected))
    except Exception:
        result.error = traceback.format_exc()
    finally:
        a.stop()
        b.stop()


def _server_url(request: pytest.FixtureRequest, fixture: str, env: str) -> str:
    url = os.environ.get(env)
    if url:
        return url
    return str(request.getfixturevalue(fixture).url)


def _try(func: Any) -> tuple[Any, str | None]:
    """Run ``func``; a skip (server missing) becomes a reason, anything else raises."""
    try:
        return func(), None
    except pytest.skip.Exception as exc:
        return None, str(exc.msg)


def _store_spec(kind: str, request: pytest.FixtureRequest, tmp: Path) -> StoreSpec:
    data = f"data_{uuid.uuid4().hex[:12]}"
    table = f"fences_{uuid.uuid4().hex[:12]}"
    if kind == "sqlite":
        path = tmp / "protected.db"
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(DATA_DDL.format(data=data))
            conn.execute(fence.create_table_sql("sqlite", table))
        conn.close()
        return StoreSpec(kind, str(path), table, data)
    if kind == "postgres":
        import psycopg

        url = _server_url(request, "postgres_server", "LEASEHOLD_TEST_POSTGRES_URL")
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(DATA_DDL.format(data=data))
            pg.execute(fence.create_table_sql("postgresql", table))
        return StoreSpec(kind, url, table, data)
    url = _server_url(request, "redis_server", "LEASEHOLD_TEST_REDIS_URL")
    return StoreSpec(kind, url, f"{table}:", f"{data}:value")


def _lock_url(kind: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    if kind == "sqlite":
        url = f"sqlite:///{tmp / f'locks-{uuid.uuid4().hex[:8]}.db'}"
    elif kind == "redis":
        url = _server_url(request, "redis_server", "LEASEHOLD_TEST_REDIS_URL")
    else:
        url = _server_url(request, "postgres_server", "LEASEHOLD_TEST_POSTGRES_URL")
    # The Redis and PostgreSQL lock backends may not be built yet: skip, not fail.
    try:
        client = leasehold.Client(url)
    except leasehold.InvalidArgument as exc:
        pytest.skip(f"{kind} lock backend unavailable: {exc}")
    client.close()
    return url


@pytest.fixture(scope="module")
def paused_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[str, str], ComboResult | str]]:
    tmp = tmp_path_factory.mktemp("paused")
    results: dict[tuple[str, str], ComboResult | str] = {}
    lock_urls: dict[str, str] = {}
    for lock_kind in LOCK_BACKENDS:
        url, reason = _try(lambda k=lock_kind: _lock_url(k, request, tmp))
        if reason is not None:
            for store_kind in STORES:
                results[lock_kind, store_kind] = reason
        else:
            lock_urls[lock_kind] = url
    threads = []
    for store_kind in STORES:
        for lock_kind, lock_url in lock_urls.items():
            spec, reason = _try(lambda s=store_kind: _store_spec(s, request, tmp))
            if reason is not None:
                results[lock_kind, store_kind] = reason
                continue
            result = ComboResult()
            results[lock_kind, store_kind] = result
            thread = threading.Thread(target=run_combo, args=(lock_url, spec, result))
            thread.start()
            threads.append(thread)
    started = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    ran = [r for r in results.values() if isinstance(r, ComboResult)]
    print(f"\npaused-holder trials: {len(ran)} combinations in {elapsed:.1f} s")
    yield results


@pytest.mark.slow
@pytest.mark.parametrize("store_kind", STORES)
@pytest.mark.parametrize("lock_kind", LOCK_BACKENDS)
def test_paused_holder_write_is_rejected_by_the_resource(
    lock_kind: str, store_kind: str, paused_results: dict[tuple[str, str], ComboResult | str]
) -> None:
    result = paused_results[lock_kind, store_kind]
    if isinstance(result, str):
        pytest.skip(result)
    assert result.error is None, result.error
    assert len(result.trials) == TRIALS
    violations = result.violations()
    print(
        f"lock={lock_kind} store={store_kind}: {len(result.trials)} trials, "
        f"{len(violations)} violations"
    )
    assert violations == [], f"{len(violations)} of {TRIALS} trials let A write: {violations[:3]}"
