"""Where the time goes: small probes behind the numbers in docs/benchmarks.md.

    python -m bench.probes            # all probes
    python -m bench.probes redis      # one of: keeper, redis, redis-asyncio,
                                      # redis-instructions, redis-pipeline, postgres,
                                      # postgres-hops, postgres-notify,
                                      # postgres-layers, sqlite

Each probe starts its own server, runs uncontended acquire + release and prints
what one operation costs: round trips, commands the server ran, server CPU,
nested SQL statements, WAL flushes and their time, the keeper thread. Rerun after a
change to see it move.
"""

from __future__ import annotations

import collections
import contextlib
import cProfile
import pstats
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench import hops, layers, pipeline
from bench.common import cpu_ticks
from bench.servers import PostgresServer, RedisServer

N = 2000


def p50_us(fn: Callable[[], Any], n: int = N) -> float:
    for _ in range(100):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return samples[n // 2] / 1000


def cycle(lock: Any) -> Callable[[], None]:
    return lambda: lock.acquire().release()


def keeper(urls: dict[str, str]) -> None:
    """The keeper thread exits when a client holds nothing and is started again by the
    next acquire; holding one more lease keeps it alive. The difference is its cost."""
    import leasehold

    for backend, url in urls.items():
        client = leasehold.Client(url)
        alone = p50_us(cycle(client.lock("probe-a", ttl=30)))
        pin = client.lock("probe-pin", ttl=60).acquire()
        pinned = p50_us(cycle(client.lock("probe-b", ttl=30)))
        pin.release()
        client.close()
        print(
            f"keeper  {backend:8s} p50 {alone:7.0f} us (keeper restarted per acquire)  "
            f"{pinned:7.0f} us (keeper kept alive by a second lease)"
        )


def redis_probe(url: str) -> None:
    import redis

    import leasehold

    raw = redis.Redis.from_url(url)

    def snapshot() -> tuple[dict[str, int], float]:
        stats = {k: v["calls"] for k, v in raw.info("commandstats").items()}
        cpu = raw.info("cpu")
        return stats, cpu["used_cpu_sys"] + cpu["used_cpu_user"]

    def measure(name: str, fn: Callable[[], None]) -> None:
        fn()
        before, cpu0 = snapshot()
        wall = p50_us(fn)
        after, cpu1 = snapshot()
        n = N + 100
        calls = {k.removeprefix("cmdstat_"): (v - before.get(k, 0)) / n for k, v in after.items()}
        calls = {k: round(v, 2) for k, v in calls.items() if v >= 0.01 and k != "info"}
        cpu = (cpu1 - cpu0) / n * 1e6
        print(
            f"redis   {name:14s} p50 {wall:6.0f} us, server CPU {cpu:5.0f} us, "
            f"{sum(calls.values()):5.1f} commands per acquire+release: {calls}"
        )

    client = leasehold.Client(url)
    pin = client.lock("probe-pin", ttl=60).acquire()  # keep the keeper out of the picture
    measure("leasehold", cycle(client.lock("probe", ttl=30)))
    lock = raw.lock("probe-redis-py", timeout=30)
    measure("redis-py Lock", lambda: (lock.acquire(), lock.release()))
    # Client CPU, counted rather than timed (timings are noisy on a busy machine):
    # Python function calls per acquire + release, sync and asyncio.
    print(
        f"redis   leasehold      {calls_per(cycle(client.lock('probe', ttl=30))):5.0f} "
        "Python function calls per acquire+release (sync)"
    )
    print(
        f"redis   leasehold      {async_calls_per(url):5.0f} "
        "Python function calls per acquire+release (asyncio)"
    )
    contended(url, raw)
    pin.release()
    client.close()


def redis_asyncio(url: str, n: int = N) -> None:
    """The asyncio gap, decomposed per acquire + release: wall p50, the client's own
    CPU (process time: the server is another process), the server's CPU, and how
    often the event loop polled its selector (each poll is a return to the loop:
    a reply waited for, or a task switch)."""
    import asyncio

    import redis
    import redis.asyncio

    import leasehold

    raw = redis.Redis.from_url(url)

    def server_cpu() -> float:
        cpu = raw.info("cpu")
        return float(cpu["used_cpu_sys"] + cpu["used_cpu_user"])

    async def measure(name: str, fn: Callable[[], Any]) -> None:
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        polls = [0]
        select = selector.select

        def counted(timeout: float | None = None) -> Any:
            polls[0] += 1
            return select(timeout)

        for _ in range(100):
            await fn()
        samples = []
        cpu0, server0 = time.process_time(), server_cpu()
        selector.select = counted
        try:
            for _ in range(n):
                start = time.perf_counter_ns()
                await fn()
                samples.append(time.perf_counter_ns() - start)
        finally:
            selector.select = select
        cpu1, server1 = time.process_time(), server_cpu()
        samples.sort()
        print(
            f"redis   asyncio {name:22s} p50 {samples[n // 2] / 1000:6.0f} us, "
            f"client CPU {(cpu1 - cpu0) / n * 1e6:5.0f} us, "
            f"server CPU {(server1 - server0) / n * 1e6:4.0f} us, "
            f"{polls[0] / n:4.1f} selector polls per acquire+release"
        )

    async def run() -> None:
        client = leasehold.AsyncClient(url)
        pin = await client.lock("probe-async-pin", ttl=60).acquire()  # keeper stays up
        lock = client.lock("probe-async", ttl=30)
        r = redis.asyncio.Redis.from_url(url)
        rlock = r.lock("probe-async-redis-py", timeout=30)

        async def leasehold_cycle() -> None:
            await (await lock.acquire()).release()

        async def redis_py_cycle() -> None:
            await rlock.acquire()
            await rlock.release()

        async def pings() -> None:
            await r.ping()
            await r.ping()

        await measure("2xPING floor", pings)
        await measure("redis-py asyncio Lock", redis_py_cycle)
        await measure("leasehold", leasehold_cycle)
        await pin.release()
        await client.aclose()
        await r.aclose()

    asyncio.run(run())
    raw.close()


CALLGRIND_CYCLES = 300


def redis_instructions() -> None:
    """The instructions a Redis server executes per uncontended acquire + release,
    leasehold's and redis-py Lock's, counted by callgrind from the moment a request
    is parsed to its reply (``processCommand``: lookup, checks, the command or
    script and every command it runs; not reading the socket or writing the reply).
    A count, not a timing: the same for the same code on any machine however busy,
    so a change to the scripts shows here when wall times are lost in noise. The
    server is its own, under valgrind (about 50 times slower)."""
    import redis

    import leasehold

    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        print("redis   instructions: not measured (valgrind is not installed)")
        return
    out = tempfile.mkdtemp(prefix="leasehold-callgrind-") + "/callgrind.out"
    server = RedisServer(
        wrapper=(valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
                 "--toggle-collect=processCommand")
    )  # fmt: skip
    dumps = 0

    def counted(fn: Callable[[], Any]) -> float:
        nonlocal dumps
        for _ in range(20):
            fn()
        subprocess.run([control, "-z", str(server.process.pid)], check=True, capture_output=True)
        for _ in range(CALLGRIND_CYCLES):
            fn()
        subprocess.run([control, "-d", str(server.process.pid)], check=True, capture_output=True)
        dumps += 1
        with open(f"{out}.{dumps}", encoding="utf-8") as dump:
            summary = next(line for line in dump if line.startswith("summary:"))
        return int(summary.split()[1]) / CALLGRIND_CYCLES

    try:
        client = leasehold.Client(server.url)
        raw = redis.Redis.from_url(server.url)
        ours = counted(cycle(client.lock("probe", ttl=30)))
        lock = raw.lock("probe-redis-py", timeout=30)
        theirs = counted(lambda: (lock.acquire(), lock.release()))
        empty = counted(_empty_script_calls(raw, client))
        client.close()
        raw.close()
    finally:
        server.stop()
    for label, count in (("leasehold", ours), ("redis-py Lock", theirs)):
        print(
            f"redis   {label:14s} {count:9,.0f} instructions in Redis per acquire+release "
            f"(callgrind, {CALLGRIND_CYCLES} cycles)"
        )
    print(
        f"redis   leasehold: {empty:,.0f} of them are the two FCALLs' own cost (an empty "
        f"function called with the same keys and arguments), {ours - empty:,.0f} the "
        "scripts' work (their commands, Lua, MessagePack)"
    )


def _empty_script_calls(raw: Any, client: Any) -> Callable[[], None]:
    """An acquire's and a release's FCALL, with the keys and arguments leasehold
    sends (the same sizes: its key layout, a token, the holder, a run id), of a
    function that does nothing: what calling a script costs Redis before it runs."""
    from leasehold._sync.backends.redis.store import _holder_json
    from leasehold._sync.lock import new_token

    raw.function_load(
        "#!lua name=leasehold_probe_empty\n"
        "redis.register_function('leasehold_probe_empty', function(keys, args) return 1 end)",
        replace=True,
    )
    layout = client.store.keys.for_name("probe")
    keys = layout.script_keys()
    token, run_id = new_token(), "0" * 40
    holder = _holder_json(client._context.holder)
    acquire = ["probe", layout.signal_prefix, token, 30_000_000, 1, 3_000_000, holder, run_id]
    release = ["probe", layout.signal_prefix, token, run_id]

    def calls() -> None:
        raw.fcall("leasehold_probe_empty", len(keys), *keys, *acquire)
        raw.fcall("leasehold_probe_empty", len(keys), *keys, *release)

    return calls


def contended(url: str, raw: Any, rounds: int = 300) -> None:
    """Two clients (threads) hand one lock back and forth, so (but for the first)
    every acquisition waits and is handed the lock by a release: per acquisition
    and its release, the round trips (the server's socket reads: one per client
    write) and the commands they cost (the queueing acquire script, the BLPOP that
    returns the handed-over fence, the release that hands over)."""
    import threading

    import leasehold

    clients = [leasehold.Client(url) for _ in range(2)]
    locks = [c.lock("probe-contended", ttl=30) for c in clients]

    def player(lock: Any) -> None:
        # Held a moment longer than a round trip: the other player is queued and
        # blocked by the time of each release, so every acquisition is handed over.
        for _ in range(rounds):
            lease = lock.acquire()
            time.sleep(0.002)
            lease.release()

    def run() -> None:
        threads = [threading.Thread(target=player, args=(lock,)) for lock in locks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run()  # warm: connections open, both handles have waited once
    before = {k: v["calls"] for k, v in raw.info("commandstats").items()}
    reads0 = raw.info("stats")["total_reads_processed"]
    run()
    reads1 = raw.info("stats")["total_reads_processed"]
    after = {k: v["calls"] for k, v in raw.info("commandstats").items()}
    n = 2 * rounds
    calls = {k.removeprefix("cmdstat_"): (v - before.get(k, 0)) / n for k, v in after.items()}
    calls = {k: round(v, 2) for k, v in calls.items() if v >= 0.01 and not k.startswith("info")}
    print(
        f"redis   leasehold contended: {(reads1 - reads0 - 1) / n:4.2f} round trips and "
        f"{sum(calls.values()):5.1f} commands per handed-over acquisition + its release: {calls}"
    )
    for client in clients:
        client.close()


def _pg_counters(conn: Any) -> tuple[float, ...]:
    """Cluster-wide counters: transactions (one per round trip in autocommit mode),
    WAL flushes and their time (ms), WAL bytes. Backends publish them when they exit,
    so read after closing the client whose calls they count."""
    row = conn.execute(
        "SELECT (SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database), "
        "wal_sync, wal_sync_time, wal_bytes FROM pg_stat_wal"
    ).fetchone()
    return tuple(float(x) for x in row)


def calls_per(fn: Callable[[], None], n: int = 500) -> float:
    for _ in range(50):
        fn()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        fn()
    profile.disable()
    return float(pstats.Stats(profile).total_calls) / n  # type: ignore[attr-defined]


def async_calls_per(url: str, n: int = 500) -> float:
    # cProfile counts each resumption of a coroutine as a call, so this is an
    # upper bound of what asyncio code runs; compare it only with itself.
    import asyncio

    import leasehold

    async def run() -> float:
        client = leasehold.AsyncClient(url)
        lock = client.lock("probe-async", ttl=30)
        for _ in range(50):
            await (await lock.acquire()).release()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(n):
            await (await lock.acquire()).release()
        profile.disable()
        await client.aclose()
        return float(pstats.Stats(profile).total_calls) / n  # type: ignore[attr-defined]

    return asyncio.run(run())


def postgres_probe(server: PostgresServer, *, relaxed: bool = False) -> None:
    """What one acquire+release costs: wall time, client CPU, round trips, WAL
    flushes and their time (pg_stat_wal), and the server time per statement inside
    leasehold's SQL functions (auto_explain). ``relaxed``: the same for
    ?durability=relaxed (its own schema, its functions)."""
    import psycopg

    import leasehold

    schema = "leasehold_relaxed" if relaxed else "leasehold"
    suffix = "_relaxed" if relaxed else ""
    mode = "relaxed" if relaxed else "durable"
    url = server.url + (f"?schema={schema}&durability=relaxed" if relaxed else "")
    with psycopg.connect(server.url, autocommit=True) as admin:
        # Flush timing for every backend (a superuser setting, no restart).
        admin.execute("ALTER SYSTEM SET track_wal_io_timing = on")
        admin.execute("SELECT pg_reload_conf()")
        client = leasehold.Client(url)
        cycle(client.lock("probe-warm", ttl=30))()  # schema, pool and LISTEN in place
        time.sleep(0.2)
        before = _pg_counters(admin)
        lock = client.lock("probe", ttl=30)
        cpu = time.process_time()
        wall = p50_us(cycle(lock), 1000)
        cpu = (time.process_time() - cpu) / 1100 * 1e6
        client.close()  # its backends exit and publish their counters
        time.sleep(0.5)
        after = _pg_counters(admin)
    # Less the admin connection's own two reads.
    trips, syncs, sync_ms, wal = ((b - a) / 1100 for a, b in zip(before, after, strict=True))
    trips -= 2 / 1100
    with psycopg.connect(server.url, autocommit=True) as conn:

        def pair() -> None:
            conn.execute("SELECT pg_advisory_lock(1)")
            conn.execute("SELECT pg_advisory_unlock(1)")

        advisory = p50_us(pair, 500)
        args = ("probe", "", "o", "h", 1, 30.0, 1, None, "probe_channel", "k")

        def functions() -> None:
            token = secrets.token_urlsafe(24)
            conn.execute(
                f"SELECT * FROM {schema}.acquire{suffix}(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (args[0], token, *args[2:]),
            )
            conn.execute(f"SELECT * FROM {schema}.release{suffix}(%s,%s)", ("probe", token))

        raw_sql = p50_us(functions, 500)
        conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_analyze = on"):
            conn.execute(f"SET auto_explain.{setting}")
        log = server.dir / "server.log"
        start = log.stat().st_size
        for _ in range(200):
            functions()
    print(
        f"postgres ({mode}) p50: advisory pair {advisory:.0f} us, leasehold's "
        f"acquire{suffix}()+release{suffix}() SQL functions on a bare connection "
        f"{raw_sql:.0f} us, the leasehold client {wall:.0f} us"
    )
    print(
        f"postgres ({mode}) per acquire+release by the client: {trips:.2f} round trips "
        f"(transactions), {syncs:.2f} WAL flushes taking {sync_ms * 1000:.0f} us of server "
        f"time (this disk), {wal:.0f} WAL bytes, client CPU {cpu:.0f} us (all threads)"
    )
    time.sleep(0.5)
    text = log.read_bytes()[start:].decode(errors="replace")
    spent: dict[str, list[float]] = collections.defaultdict(list)
    for match in re.finditer(r"duration: ([\d.]+) ms\s+plan:\s*\n\s*Query Text: (.*?)\n", text):
        spent[match.group(2).strip()[:80]].append(float(match.group(1)))
    print(f"postgres ({mode}) server time per acquire+release, by statement (auto_explain):")
    for query, durations in sorted(spent.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"  {sum(durations) / 200 * 1000:7.1f} us  x{len(durations) / 200:.0f}  {query}")


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _server_processes(postmaster: int) -> list[int]:
    """The postmaster and its children (backends, WAL writer, checkpointer...)."""
    import os

    children = [
        int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) == postmaster
    ]
    return [postmaster, *children]


def postgres_contended(server: PostgresServer, *, relaxed: bool = False, rounds: int = 600) -> None:
    """Two clients (each its own store, pool and LISTEN connection, as two processes
    have) hand one lock back and forth: the hand-over's latency and the release call
    that makes it, and per handed-over acquisition + its release the transactions
    (round trips), WAL flushes, and CPU in the clients, in the backends running
    their calls, in their LISTEN backends (PostgreSQL signals every listener on
    every NOTIFY) and in the server's other processes."""
    import os
    import threading

    import psycopg

    import leasehold

    mode = "relaxed" if relaxed else "durable"
    schema = "leasehold_relaxed" if relaxed else "leasehold"
    tag = secrets.token_hex(4)
    urls = [
        f"{server.url}?schema={schema}&application_name=probe_{tag}_{i}"
        + ("&durability=relaxed" if relaxed else "")
        for i in range(2)
    ]
    clients = [leasehold.Client(url) for url in urls]
    locks = [c.lock(f"probe-contended-{tag}", ttl=30) for c in clients]
    calls = [0]  # the clients' round trips: every store call is one _run
    for client in clients:
        store = client._context.store
        run = store._run

        def counted(*args: Any, _run: Any = run) -> Any:
            calls[0] += 1
            return _run(*args)

        store._run = counted
    released = [0, -1]  # when, by whom
    handoffs: list[int] = []
    release_calls: list[int] = []
    go = threading.Barrier(2)

    def player(me: int, count: int) -> None:
        lock = locks[me]
        go.wait()
        for _ in range(count):
            lease = lock.acquire()
            got = time.perf_counter_ns()
            if released[1] not in (-1, me):
                handoffs.append(got - released[0])
            # Held a moment: the other player is queued and blocked by the release.
            time.sleep(0.002)
            start = released[0] = time.perf_counter_ns()
            released[1] = me
            lease.release()
            release_calls.append(time.perf_counter_ns() - start)

    def play(count: int) -> None:
        threads = [threading.Thread(target=player, args=(i, count)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    play(20)  # connections, schema and LISTEN in place
    handoffs.clear()
    release_calls.clear()
    calls[0] = 0
    with psycopg.connect(server.url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid, query LIKE 'LISTEN%%' FROM pg_stat_activity "
            "WHERE application_name LIKE %s",
            (f"probe_{tag}_%",),
        ).fetchall()
        before = _pg_counters(admin)
    backends = {int(pid): bool(listening) for pid, listening in rows}
    postmaster = _parent(next(iter(backends)))
    others = [pid for pid in _server_processes(postmaster) if pid not in backends]
    ticks = {pid: cpu_ticks(pid) for pid in [*backends, *others]}
    cpu = time.process_time()
    play(rounds)
    cpu = time.process_time() - cpu
    trips = calls[0] / (2 * rounds)
    spent = {pid: cpu_ticks(pid) - ticks[pid] for pid in ticks}
    for client in clients:
        client.close()  # its backends exit and publish their counters
    time.sleep(0.5)
    with psycopg.connect(server.url, autocommit=True) as admin:
        after = _pg_counters(admin)
    n = len(handoffs)
    hz = os.sysconf("SC_CLK_TCK")

    def us(total_ticks: float) -> float:
        return total_ticks / hz * 1e6 / n

    xacts, syncs, sync_ms, _ = ((b - a) / (2 * rounds) for a, b in zip(before, after, strict=True))
    handoffs.sort()
    release_calls.sort()
    print(
        f"postgres ({mode}) contended, 2 clients handing one lock over ({n} hand-overs): "
        f"handoff p50 {handoffs[n // 2] / 1000:.0f} us (release called -> the next holder's "
        f"acquire returned), of which the release call p50 "
        f"{release_calls[len(release_calls) // 2] / 1000:.0f} us"
    )
    print(
        f"postgres ({mode}) per handed-over acquisition + its release: {trips:.2f} round "
        f"trips; {xacts:.2f} transactions in all (the others: LISTEN backends reading the "
        f"notification queue, every listener at every NOTIFY); {syncs:.2f} WAL flushes "
        f"taking {sync_ms * 1000:.0f} us; "
        f"CPU {cpu * 1e6 / n:.0f} us in the clients (all threads), "
        f"{us(sum(v for pid, v in spent.items() if backends.get(pid) is False)):.0f} us in "
        f"their operation backends, "
        f"{us(sum(v for pid, v in spent.items() if backends.get(pid) is True)):.0f} us in "
        f"their LISTEN backends, {us(sum(spent[pid] for pid in others)):.0f} us in the "
        f"server's other processes"
    )


def postgres_floor(server: PostgresServer) -> None:
    """What this server and disk cost a durable grant by themselves, measured now: the
    settings every commit depends on (the bench's server keeps PostgreSQL's defaults,
    what a production install has), where the data directory is, and the p50 of a
    one-row INSERT committed with and without waiting for its WAL flush, with the
    server time of that flush (pg_stat_wal). The shared disk of a VM makes the flush
    vary tenfold between runs (fdatasync: ~33 us idle, 300 us to 3.5 ms while other
    jobs write), so read the durable rows of the same run against this one."""
    import os

    import psycopg

    names = (
        "wal_sync_method", "full_page_writes", "wal_buffers", "commit_delay",
        "synchronous_commit", "wal_writer_delay", "wal_writer_flush_after", "fsync",
    )  # fmt: skip
    with psycopg.connect(server.url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (list(names),),
        ).fetchall()
        settings = ", ".join(f"{name}={value}" for name, value in sorted(rows))
        conn.execute("ALTER SYSTEM SET track_wal_io_timing = on")  # as postgres_probe
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.2)
        conn.execute("CREATE TABLE IF NOT EXISTS probe_flush (x integer)")
        insert = "INSERT INTO probe_flush VALUES (1)"

        def flushes() -> tuple[float, float]:
            row = conn.execute("SELECT wal_sync, wal_sync_time FROM pg_stat_wal").fetchone()
            return float(row[0]), float(row[1])

        conn.execute(insert)
        conn.execute("SELECT pg_stat_force_next_flush()")  # publish, before and after
        syncs, sync_ms = flushes()
        durable = p50_us(lambda: conn.execute(insert), 500)
        conn.execute("SELECT pg_stat_force_next_flush()")
        syncs2, sync_ms2 = flushes()
        conn.execute("SET synchronous_commit = off")
        lazy = p50_us(lambda: conn.execute(insert), 500)
        conn.execute("DROP TABLE probe_flush")
    per_flush = (sync_ms2 - sync_ms) * 1000 / max(1.0, syncs2 - syncs)
    stat = os.statvfs(server.data)
    print(f"postgres server: {settings}; data directory {server.data} ({_filesystem(server.data)})")
    print(
        f"postgres floor p50: one-row INSERT {durable:.0f} us durable, {lazy:.0f} us with "
        f"synchronous_commit=off; one WAL flush {per_flush:.0f} us of server time "
        f"(this disk, now; {stat.f_bavail * stat.f_frsize >> 30} GiB free)"
    )


_MEAN = re.compile(r"latency average = ([\d.]+) ms")


def _pgbench_us(
    url: str, script: str, found_in: re.Pattern[str], *, what: str, per_statement: bool = False
) -> float | None:
    """µs: the mean latency (ms, the one group of ``found_in``) in the report of pgbench
    running ``script`` for 3 s in one session with prepared statements (and timing
    each statement: ``per_statement``). None, and pgbench's error printed, if it
    failed."""
    from bench.servers import PG_BIN

    timing = ["-r"] if per_statement else []
    out = subprocess.run(
        [str(PG_BIN / "pgbench"), "-n", "-M", "prepared", *timing, "-T", "3", "-f", script, url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = found_in.search(out.stdout)
    if found is None:
        print(f"{what}: pgbench failed: {out.stderr.strip()[-300:]}")
        return None
    return float(found.group(1)) * 1000


def postgres_c_client(server: PostgresServer) -> None:
    """The same pairs from a C client (pgbench, prepared statements, one session):
    the advisory pair, and leasehold's acquire() + release() SQL functions in both
    durabilities. What a client with no cost of its own would see, so the ratios
    here are the most the client side can approach. Beside them, the least any
    lease kept in a table costs: a one-row INSERT and a DELETE by primary key, each
    its own transaction, with and without waiting for the WAL flush (no fence, no
    lock, no queue)."""

    args = "'cprobe', 'token', 'o', 'h', 1, 30, 1, NULL, NULL, NULL"
    pairs = {
        "advisory pair": ["SELECT pg_advisory_lock(1);", "SELECT pg_advisory_unlock(1);"],
        "durable acquire()+release()": [
            f"SELECT * FROM leasehold.acquire({args});",
            "SELECT * FROM leasehold.release('cprobe', 'token');",
        ],
        "relaxed acquire_relaxed()+release_relaxed()": [
            f"SELECT * FROM leasehold_relaxed.acquire_relaxed({args});",
            "SELECT * FROM leasehold_relaxed.release_relaxed('cprobe', 'token');",
        ],
        "bare INSERT+DELETE durable": [
            "INSERT INTO cprobe_floor VALUES ('x', 'token');",
            "DELETE FROM cprobe_floor WHERE name = 'x';",
        ],
        "bare INSERT+DELETE synchronous_commit=off": [
            "\\startpipeline",
            "BEGIN;",
            "SELECT set_config('synchronous_commit', 'off', true);",
            "INSERT INTO cprobe_floor VALUES ('x', 'token');",
            "COMMIT;",
            "\\endpipeline",
            "\\startpipeline",
            "BEGIN;",
            "SELECT set_config('synchronous_commit', 'off', true);",
            "DELETE FROM cprobe_floor WHERE name = 'x';",
            "COMMIT;",
            "\\endpipeline",
        ],
    }
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS cprobe_floor (name text PRIMARY KEY, token text)")
    means: dict[str, list[float]] = {name: [] for name in pairs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):  # interleaved, medians
            for name, statements in pairs.items():
                script = f"{tmp}/pair.sql"
                with open(script, "w") as handle:
                    handle.write("\n".join(statements) + "\n")
                mean = _pgbench_us(server.url, script, _MEAN, what="postgres C client")
                if mean is None:
                    return
                means[name].append(mean)
    advisory = sorted(means["advisory pair"])[1]
    shown = ", ".join(
        f"{name} {sorted(values)[1]:.0f} us ({sorted(values)[1] / advisory:.2f}x)"
        for name, values in means.items()
    )
    print(f"postgres from a C client (pgbench, mean latency, median of 3): {shown}")


NOTIFY_OTHERS = 7  # the listeners of the other 7 processes at 8 processes


@contextlib.contextmanager
def _listening(url: str, channels: tuple[str, ...]) -> Iterator[None]:
    """One connection per channel, LISTENing on it, each read by a thread of its own
    (as a leasehold store's listener reads), for the duration."""
    import threading

    import psycopg

    stop = threading.Event()

    def drain(conn: Any) -> None:
        while not stop.is_set():
            for _ in conn.notifies(timeout=0.2):
                pass

    connections = [psycopg.connect(url, autocommit=True) for _ in channels]
    threads = []
    try:
        for conn, channel in zip(connections, channels, strict=True):
            conn.execute(f"LISTEN {channel}")
            threads.append(threading.Thread(target=drain, args=(conn,), daemon=True))
            threads[-1].start()
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        for conn in connections:
            conn.close()


def postgres_notify_fanout(server: PostgresServer) -> None:
    """What a release that hands the lock over costs in the server, against the
    number of LISTEN connections open in the database: the hand-over's NOTIFY goes
    to one waiter's channel, yet PostgreSQL (up to 18 at least) signals every
    backend that listens on any channel of the database, and the release's commit
    sends those signals. From pgbench (``-r``, per-statement mean latency), one
    session: a holder is granted, a second token queues (with the waiter's channel),
    the holder releases (the hand-over: that statement is reported), the new holder
    releases. Listeners: none (the NOTIFY finds nobody), the waiter's own, and the
    waiter's plus seven others on channels of their own, as at 8 processes (each
    leasehold process LISTENs on one channel of its own)."""
    import leasehold

    waiter = "cprobe_waiter"
    others = tuple(f"cprobe_other_{i}" for i in range(NOTIFY_OTHERS))
    setups = {
        "none": (),
        "the waiter's": (waiter,),
        f"the waiter's + {NOTIFY_OTHERS} others": (waiter, *others),
    }
    handover = re.compile(r"^\s+([\d.]+)\s+\d+\s+SELECT \* FROM \S+\('cnotify', 't1'\)", re.M)
    for relaxed in (False, True):
        schema, suffix = ("leasehold_relaxed", "_relaxed") if relaxed else ("leasehold", "")
        url = server.url + (f"?schema={schema}&durability=relaxed" if relaxed else "")
        client = leasehold.Client(url)
        client.lock("probe-notify-warm", ttl=30).acquire().release()  # the schema in place
        client.close()
        acquire, release = f"{schema}.acquire{suffix}", f"{schema}.release{suffix}"
        statements = [
            f"SELECT * FROM {acquire}('cnotify', 't1', 'o', 'h', 1, 30, 1, NULL, NULL, NULL);",
            f"SELECT * FROM {acquire}('cnotify', 't2', 'o', 'h', 1, 30, 1, 10, '{waiter}', 'k');",
            f"SELECT * FROM {release}('cnotify', 't1');",
            f"SELECT * FROM {release}('cnotify', 't2');",
        ]
        means: dict[str, list[float]] = {name: [] for name in setups}
        with tempfile.TemporaryDirectory() as tmp:
            script = f"{tmp}/handover.sql"
            with open(script, "w") as handle:
                handle.write("\n".join(statements) + "\n")
            for _ in range(3):  # interleaved, medians
                for name, channels in setups.items():
                    with _listening(server.url, channels):
                        mean = _pgbench_us(
                            server.url, script, handover, what="postgres NOTIFY", per_statement=True
                        )
                    if mean is None:
                        return
                    means[name].append(mean)
        medians = {name: sorted(values)[1] for name, values in means.items()}
        shown = ", ".join(
            f"{name} {us:.0f} us ({us - medians['none']:+.0f})" for name, us in medians.items()
        )
        print(
            f"postgres ({'relaxed' if relaxed else 'durable'}) the release that hands over, "
            "from a C client (pgbench, mean, median of 3), by the LISTEN connections in the "
            f"database: {shown}"
        )


def _filesystem(path: Any) -> str:
    """The mount (filesystem type and device) holding ``path``, from /proc/mounts."""
    import os

    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, point, kind = line.split()[:3]
                if str(path).startswith(point) and len(point) >= len(best[0]):
                    best = (point, kind, device)
    except OSError:
        return "unknown filesystem"
    return f"{best[1]} on {best[2]}, mounted at {best[0] or os.sep}"


def sqlite_probe(url: str) -> None:
    import leasehold

    client = leasehold.Client(url)
    pin = client.lock("probe-pin", ttl=60).acquire()
    lock = client.lock("probe", ttl=30)
    wall = p50_us(cycle(lock))
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(N):
        lock.acquire().release()
    profile.disable()
    pin.release()
    client.close()
    stats = pstats.Stats(profile).stats
    execute = "<method 'execute' of 'sqlite3.Connection' objects>"
    executes = sum(v[1] for k, v in stats.items() if k[2] == execute)
    print(
        f"sqlite  p50 {wall:.0f} us (keeper alive), {executes / N:.0f} sqlite3 execute() calls "
        "per acquire+release"
    )


def main(argv: list[str]) -> int:
    wanted = set(argv) or {"keeper", "redis", "postgres", "sqlite"}
    tmp = tempfile.mkdtemp(prefix="leasehold-probe-")
    redis_server = (
        RedisServer() if wanted & {"keeper", "redis", "redis-asyncio", "redis-pipeline"} else None
    )
    pg_server = (
        PostgresServer()
        if wanted & {"keeper", "postgres", "postgres-hops", "postgres-notify", "postgres-layers"}
        else None
    )
    try:
        urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/probe.db"}
        if redis_server:
            urls["redis"] = redis_server.url
        if pg_server:
            urls["postgres"] = pg_server.url
        if "keeper" in wanted:
            keeper(urls)
        if "redis" in wanted and redis_server:
            redis_probe(redis_server.url)
        if "redis-asyncio" in wanted and redis_server:
            redis_asyncio(redis_server.url)
        if "redis-instructions" in wanted:
            redis_instructions()
        if "redis-pipeline" in wanted and redis_server:
            print("\n".join(pipeline.measure(redis_server.url)))
        if "postgres-hops" in wanted and pg_server:
            for relaxed in (False, True):
                print("\n".join(hops.measure(pg_server, relaxed=relaxed)))
        if "postgres-layers" in wanted and pg_server:
            print("\n".join(layers.both(pg_server.url)))
        if "postgres-notify" in wanted and pg_server:
            postgres_notify_fanout(pg_server)
        if "postgres" in wanted and pg_server:
            postgres_floor(pg_server)
            postgres_probe(pg_server)
            postgres_probe(pg_server, relaxed=True)
            postgres_c_client(pg_server)
            postgres_contended(pg_server)
            postgres_contended(pg_server, relaxed=True)
        if "sqlite" in wanted:
            sqlite_probe(urls["sqlite"])
    finally:
        for server in (redis_server, pg_server):
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
