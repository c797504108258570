"""The Redis backend against real redis-server processes on random loopback ports.

Most tests share one module-wide server and use fresh names; tests that restart,
flush, pause or reconfigure a server start a private one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import traceback
import urllib.parse
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis import exceptions as redis_exceptions
from redis.crc import key_slot

from leasehold._async.backends.redis import layout as redis_layout
from leasehold._async.backends.redis import options as redis_options
from leasehold._async.backends.redis import scripts as redis_scripts
from leasehold._async.backends.redis import store as async_redis
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.records import (
    MAX_RECORD_BYTES,
    AcquireRequest,
    Busy,
    Granted,
    HandedOver,
    Holder,
    RenewItem,
)
from leasehold._core.url import parse
from leasehold._errors import InvalidArgument, StoreUnavailable
from leasehold._sync.backends.redis import store as sync_redis
from tests.conftest import unavailable
from tests.servers.redis import RedisServer, make_tls_files, openssl_binary, redis_server_binary

T = TypeVar("T")
HOLDER = Holder(owner="tester:ünï", host="test-host", pid=4242)


def need_redis() -> None:
    if redis_server_binary() is None:
        unavailable("redis-server is not installed (apt-get install redis-server)")


def need_openssl() -> None:
    if openssl_binary() is None:
        unavailable("the openssl command line tool is needed to make test certificates")


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    need_redis()
    with RedisServer() as shared:
        yield shared


@pytest.fixture
def private() -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (restarts, flushes, special configs); stopped afterwards."""
    need_redis()
    started: list[RedisServer] = []

    def start(**kwargs: Any) -> RedisServer:
        instance = RedisServer(**kwargs)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.cleanup()


def name(stem: str = "n") -> str:
    return f"{stem}:{uuid.uuid4().hex[:10]}"


def req(
    lease: str, token: str, ttl: float = 10.0, limit: int = 1, queue_ttl: float | None = None
) -> AcquireRequest:
    return AcquireRequest(
        name=lease, token=token, holder=HOLDER, ttl=ttl, limit=limit, queue_ttl=queue_ttl
    )


def with_store(url: str, fn: Callable[[async_redis.AsyncRedisStore], Awaitable[T]]) -> T:
    """Run ``fn(store)`` on a fresh async store in a fresh event loop, then close it."""

    async def main() -> T:
        store = async_redis.from_url(parse(url), SYSTEM_CLOCK)
        try:
            return await fn(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


def sync_store(url: str) -> sync_redis.RedisStore:
    return sync_redis.from_url(parse(url), SYSTEM_CLOCK)


def fence_of(result: object) -> int:
    assert isinstance(result, Granted), result
    return result.fence


def script_calls(admin: Any) -> int:
    """Script calls the server ran: as functions (FCALL) or as scripts (EVALSHA)."""
    stats = admin.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("fcall", "evalsha"))


# ----------------------------------------------------------------- URL and options


def options(url: str) -> redis_options.RedisOptions:
    return redis_options.parse_options(parse(url))


def test_url_forms() -> None:
    plain = options("redis://cache.internal:6380/3")
    assert (plain.host, plain.port, plain.db, plain.tls) == ("cache.internal", 6380, 3, False)
    assert plain.prefix == "leasehold:" and plain.unix_path is None
    assert options("redis://").host == "localhost" and options("redis://").port == 6379
    assert options("redis://h?db=5").db == 5
    assert options("redis://h/5?db=5").db == 5
    acl = options("redis://worker:p%40ss%3Aw0rd@h/0")
    assert (acl.username, acl.password) == ("worker", "p@ss:w0rd")
    assert options("redis://:onlypass@h").username is None
    assert options("redis://h?username=u&password=p").password == "p"
    unix = options("unix:///run/redis/redis.sock?db=2&prefix=app:")
    assert (unix.unix_path, unix.db, unix.prefix) == ("/run/redis/redis.sock", 2, "app:")
    assert options("unix://:pw@/tmp/r.sock").password == "pw"
    tls = options("rediss://h:6390?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional")
    assert tls.tls and tls.ssl_ca_certs == "/ca.pem" and not tls.ssl_check_hostname
    assert options("rediss://h").ssl_check_hostname
    timed = options("redis://h?socket_timeout=0.5&socket_connect_timeout=2&max_connections=4")
    assert (timed.socket_timeout, timed.socket_connect_timeout) == (0.5, 2.0)
    assert timed.max_connections == 4
    ipv6 = options("redis://[::1]:7000")
    assert (ipv6.host, ipv6.port) == ("::1", 7000)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://h/abc", "database number"),
        ("redis://h/1?db=2", "db=2"),
        ("redis://h:99999", "port"),
        ("redis://h?bogus=1", "unknown option 'bogus'"),
        ("redis://h?db=1&db=1", "twice"),
        ("redis://h?socket_timeout=-1", "socket_timeout"),
        ("redis://h?socket_timeout=nan", "socket_timeout"),
        ("redis://h?socket_timeout=soon", "socket_timeout"),
        ("redis://h?max_connections=0", "max_connections"),
        ("redis://h?prefix=a{b}", "prefix"),
        ("redis://h?prefix=", "prefix"),
        ("redis://h?client_name=two%20words", "client_name"),
        ("redis://h?ssl_ca_certs=/ca.pem", "rediss://"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("rediss://h?ssl_cert_reqs=none&ssl_check_hostname=true", "ssl_check_hostname"),
        ("unix://somehost/tmp/r.sock", "three slashes"),
        ("unix://", "socket path"),
        ("redis://u:pw@h?password=other", "password is given both"),
    ],
)
def test_bad_urls_fail_before_io(url: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        async_redis.from_url(parse(url), SYSTEM_CLOCK)
    assert fragment in str(caught.value)
    assert "pw@" not in str(caught.value)


def test_construction_does_no_io() -> None:
    # Port 1 on loopback: nothing listens. Building (async and sync) must not notice.
    url = "redis://user:hunter2@127.0.0.1:1/0"
    store = async_redis.from_url(parse(url), SYSTEM_CLOCK)
    twin = sync_store(url)
    assert store._connections is None and twin._connections is None
    assert "hunter2" not in repr(store) and "hunter2" not in repr(twin)
    assert "hunter2" not in repr(store.options)
    assert repr(twin).startswith("RedisStore(")
    twin.close()


def test_unreachable_server_is_storeunavailable() -> None:
    url = "redis://user:hunter2@127.0.0.1:1/0?socket_connect_timeout=1"
    with pytest.raises(StoreUnavailable) as caught:
        with_store(url, lambda store: store.ping())
    text = "".join(traceback.format_exception(caught.value))
    assert "hunter2" not in text
    assert "redis://user:***@127.0.0.1:1/0" in str(caught.value)
    assert caught.value.__cause__ is None


def test_closed_store_refuses_calls() -> None:
    store = sync_store("redis://127.0.0.1:1/0")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreUnavailable, match="closed"):
        store.ping()


def test_a_call_that_outlives_close_leaves_no_connection_open(server: RedisServer) -> None:
    """A call that took the store's connections just before another thread closed
    the store (a background clean-up, a keeper's last renewal) and reaches Redis
    only after the pools were disconnected makes a connection anew; the call must
    close it, or its socket stays open until the garbage collector finds it (a
    ResourceWarning, the file descriptor and the server's client slot held until
    then). Counted on the server: its clients besides the counting one."""
    admin = server.client()

    def others() -> int:
        return len(admin.client_list()) - 1

    def settled(expected: int) -> int:
        # The server notices a closed socket on its next event-loop turn.
        deadline = time.monotonic() + 5
        while others() != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return others()

    store = sync_store(server.url)
    try:
        assert settled(0) == 0
        store.ping()
        assert settled(1) == 1  # the connection the ping used
        connections = store._connect()  # taken by the call in flight
        store.close()
        assert settled(0) == 0  # close() closed what the store had
        # The call goes on, on the pools close() disconnected: a script call, a
        # blocking wait, a plain command. Control: each is answered (the call
        # really reached Redis on a new connection).
        assert store._call(connections, ("PING",)) in (b"PONG", "PONG", True)
        assert store._call(connections, ("BLPOP", name("nothing"), "0.01"), blocking=True) is None
        assert store._execute(connections.commands, "PING")
        assert settled(0) == 0, admin.client_list()
    finally:
        store.close()
        admin.close()


# Busy for 0.6 s on the server's clock, then answers 1: a call still in flight when
# an earlier operation's 0.3 s deadline passes.
_SLOW_SCRIPT = (
    "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 "
    "while true do local u = redis.call('TIME') "
    "if u[1] + u[2] / 1e6 - s > 0.6 then return 1 end end"
)


def test_a_connection_given_back_is_not_shut_by_the_deadline_it_served(
    server: RedisServer,
) -> None:
    """One operation makes a call and goes on within its deadline (wait() polls with
    LPOP, then sleeps); the connection it gave back (the spare the next call takes
    first) serves another operation when that deadline passes, and must not be shut
    down under it. Control: before script calls detached their socket, the second
    call failed with a connection error. Sync (threads) and asyncio (tasks)."""
    from leasehold import _deadline

    store = sync_store(server.url)
    try:
        connections = store._connect()
        store._call(connections, ("PING",))  # one connection, kept as the spare
        given_back = threading.Event()
        answers: list[object] = []

        def first() -> None:
            with _deadline.bounded(0.3):
                store._call(connections, ("LPOP", name("signal")))
                given_back.set()
                time.sleep(0.8)  # still inside the operation when its deadline passes

        def second() -> None:
            given_back.wait(5)
            try:
                with _deadline.bounded(5.0):
                    answers.append(store._call(connections, ("EVAL", _SLOW_SCRIPT, 0)))
            except Exception as exc:  # the failure this test looks for
                answers.append(exc)

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert answers == [1]
    finally:
        store.close()

    async def tasks(store: async_redis.AsyncRedisStore) -> list[object]:
        connections = store._connect()
        await store._call(connections, ("PING",))
        given_back = asyncio.Event()
        answers: list[object] = []

        async def first() -> None:
            with _deadline.bounded(0.3):
                await store._call(connections, ("LPOP", name("signal")))
                given_back.set()
                await asyncio.sleep(0.8)

        async def second() -> None:
            await asyncio.wait_for(given_back.wait(), 5)
            try:
                with _deadline.bounded(5.0):
                    answers.append(await store._call(connections, ("EVAL", _SLOW_SCRIPT, 0)))
            except Exception as exc:
                answers.append(exc)

        await asyncio.wait_for(asyncio.gather(first(), second()), 10)
        return answers

    assert with_store(server.url, tasks) == [1]


# -------------------------------------------------------------------- key layout


def test_key_layout_keeps_a_name_in_one_slot() -> None:
    layout = redis_layout.KeyLayout("leasehold:")
    for lease in ["jobs/nightly", "a{b}c", "{", "}", "{}", "x:y:z", "ünïcödé", "a" * 512]:
        keys = layout.for_name(lease)
        everything = [*keys.script_keys(), keys.signal("tok:en")]
        slots = {key_slot(key.encode()) for key in everything}
        assert len(slots) == 1, (lease, everything)
        bucket = layout.bucket(lease)
        assert keys.state == f"leasehold:{{{bucket}}}:n:{lease}"
        assert keys.floor == f"leasehold:{{{bucket}}}:fence"
        assert keys.index in layout.indexes()


def test_key_layout_is_stable_and_spread() -> None:
    layout = redis_layout.KeyLayout("p:")
    # Stable across processes and versions: pinned values (CRC-32 of the UTF-8 name).
    assert layout.for_name("jobs/nightly").state == "p:{891}:n:jobs/nightly"
    assert layout.bucket("a{b}c") == layout.bucket("a{b}c")
    buckets = {layout.bucket(f"name-{i}") for i in range(5000)}
    assert len(buckets) > 0.95 * redis_layout.BUCKETS
    assert len(layout.indexes()) == redis_layout.BUCKETS
    assert len({key_slot(index.encode()) for index in layout.indexes()}) > 900


def test_signal_keys_are_unambiguous() -> None:
    layout = redis_layout.KeyLayout()
    one = layout.for_name("a:b").signal("c")
    two = layout.for_name("a").signal("b:c")
    assert one != two


def test_scripts_start_with_a_contract() -> None:
    from importlib import resources

    folder = resources.files("leasehold") / "_shared" / "redis"
    for script_name in ("acquire", "renew", "release", "holders", "leases", "break"):
        text = (folder / f"{script_name}.lua").read_text(encoding="utf-8")
        header = text.split("\n\n", 1)[0]
        assert header.startswith(f"-- {script_name}.lua: "), script_name
        for part in ("KEYS", "ARGV", "Returns"):
            assert part in text.split("\nlocal ", 1)[0], (script_name, part)


def test_scripts_write_microsecond_times_and_fences_exactly(server: RedisServer) -> None:
    """fmt() (the prelude) writes every integral value below 2^53 digit for digit;
    the control shows what Lua's own number-to-text conversion would write."""
    from importlib import resources

    prelude = (resources.files("leasehold") / "_shared" / "redis" / "_prelude.lua").read_text(
        encoding="utf-8"
    )
    values = [0, 1, 1_765_012_345_678_901, 2**53 - 1]
    probe = "return {" + ", ".join(f"fmt({v})" for v in values) + ", tostring(ARGV[1] + 0)}"
    admin = server.client()
    try:
        *written, plain = admin.eval(f"{prelude}\n{probe}", 0, str(values[2]))
    finally:
        admin.close()
    assert [int(text) for text in written] == values
    assert written == [str(v) for v in values]
    assert plain != str(values[2])  # the control: 1.7650123456789e+15


# ---------------------------------------------------------- the contract, directly


def test_grant_busy_and_fences(server: RedisServer) -> None:
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        first = fence_of(await store.acquire(req(lease, "t1")))
        # A retried acquire (its answer was lost) gets the same grant back.
        assert fence_of(await store.acquire(req(lease, "t1"))) == first
        busy = await store.acquire(req(lease, "t2"))
        assert isinstance(busy, Busy) and busy.position is None
        assert busy.retry_after is not None and 9 < busy.retry_after <= 10
        assert await store.release(lease, "t1")
        assert not await store.release(lease, "t1")  # idempotent
        second = fence_of(await store.acquire(req(lease, "t2")))
        assert second > first
        [info] = await store.holders(lease)
        assert (info.name, info.owner, info.host, info.pid) == (
            lease,
            HOLDER.owner,
            HOLDER.host,
            HOLDER.pid,
        )
        assert info.fence == second and info.limit == 1
        assert 0 <= info.held_for < 2 and 8 < info.expires_in <= 10

    with_store(server.url, scenario)


def test_fence_floor_wins_over_a_clock_that_stepped_back(server: RedisServer) -> None:
    lease = name()
    keys = redis_layout.KeyLayout().for_name(lease)
    future = (int(time.time()) + 10 * 365 * 86400) * 1_000_000
    admin = server.client()
    try:
        # As if fences had been issued by a clock ten years ahead, now corrected.
        admin.set(keys.floor, str(future))
        fence = with_store(server.url, lambda store: store.acquire(req(lease, "t")))
        assert fence_of(fence) == future + 1
    finally:
        admin.delete(keys.floor)
        admin.close()


def test_expiry_on_the_server_clock(server: RedisServer) -> None:
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        first = fence_of(await store.acquire(req(lease, "t1", ttl=0.2)))
        assert isinstance(await store.acquire(req(lease, "t2")), Busy)
        await asyncio.sleep(0.3)
        assert await store.renew([RenewItem(lease, "t1", 10)]) == [False]
        assert await store.holders(lease) == []
        assert fence_of(await store.acquire(req(lease, "t2"))) > first
        assert not await store.release(lease, "t1")

    with_store(server.url, scenario)


def test_limit_and_fifo_queue(server: RedisServer) -> None:
    lease = name("sem")

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        fences = [fence_of(await store.acquire(req(lease, f"h{i}", limit=3))) for i in range(3)]
        assert fences == sorted(set(fences))
        positions = []
        for token in ("w1", "w2", "w3"):
            busy = await store.acquire(req(lease, token, limit=3, queue_ttl=10))
            assert isinstance(busy, Busy)
            positions.append(busy.position)
        assert positions == [0, 1, 2]
        # Asking again keeps the place; a caller that does not queue is behind everyone.
        again = await store.acquire(req(lease, "w2", limit=3, queue_ttl=10))
        assert isinstance(again, Busy) and again.position == 1
        assert await store.release(lease, "h0")
        # One place is free, and it belongs to the head of the queue.
        outsider = await store.acquire(req(lease, "x", limit=3))
        assert isinstance(outsider, Busy) and outsider.position is None
        # The release handed that place to w1 (it left the queue), so w2 is next.
        late = await store.acquire(req(lease, "w2", limit=3, queue_ttl=10))
        assert isinstance(late, Busy) and late.position == 0
        assert fence_of(await store.acquire(req(lease, "w1", limit=3, queue_ttl=10))) > max(fences)
        third = await store.acquire(req(lease, "w3", limit=3, queue_ttl=10))
        assert isinstance(third, Busy) and third.position == 1
        assert len(await store.holders(lease)) == 3

    with_store(server.url, scenario)


def test_release_wakes_the_head_waiter_only(server: RedisServer) -> None:
    lease = name("lock")
    keys = redis_layout.KeyLayout().for_name(lease)
    admin = server.client()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder"))
        for token in ("a", "b", "c"):
            assert isinstance(await store.acquire(req(lease, token, queue_ttl=10)), Busy)
        assert not any(admin.exists(keys.signal(t)) for t in "abc")
        assert await store.release(lease, "holder")
        assert [admin.exists(keys.signal(t)) for t in "abc"] == [1, 0, 0]
        assert not await store.wait(lease, "b", 0.05)
        handed = await store.wait(lease, "a", 1)
        assert isinstance(handed, HandedOver)
        assert fence_of(await store.acquire(req(lease, "a", queue_ttl=10))) == handed.fence
        # The place passes on to the next waiter when the holder leaves.
        assert await store.release(lease, "a")
        assert [admin.exists(keys.signal(t)) for t in "bc"] == [1, 0]
        # b was handed the place without collecting it: still a holder, and its
        # release passes the place on to c.
        assert await store.release(lease, "b")
        assert admin.exists(keys.signal("b")) == 0
        assert admin.exists(keys.signal("c")) == 1

    try:
        with_store(server.url, scenario)
    finally:
        admin.close()


def test_a_signal_sent_before_wait_is_not_missed(server: RedisServer) -> None:
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder"))
        assert isinstance(await store.acquire(req(lease, "waiter", queue_ttl=10)), Busy)
        await store.release(lease, "holder")
        await asyncio.sleep(0.1)  # the wake-up is sent long before wait() is called
        started = time.monotonic()
        assert await store.wait(lease, "waiter", 5)
        assert time.monotonic() - started < 1
        # Consumed: a second wait times out (spurious wake-ups are allowed, but the
        # signal list holds at most one element).
        assert not await store.wait(lease, "waiter", 0.05)

    with_store(server.url, scenario)


def test_wait_is_woken_promptly_and_times_out_on_time(server: RedisServer) -> None:
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder"))
        await store.acquire(req(lease, "waiter", queue_ttl=10))
        for timeout in (0.0, 0.05, 0.3):
            started = time.monotonic()
            assert not await store.wait(lease, "waiter", timeout)
            assert timeout <= time.monotonic() - started + 0.005 < timeout + 0.08

        async def release_soon() -> None:
            await asyncio.sleep(0.2)
            await store.release(lease, "holder")

        started = time.monotonic()
        releaser = asyncio.create_task(release_soon())
        assert await store.wait(lease, "waiter", 5)
        assert time.monotonic() - started < 0.5
        await releaser

    with_store(server.url, scenario)


def test_expired_waiter_does_not_block_the_queue(server: RedisServer) -> None:
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder"))
        await store.acquire(req(lease, "gone", queue_ttl=0.2))
        busy = await store.acquire(req(lease, "next", queue_ttl=10))
        assert isinstance(busy, Busy) and busy.position == 1
        await store.release(lease, "holder")
        await asyncio.sleep(0.3)  # "gone" never comes back for its turn
        fence_of(await store.acquire(req(lease, "next", queue_ttl=10)))

    with_store(server.url, scenario)


def test_semaphore_release_wakes_as_many_as_places(server: RedisServer) -> None:
    lease = name("sem")
    keys = redis_layout.KeyLayout().for_name(lease)
    admin = server.client()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for token in ("h1", "h2"):
            await store.acquire(req(lease, token, limit=2))
        for token in ("a", "b", "c"):
            await store.acquire(req(lease, token, limit=2, queue_ttl=10))
        assert await store.break_lease(lease) == 2
        # Both places are handed over at once: a and b are signalled, c is not.
        assert [admin.exists(keys.signal(t)) for t in "abc"] == [1, 1, 0]
        # "a" confirms its place (its signal goes); "b" keeps its one signal.
        fence_of(await store.acquire(req(lease, "a", limit=2, queue_ttl=10)))
        assert admin.llen(keys.signal("b")) == 1
        assert admin.exists(keys.signal("c")) == 0

    try:
        with_store(server.url, scenario)
    finally:
        admin.close()


def test_a_head_granted_on_its_own_call_hands_the_next_waiter_its_place(
    server: RedisServer,
) -> None:
    """A waiter at the head whose new, larger limit gives it a place on its own call
    leaves the next waiter at the head; if that one has a place too, the same call
    hands it over (acquire.lua otherwise looks at the head only when holders or
    waiters expired)."""
    lease = name("sem")
    keys = redis_layout.KeyLayout().for_name(lease)
    admin = server.client()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for token in ("h1", "h2", "h3"):
            fence_of(await store.acquire(req(lease, token, limit=3)))
        assert isinstance(await store.acquire(req(lease, "w1", limit=1, queue_ttl=10)), Busy)
        assert isinstance(await store.acquire(req(lease, "w2", limit=4, queue_ttl=10)), Busy)
        # Two holders left: w2 (limit 4) would have a place, but waits behind w1 (FIFO).
        assert await store.release(lease, "h1")
        assert admin.exists(keys.signal("w1"), keys.signal("w2")) == 0
        # w1 asks again with limit 4: it holds, and w2, now first, is handed a place.
        fence_of(await store.acquire(req(lease, "w1", limit=4, queue_ttl=10)))
        handed = await store.wait(lease, "w2", 0.5)
        assert isinstance(handed, HandedOver), handed
        assert admin.zcard(keys.queue) == 0

    try:
        with_store(server.url, scenario)
    finally:
        admin.close()


def test_hand_overs_skip_index_updates_and_a_name_released_is_listed_again(
    private: Callable[..., RedisServer],
) -> None:
    """Hand-overs run fewer commands than the general path: the name index is
    updated only when the time it covers runs short (a mark in the name's
    state), the queue keys' TTLs only when they do not cover a new place, and the
    queue's head is read once. The mark goes with the name's state: once the last
    holder releases (and the name leaves the index), the next grant lists it again."""
    server = private()  # its own command counts
    lease = name("marks")
    keys = redis_layout.KeyLayout().for_name(lease)
    admin = server.client()

    def commands() -> dict[str, int]:
        stats = admin.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        holder = "t0"
        fence_of(await store.acquire(req(lease, holder)))
        waiting = [f"t{i}" for i in range(1, 5)]
        for token in waiting:
            assert isinstance(await store.acquire(req(lease, token, queue_ttl=10)), Busy)
        serial = 5
        for cycle in range(6):
            if cycle == 1:
                before = commands()
            assert await store.release(lease, holder)
            holder = waiting.pop(0)
            assert isinstance(await store.wait(lease, holder, 1), HandedOver)
            token = f"t{serial}"
            serial += 1
            assert isinstance(await store.acquire(req(lease, token, queue_ttl=10)), Busy)
            waiting.append(token)
        after = commands()
        spent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        # Five hand-overs (release, BLPOP, queueing acquire): no index or queue TTL
        # command, no look at the head by an acquire.
        assert spent.get("pexpire", 0) == 5, spent  # the signal list of each hand-over
        assert "zrank" not in spent and "hget" not in spent, spent
        assert spent["hmget"] == 5 and spent["pttl"] == 5, spent
        assert admin.zscore(keys.index, lease) is not None
        # Everyone leaves: the state (and its mark) gone, the name still listed until
        # its score passes but not reported; a new grant finds it listed.
        for token in waiting:
            await store.release(lease, token)
        assert await store.release(lease, holder)
        assert admin.exists(keys.state) == 0 and admin.zscore(keys.index, lease) is not None
        assert await store.leases(lease) == []
        fence_of(await store.acquire(req(lease, "again")))
        assert admin.zscore(keys.index, lease) is not None
        assert [info.name for info in await store.leases(lease)] == [lease]

    try:
        with_store(server.url, scenario)
    finally:
        admin.close()


def _same_bucket(stem: str) -> tuple[str, str]:
    """Two names whose keys share one bucket (so one name index)."""
    first = name(stem)
    bucket = redis_layout.KeyLayout.bucket(first)
    for i in range(100_000):  # bounded: a bucket is 1 in 1,024
        other = f"{first}/{i}"
        if redis_layout.KeyLayout.bucket(other) == bucket:
            return first, other
    raise AssertionError("no second name in the bucket")


@pytest.mark.parametrize("unlist", [False, True], ids=["as-is", "control-unlisted"])
def test_a_name_released_and_taken_again_costs_no_index_sweep(
    private: Callable[..., RedisServer], unlist: bool
) -> None:
    """In a bucket whose index lists another held name, each acquire + release of
    a name costs one ZSCORE of the index: release leaves the name listed, and the
    next grant, finding it listed for long enough, neither lists it anew nor sweeps
    nor raises its score. The control unlists the name after each release (as
    release once did), and the counter sees the ZADD, the sweep and the two
    PEXPIREs of every grant that follows (the first one finds the name listed by
    the warm-up grant)."""
    server = private()
    held, cycled = _same_bucket("bucket")
    keys = redis_layout.KeyLayout().for_name(cycled)
    admin = server.client()

    def commands() -> dict[str, int]:
        stats = admin.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    async def scenario(store: async_redis.AsyncRedisStore) -> dict[str, int]:
        fence_of(await store.acquire(req(held, "h", ttl=60)))
        fence_of(await store.acquire(req(cycled, "warm")))
        assert await store.release(cycled, "warm")
        before = commands()
        for cycle in range(5):
            fence_of(await store.acquire(req(cycled, f"t{cycle}")))
            assert await store.release(cycled, f"t{cycle}")
            if unlist:
                admin.zrem(keys.index, cycled)
        after = commands()
        assert [i.name for i in await store.leases(held.split(":")[0])] == [held]
        return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}

    try:
        spent = with_store(server.url, scenario)
    finally:
        admin.close()
    print(f"\nunlist={unlist}: {spent}")
    assert spent["zscore"] == 5, spent
    if unlist:
        assert spent["zadd"] == 4 and spent["pexpire"] == 8, spent
        assert spent["zremrangebyscore"] == 4, spent
    else:
        assert not {"zadd", "pexpire", "zremrangebyscore", "zrem"} & set(spent), spent


def test_break_lease(server: RedisServer) -> None:
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        broken = fence_of(await store.acquire(req(lease, "t1")))
        await store.acquire(req(lease, "w", queue_ttl=10))
        assert await store.break_lease(lease) == 1
        assert await store.renew([RenewItem(lease, "t1", 10)]) == [False]
        # The place went to the waiter, with a fence above the broken one.
        handed = await store.wait(lease, "w", 1)
        assert isinstance(handed, HandedOver) and handed.fence > broken
        assert await store.break_lease(lease) == 1
        assert await store.break_lease(lease) == 0
        assert fence_of(await store.acquire(req(lease, "w", queue_ttl=10))) > handed.fence

    with_store(server.url, scenario)


def test_renew_ten_thousand_items_in_one_call(server: RedisServer) -> None:
    stem = name("batch")
    names = [f"{stem}/{i}" for i in range(10_000)]
    admin = server.client()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            results = await asyncio.gather(*(store.acquire(req(n, "tok", ttl=60)) for n in chunk))
            assert all(isinstance(r, Granted) for r in results)
        items = [RenewItem(n, "tok", 30) for n in names]
        items[17] = RenewItem(names[17], "not-the-holder", 30)
        await store.renew(items[:1])  # the first call per server loads the script
        before = script_calls(admin)
        answers = await store.renew(items)
        # One round trip: scripts of RENEW_CHUNK items each, pipelined.
        assert script_calls(admin) - before == len(items) // async_redis.RENEW_CHUNK
        assert answers.count(True) == 9_999 and answers[17] is False
        infos = await store.holders(names[5000])
        assert infos[0].expires_in > 25
        assert await store.renew([]) == []
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            await asyncio.gather(*(store.release(n, "tok") for n in chunk))

    try:
        with_store(server.url, scenario)
    finally:
        admin.close()


def test_leases_by_prefix(server: RedisServer) -> None:
    stem = name("ls")
    names = [f"{stem}/a", f"{stem}/b{{x}}", f"{stem}/c:ü", f"{stem}x"]

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for lease in names:
            await store.acquire(req(lease, "t1", limit=2))
        await store.acquire(req(names[0], "t2", limit=2))
        await store.acquire(req(f"{stem}/gone", "t", ttl=0.05))
        await asyncio.sleep(0.1)
        found = await store.leases(f"{stem}/")
        assert [info.name for info in found] == [names[0], names[0], names[1], names[2]]
        assert found[0].fence < found[1].fence
        everything = [info.name for info in await store.leases()]
        assert set(names) <= set(everything)
        assert await store.leases(f"{stem}/zzz") == []

    with_store(server.url, scenario)


def test_cancelled_wait_leaves_the_store_usable(server: RedisServer) -> None:
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder"))
        await store.acquire(req(lease, "waiter", queue_ttl=10))
        waiting = asyncio.create_task(store.wait(lease, "waiter", 5))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await store.release(lease, "holder")
        assert await store.wait(lease, "waiter", 1)
        fence_of(await store.acquire(req(lease, "waiter", queue_ttl=10)))

    with_store(server.url, scenario)


def test_waiters_beyond_the_blocking_pool_still_wake(server: RedisServer) -> None:
    lease = name("sem")
    url = server.url + "?max_blocking_connections=1"

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder", limit=1))
        for token in ("a", "b"):
            await store.acquire(req(lease, token, limit=1, queue_ttl=10))

        async def hand_over() -> None:
            await asyncio.sleep(0.2)
            await store.release(lease, "holder")
            await asyncio.sleep(0.2)
            await store.release(lease, "a")

        helper = asyncio.create_task(hand_over())
        woken = await asyncio.gather(store.wait(lease, "a", 3), store.wait(lease, "b", 3))
        assert [isinstance(result, HandedOver) for result in woken] == [True, True]
        await helper

    with_store(url, scenario)


def test_unusual_names_and_owners(server: RedisServer) -> None:
    odd = [f"{name()}{suffix}" for suffix in ["{", "}", "{x}", " sp ace", "ü€😀", "%s", "\\"]]

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        holder = Holder(owner='quote " and space', host="h ost", pid=1)
        for lease in odd:
            request = AcquireRequest(name=lease, token="t k", holder=holder, ttl=5)
            fence_of(await store.acquire(request))
            [info] = await store.holders(lease)
            assert (info.owner, info.host) == (holder.owner, holder.host)
            assert await store.release(lease, "t k")

    with_store(server.url, scenario)


def test_memory_does_not_grow_with_distinct_names(private: Callable[..., RedisServer]) -> None:
    instance = private()
    admin = instance.client()

    async def churn(store: async_redis.AsyncRedisStore, stem: str, release: bool) -> None:
        names = [f"{stem}/{i}" for i in range(5000)]
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            await asyncio.gather(*(store.acquire(req(n, "tok", ttl=0.3)) for n in chunk))
            await asyncio.gather(
                *(store.acquire(req(n, "w", ttl=0.3, queue_ttl=0.3)) for n in chunk)
            )
            if release:
                await asyncio.gather(*(store.release(n, "tok") for n in chunk))
                await asyncio.gather(*(store.release(n, "w") for n in chunk))

    def leftover(kept: tuple[str, ...] = (":fence",)) -> tuple[int, list[str]]:
        keys = list(admin.scan_iter("*", count=1000))  # SCAN skips expired keys
        return len(keys), [key for key in keys if not key.endswith(kept)]

    def settled() -> tuple[int, list[str]]:
        # Released names stay listed in their bucket's index until their scores
        # pass (see release.lua): the index keys expire a little after that.
        deadline = time.monotonic() + 10
        while leftover()[1] and time.monotonic() < deadline:  # bounded: 10 s
            time.sleep(0.2)
        return leftover()

    try:
        with_store(instance.url, lambda store: churn(store, "first", release=True))
        # Every key of a released name goes at once; only per-bucket keys stay.
        assert leftover((":fence", ":index"))[1] == []
        total, per_name = settled()
        assert per_name == []
        # What stays is one fence floor per bucket: bounded, whatever the names.
        assert total <= redis_layout.BUCKETS
        with_store(instance.url, lambda store: churn(store, "second", release=True))
        assert settled()[0] <= redis_layout.BUCKETS
        # Holders and waiters that vanish without releasing expire with their keys.
        with_store(instance.url, lambda store: churn(store, "crashed", release=False))
        deadline = time.monotonic() + 10
        while leftover()[1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftover()[1] == []
        assert leftover()[0] <= redis_layout.BUCKETS
    finally:
        admin.close()


def test_cancellation_during_a_command_is_never_lost(server: RedisServer) -> None:
    # redis-py sends through asyncio.wait_for, which on Python 3.11 can drop a
    # cancellation that lands as the send completes; the store raises it again.
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder"))
        for attempt in range(300):
            task = asyncio.ensure_future(store.acquire(req(lease, f"w{attempt}")))
            await asyncio.sleep((0, 0.0001, 0.0003)[attempt % 3])
            if task.cancel():
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await task

    with_store(server.url, scenario)


def test_records_hold_any_bytes_and_never_reuse_versions(
    private: Callable[..., RedisServer],
) -> None:
    instance = private()
    admin = instance.client()
    key = "config/one"
    value = bytes(range(256)) + b"\xff\xfe\xc3("  # not UTF-8

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        absent = await store.read_record(key)
        assert (absent.value, absent.version) == (None, 0)
        assert abs(absent.now - time.time()) < 5  # server clock, in seconds
        v1 = await store.write_record(key, 0, value)
        assert v1 is not None
        assert (await store.read_record(key)).value == value
        assert await store.write_record(key, 0, b"lost race") is None
        # Records and leases are separate namespaces.
        fence_of(await store.acquire(req(key, "t")))
        assert (await store.read_record(key)).value == value
        # Versions keep increasing across deletion, FLUSHALL and a restart.
        deleted = await store.write_record(key, v1, None)
        assert deleted is not None and deleted > v1
        v2 = await store.write_record(key, 0, b"again")
        assert v2 is not None and v2 > deleted
        admin.flushall()
        v3 = await store.write_record(key, 0, b"after flush")
        assert v3 is not None and v3 > v2
        await asyncio.to_thread(instance.restart)
        v4 = await store.write_record(key, 0, b"after restart", ttl=0.2)
        assert v4 is not None and v4 > v3
        await asyncio.sleep(0.3)
        assert (await store.read_record(key)).version == 0
        with pytest.raises(InvalidArgument):
            await store.write_record(key, 0, b"x" * (MAX_RECORD_BYTES + 1))
        big = os.urandom(MAX_RECORD_BYTES)
        v5 = await store.write_record(key, 0, big)
        assert (await store.read_record(key)).value == big
        assert await store.write_record(key, v5 or 0, None) is not None

    try:
        with_store(instance.url, scenario)
    finally:
        admin.close()


def test_release_hands_the_place_to_the_head_waiter(server: RedisServer) -> None:
    lease = name("handover")

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        first = fence_of(await store.acquire(req(lease, "holder")))
        assert isinstance(await store.acquire(req(lease, "w1", queue_ttl=0.5)), Busy)
        assert isinstance(await store.acquire(req(lease, "w2", queue_ttl=10)), Busy)
        assert await store.release(lease, "holder")
        # w1 holds at once: nobody can slip in, and it can renew without confirming.
        [handed] = await store.holders(lease)
        assert handed.fence > first
        assert handed.expires_in <= 0.5  # on its queue place until renewed
        assert isinstance(await store.acquire(req(lease, "outsider")), Busy)
        assert await store.wait(lease, "w1", 1) == HandedOver(handed.fence)
        assert await store.renew([RenewItem(lease, "w1", 10)]) == [True]
        # A late acquire (its wake-up lost) confirms and keeps the handed fence.
        assert fence_of(await store.acquire(req(lease, "w1", queue_ttl=0.5))) == handed.fence
        assert await store.release(lease, "w1")
        # w2 is handed the place next and, a full holder, releases it uncollected.
        [uncollected] = await store.holders(lease)
        assert uncollected.expires_in <= 10
        assert await store.release(lease, "w2")
        assert await store.holders(lease) == []
        assert await store.wait(lease, "w2", 0.05) is False  # its signal went too

    with_store(server.url, scenario)


def test_unconfirmed_hand_over_expires_with_the_queue_place(server: RedisServer) -> None:
    lease = name("handover")

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder", ttl=30))
        await store.acquire(req(lease, "dies", ttl=30, queue_ttl=0.3))
        await store.acquire(req(lease, "next", ttl=30, queue_ttl=10))
        assert await store.release(lease, "holder")
        assert isinstance(await store.acquire(req(lease, "next", queue_ttl=10)), Busy)
        await asyncio.sleep(0.4)  # "dies" never confirms
        fence_of(await store.acquire(req(lease, "next", queue_ttl=10)))

    with_store(server.url, scenario)


def test_chunked_renew_survives_script_flush(server: RedisServer) -> None:
    stem = name("chunks")
    names = [f"{stem}/{i}" for i in range(2_500)]
    admin = server.client()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            await asyncio.gather(*(store.acquire(req(n, "tok", ttl=60)) for n in chunk))
        admin.script_flush()
        items = [RenewItem(n, "tok", 30) for n in names]
        items[2_400] = RenewItem(names[2_400], "other", 30)
        answers = await store.renew(items)
        assert answers.count(True) == 2_499 and answers[2_400] is False
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            await asyncio.gather(*(store.release(n, "tok") for n in chunk))

    try:
        with_store(server.url, scenario)
    finally:
        admin.close()


# --------------------------------------------------------------- data loss, restarts


def test_fences_survive_restart_without_persistence(private: Callable[..., RedisServer]) -> None:
    instance = private()
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        before = fence_of(await store.acquire(req(lease, "old", ttl=30)))
        # In a thread, as in a live app whose event loop keeps running meanwhile.
        await asyncio.to_thread(instance.restart)
        admin = instance.client()
        assert admin.dbsize() == 0
        admin.close()
        assert await store.renew([RenewItem(lease, "old", 30)]) == [False]
        after = fence_of(await store.acquire(req(lease, "new")))
        assert after > before

    with_store(instance.url, scenario)


def test_fences_survive_flushall_and_script_flush(private: Callable[..., RedisServer]) -> None:
    instance = private()
    admin = instance.client()
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        fences = [fence_of(await store.acquire(req(lease, "t0")))]
        admin.flushall()
        fences.append(fence_of(await store.acquire(req(lease, "t1"))))
        admin.script_flush()
        await store.release(lease, "t1")
        fences.append(fence_of(await store.acquire(req(lease, "t2"))))
        admin.script_flush()
        assert await store.renew([RenewItem(lease, "t2", 5)]) == [True]
        admin.flushall()
        admin.script_flush()
        fences.append(fence_of(await store.acquire(req(lease, "t3"))))
        assert fences == sorted(set(fences))

    try:
        with_store(instance.url, scenario)
    finally:
        admin.close()


def test_grants_from_before_a_restart_cannot_renew(private: Callable[..., RedisServer]) -> None:
    # With persistence the grant survives the restart, but a renewal it made might
    # not have (appendfsync everysec), so the holder must learn its lease is lost.
    instance = private(appendonly=True)
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        before = fence_of(await store.acquire(req(lease, "old", ttl=30)))
        assert await store.renew([RenewItem(lease, "old", 30)]) == [True]
        await asyncio.to_thread(instance.restart)
        [survivor] = await store.holders(lease)
        assert survivor.fence == before
        assert await store.renew([RenewItem(lease, "old", 30)]) == [False]
        # The old grant still blocks others until it expires or is released: the
        # holder may be finishing up until its own safe deadline.
        assert isinstance(await store.acquire(req(lease, "new")), Busy)
        assert await store.release(lease, "old")
        assert fence_of(await store.acquire(req(lease, "new"))) > before
        assert await store.renew([RenewItem(lease, "new", 30)]) == [True]

    with_store(instance.url, scenario)


def test_killed_server_is_storeunavailable(private: Callable[..., RedisServer]) -> None:
    instance = private()
    store = sync_store(instance.url)
    try:
        store.ping()
        instance.kill()
        with pytest.raises(StoreUnavailable):
            store.acquire(req(name(), "t"))
        # A wait is the pause between acquire attempts: it sleeps out its timeout
        # instead of failing at once (a retrying caller must not spin).
        started = time.monotonic()
        assert not store.wait(name(), "t", 0.3)
        assert 0.29 < time.monotonic() - started < 1
        instance.start()
        fence_of(store.acquire(req(name(), "t")))
    finally:
        store.close()


def test_silent_server_times_out(private: Callable[..., RedisServer]) -> None:
    instance = private()
    store = sync_store(instance.url + "?socket_timeout=0.3")
    try:
        store.ping()
        assert instance.pid is not None
        os.kill(instance.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"no reply within 0\.3 s"):
                store.renew([RenewItem(name(), "t", 5)])
            assert time.monotonic() - started < 2
        finally:
            os.kill(instance.pid, signal.SIGCONT)
        store.ping()
    finally:
        store.close()


# ------------------------------------------------------------- auth, ACL, TLS, unix


def test_wrong_password_never_shows_the_password(private: Callable[..., RedisServer]) -> None:
    secret = "s3cr3t-P@ss/word"
    instance = private(password=secret)
    wrong = "wr0ng-Pa55:w0rd"
    bad_url = instance.url.replace(urllib.parse.quote(secret, safe=""), urllib.parse.quote(wrong))
    store = async_redis.from_url(parse(bad_url), SYSTEM_CLOCK)
    with pytest.raises(StoreUnavailable) as caught:
        with_store(bad_url, lambda s: s.acquire(req(name(), "t")))
    text = "".join(traceback.format_exception(caught.value)) + repr(caught.value) + repr(store)
    for shown in (wrong, urllib.parse.quote(wrong), urllib.parse.quote(wrong, safe="")):
        assert shown not in text
    assert "authentication failed" in str(caught.value)
    fence_of(with_store(instance.url, lambda s: s.acquire(req(name(), "t"))))


# The permissions docs/backends.md (Redis) lists for a dedicated ACL user.
ACL_RULES = (
    "on resetkeys ~leasehold:* resetchannels -@all "
    "+fcall +function|load +blpop +lpop +ping +time +info +client|setname "
    "+select +zadd +zrem +zscore +zrank +zcard +zrange +zrangebyscore +zremrangebyscore "
    "+hget +hmget +hset +hdel +get +set +del +exists +lpush +pexpire +pttl "
    "&leasehold:* +publish +subscribe"
)


def test_acl_user_with_documented_permissions(private: Callable[..., RedisServer]) -> None:
    instance = private()
    admin = instance.client()
    admin.execute_command("ACL", "SETUSER", "worker", *ACL_RULES.split(), ">w0rker-pw")
    admin.execute_command("ACL", "SETUSER", "limited", "on", ">lim", "~*", "+@all", "-info")
    admin.close()
    url = f"redis://worker:w0rker-pw@127.0.0.1:{instance.port}/0"
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.ping()
        fence_of(await store.acquire(req(lease, "t1")))
        await store.acquire(req(lease, "t2", queue_ttl=5))
        assert await store.renew([RenewItem(lease, "t1", 5)]) == [True]
        assert len(await store.leases()) == 1
        assert await store.release(lease, "t1")
        assert isinstance(await store.wait(lease, "t2", 1), HandedOver)
        assert await store.break_lease(lease) == 1  # t2, handed the place
        assert await store.server_time() is not None
        version = await store.write_record(lease, 0, b"v")
        assert (await store.read_record(lease)).version == version

    with_store(url, scenario)
    limited = f"redis://limited:lim@127.0.0.1:{instance.port}/0"
    with pytest.raises(StoreUnavailable, match="permission"):
        with_store(limited, lambda store: store.acquire(req(name(), "t")))


def _script_commands(admin: Any) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("fcall", "evalsha")}


def _every_operation(lease: str) -> Callable[[async_redis.AsyncRedisStore], Awaitable[None]]:
    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        first = fence_of(await store.acquire(req(lease, "t1")))
        assert isinstance(await store.acquire(req(lease, "t2", queue_ttl=5)), Busy)
        assert await store.renew([RenewItem(lease, "t1", 5)]) == [True]
        assert [i.fence for i in await store.holders(lease)] == [first]
        assert len(await store.leases(lease)) == 1 and len(await store.waiters(lease)) == 1
        assert await store.release(lease, "t1")
        assert isinstance(await store.wait(lease, "t2", 1), HandedOver)
        assert await store.break_lease(lease) == 1
        version = await store.write_record(lease, 0, b"v")
        assert (await store.read_record(lease)).version == version

    return scenario


def test_a_standalone_server_runs_the_scripts_as_functions(
    private: Callable[..., RedisServer],
) -> None:
    """One library, loaded once; every operation an FCALL, none an EVALSHA."""
    instance = private()
    admin = instance.client()
    store = async_redis.from_url(parse(instance.url), SYSTEM_CLOCK)
    try:
        with_store(instance.url, _every_operation(name("fn")))
        calls = _script_commands(admin)
        assert calls["evalsha"] == 0 and calls["fcall"] >= 10, calls
        libraries = admin.execute_command("FUNCTION", "LIST")
        assert [entry["library_name"] for entry in libraries] == [redis_scripts._library().name]
        [library] = libraries
        flags = {f["name"].rsplit("_", 1)[-1]: f["flags"] for f in library["functions"]}
        assert flags["release"] == ["allow-oom"] and flags["holders"] == ["no-writes"], flags
        assert store.warnings() == []
    finally:
        admin.close()


def test_functions_are_loaded_again_after_function_flush(
    private: Callable[..., RedisServer],
) -> None:
    instance = private()
    admin = instance.client()
    lease = name()

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        fences = [fence_of(await store.acquire(req(lease, "t0")))]
        admin.execute_command("FUNCTION", "FLUSH")
        # The control: the server really lost the function.
        with pytest.raises(redis_exceptions.ResponseError, match="Function not found"):
            admin.execute_command("FCALL", redis_scripts._script("holders").function, 1, "k")
        assert await store.release(lease, "t0")
        fences.append(fence_of(await store.acquire(req(lease, "t1"))))
        admin.execute_command("FUNCTION", "FLUSH")
        assert await store.renew([RenewItem(lease, "t1", 5)] * 2) == [True, True]
        assert fences == sorted(set(fences))
        assert _script_commands(admin)["evalsha"] == 0

    try:
        with_store(instance.url, scenario)
    finally:
        admin.close()


@pytest.mark.parametrize(
    "refused", ["-fcall", "-function|load", "-@scripting +evalsha +script|load"]
)
def test_a_user_refused_functions_runs_scripts_and_says_so(
    private: Callable[..., RedisServer], refused: str
) -> None:
    """FCALL (or FUNCTION LOAD) refused by the ACL: the store falls back to
    EVALSHA for good, every operation works, and warnings() tells why."""
    instance = private()
    admin = instance.client()
    admin.execute_command(
        "ACL", "SETUSER", "old", "on", ">old-pw", "~*", "&*", "+@all", *refused.split()
    )
    url = f"redis://old:old-pw@127.0.0.1:{instance.port}/0"
    store = async_redis.from_url(parse(url), SYSTEM_CLOCK)
    try:

        async def scenario(live: async_redis.AsyncRedisStore) -> list[str]:
            await _every_operation(name("old"))(live)
            return live.warnings()

        found = with_store(url, scenario)
        calls = _script_commands(admin)
        assert calls["evalsha"] >= 10, calls
        assert any("functions refused" in warning for warning in found), found
        # The control: a store that made no call yet has nothing to say.
        assert not any("functions refused" in warning for warning in store.warnings())
    finally:
        admin.close()


def test_clients_calling_functions_and_scripts_share_leases(server: RedisServer) -> None:
    lease = name("mixed")

    async def scenario(functions: async_redis.AsyncRedisStore) -> None:
        scripts = async_redis.from_url(parse(server.url), SYSTEM_CLOCK)
        scripts._use_scripts(RuntimeError("as a cluster or an old ACL would"))
        try:
            first = fence_of(await functions.acquire(req(lease, "f")))
            assert isinstance(await scripts.acquire(req(lease, "s", queue_ttl=5)), Busy)
            assert await functions.release(lease, "f")
            assert isinstance(await scripts.wait(lease, "s", 1), HandedOver)
            [info] = await functions.holders(lease)
            assert info.fence > first
            assert await scripts.release(lease, "s")
            assert await functions.holders(lease) == []
        finally:
            await scripts.aclose()

    with_store(server.url, scenario)


def test_out_of_memory_a_release_still_runs_and_an_acquire_is_refused(
    private: Callable[..., RedisServer],
) -> None:
    """Functions refused out of memory are refused before they run; release
    (allow-oom) frees a name, and reads (no-writes) keep working."""
    instance = private()
    admin = instance.client()
    lease = name("oom")

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        fence_of(await store.acquire(req(lease, "t1")))
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        try:
            with pytest.raises(StoreUnavailable, match=r"(?i)oom|memory"):
                await store.acquire(req(name("other"), "t2"))
            assert len(await store.holders(lease)) == 1
            assert await store.renew([RenewItem(lease, "t1", 5)]) == [True]
            assert await store.release(lease, "t1")
            assert await store.holders(lease) == []
        finally:
            admin.config_set("maxmemory", "0")
        fence_of(await store.acquire(req(lease, "t3")))

    try:
        with_store(instance.url, scenario)
    finally:
        admin.close()


def test_acl_user_announces_and_subscribes(private: Callable[..., RedisServer]) -> None:
    instance = private()
    admin = instance.client()
    admin.execute_command("ACL", "SETUSER", "worker", *ACL_RULES.split(), ">w0rker-pw")
    without = ACL_RULES.replace("&leasehold:*", "").split()
    admin.execute_command("ACL", "SETUSER", "nochannels", *without, ">nc-pw")
    admin.close()
    port = instance.port

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        async with store.subscribe("election:x") as subscription:
            await store.announce("election:x")
            assert await subscription.wait(5.0) is True

    with_store(f"redis://worker:w0rker-pw@127.0.0.1:{port}/0", scenario)

    async def degraded(store: async_redis.AsyncRedisStore) -> None:
        # Without the channel permission announcing fails (elections log it), and
        # subscriptions poll instead of failing; doctor says why.
        with pytest.raises(StoreUnavailable, match="permission"):
            await store.announce("election:x")
        async with store.subscribe("election:x") as subscription:
            assert subscription.notified is False
            assert await subscription.wait(0.2) is False
        assert any("SUBSCRIBE" in warning for warning in store.warnings())

    with_store(f"redis://nochannels:nc-pw@127.0.0.1:{port}/0", degraded)


def test_announcement_channel_is_per_prefix_and_database(server: RedisServer) -> None:
    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        assert store.announce_channel == "app:announce:3"
        async with store.subscribe("t") as subscription:
            # Another prefix or database is another store: not woken.
            base = f"redis://127.0.0.1:{server.port}"
            other = async_redis.from_url(parse(base + "/0?prefix=app:"), SYSTEM_CLOCK)
            try:
                await other.announce("t")
            finally:
                await other.aclose()
            assert await subscription.wait(0.3) is False
            await store.announce("t")
            assert await subscription.wait(5.0) is True

    with_store(f"redis://127.0.0.1:{server.port}/3?prefix=app:", scenario)


def test_database_number_is_used(private: Callable[..., RedisServer]) -> None:
    instance = private()
    admin = instance.client(db=3)
    try:
        url = f"redis://127.0.0.1:{instance.port}/3?prefix=app:"
        fence_of(with_store(url, lambda store: store.acquire(req("db-test", "t"))))
        assert admin.exists(redis_layout.KeyLayout("app:").for_name("db-test").state) == 1
    finally:
        admin.close()


def test_unix_socket(private: Callable[..., RedisServer], tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    private(extra_config=[f"unixsocket {sock}", "unixsocketperm 700"])
    url = f"unix://{sock}?db=1"
    fence_of(with_store(url, lambda store: store.acquire(req(name(), "t"))))


def test_tls_verified_and_wrong_ca(private: Callable[..., RedisServer], tmp_path: Path) -> None:
    need_openssl()
    instance = private(tls=True, password="tls-pw")
    assert instance.url.startswith("rediss://")
    fence_of(with_store(instance.url, lambda store: store.acquire(req(name(), "t"))))

    async def kept_reusable(store: async_redis.AsyncRedisStore) -> bool:
        await store.acquire(req(name(), "t"))
        spare = store._connect().spare
        assert spare
        return bool(spare[0].reusable())

    # Over TLS the kept connection always goes through the pool's own check: the
    # transport may hold part of a record that the lean check cannot see.
    assert not with_store(instance.url, kept_reusable)

    other = make_tls_files(tmp_path / "other", "other")
    wrong_ca = instance.url.replace(
        urllib.parse.quote(str(instance.tls_files.ca_cert), safe=""),
        urllib.parse.quote(str(other.ca_cert), safe=""),
    )
    assert wrong_ca != instance.url
    with pytest.raises(StoreUnavailable) as caught:
        with_store(wrong_ca, lambda store: store.ping())
    message = str(caught.value)
    assert "TLS certificate verification failed" in message and "ssl_ca_certs" in message
    assert "tls-pw" not in message

    # Without verification the same wrong CA connects (explicitly opted out).
    insecure = wrong_ca + "&ssl_cert_reqs=none"
    with_store(insecure, lambda store: store.ping())


def test_tls_client_certificate(private: Callable[..., RedisServer]) -> None:
    need_openssl()
    instance = private(tls=True, extra_config=["tls-auth-clients yes"])
    with pytest.raises(StoreUnavailable):
        with_store(instance.url, lambda store: store.ping())
    files = instance.tls_files  # its certificate is valid for clientAuth too
    query = urllib.parse.urlencode({"ssl_certfile": str(files.cert), "ssl_keyfile": str(files.key)})
    with_store(f"{instance.url}&{query}", lambda store: store.ping())


def test_warnings_report_risky_server_settings(private: Callable[..., RedisServer]) -> None:
    instance = private(extra_config=["maxmemory-policy allkeys-lru"])

    async def scenario(store: async_redis.AsyncRedisStore) -> list[str]:
        assert store.warnings() == []  # nothing known before any I/O
        await store.ping()
        return store.warnings()

    found = " | ".join(with_store(instance.url, scenario))
    assert "noeviction" in found and "appendonly no" in found


def test_one_node_cluster_accepts_every_per_name_script(
    private: Callable[..., RedisServer],
) -> None:
    # Cluster mode refuses a script that touches keys of two slots. A one-node
    # cluster owning every slot proves that each per-name operation (with the
    # signal lists it writes to) stays in one slot.
    instance = private(extra_config=["cluster-enabled yes", "cluster-config-file nodes.conf"])
    admin = instance.client()
    try:
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while admin.cluster("info")["cluster_state"] != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        admin.close()
    lease = "cluster{job}"

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        first = fence_of(await store.acquire(req(lease, "t1")))
        await store.acquire(req(lease, "t2", queue_ttl=5))
        await store.acquire(req(lease, "t3", queue_ttl=5))
        assert await store.renew([RenewItem(lease, "t1", 5)]) == [True]
        assert len(await store.holders(lease)) == 1
        assert await store.release(lease, "t1")
        assert await store.wait(lease, "t2", 1)
        assert fence_of(await store.acquire(req(lease, "t2", queue_ttl=5))) > first
        assert await store.break_lease(lease) == 1
        assert await store.wait(lease, "t3", 1)
        version = await store.write_record(lease, 0, b"v")
        assert (await store.read_record(lease)).version == version

    with_store(instance.url, scenario)


# ------------------------------------------------------------ generated sync twin


def test_sync_store_contract(server: RedisServer) -> None:
    lease = name("sync")
    store = sync_store(server.url)
    try:
        first = fence_of(store.acquire(req(lease, "t1")))
        busy = store.acquire(req(lease, "t2", queue_ttl=10))
        assert isinstance(busy, Busy) and busy.position == 0
        assert store.renew([RenewItem(lease, "t1", 10), RenewItem(lease, "t2", 10)]) == [
            True,
            False,
        ]
        assert [info.fence for info in store.holders(lease)] == [first]
        assert [info.name for info in store.leases(lease)] == [lease]
        releaser = threading.Timer(0.2, store.release, args=(lease, "t1"))
        releaser.start()
        started = time.monotonic()
        assert store.wait(lease, "t2", 5)
        assert time.monotonic() - started < 1
        releaser.join()
        assert fence_of(store.acquire(req(lease, "t2", queue_ttl=10))) > first
        assert store.break_lease(lease) == 1
        version = store.write_record(lease, 0, b"\x00\xff")
        assert version is not None and store.read_record(lease).value == b"\x00\xff"
        store.ping()
        server_time = store.server_time()
        assert server_time is not None and abs(server_time - time.time()) < 5
    finally:
        store.close()


def test_sync_store_from_many_threads(server: RedisServer) -> None:
    lease = name("threads")
    store = sync_store(server.url)
    fences: list[int] = []
    guard = threading.Lock()
    inside = 0
    overlap = False

    def worker(index: int) -> None:
        nonlocal inside, overlap
        token = f"t{index}"
        for _ in range(200):
            result = store.acquire(req(lease, token, ttl=10, queue_ttl=10))
            if isinstance(result, Granted):
                break
            store.wait(lease, token, 2)
        else:
            raise AssertionError("never granted")
        with guard:
            inside += 1
            overlap = overlap or inside > 1
            fences.append(result.fence)
        time.sleep(0.01)
        with guard:
            inside -= 1
        assert store.release(lease, token)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not overlap
        assert len(fences) == 8 and len(set(fences)) == 8
    finally:
        store.close()


def test_fork_reconnects_in_the_child(server: RedisServer) -> None:
    lease = name("fork")
    store = sync_store(server.url)
    try:
        fence_of(store.acquire(req(lease, "parent")))
        parent_connections = store._connections
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                infos = store.holders(lease)
                fresh = store._connections
                code = (
                    0
                    if (
                        len(infos) == 1
                        and fresh is not parent_connections
                        and fresh is not None
                        and fresh.pid == os.getpid()
                        and parent_connections in store._inherited
                    )
                    else 2
                )
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's sockets were not touched by the child.
        assert store._connections is parent_connections
        assert store.renew([RenewItem(lease, "parent", 10)]) == [True]
        assert store.release(lease, "parent")
    finally:
        store.close()


def test_a_long_queue_costs_no_more_per_operation(private: Callable[..., RedisServer]) -> None:
    """Waiters live in zsets, not in the encoded holders: the commands a queue refresh
    and a hand-over run inside their scripts do not grow with the queue."""
    instance = private()
    admin = instance.client()

    def commands() -> int:
        stats = admin.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_config|resetstat")

    async def cost(store: async_redis.AsyncRedisStore, waiters: int) -> tuple[int, int]:
        lease = name(f"queue{waiters}")
        await store.acquire(req(lease, "holder"))
        for i in range(waiters):
            assert isinstance(await store.acquire(req(lease, f"w{i}", queue_ttl=30)), Busy)
        admin.config_resetstat()
        assert isinstance(await store.acquire(req(lease, f"w{waiters - 1}", queue_ttl=30)), Busy)
        refresh = commands()
        admin.config_resetstat()
        assert await store.release(lease, "holder")
        hand_over = commands()
        return refresh, hand_over

    try:
        short = with_store(instance.url, lambda store: cost(store, 3))
        long = with_store(instance.url, lambda store: cost(store, 1_000))
        # Equal but for a key-TTL fallback (PEXPIRE GT, then NX) taken or not.
        assert all(abs(a - b) <= 2 for a, b in zip(long, short, strict=True)), (short, long)
        assert max(long) < 40
    finally:
        admin.close()


def test_a_kept_connection_the_server_closed_is_replaced(
    private: Callable[..., RedisServer],
) -> None:
    """Script calls keep one connection out of the pool between calls; like the pool,
    they check it before use, so a connection the server closed meanwhile (a restart,
    CLIENT KILL, an idle timeout) is replaced instead of failing the next call."""
    import redis.exceptions

    from leasehold._async.backends.redis.io import pack_command

    instance = private()
    admin = instance.client()

    async def kill_every_other_client() -> None:
        admin.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        # The event loop learns of the closed sockets on its next turns (the pool's
        # own check of a connection it hands out has the same blind spot before).
        await asyncio.sleep(0.05)

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        connections = store._connect()
        assert connections.spare is not None
        # Control: a kept connection is really broken by the kill.
        await store.acquire(req(name(), "t"))
        kept = connections.spare.pop()
        await kill_every_other_client()
        with pytest.raises(redis.exceptions.ConnectionError):
            await kept.exchange(pack_command(kept, ("PING",)))
        await connections.command_pool.release(kept)
        # The store's next call after the same kill is answered.
        lease = name()
        fence = fence_of(await store.acquire(req(lease, "t")))
        assert connections.spare
        await kill_every_other_client()
        assert await store.release(lease, "t")
        assert connections.spare
        assert fence_of(await store.acquire(req(lease, "u"))) > fence

    try:
        with_store(instance.url, scenario)
    finally:
        admin.close()


def test_a_kept_asyncio_connection_is_checked_without_the_pools_layers(
    private: Callable[..., RedisServer],
) -> None:
    """The asyncio twin of the test below: the lean check (``reusable``) passes a
    clean kept connection and refuses one with a reply left on it (still on the
    socket, or already read by the event loop into the stream) or one the server
    closed; those go through the pool's check and are replaced, and the next call
    is answered."""
    import redis.exceptions

    from leasehold._async.backends.redis.io import pack_command

    instance = private()
    admin = instance.client()

    async def refused(connection: Any, what: str) -> None:
        # Until the server's bytes arrive, the connection still looks clean.
        deadline = time.monotonic() + 5
        while connection.reusable():
            assert time.monotonic() < deadline, f"{what} never arrived"
            await asyncio.sleep(0.005)

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        connections = store._connect()
        assert connections.spare is not None and connections.command_pool is not None
        pool = connections.command_pool
        lease = name()
        fence = fence_of(await store.acquire(req(lease, "t")))
        (kept,) = connections.spare
        assert kept.reusable()  # clean: the pool's check is skipped
        checked: list[object] = []
        real_check = pool.ensure_connection

        async def counting_check(connection: object) -> None:
            checked.append(connection)
            await real_check(connection)

        pool.ensure_connection = counting_check  # type: ignore[method-assign]
        assert await store.holders(lease)
        assert checked == []

        # A reply nobody read: refused while it waits on the socket, and once the
        # event loop has read it into the connection's stream; the pool's check
        # replaces the connection instead of handing it to the next call.
        for stage in ("socket", "stream"):
            kept = connections.spare[0]
            kept._writer.writelines(pack_command(kept, ("PING",)))
            await refused(kept, "the PONG")
            if stage == "stream":
                stream = kept._parser._stream
                deadline = time.monotonic() + 5
                while not stream._buffer:  # the loop's turn: socket -> stream
                    assert time.monotonic() < deadline, "the PONG never reached the stream"
                    await asyncio.sleep(0.005)
                assert not kept.reusable()
            checked.clear()
            assert fence_of(await store.acquire(req(lease, "t"))) == fence  # not the PONG
            assert checked[0] is kept  # then others: a new connection reads the run_id

        # A connection the server closed: refused by the check; the control shows
        # it really is broken; and the store's next call is answered.
        kept = connections.spare[0]
        admin.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        await refused(kept, "the close")
        broken = connections.spare.pop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await broken.exchange(pack_command(broken, ("PING",)))
        await pool.release(broken)
        fence = fence_of(await store.acquire(req(lease, "t")))
        kept = connections.spare[0]
        admin.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        await refused(kept, "the close")
        checked.clear()
        assert await store.release(lease, "t")
        assert checked[0] is kept and connections.spare
        assert fence_of(await store.acquire(req(lease, "u"))) > fence

    try:
        with_store(instance.url, scenario)
    finally:
        admin.close()


def test_a_kept_sync_connection_is_checked_without_the_pools_layers(
    private: Callable[..., RedisServer],
) -> None:
    """The sync client's lean check of its kept connection (``reusable``) passes a
    clean connection and refuses one with a reply left on it or one the server
    closed, so those go through the pool's check and are replaced, and the next
    call is answered."""
    import redis.exceptions

    from leasehold._sync.backends.redis.io import pack_command

    instance = private()
    admin = instance.client()
    store = sync_store(instance.url)

    def refused(connection: Any, what: str) -> None:
        # Until the server's bytes arrive, the connection still looks clean.
        deadline = time.monotonic() + 5
        while connection.reusable():
            assert time.monotonic() < deadline, f"{what} never arrived"
            time.sleep(0.005)

    try:
        connections = store._connect()
        assert connections.spare is not None and connections.command_pool is not None
        pool = connections.command_pool
        lease = name()
        fence = fence_of(store.acquire(req(lease, "t")))
        (kept,) = connections.spare
        assert kept.reusable()  # clean: the pool's check is skipped
        checked: list[object] = []
        real_check = pool.ensure_connection

        def counting_check(connection: object) -> None:
            checked.append(connection)
            real_check(connection)

        pool.ensure_connection = counting_check  # type: ignore[method-assign]
        assert store.holders(lease)
        assert checked == []

        # A reply nobody read (a PING sent here by hand) is seen, and the pool's
        # check replaces the connection instead of handing it to the next call.
        kept = connections.spare[0]
        for item in pack_command(kept, ("PING",)):
            kept._sock.sendall(item)
        refused(kept, "the PONG")
        assert fence_of(store.acquire(req(lease, "t"))) == fence  # not the PONG
        assert checked[0] is kept  # then others: a new connection reads the run_id

        # A connection the server closed: refused by the check; the control shows
        # it really is broken; and the store's next call is answered.
        kept = connections.spare[0]
        admin.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        refused(kept, "the close")
        broken = connections.spare.pop()
        with pytest.raises(redis.exceptions.ConnectionError):
            broken.exchange(pack_command(broken, ("PING",)))
        pool.release(broken)
        fence = fence_of(store.acquire(req(lease, "t")))
        kept = connections.spare[0]
        admin.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        refused(kept, "the close")
        checked.clear()
        assert store.release(lease, "t")
        assert checked[0] is kept and connections.spare
        assert fence_of(store.acquire(req(lease, "u"))) > fence
    finally:
        store.close()
        admin.close()
