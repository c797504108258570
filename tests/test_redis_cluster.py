"""The Redis backend against a real three-master Redis Cluster (``redis+cluster://``).

The cluster is three redis-server processes on random loopback ports
(tests/servers/redis_cluster.py). Most tests share one module-wide cluster and use
fresh names; tests that restart a node or move a slot start a private one. Names
are picked per node (``names_on``) so that every test touches all three nodes.
The conformance suite also runs on a cluster (tests/test_conformance.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

import leasehold
from leasehold._async.backends.redis import layout as redis_layout
from leasehold._async.backends.redis import options as redis_options
from leasehold._async.backends.redis import scripts as redis_scripts
from leasehold._async.backends.redis import store as async_redis
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.election import CHANGES
from leasehold._core.records import AcquireRequest, Busy, Granted, HandedOver, Holder, RenewItem
from leasehold._core.url import parse
from leasehold._errors import InvalidArgument, StoreUnavailable
from leasehold._sync.backends.redis import store as sync_redis
from tests.servers.redis import RedisServer
from tests.servers.redis_cluster import RedisClusterServers
from tests.test_redis_backend import need_redis, with_store

T = TypeVar("T")
HOLDER = Holder(owner="cluster-tester", host="test-host", pid=4242)
LAYOUT = redis_layout.KeyLayout()
# docs/backends.md (A dedicated ACL user), with the two rules a cluster adds.
ACL_RULES = (
    "on >secret resetkeys ~leasehold:* resetchannels -@all +evalsha +script|load "
    "+blpop +lpop +ping +time +info +client|setname +select +zadd +zrem +zscore "
    "+zrank +zcard +zrange +zrangebyscore +zremrangebyscore +hget +hmget +hset +hdel "
    "+get +set +del +exists +lpush +pexpire +pttl &leasehold:* +publish +subscribe "
    "+cluster|slots +command"
)
SCRIPTS = ("acquire", "release", "renew", "holders", "break", "leases")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    need_redis()
    with RedisClusterServers(3) as shared:
        yield shared


@pytest.fixture
def private_cluster() -> Iterator[RedisClusterServers]:
    """A cluster of its own, for tests that restart a node or move a slot."""
    need_redis()
    with RedisClusterServers(3) as own:
        yield own


def names_on(cluster: RedisClusterServers, node: RedisServer, count: int, stem: str) -> list[str]:
    """``count`` fresh lease names whose slot ``node`` owns."""
    found: list[str] = []
    while len(found) < count:
        name = f"{stem}:{uuid.uuid4().hex[:10]}"
        if cluster.owner_of(LAYOUT.for_name(name).state) is node:
            found.append(name)
    return found


def req(
    lease: str, token: str, ttl: float = 10.0, queue_ttl: float | None = None
) -> AcquireRequest:
    return AcquireRequest(
        name=lease, token=token, holder=HOLDER, ttl=ttl, limit=1, queue_ttl=queue_ttl
    )


def fence_of(result: object) -> int:
    assert isinstance(result, Granted), result
    return result.fence


def evalsha_calls(node: RedisServer) -> int:
    admin = node.client()
    try:
        stats = admin.info("commandstats")
    finally:
        admin.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# ----------------------------------------------------------------- URL and options


def test_cluster_urls_are_parsed_and_checked_before_io() -> None:
    plain = redis_options.parse_options(parse("redis+cluster://seed.internal:7000"))
    assert (plain.cluster, plain.tls, plain.host, plain.port) == (
        True,
        False,
        "seed.internal",
        7000,
    )
    tls = redis_options.parse_options(parse("rediss+cluster://u:pw@seed:7000?ssl_ca_certs=/ca"))
    assert tls.cluster and tls.tls and tls.ssl_ca_certs == "/ca" and tls.username == "u"
    assert "pw" not in repr(tls) and "cluster=True" in repr(tls)
    assert not redis_options.parse_options(parse("redis://h")).cluster
    bad = {
        "redis+cluster://h/1": "only database 0",
        "redis+cluster://h?db=2": "only database 0",
        "redis+cluster://h?ssl_ca_certs=/ca": "rediss+cluster://",
        "redis+cluster://h?bogus=1": "unknown option 'bogus'",
    }
    for url, fragment in bad.items():
        with pytest.raises(InvalidArgument, match=re.escape(fragment)):
            async_redis.from_url(parse(url), SYSTEM_CLOCK)
    # Building never connects (port 1: nothing listens), async or sync.
    url = "redis+cluster://user:hunter2@127.0.0.1:1"
    store = async_redis.from_url(parse(url), SYSTEM_CLOCK)
    twin = sync_redis.from_url(parse(url), SYSTEM_CLOCK)
    assert store._connections is None and twin._connections is None
    assert "hunter2" not in repr(store) and "hunter2" not in repr(twin)
    twin.close()


def test_unreachable_seed_is_store_unavailable_without_the_password() -> None:
    url = "redis+cluster://user:hunter2@127.0.0.1:1?socket_connect_timeout=1"
    with pytest.raises(StoreUnavailable) as caught:
        with_store(url, lambda store: store.ping())
    assert "hunter2" not in str(caught.value)
    twin = sync_redis.from_url(parse(url), SYSTEM_CLOCK)
    with pytest.raises(StoreUnavailable) as caught:
        twin.ping()
    assert "hunter2" not in str(caught.value)
    twin.close()


def test_a_standalone_server_behind_a_cluster_url_is_a_clear_error() -> None:
    need_redis()
    with RedisServer() as standalone:
        url = f"redis+cluster://127.0.0.1:{standalone.port}"
        with pytest.raises(StoreUnavailable, match="use redis:// for a standalone server"):
            with_store(url, lambda store: store.acquire(req("n", "t")))


# ------------------------------------------------------------------ per-name calls


def test_locks_on_every_node(cluster: RedisClusterServers) -> None:
    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for node in cluster.nodes:
            (lease,) = names_on(cluster, node, 1, "lock")
            first = fence_of(await store.acquire(req(lease, "a")))
            assert fence_of(await store.acquire(req(lease, "a"))) == first  # idempotent
            busy = await store.acquire(req(lease, "b", queue_ttl=5))
            assert isinstance(busy, Busy) and busy.position == 0
            assert [h.fence for h in await store.holders(lease)] == [first]
            assert not await store.release(lease, "nobody")
            # The release hands the place to the queued waiter, whose BLPOP on the
            # node that owns the name returns the grant itself.
            assert await store.release(lease, "a")
            handed = await store.wait(lease, "b", 2)
            assert isinstance(handed, HandedOver) and handed.fence > first
            assert await store.renew([RenewItem(lease, "b", 5)]) == [True]
            assert await store.break_lease(lease) == 1
            third = fence_of(await store.acquire(req(lease, "c")))
            assert third > handed.fence
            version = await store.write_record(lease, 0, b"\x00\xff")
            assert version is not None and version > third  # drawn from the same floor
            record = await store.read_record(lease)
            assert (record.value, record.version) == (b"\x00\xff", version)

    with_store(cluster.url, scenario)


def test_renewal_batch_spans_every_node_in_one_call(cluster: RedisClusterServers) -> None:
    """Each node renews the items of its slots, and answers keep the caller's order.
    A grant stamped with another node's run_id could not renew: every renewal
    succeeding also shows that stamps come from the node owning the name."""
    per_node = {node.port: names_on(cluster, node, 8, "renew") for node in cluster.nodes}
    # Interleave the nodes, and put a wrong token between them.
    names = [name for group in zip(*per_node.values(), strict=True) for name in group]

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for lease in names:
            fence_of(await store.acquire(req(lease, "tok", ttl=2)))
        items: list[RenewItem] = []
        expected: list[bool] = []
        for index, lease in enumerate(names):
            items.append(RenewItem(lease, "tok", 30))
            expected.append(True)
            if index % 5 == 0:
                items.append(RenewItem(lease, "not-the-holder", 30))
                expected.append(False)
        # Loads renew.lua on every node first (one item per node): a NOSCRIPT would
        # count twice below.
        firsts = [RenewItem(group[0], "tok", 30) for group in per_node.values()]
        assert await store.renew(firsts) == [True] * len(firsts)
        before = {node.port: evalsha_calls(node) for node in cluster.nodes}
        assert await store.renew(items) == expected
        for node in cluster.nodes:
            # One renew.lua per slot touched on that node (names of one node may
            # still share a slot).
            slots = {
                redis_layout._bucket_slot(LAYOUT.bucket(lease)) for lease in per_node[node.port]
            }
            assert evalsha_calls(node) - before[node.port] == len(slots)
        # Renewed to the new ttl on every node, not left at the 2 s of the grant.
        for lease in names:
            (holder,) = await store.holders(lease)
            assert holder.expires_in > 20
        listed = {info.name for info in await store.leases("renew:")}
        assert set(names) <= listed

    with_store(cluster.url, scenario)


def test_leases_lists_names_from_every_node(cluster: RedisClusterServers) -> None:
    prefix = f"ls-{uuid.uuid4().hex[:6]}:"
    per_node = [names_on(cluster, node, 3, prefix.rstrip(":")) for node in cluster.nodes]
    names = sorted(name for group in per_node for name in group)

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        fences = {lease: fence_of(await store.acquire(req(lease, "t"))) for lease in names}
        other = names_on(cluster, cluster.nodes[1], 1, "elsewhere")[0]
        await store.acquire(req(other, "t"))
        listed = await store.leases(prefix)
        assert [info.name for info in listed] == names
        assert {info.name: info.fence for info in listed} == fences
        assert all(info.owner == HOLDER.owner and info.expires_in > 5 for info in listed)
        assert await store.release(names[0], "t")
        assert [info.name for info in await store.leases(prefix)] == names[1:]

    with_store(cluster.url, scenario)


def test_release_wakes_a_waiter_on_its_node_without_polling(cluster: RedisClusterServers) -> None:
    """The waiter blocks in BLPOP on the node that owns the name (not the seed): it
    returns as soon as the release pushes its signal, long before its timeout."""
    (lease,) = names_on(cluster, cluster.nodes[2], 1, "wake")

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        await store.acquire(req(lease, "holder"))
        assert isinstance(await store.acquire(req(lease, "waiter", queue_ttl=10)), Busy)

        async def release_soon() -> float:
            await asyncio.sleep(0.3)
            assert await store.release(lease, "holder")
            return time.monotonic()

        started = time.monotonic()
        releaser = asyncio.create_task(release_soon())
        woken = await store.wait(lease, "waiter", 10)
        returned = time.monotonic()
        released = await releaser
        assert isinstance(woken, HandedOver)
        assert returned - released < 0.2 and returned - started < 1.0

    with_store(cluster.url, scenario)


def test_semaphore_and_fences_through_the_client(cluster: RedisClusterServers) -> None:
    name = f"sem:{uuid.uuid4().hex[:8]}"
    with leasehold.Client(cluster.url) as client:
        first = client.semaphore(name, limit=2, ttl=10).acquire(timeout=5)
        second = client.semaphore(name, limit=2, ttl=10).acquire(timeout=5)
        with pytest.raises(leasehold.AcquireTimeout):
            client.semaphore(name, limit=2, ttl=10).acquire(timeout=0.3)
        assert second.fence > first.fence
        assert first.release()
        third = client.semaphore(name, limit=2, ttl=10).acquire(timeout=5)
        assert third.fence > second.fence
        assert len(client.holders(name)) == 2
        # Fences of a lock strictly increase, whichever node owns the name.
        for node in cluster.nodes:
            (lock_name,) = names_on(cluster, node, 1, "fences")
            fences = []
            for _ in range(5):
                lease = client.lock(lock_name, ttl=10).acquire(timeout=5)
                fences.append(lease.fence)
                lease.release()
            assert fences == sorted(set(fences))
        second.release()
        third.release()


def test_announcements_reach_a_subscriber_from_every_node(cluster: RedisClusterServers) -> None:
    """A store listens on one node; a PUBLISH on any node reaches it."""

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        topic = f"topic-{uuid.uuid4().hex[:6]}"
        async with store.subscribe(topic) as subscription:
            assert subscription.notified
            assert await subscription.wait(0.2) is False  # nothing announced yet
            for node in cluster.nodes:
                admin = node.client()
                try:
                    admin.publish(store.announce_channel, topic)
                finally:
                    admin.close()
                assert await subscription.wait(2) is True, f"nothing heard from {node}"
            # And the store's own announce, routed by redis-py to some node.
            await store.announce(topic)
            assert await subscription.wait(2) is True

    with_store(cluster.url, scenario)


def test_election_observer_is_notified_through_the_cluster(
    cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ttl=30 puts an observer's safety polls 8-10 s apart and in-process wake-ups
    are off: only announcements through the cluster explain changes seen at once."""
    name = f"el:{uuid.uuid4().hex[:8]}"
    with leasehold.Client(cluster.url) as candidate, leasehold.Client(cluster.url) as observing:
        seen: list[leasehold.Leader | None] = []
        election = observing.election(name, ttl=30)

        def observe() -> None:
            for leader in election.observe():
                seen.append(leader)

        thread = threading.Thread(target=observe, daemon=True)
        thread.start()
        deadline = time.monotonic() + 5
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        monkeypatch.setattr(CHANGES, "announce", lambda topic: None)
        term = candidate.election(name, ttl=30, identity="a").campaign(timeout=5)
        started = time.monotonic()
        while not any(leader is not None and leader.term == term.fence for leader in seen):
            assert time.monotonic() - started < 1.0, seen
            time.sleep(0.01)
        assert term.release()
        started = time.monotonic()
        while seen[-1] is not None:
            assert time.monotonic() - started < 1.0, seen
            time.sleep(0.01)
        monkeypatch.undo()
        election.stop()
        thread.join(5)
        assert not thread.is_alive()


def test_sync_store_on_the_cluster(cluster: RedisClusterServers) -> None:
    store = sync_redis.from_url(parse(cluster.url), SYSTEM_CLOCK)
    try:
        names = [names_on(cluster, node, 2, "sync")[i] for node in cluster.nodes for i in (0, 1)]
        fences = [fence_of(store.acquire(req(lease, "s"))) for lease in names]
        assert store.renew([RenewItem(lease, "s", 10) for lease in names]) == [True] * 6
        assert {info.name for info in store.leases("sync:")} >= set(names)
        waiter = names[-1]
        assert isinstance(store.acquire(req(waiter, "w", queue_ttl=5)), Busy)
        assert store.release(waiter, "s")
        handed = store.wait(waiter, "w", 2)
        assert isinstance(handed, HandedOver) and handed.fence > fences[-1]
        store.ping()
        assert any("appendonly no" in warning for warning in store.warnings())
    finally:
        store.close()


def test_commands_wait_for_a_busy_node_connection(cluster: RedisClusterServers) -> None:
    """redis-py's cluster client refuses a command when every connection to its
    node is busy; the store waits for one (as its standalone pool does), so a burst
    of calls larger than max_connections still succeeds."""
    names = names_on(cluster, cluster.nodes[0], 30, "burst")

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        results = await asyncio.gather(*(store.acquire(req(lease, "t")) for lease in names))
        assert all(isinstance(result, Granted) for result in results)
        assert await store.renew([RenewItem(lease, "t", 10) for lease in names]) == [True] * 30

    with_store(cluster.url + "?max_connections=2", scenario)


def test_a_flushed_script_cache_on_one_node_is_reloaded_there(
    cluster: RedisClusterServers,
) -> None:
    per_node = [names_on(cluster, node, 1, "noscript")[0] for node in cluster.nodes]

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for lease in per_node:
            await store.acquire(req(lease, "t"))
        flushed = cluster.nodes[1]
        admin = flushed.client()
        try:
            admin.script_flush()
        finally:
            admin.close()
        # The batch's call on the flushed node meets NOSCRIPT; the others do not.
        assert await store.renew([RenewItem(lease, "t", 10) for lease in per_node]) == [True] * 3
        again = names_on(cluster, flushed, 1, "noscript")[0]
        admin = flushed.client()
        try:
            admin.script_flush()
        finally:
            admin.close()
        fence_of(await store.acquire(req(again, "t")))
        assert await store.renew([RenewItem(again, "t", 10)]) == [True]

    with_store(cluster.url, scenario)


def test_fork_reconnects_in_the_child(cluster: RedisClusterServers) -> None:
    store = sync_redis.from_url(parse(cluster.url), SYSTEM_CLOCK)
    try:
        (lease,) = names_on(cluster, cluster.nodes[1], 1, "fork")
        fence_of(store.acquire(req(lease, "parent")))
        parent_connections = store._connections
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                (child_name,) = names_on(cluster, cluster.nodes[2], 1, "fork-child")
                granted = isinstance(store.acquire(req(child_name, "child")), Granted)
                fresh = store._connections is not parent_connections
                code = 0 if granted and fresh else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's connections were neither used nor closed by the child.
        assert store._connections is parent_connections
        assert store.renew([RenewItem(lease, "parent", 10)]) == [True]
    finally:
        store.close()


def test_acl_user_with_documented_permissions(private_cluster: RedisClusterServers) -> None:
    """The permissions docs/backends.md lists, plus the two a cluster needs."""
    permissions = ACL_RULES.split()
    for node in private_cluster.nodes:
        admin = node.client()
        try:
            admin.execute_command("ACL", "SETUSER", "leasehold", *permissions)
        finally:
            admin.close()
    url = private_cluster.url.replace("://", "://leasehold:secret@")
    names = [names_on(private_cluster, node, 1, "acl")[0] for node in private_cluster.nodes]

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        for lease in names:
            fence_of(await store.acquire(req(lease, "t")))
            assert isinstance(await store.acquire(req(lease, "w", queue_ttl=5)), Busy)
        assert await store.renew([RenewItem(lease, "t", 10) for lease in names]) == [True] * 3
        assert {info.name for info in await store.leases("acl:")} == set(names)
        assert await store.release(names[1], "t")
        assert isinstance(await store.wait(names[1], "w", 2), HandedOver)
        await store.ping()
        async with store.subscribe("acl-topic") as subscription:
            await store.announce("acl-topic")
            assert await subscription.wait(2) is True
        assert store._announcements.error is None

    with_store(url, scenario)


# ------------------------------------------------------------ restarts and moves


def _retrying(call: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """Calls to a node that restarted may fail once per pooled connection (the
    cluster client does not test idle connections before use); the keeper and
    callers retry such a StoreUnavailable, as this does."""

    async def attempt() -> T:
        for _ in range(5):
            try:
                return await call()
            except StoreUnavailable:
                await asyncio.sleep(0.05)
        return await call()

    return attempt


def test_restart_of_one_master_loses_its_leases_only(
    private_cluster: RedisClusterServers,
) -> None:
    """A master restarted without persistence comes back empty with a new run_id:
    its holders are told at their next renewal, the other nodes' holders are not,
    and its next fence is higher. A grant made after the restart renews, so its
    stamp came from the new server process, not from a cached run_id. The scripts
    are loaded on the restarted node before the store meets it again (as another
    client would), so no NOSCRIPT tells the store: only its new connections do."""
    cluster = private_cluster
    per_node = [names_on(cluster, node, 2, "restart") for node in cluster.nodes]
    restarted = cluster.nodes[1]
    everyone = [lease for group in per_node for lease in group]

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        fences = {
            lease: fence_of(await store.acquire(req(lease, "t", ttl=30))) for lease in everyone
        }
        assert await store.renew([RenewItem(lease, "t", 30) for lease in everyone]) == [True] * 6
        # Idempotent acquires (same fences) leave every node's run_id cached: the
        # renewal above met NOSCRIPT (first use) and forgot them.
        for lease in everyone:
            assert fence_of(await store.acquire(req(lease, "t", ttl=30))) == fences[lease]
        cluster.restart(restarted)
        admin = restarted.client()
        try:
            for script in SCRIPTS:
                admin.script_load(redis_scripts._script(script).source)
        finally:
            admin.close()
        answers = await _retrying(
            lambda: store.renew([RenewItem(lease, "t", 30) for lease in everyone])
        )()
        assert answers == [lease not in per_node[1] for lease in everyone]
        # The store saw that node restart, and only that one: its holders' loss
        # reason is "restart", the others' would still be "refused".
        assert [store.restarts(lease) for lease in everyone] == [
            int(lease in per_node[1]) for lease in everyone
        ]
        lost = per_node[1][0]
        fence = fence_of(await _retrying(lambda: store.acquire(req(lost, "u", ttl=30)))())
        assert fence > fences[lost]
        assert await store.renew([RenewItem(lost, "u", 30)]) == [True]
        # The survivors still hold theirs.
        assert await store.holders(per_node[0][0]) != []

    with_store(cluster.url, scenario)


def test_a_moved_slot_is_followed_and_stamped_by_its_new_owner(
    private_cluster: RedisClusterServers,
) -> None:
    """After a slot moves to another node (here an empty slot, reassigned with
    CLUSTER SETSLOT ... NODE), the client meets MOVED and follows it; the grant is
    stamped with the new owner's run_id, so it renews."""
    cluster = private_cluster
    source, target = cluster.nodes[0], cluster.nodes[2]
    (warm,) = names_on(cluster, source, 1, "warm")
    # A name in another slot than the warm-up's, so the slot that moves is empty.
    warm_slot = redis_layout._bucket_slot(LAYOUT.bucket(warm))
    lease = next(
        name
        for name in names_on(cluster, source, 50, "moved")
        if redis_layout._bucket_slot(LAYOUT.bucket(name)) != warm_slot
    )
    slot = redis_layout._bucket_slot(LAYOUT.bucket(lease))

    async def scenario(store: async_redis.AsyncRedisStore) -> None:
        # The store learns the slot map (and the source's run_id) first.
        await store.acquire(req(warm, "t"))
        assert await store.release(warm, "t")
        admin = target.client()
        try:
            target_id = admin.execute_command("CLUSTER", "MYID")
        finally:
            admin.close()
        for node in (target, source, cluster.nodes[1]):
            admin = node.client()
            try:
                admin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            finally:
                admin.close()
        cluster.wait_ok()
        assert cluster.owner_of(LAYOUT.for_name(lease).state) is target
        fence = fence_of(await store.acquire(req(lease, "t", ttl=5)))
        assert await store.renew([RenewItem(lease, "t", 30)]) == [True]
        (holder,) = await store.holders(lease)
        assert holder.fence == fence and holder.expires_in > 20

    with_store(cluster.url, scenario)


# redis-py's asyncio cluster client replaces its ClusterNode objects when it
# rediscovers the cluster after a node failed, without closing the old ones or their
# sockets; their __del__ then warns. They are collected inside this test (gc below),
# so the warnings land here and not in whichever test runs when they are collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_node_down_costs_only_the_leases_on_that_node(
    private_cluster: RedisClusterServers,
) -> None:
    # A renewal batch spans nodes; redis-py fails a cluster pipeline as a whole when
    # one node is unreachable. The store answers the reachable nodes' items and
    # None (unknown) for the others, so the keeper renews the leases on the live
    # nodes and retries the rest until their own deadlines.
    names = [names_on(private_cluster, node, 1, "down")[0] for node in private_cluster.nodes]
    tokens = [uuid.uuid4().hex for _ in names]
    store = sync_redis.from_url(parse(private_cluster.url), SYSTEM_CLOCK)
    try:
        for name, token in zip(names, tokens, strict=True):
            fence_of(store.acquire(req(name, token, ttl=30)))
        items = [RenewItem(name, token, 30) for name, token in zip(names, tokens, strict=True)]
        private_cluster.nodes[2].stop()
        assert store.renew(items) == [True, True, None]
        with pytest.raises(StoreUnavailable):
            store.renew(items[2:])  # nothing answerable: an error, never a lone None
    finally:
        store.close()

    async def on_async(astore: async_redis.AsyncRedisStore) -> None:
        assert await astore.renew(items) == [True, True, None]
        with pytest.raises(StoreUnavailable):
            await astore.renew(items[2:])  # nothing answerable: an error, not None

    with_store(private_cluster.url, on_async)

    # What a holder sees: only the lease on the stopped node is lost.
    client = leasehold.Client(private_cluster.url)
    try:
        leases = [
            client.lock(name, ttl=1.5).acquire(timeout=5)
            for name in names_on(private_cluster, private_cluster.nodes[0], 1, "kept")
            + names_on(private_cluster, private_cluster.nodes[1], 1, "kept")
        ]
        private_cluster.nodes[1].stop()
        time.sleep(2.5)  # past the ttl: several renewal rounds, each partly failing
        assert leases[0].held, "the lease on the live node must still be renewed"
        assert leases[1].lost
        assert client.statistics().lost == 1
    finally:
        client.close()
        gc.collect()
