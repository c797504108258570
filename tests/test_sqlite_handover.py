"""The SQLite store's hand-over: a release makes the head waiter a holder itself.

Most tests drive ``SQLiteTables`` (the transactions) with explicit store times, so
expiry is exact; the ``wait`` tests use the sync store over the same file.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leasehold._core.clock import FakeClock
from leasehold._core.records import (
    AcquireRequest,
    Busy,
    Granted,
    HandedOver,
    Holder,
    RenewItem,
)
from leasehold._core.url import parse
from leasehold._errors import StoreUnavailable
from leasehold._shared.sqlite import wake as _wake
from leasehold._shared.sqlite.connection import boot_id
from leasehold._shared.sqlite.tx import SQLiteTables
from leasehold._sync.backends.sqlite.store import SQLiteStore, _heard, from_url

HOLDER = Holder(owner="holder", host="h", pid=1)
WAITER = Holder(owner="waiter", host="w", pid=2)
T0 = 1000.0


def _tables(path: Path) -> SQLiteTables:
    return SQLiteTables(path, busy_timeout=5.0, allow_network_fs=False)


def _req(
    token: str,
    *,
    holder: Holder = HOLDER,
    ttl: float = 30.0,
    limit: int = 1,
    queue_ttl: float | None = None,
    name: str = "n",
) -> AcquireRequest:
    return AcquireRequest(
        name=name, token=token, holder=holder, ttl=ttl, limit=limit, queue_ttl=queue_ttl
    )


def _token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def tables(tmp_path: Path) -> Iterator[SQLiteTables]:
    t = _tables(tmp_path / "leases.db")
    yield t
    t.close()


def test_release_hands_over_with_a_higher_fence(tables: SQLiteTables) -> None:
    holder, waiter = _token(), _token()
    first = tables.acquire(_req(holder), T0)
    assert isinstance(first, Granted)
    busy = tables.acquire(_req(waiter, holder=WAITER, ttl=20.0, queue_ttl=3.0), T0 + 1)
    assert busy == Busy(retry_after=29.0, position=0)
    held, wakes = tables.release("n", holder, T0 + 2)
    assert held is True
    assert wakes == []  # the waiter never published an address
    infos = tables.holders("n", T0 + 2)
    assert len(infos) == 1
    info = infos[0]
    assert info.fence > first.fence
    assert (info.owner, info.host, info.pid, info.limit) == ("waiter", "w", 2, 1)
    # Expiry: min(queue expiry T0 + 4, now + ttl T0 + 22).
    assert info.expires_in == pytest.approx(2.0)
    assert [i.fence for i in tables.leases("", T0 + 2)] == [info.fence]
    # A full holder: counted, renewable, confirmed by a late acquire, releasable.
    assert isinstance(tables.acquire(_req(_token()), T0 + 2), Busy)
    assert tables.renew([RenewItem("n", waiter, 20.0)], T0 + 3) == [True]
    assert tables.holders("n", T0 + 3)[0].expires_in == pytest.approx(20.0)
    assert tables.acquire(_req(waiter, ttl=20.0, queue_ttl=3.0), T0 + 4) == Granted(info.fence)
    assert tables.holders("n", T0 + 4)[0].expires_in == pytest.approx(20.0)
    held, _ = tables.release("n", waiter, T0 + 5)
    assert held is True
    assert tables.holders("n", T0 + 5) == []


def test_hand_over_expiry_is_capped_by_the_requested_ttl(tables: SQLiteTables) -> None:
    holder, waiter = _token(), _token()
    tables.acquire(_req(holder), T0)
    tables.acquire(_req(waiter, ttl=1.0, queue_ttl=10.0), T0)
    tables.release("n", holder, T0 + 0.5)
    assert tables.holders("n", T0 + 0.5)[0].expires_in == pytest.approx(1.0)


def test_hand_over_uses_the_latest_request(tables: SQLiteTables) -> None:
    holder, waiter = _token(), _token()
    tables.acquire(_req(holder), T0)
    tables.acquire(_req(waiter, holder=HOLDER, ttl=5.0, queue_ttl=3.0), T0)
    tables.acquire(_req(waiter, holder=WAITER, ttl=2.0, queue_ttl=3.0), T0 + 2)
    tables.release("n", holder, T0 + 2.5)
    (info,) = tables.holders("n", T0 + 2.5)
    assert info.owner == "waiter"
    assert info.expires_in == pytest.approx(2.0)  # min(T0 + 5, T0 + 4.5)


def test_dead_waiter_blocks_the_name_at_most_its_queue_ttl(tables: SQLiteTables) -> None:
    holder, ghost, alive = _token(), _token(), _token()
    tables.acquire(_req(holder), T0)
    tables.acquire(_req(ghost, ttl=60.0, queue_ttl=3.0), T0)
    tables.release("n", holder, T0 + 1)
    assert isinstance(tables.acquire(_req(alive), T0 + 2.9), Busy)
    assert isinstance(tables.acquire(_req(alive), T0 + 3.0), Granted)


def test_expired_waiters_are_skipped(tables: SQLiteTables) -> None:
    holder, stale, fresh = _token(), _token(), _token()
    tables.acquire(_req(holder), T0)
    tables.acquire(_req(stale, queue_ttl=1.0), T0)
    tables.acquire(_req(fresh, queue_ttl=10.0), T0)
    tables.release("n", holder, T0 + 2)
    assert [i.owner for i in tables.holders("n", T0 + 2)] == ["holder"]  # HOLDER's owner
    assert tables.release("n", fresh, T0 + 2)[0] is True


def test_semaphore_hands_over_every_free_place_in_order(tables: SQLiteTables) -> None:
    held = [_token() for _ in range(3)]
    waiters = [_token() for _ in range(6)]
    for token in held:
        assert isinstance(tables.acquire(_req(token, limit=3), T0), Granted)
    for token in waiters:
        assert isinstance(tables.acquire(_req(token, limit=3, queue_ttl=10.0), T0), Busy)
    for token in held:
        tables.release("n", token, T0 + 1)
    fences = [i.fence for i in tables.holders("n", T0 + 1)]
    assert len(fences) == 3
    # The first three waiters, in arrival order, hold; the others still wait.
    for token in waiters[:3]:
        assert isinstance(tables.acquire(_req(token, limit=3), T0 + 1), Granted)
    busy = tables.acquire(_req(waiters[3], limit=3, queue_ttl=10.0), T0 + 1)
    assert isinstance(busy, Busy) and busy.position == 0
    # One release: one place, handed to the next in line.
    tables.release("n", waiters[0], T0 + 2)
    assert tables.acquire(_req(waiters[3], limit=3), T0 + 2) == Granted(max(fences) + 1)


def test_waiter_limit_decides_whether_it_fits(tables: SQLiteTables) -> None:
    a, b, waiter = _token(), _token(), _token()
    tables.acquire(_req(a, limit=2), T0)
    tables.acquire(_req(b, limit=2), T0)
    # This waiter asks for a lock (limit 1): one remaining holder keeps it out.
    tables.acquire(_req(waiter, limit=1, queue_ttl=10.0), T0)
    tables.release("n", a, T0 + 1)
    assert len(tables.holders("n", T0 + 1)) == 1
    tables.release("n", b, T0 + 1)
    assert [i.limit for i in tables.holders("n", T0 + 1)] == [1]


def test_break_lease_hands_over_too(tables: SQLiteTables) -> None:
    holder, waiter = _token(), _token()
    first = tables.acquire(_req(holder), T0)
    assert isinstance(first, Granted)
    tables.acquire(_req(waiter, queue_ttl=10.0), T0)
    assert tables.break_lease("n", T0 + 1)[0] == 1
    (info,) = tables.holders("n", T0 + 1)
    assert info.fence > first.fence
    assert tables.acquire(_req(waiter), T0 + 1) == Granted(info.fence)


def test_release_sends_the_fence_to_the_armed_waiter(tables: SQLiteTables) -> None:
    holder, waiter, second = _token(), _token(), _token()
    tables.acquire(_req(holder), T0)
    tables.acquire(_req(waiter, queue_ttl=10.0), T0)
    tables.acquire(_req(second, queue_ttl=10.0), T0)
    assert tables.arm("n", waiter, _wake._PREFIX + "a", 1, T0) is False
    assert tables.arm("n", second, _wake._PREFIX + "b", 1, T0) is False
    _, wakes = tables.release("n", holder, T0 + 1)
    (fence,) = (i.fence for i in tables.holders("n", T0 + 1))
    assert wakes == [(_wake._PREFIX + "a", (fence, waiter))]
    assert tables.look("n", waiter, 1, T0 + 1) == HandedOver(fence)
    assert tables.look("n", second, 1, T0 + 1) is False
    # Arming after the hand-over (the release came first) finds the grant too.
    assert tables.arm("n", waiter, _wake._PREFIX + "c", 1, T0 + 1) == HandedOver(fence)


# -- migration from a store created before hand-over --------------------------

OLD_SCHEMA = """
CREATE TABLE lh_seq (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT INTO lh_seq (id, value) VALUES (1, 41);
CREATE TABLE lh_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE lh_holder (
    name TEXT NOT NULL, token TEXT NOT NULL, owner TEXT NOT NULL, host TEXT NOT NULL,
    pid INTEGER NOT NULL, fence INTEGER NOT NULL, lim INTEGER NOT NULL,
    acquired REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (name, token)
) WITHOUT ROWID;
CREATE TABLE lh_waiter (
    name TEXT NOT NULL, token TEXT NOT NULL, seq INTEGER NOT NULL, expires REAL NOT NULL,
    wake TEXT, PRIMARY KEY (name, token)
) WITHOUT ROWID;
CREATE TABLE lh_record (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL, expires REAL
) WITHOUT ROWID;
"""


def _old_store(path: Path, *, with_wake: bool = True) -> None:
    conn = sqlite3.connect(path)
    schema = OLD_SCHEMA if with_wake else OLD_SCHEMA.replace("    wake TEXT, ", "    ")
    conn.executescript(schema)
    conn.execute("INSERT INTO lh_meta (key, value) VALUES ('boot', ?)", (boot_id(),))
    conn.execute(
        "INSERT INTO lh_holder VALUES ('n', 'old-holder', 'o', 'h', 1, 41, 1, ?, ?)",
        (T0, T0 + 30),
    )
    columns = "(name, token, seq, expires, wake)" if with_wake else "(name, token, seq, expires)"
    values = (
        ("'n', 'old-waiter', 1, ?, '" + _wake._PREFIX + "old'")
        if with_wake
        else ("'n', 'old-waiter', 1, ?")
    )
    conn.execute(f"INSERT INTO lh_waiter {columns} VALUES ({values})", (T0 + 10,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("with_wake", [True, False])
def test_migration_from_the_old_schema(tmp_path: Path, with_wake: bool) -> None:
    path = tmp_path / "old.db"
    _old_store(path, with_wake=with_wake)
    tables = _tables(path)
    try:
        # Opening migrates; the old rows survive (same boot).
        assert [i.fence for i in tables.holders("n", T0)] == [41]
        conn = sqlite3.connect(path)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(lh_waiter)")}
        conn.close()
        assert {"wake", "ttl", "lim", "owner", "host", "pid"} <= columns
        # A new waiter queues behind the old one, with its request stored.
        new = _token()
        assert tables.acquire(_req(new, queue_ttl=10.0), T0) == Busy(retry_after=30.0, position=1)
        # The old waiter lacks a stored request: the release only wakes it.
        held, wakes = tables.release("n", "old-holder", T0 + 1)
        assert held is True
        assert tables.holders("n", T0 + 1) == []
        assert wakes == ([(_wake._PREFIX + "old", None)] if with_wake else [])
        assert tables.look("n", "old-waiter", 1, T0 + 1) is True  # it could go now
        old = tables.acquire(_req("old-waiter", queue_ttl=10.0), T0 + 1)
        assert isinstance(old, Granted) and old.fence > 41
        # The new waiter is handed the place when the old one releases.
        tables.release("n", "old-waiter", T0 + 2)
        (info,) = tables.holders("n", T0 + 2)
        assert info.fence > old.fence and info.owner == "holder"
    finally:
        tables.close()
    # Opening again (another process, a restart) changes nothing: idempotent.
    again = _tables(path)
    try:
        assert [i.fence for i in again.holders("n", T0 + 2)] == [info.fence]
    finally:
        again.close()


# -- wait() over the store --------------------------------------------------------


def _store(path: Path, clock: FakeClock | None = None) -> SQLiteStore:
    url = parse(f"sqlite:///{path}")
    return from_url(url, clock or FakeClock())


needs_wake = pytest.mark.skipif(not _wake.SUPPORTED, reason="no same-host datagrams here")


@needs_wake
def test_wait_returns_the_hand_over_from_the_datagram(tmp_path: Path) -> None:
    clock = FakeClock()
    store, other = _store(tmp_path / "s.db", clock), _store(tmp_path / "s.db", clock)
    try:
        holder, waiter = _token(), _token()
        assert isinstance(store.acquire(_req(holder)), Granted)
        assert isinstance(other.acquire(_req(waiter, queue_ttl=10.0)), Busy)
        assert other.wait("n", waiter, 0.05) is False  # armed, nothing yet
        got: list[object] = []
        thread = threading.Thread(target=lambda: got.append(other.wait("n", waiter, 10.0)))
        thread.start()
        time.sleep(0.05)
        started = time.monotonic()
        assert store.release("n", holder) is True
        thread.join(5)
        assert time.monotonic() - started < 0.15  # the datagram, not the fallback look
        (handed,) = got
        assert isinstance(handed, HandedOver)
        assert [i.fence for i in store.holders("n")] == [handed.fence]
        assert other.release("n", waiter) is True
    finally:
        store.close()
        other.close()


@needs_wake
def test_lost_datagram_never_loses_the_grant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_wake, "send_messages", lambda messages: None)
    store = _store(tmp_path / "s.db")
    try:
        holder, waiter = _token(), _token()
        store.acquire(_req(holder))
        store.acquire(_req(waiter, queue_ttl=10.0))
        assert store.wait("n", waiter, 0.01) is False
        store.release("n", holder)
        started = time.monotonic()
        handed = store.wait("n", waiter, 5.0)
        assert isinstance(handed, HandedOver)
        assert time.monotonic() - started < 1.0  # the fallback look, not the timeout
        assert store.acquire(_req(waiter)) == Granted(handed.fence)
        assert store.release("n", waiter) is True
    finally:
        store.close()


@needs_wake
def test_wait_blocks_until_its_timeout_when_nothing_happens(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.db")
    try:
        holder, waiter = _token(), _token()
        store.acquire(_req(holder))
        store.acquire(_req(waiter, queue_ttl=10.0))
        started = time.monotonic()
        assert store.wait("n", waiter, 0.5) is False
        assert 0.45 <= time.monotonic() - started < 2.0
    finally:
        store.close()


@needs_wake
def test_queued_acquire_records_its_wake_up_address(tmp_path: Path) -> None:
    """Being queued and being reachable are one transaction: no second one to arm."""
    store = _store(tmp_path / "s.db")
    try:
        holder, waiter = _token(), _token()
        store.acquire(_req(holder))
        store.acquire(_req(waiter, queue_ttl=10.0))
        conn = sqlite3.connect(tmp_path / "s.db")
        ((wake,),) = conn.execute("SELECT wake FROM lh_waiter WHERE token = ?", (waiter,))
        conn.close()
        assert wake is not None and wake.startswith(_wake._PREFIX)
        assert store.release("n", waiter) is False
        assert store.release("n", holder) is True
    finally:
        store.close()


def test_a_hand_over_to_another_token_is_not_ours() -> None:
    # Wake-up sockets are reused: a datagram in flight for the previous waiter
    # names that waiter's token and must not be taken for a grant.
    assert _heard([b"g5 someone-else"], "mine") is False
    assert _heard([b"g5 someone-else", b"g7 mine"], "mine") == HandedOver(7)
    assert _heard([b"w"], "mine") is True
    assert _heard([], "mine") is False


def test_a_locked_database_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    tables = _tables(path)
    tables.ping()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.2, lambda: other.execute("COMMIT")).start()
    started = time.monotonic()
    try:
        assert isinstance(tables.acquire(_req(_token()), T0), Granted)
        assert time.monotonic() - started >= 0.15
    finally:
        tables.close()
        other.close()


def test_a_database_locked_past_the_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    tables = SQLiteTables(path, busy_timeout=0.2, allow_network_fs=False)
    tables.ping()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            tables.acquire(_req(_token()), T0)
        assert 0.15 <= time.monotonic() - started < 2.0
    finally:
        other.execute("COMMIT")
        other.close()
        tables.close()


@needs_wake
def test_spare_wake_up_sockets_stay_with_their_process(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.db")
    try:
        holder, waiter = _token(), _token()
        store.acquire(_req(holder))
        store.acquire(_req(waiter, queue_ttl=10.0))
        store.release("n", waiter)  # its socket is kept for the next waiter
        spare = {sock.address for sock in store._spare}
        assert spare
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                child = _token()
                store.acquire(_req(child, queue_ttl=10.0))
                fresh = store._sockets[("n", child)].address not in spare
                os.write(write_end, b"1" if fresh else b"0")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read_end, 1) == b"1"
        os.close(read_end)
        os.close(write_end)
        store.release("n", holder)
    finally:
        store.close()
