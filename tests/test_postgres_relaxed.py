"""PostgreSQL ``?durability=relaxed`` (schema version 6): grants commit without
waiting for their WAL flush; an epoch bumped after a crash keeps fences increasing,
and a quarantine keeps a holder whose grant the crash lost alone.

The crash tests run several processes on one lock with a fenced ledger
(tests/_ledger.py) against a server of their own, crash it (``pg_ctl stop -m
immediate``, SIGKILL of the postmaster) while they contend, and check the history:
no fence reused, fences increasing in grant order, no overlapping holders, no grant
inside the quarantine. A process crash loses only the WAL still in PostgreSQL's
buffers: the WAL writer writes every full page at once, so normally that is less
than a page (a few commits), and the fence sequence, which logs 32 values ahead,
never comes back below a fence handed out -- only an operating-system crash or a
failover would show that. To make the crash lose that much, the tests stop
(SIGSTOP) the WAL writer and background writer for the last stretch before the
crash, and check that it worked: the sequence came back below a fence a worker
held. A control run with crash detection defeated shows the checker firing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

from leasehold import Client  # noqa: E402
from leasehold._async.backends.postgres import options as pg_options  # noqa: E402
from leasehold._async.backends.postgres import relaxed as apg_relaxed  # noqa: E402
from leasehold._async.backends.postgres import schema as pg_schema  # noqa: E402
from leasehold._async.backends.postgres import store as apg  # noqa: E402
from leasehold._core.records import Busy, Granted, RenewItem  # noqa: E402
from leasehold._core.url import parse  # noqa: E402
from leasehold._errors import InvalidArgument  # noqa: E402
from leasehold._sync.backends.postgres import relaxed as spg_relaxed  # noqa: E402
from leasehold.testing import BackendHarness  # noqa: E402
from leasehold.testing.conformance import *  # noqa: E402, F403
from tests import _relaxed_workers  # noqa: E402
from tests._ledger import Hold, check_history, read_holds  # noqa: E402
from tests.servers.postgres import PostgresServer  # noqa: E402
from tests.test_postgres_backend import (  # noqa: E402
    _for_schema,
    _need_binaries,
    _schema_sql_at,
    _url,
    req,
    sstore,
    tok,
    unique,
)

# Room for every commit of the test in the WAL buffers, and nothing else that
# writes data pages (which flushes the WAL up to them) while the writers stop.
LOSSY = {"wal_buffers": "16MB", "autovacuum": "off", "checkpoint_timeout": "1h"}
TTL = 2.0  # the workers' lease ttl: the quarantine after a crash


# -- the conformance suite, relaxed ---------------------------------------------------


@pytest.fixture
def lh_backend(postgres_server: Any) -> Iterator[BackendHarness]:
    # A schema of its own: the session server's default schema stays durable-only,
    # so a test that crashes it finds no quarantine there.
    url = _url(postgres_server, schema="relaxed_conformance", durability="relaxed")
    harness = BackendHarness(name="postgres-relaxed", url=url, clock=None, fresh_url=lambda: url)
    try:
        yield harness
    finally:
        harness.close()


# -- options and classes ----------------------------------------------------------------


def test_durability_option_is_checked_and_picks_the_relaxed_store() -> None:
    base = "postgresql://u:secret@127.0.0.1:5/db"
    assert pg_options.parse_options(parse(base)).durability == "durable"
    opts = pg_options.parse_options(parse(base + "?durability=RELAXED"))
    assert opts.relaxed and "durability='relaxed'" in repr(opts) and "secret" not in repr(opts)
    with pytest.raises(InvalidArgument, match=r"\?durability= must be one of durable, relaxed"):
        pg_options.parse_options(parse(base + "?durability=fast"))
    store = apg.AsyncPostgresStore(parse(base + "?durability=relaxed"))
    assert type(store) is apg_relaxed.AsyncRelaxedPostgresStore
    assert store.capabilities.durable is False
    assert b".acquire_relaxed(" in store._queries["acquire"]
    assert b".renew_relaxed(" in store._queries["renew"]
    assert b".release_relaxed(" in store._queries["release"]
    assert b".break_lease(" in store._queries["break_lease"]
    pooled = apg.AsyncPostgresStore(parse(base + "?durability=relaxed&pooler=transaction"))
    assert type(pooled) is apg_relaxed.AsyncRelaxedPooledPostgresStore
    assert pooled.capabilities.hand_over is False
    durable = apg.AsyncPostgresStore(parse(base))
    assert type(durable) is apg.AsyncPostgresStore
    assert b".acquire(" in durable._queries["acquire"]
    sync = spg_relaxed.RelaxedPostgresStore(parse(base + "?durability=relaxed"))
    assert b".acquire_relaxed(" in sync._queries["acquire"]


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    _need_binaries()
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def lossy_pg() -> Iterator[PostgresServer]:
    _need_binaries()
    server = PostgresServer(settings=dict(LOSSY))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _schema() -> str:
    return "relaxed_" + uuid.uuid4().hex[:8]


def _epoch(pg: PostgresServer, schema: str) -> tuple[Any, ...]:
    (row,) = pg.execute(
        f"SELECT epoch, fence_ceiling, max_ttl, quarantine_until > clock_timestamp() "
        f"FROM {schema}.epoch"
    )
    return tuple(row)


def _sql(pg: PostgresServer, schema: str, statement: str) -> None:
    pg.execute(statement.replace("@s@", schema))


@contextlib.contextmanager
def _socket_only(server: PostgresServer) -> Iterator[Any]:
    """Start the server without TCP (workers cannot reach it) and yield a superuser
    connection over its unix socket; shut it down cleanly afterwards (a clean
    shutdown keeps unlogged tables as they are)."""
    server._settings["listen_addresses"] = "''"
    try:
        server.start()
        conninfo = f"host={server._tmp} port={server.port} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            yield conn
        server.shutdown("fast")
    finally:
        del server._settings["listen_addresses"]


def _kill_postmaster(server: PostgresServer, stopped: list[int]) -> None:
    """SIGKILL the postmaster alone; its children notice and exit by themselves
    (the stopped writers are killed, the ones that do not exit within 30 s are
    killed too). Then clear what a real crash leaves behind (server.kill)."""
    pids = server._cluster_pids()
    os.kill(pids[0], signal.SIGKILL)
    for pid in stopped:  # cannot notice anything while stopped; quit unflushed
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    children = pids[1:]
    while time.monotonic() < deadline:
        children = [pid for pid in children if _alive(pid)]
        if not children:
            break
        time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.kill()


def _hold_back_wal(server: PostgresServer) -> list[int]:
    """SIGSTOP the WAL writer and the background writer: from now on commits made
    with synchronous_commit=off stay in the WAL buffers, and a crash loses them."""
    stopped = []
    for pid in server._cluster_pids()[1:]:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"walwriter" in title or b"background writer" in title:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
    assert len(stopped) == 2, stopped
    return stopped


def _pending(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone
    masks = [int(line.split()[1], 16) for line in status.splitlines() if "Pnd:" in line]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def _stop_immediate(server: PostgresServer, stopped: list[int]) -> None:
    """``pg_ctl stop -m immediate`` with the writers stopped: once the postmaster
    has sent them SIGQUIT they are continued, and quit without writing anything."""
    thread = threading.Thread(target=server.shutdown, args=("immediate",))
    thread.start()
    deadline = time.monotonic() + 30
    while not all(_pending(pid, signal.SIGQUIT) for pid in stopped):
        assert time.monotonic() < deadline, "the postmaster never sent SIGQUIT"
        time.sleep(0.01)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    thread.join(60)
    assert not thread.is_alive()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- recovery, quarantine, limits: one server, SQL-level setup ---------------------------


def test_install_makes_the_epoch_and_its_marker(pg: PostgresServer) -> None:
    schema = _schema()
    store = sstore(_url(pg, schema=schema, durability="relaxed"))
    try:
        assert isinstance(store.acquire(req(unique(), tok(), ttl=7.5)), Granted)
        epoch, ceiling, max_ttl, quarantined = _epoch(pg, schema)
        ((fence,),) = pg.execute(f"SELECT last_value FROM {schema}.fence_seq")
        assert (epoch, max_ttl, quarantined) == (0, 7.5, None)
        assert ceiling > fence
        assert pg.execute(f"SELECT * FROM {schema}.epoch") == pg.execute(
            f"SELECT * FROM {schema}.epoch_marker"
        )
        ((persistence,),) = pg.execute(
            "SELECT relpersistence FROM pg_class WHERE oid = %s::regclass",
            (f"{schema}.epoch_marker",),
        )
        assert persistence == "u"  # unlogged: emptied by crash recovery
        # A longer ttl (acquire, renew, a queued request) raises max_ttl.
        name, token = unique(), tok()
        assert isinstance(store.acquire(req(name, token, ttl=1.0)), Granted)
        assert store.renew([RenewItem(name, token, 9.0)]) == [True]
        assert _epoch(pg, schema)[2] == 9.0
        assert isinstance(store.acquire(req(name, tok(), ttl=12.0, queue_ttl=5.0)), Busy)
        assert _epoch(pg, schema)[2] == 12.0
    finally:
        store.close()
    # A durable store never raises it: a durable-only schema has no quarantine.
    durable_schema = _schema()
    durable = sstore(_url(pg, schema=durable_schema))
    try:
        name, token = unique(), tok()
        assert isinstance(durable.acquire(req(name, token, ttl=50.0)), Granted)
        assert durable.renew([RenewItem(name, token, 60.0)]) == [True]
        assert _epoch(pg, durable_schema)[2] == 0.0
    finally:
        durable.close()


def test_an_emptied_marker_bumps_the_epoch_above_the_ceiling_and_quarantines(
    pg: PostgresServer,
) -> None:
    schema = _schema()
    relaxed = sstore(_url(pg, schema=schema, durability="relaxed"))
    durable = sstore(_url(pg, schema=schema))
    try:
        name, holder = unique(), tok()
        first = relaxed.acquire(req(name, holder, ttl=1.5))
        assert isinstance(first, Granted)
        _, ceiling, _, _ = _epoch(pg, schema)
        # What crash recovery does to an unlogged table, and a sequence that came
        # back below the fence just handed out (its WAL lost).
        _sql(pg, schema, "DELETE FROM @s@.epoch_marker")
        pg.execute(f"SELECT setval('{schema}.fence_seq', 1)")
        waiter = tok()
        sent = time.monotonic()
        busy = durable.acquire(req(name, waiter, ttl=1.0, queue_ttl=10.0))
        # The quarantine began when the server ran that call, somewhere between
        # `sent` and now (long after `sent` on a loaded machine), and busy says how
        # long it has left from then: measured from now, it is surely over.
        answered = time.monotonic()
        assert isinstance(busy, Busy)  # the holder's lease is live anyway ...
        assert busy.retry_after is not None and 1.2 < busy.retry_after <= 1.5
        epoch, new_ceiling, max_ttl, quarantined = _epoch(pg, schema)
        assert (epoch, max_ttl, quarantined) == (1, 1.5, True)
        assert new_ceiling > ceiling
        # ... and in the quarantine its re-acquire confirms, a release hands over
        # nothing, another name is not granted either.
        assert relaxed.acquire(req(name, holder, ttl=1.5)) == first
        assert relaxed.release(name, holder) is True
        assert relaxed.holders(name) == []
        other = relaxed.acquire(req(unique(), tok(), ttl=1.0))
        assert isinstance(other, Busy) and other.retry_after is not None
        # The same quarantine, less what passed between the two calls (at most
        # the time from sending the first to the second's answer).
        assert other.retry_after >= busy.retry_after - (time.monotonic() - sent) - 0.01
        # After the quarantine: the waiter's next attempt is granted, its fence
        # above the old ceiling (so above every fence handed out before).
        time.sleep(max(0.0, answered + busy.retry_after - time.monotonic()) + 0.05)
        granted = durable.acquire(req(name, waiter, ttl=1.0, queue_ttl=10.0))
        assert isinstance(granted, Granted) and granted.fence > ceiling
        assert _epoch(pg, schema)[0] == 1  # one bump per crash
    finally:
        relaxed.close()
        durable.close()


def test_a_durable_only_schema_bumps_without_quarantine(pg: PostgresServer) -> None:
    schema = _schema()
    store = sstore(_url(pg, schema=schema))
    try:
        assert isinstance(store.acquire(req(unique(), tok(), ttl=30.0)), Granted)
        _sql(pg, schema, "DELETE FROM @s@.epoch_marker")
        after = store.acquire(req(unique(), tok(), ttl=30.0))
        assert isinstance(after, Granted)  # no relaxed grant was ever lost
        assert _epoch(pg, schema)[0] == 1
    finally:
        store.close()


def test_a_fence_reaching_the_ceiling_raises_it(pg: PostgresServer) -> None:
    schema = _schema()
    store = sstore(_url(pg, schema=schema, durability="relaxed"))
    try:
        assert isinstance(store.acquire(req(unique(), tok())), Granted)
        ((last,),) = pg.execute(f"SELECT last_value FROM {schema}.fence_seq")
        _sql(pg, schema, f"UPDATE @s@.epoch SET fence_ceiling = {last + 2}")
        _sql(pg, schema, f"UPDATE @s@.epoch_marker SET fence_ceiling = {last + 2}")
        below = store.acquire(req(unique(), tok()))
        assert isinstance(below, Granted) and _epoch(pg, schema)[1] == last + 2
        reaching = store.acquire(req(unique(), tok()))
        assert isinstance(reaching, Granted) and reaching.fence == last + 2
        assert _epoch(pg, schema)[1] == reaching.fence + 1048576
        assert pg.execute(f"SELECT fence_ceiling FROM {schema}.epoch_marker") == [
            (reaching.fence + 1048576,)
        ]
        # A hand-over reaching it raises it too.
        name, holder, waiter = unique(), tok(), tok()
        assert isinstance(store.acquire(req(name, holder)), Granted)
        assert isinstance(store.acquire(req(name, waiter, queue_ttl=10.0)), Busy)
        ((last,),) = pg.execute(f"SELECT last_value FROM {schema}.fence_seq")
        _sql(pg, schema, f"UPDATE @s@.epoch SET fence_ceiling = {last + 1}")
        _sql(pg, schema, f"UPDATE @s@.epoch_marker SET fence_ceiling = {last + 1}")
        assert store.release(name, holder) is True
        (info,) = store.holders(name)
        assert info.fence == last + 1 and _epoch(pg, schema)[1] == last + 1 + 1048576
    finally:
        store.close()


def test_relaxed_commits_do_not_wait_for_the_flush(pg: PostgresServer) -> None:
    """What each function leaves synchronous_commit at, inside a transaction."""
    schema = _schema()
    store = sstore(_url(pg, schema=schema, durability="relaxed"))
    store.acquire(req(unique(), tok(), ttl=30.0))  # installs; max_ttl 30
    store.close()
    name, token = unique(), tok()
    call = f"SELECT granted FROM {schema}.%s(%%s, %%s, 'o', 'h', 1, 10.0, 1, NULL, NULL, NULL)"

    def setting_after(query: str, params: tuple[Any, ...]) -> str:
        with psycopg.connect(pg.url) as conn:
            conn.execute(query, params)
            row = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
            assert row is not None
            conn.rollback()
            return str(row[0])

    assert setting_after(call % "acquire_relaxed", (name, token)) == "off"
    assert setting_after(call % "acquire", (name, token)) == "on"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(call % "acquire_relaxed", (name, token))
    assert setting_after(f"SELECT {schema}.release_relaxed(%s, %s)", (name, token)) == "off"
    assert (
        setting_after(f"SELECT {schema}.renew_relaxed(%s, %s, %s)", ([name], [token], [10.0]))
        == "off"
    )
    # A ttl above max_ttl is raised durably, in the same transaction.
    assert (
        setting_after(call.replace("10.0", "99.0") % "acquire_relaxed", (unique(), tok())) == "on"
    )


# -- upgrade --------------------------------------------------------------------------------

# Version 5 of schema.sql (busy answers without a flush): the start of the v6 upgrade.
V5_SCHEMA_COMMIT = "ac17d94ed4ec94aad84aeb9527fed9c5152e591f"


def test_upgrade_from_schema_version_5_starts_the_epoch_above_every_fence(
    pg: PostgresServer,
) -> None:
    schema = "upgrade5_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_schema_sql_at(V5_SCHEMA_COMMIT, "AS $$ SELECT 5 $$"), schema))
    name, token = unique(), tok()
    ((granted, old_fence),) = pg.execute(
        f"SELECT granted, fence FROM {schema}.acquire(%s, %s, 'old', 'h', 1, 60, 1, "
        "NULL, NULL, NULL)",
        (name, token),
    )
    assert granted is True
    store = sstore(_url(pg, schema=schema, durability="relaxed"))
    try:
        assert store.renew([RenewItem(name, token, 60)]) == [True]  # installs version 6
        epoch, ceiling, _, quarantined = _epoch(pg, schema)
        assert (epoch, quarantined) == (0, None) and ceiling > old_fence
        (info,) = store.holders(name)
        assert info.fence == old_fence
        after = store.acquire(req(unique(), tok()))
        assert isinstance(after, Granted) and after.fence > old_fence
    finally:
        store.close()
    # Running the file again neither resets the epoch nor refills an emptied marker
    # (which would hide a crash).
    _sql(pg, schema, "DELETE FROM @s@.epoch_marker")
    before = pg.execute(f"SELECT * FROM {schema}.epoch")
    text = (Path(__file__).parent.parent / "src/leasehold/_shared/postgres/schema.sql").read_text()
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(text, schema))
    assert pg.execute(f"SELECT * FROM {schema}.epoch") == before
    assert pg.execute(f"SELECT count(*) FROM {schema}.epoch_marker") == [(0,)]


# Version 6 of schema.sql: the start of the v7 upgrade (acquire and release rewritten).
V6_SCHEMA_COMMIT = "f44bdec8bdf5df7f69a78352a7287c62373893f8"


def test_upgrade_from_schema_version_6_keeps_holders_and_the_queue(pg: PostgresServer) -> None:
    schema = "upgrade6_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.url) as conn:
        conn.execute(_for_schema(_schema_sql_at(V6_SCHEMA_COMMIT, "AS $$ SELECT 6 $$"), schema))
    name, holder, waiter = unique(), tok(), tok()
    call = (
        f"SELECT granted, fence FROM {schema}.acquire(%s, %s, 'old', 'h', 1, 60, 1, %s, NULL, NULL)"
    )
    ((granted, old_fence),) = pg.execute(call, (name, holder, None))
    assert granted is True
    assert pg.execute(call, (name, waiter, 60.0)) == [(False, None)]  # queued by version 6
    store = sstore(_url(pg, schema=schema))
    try:
        assert store.release(name, holder) is True  # installs the current version, hands over
        assert pg.execute(f"SELECT {schema}.schema_version()") == [(pg_schema.SCHEMA_VERSION,)]
        (info,) = store.holders(name)
        assert info.fence > old_fence
        confirmed = store.acquire(req(name, waiter))  # the waiter confirms its grant
        assert isinstance(confirmed, Granted) and confirmed.fence == info.fence
        semaphore = unique()
        first = store.acquire(req(semaphore, tok(), limit=2))
        second = store.acquire(req(semaphore, tok(), limit=2))
        assert isinstance(first, Granted) and isinstance(second, Granted)
        assert second.fence > first.fence > info.fence
        assert isinstance(store.acquire(req(semaphore, tok(), limit=2)), Busy)
    finally:
        store.close()


# -- crash tests -------------------------------------------------------------------------------


def _run_crash(
    server: PostgresServer,
    tmp_path: Path,
    crash: str,
    *,
    defeat_detection: bool = False,
    workers: int = 4,
) -> tuple[list[Hold], float, int, int]:
    """Contend, crash, inspect the recovered server without TCP (optionally refill
    the marker, as a store without crash detection would never notice), restart,
    contend again. Returns the holds, when the crash was over, the fence sequence
    as recovery left it, and the epoch."""
    url = _url(server, durability="relaxed")
    Client(url).close()  # install the schema before the workers race to
    stop = tmp_path / "stop"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_relaxed_workers.ledger_worker,
            args=(url, "ledger", TTL, 0.03, str(tmp_path), str(stop), 120.0),
        )
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 60
        while len(read_holds(tmp_path)) < 20:  # contention under way
            assert time.monotonic() < deadline, "workers made no progress"
            time.sleep(0.1)
        stopped = _hold_back_wal(server)
        # More grants than the 32 fences a sequence logs ahead, all unflushed.
        target = len(read_holds(tmp_path)) + 60
        while len(read_holds(tmp_path)) < target:
            assert time.monotonic() < deadline, "workers made no progress"
            time.sleep(0.05)
        if crash == "immediate":
            _stop_immediate(server, stopped)
        else:
            _kill_postmaster(server, stopped)
        crashed_at = time.monotonic()  # every server process is gone
        with _socket_only(server) as conn:
            row = conn.execute("SELECT last_value FROM leasehold.fence_seq").fetchone()
            assert row is not None
            recovered = int(row[0])
            marker = conn.execute("SELECT count(*) FROM leasehold.epoch_marker").fetchone()
            assert marker == (0,)  # crash recovery emptied it
            if defeat_detection:
                conn.execute("INSERT INTO leasehold.epoch_marker SELECT * FROM leasehold.epoch")
        server.start()
        before = len(read_holds(tmp_path))
        deadline = time.monotonic() + 60
        while len(read_holds(tmp_path)) < before + 10:
            assert time.monotonic() < deadline, "no progress after the restart"
            time.sleep(0.1)
    finally:
        stop.touch()
        for proc in procs:
            proc.join(30)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
    assert all(proc.exitcode == 0 for proc in procs)
    ((epoch,),) = server.execute("SELECT epoch FROM leasehold.epoch")
    return read_holds(tmp_path), crashed_at, recovered, int(epoch)


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["immediate", "kill-postmaster"])
def test_crash_under_contention_reuses_no_fence_and_makes_no_second_holder(
    lossy_pg: PostgresServer, tmp_path: Path, crash: str
) -> None:
    holds, crashed_at, recovered, epoch = _run_crash(lossy_pg, tmp_path, crash)
    before = [h for h in holds if h.granted < crashed_at]
    after = [h for h in holds if h.granted > crashed_at]
    # The crash lost acknowledged grants: the sequence came back below a fence a
    # worker held, so without the epoch the next grant would reuse it.
    assert recovered < max(h.fence for h in before), (recovered, before[-3:])
    assert epoch == 1
    assert after and min(h.fence for h in after) > max(h.fence for h in before)
    found = check_history(holds, crashed_at=crashed_at, quarantine=TTL)
    assert not found, found
    print(
        f"\n{crash}: {len(before)} grants before the crash (highest fence "
        f"{max(h.fence for h in before)}, sequence recovered at {recovered}), "
        f"{len(after)} after, the first {min(h.granted for h in after) - crashed_at:.2f} s "
        f"after the crash, fences from {min(h.fence for h in after)}"
    )


@pytest.mark.slow
def test_control_without_crash_detection_the_checker_fires(
    lossy_pg: PostgresServer, tmp_path: Path
) -> None:
    """The same crash with the marker refilled before anyone reconnects (what a
    store that never detects the crash would see): fences are reused."""
    holds, crashed_at, recovered, epoch = _run_crash(
        lossy_pg, tmp_path, "immediate", defeat_detection=True
    )
    assert epoch == 0  # no bump
    before = [h for h in holds if h.granted < crashed_at]
    assert recovered < max(h.fence for h in before)
    found = check_history(holds, crashed_at=crashed_at, quarantine=TTL)
    assert found.reused or found.backwards, found
    after = [h for h in holds if h.granted > crashed_at]
    if min(h.granted for h in after) < crashed_at + TTL:  # unless the restart was slow
        assert found.quarantine  # granted inside what would have been the quarantine


def test_the_checker_fires_on_each_violation() -> None:
    clean = [
        Hold(1, 1, 10, 0.0, 0.1, 0.2),
        Hold(2, 1, 11, 0.3, 0.3, 0.4),
        Hold(1, 2, 12, 3.0, 3.1, 3.2),
    ]
    assert not check_history(clean, crashed_at=0.5, quarantine=2.0)
    reused = [*clean[:2], Hold(2, 2, 11, 0.5, 0.5, 0.6)]
    assert check_history(reused).reused
    backwards = [*clean[:2], Hold(2, 2, 9, 0.5, 0.5, 0.6)]
    assert check_history(backwards).backwards
    overlapping = [clean[0], Hold(2, 1, 11, 0.15, 0.15, 0.4)]
    assert check_history(overlapping).overlapping
    assert check_history(clean, crashed_at=0.5, quarantine=3.0).quarantine


def test_a_backend_crash_restart_is_detected_too(tmp_path: Path) -> None:
    """SIGKILL of one backend makes the postmaster restart every process with crash
    recovery (pg_postmaster_start_time() stays the same); the marker is empty
    after it all the same."""
    _need_binaries()
    server = PostgresServer()
    server.start()
    try:
        store = sstore(_url(server, durability="relaxed"))
        try:
            name = unique()
            assert isinstance(store.acquire(req(name, tok(), ttl=1.5)), Granted)
            ((started,),) = server.execute("SELECT pg_postmaster_start_time()")
            # A connection of our own that only the postmaster's crash handling ends:
            # until it is gone, a new connection may still reach the old processes
            # (the postmaster learns of the death a moment later) and see the cluster
            # before its restart, as a parallel run did.
            witness = psycopg.connect(server.url, autocommit=True, connect_timeout=10)
            try:
                ((victim,),) = server.execute(
                    "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND pid <> %s AND backend_type = 'client backend' LIMIT 1",
                    (witness.info.backend_pid,),
                )
                os.kill(int(victim), signal.SIGKILL)
                deadline = time.monotonic() + 60
                while True:  # the postmaster ends every backend, the witness too
                    try:
                        witness.execute("SELECT 1")
                    except psycopg.OperationalError:
                        break
                    assert time.monotonic() < deadline, "the crash was not handled"
                    time.sleep(0.05)
            finally:
                witness.close()
            while True:  # then restarts the cluster by itself
                try:
                    ((now_started,),) = server.execute("SELECT pg_postmaster_start_time()")
                    break
                except psycopg.OperationalError:
                    assert time.monotonic() < deadline, "the server did not come back"
                    time.sleep(0.1)
            assert now_started == started  # not a restart pg_ctl would show
            busy = store.acquire(req(unique(), tok(), ttl=1.0))
            assert isinstance(busy, Busy) and busy.retry_after is not None
            assert 1.0 < busy.retry_after <= 1.5  # quarantined for max_ttl
            assert _epoch(server, "leasehold")[0] == 1
        finally:
            store.close()
    finally:
        server.stop()


# -- a state machine: durable and relaxed grants, releases and crashes ----------------------


def test_fences_increase_through_any_sequence_of_grants_and_crashes(pg: PostgresServer) -> None:
    """Against a model that only remembers the highest fence ever handed out: every
    grant (relaxed or durable, by acquire or by hand-over) is above it, through
    crashes that lose any suffix of the fence sequence (the marker emptied, the
    sequence set back anywhere at or below the highest fence -- more than a real
    crash can lose). A crash quarantines grants for max_ttl (0.05 s here)."""
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        invariant,
        rule,
        run_state_machine_as_test,
    )

    schema = _schema()
    ttl = 0.05
    relaxed = sstore(_url(pg, schema=schema, durability="relaxed"))
    durable = sstore(_url(pg, schema=schema))
    names = [unique() for _ in range(3)]

    class Crashes(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            # Every fence earlier examples handed out (each crash was recovered).
            ((last,),) = pg.execute(f"SELECT last_value FROM {schema}.fence_seq")
            self.highest = int(last)
            self.crashes = 0
            self.held: dict[str, list[str]] = {}
            self.queued: dict[str, list[str]] = {}

        def _granted(self, fence: int) -> None:
            assert fence > self.highest, (fence, self.highest)
            self.highest = fence

        @rule(name=st.sampled_from(names), use_relaxed=st.booleans(), queue=st.booleans())
        def acquire(self, name: str, use_relaxed: bool, queue: bool) -> None:
            store = relaxed if use_relaxed else durable
            token = tok()
            result = store.acquire(req(name, token, ttl=ttl, queue_ttl=5.0 if queue else None))
            if isinstance(result, Granted):
                self._granted(result.fence)
                self.held.setdefault(name, []).append(token)
            elif queue:
                self.queued.setdefault(name, []).append(token)

        @rule(name=st.sampled_from(names), use_relaxed=st.booleans())
        def release(self, name: str, use_relaxed: bool) -> None:
            tokens = self.held.get(name)
            if not tokens:
                return
            store = relaxed if use_relaxed else durable
            store.release(name, tokens.pop(0))
            # A hand-over grants the first waiter: its fence is the model's too.
            for info in store.holders(name):
                if info.fence > self.highest:
                    self._granted(info.fence)

        @rule(back=st.integers(min_value=0, max_value=50))
        def crash(self, back: int) -> None:
            _sql(pg, schema, "DELETE FROM @s@.epoch_marker")
            pg.execute(f"SELECT setval('{schema}.fence_seq', %s)", (max(1, self.highest - back),))
            self.crashes += 1
            # The first call after the crash recovers and starts the quarantine
            # (max_ttl = ttl): wait it out, so that grants follow the crash.
            assert isinstance(durable.acquire(req(unique(), tok(), ttl=ttl)), Busy)
            time.sleep(ttl + 0.01)

        @invariant()
        def sequence_never_reissues(self) -> None:
            ((last, called),) = pg.execute(f"SELECT last_value, is_called FROM {schema}.fence_seq")
            marker = pg.execute(f"SELECT count(*) FROM {schema}.epoch_marker")
            if marker == [(1,)]:  # recovered (or never crashed): nothing below is issued
                next_value = last + 1 if called else last
                assert next_value > self.highest

    try:
        durable.acquire(req(unique(), tok(), ttl=ttl))  # install, and set max_ttl ...
        relaxed.acquire(req(unique(), tok(), ttl=ttl))  # ... to the ttl used here
        run_state_machine_as_test(
            Crashes, settings=settings(max_examples=15, stateful_step_count=25, deadline=None)
        )
    finally:
        relaxed.close()
        durable.close()
