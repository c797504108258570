"""etcd-specific behaviour: URLs, auth, TLS, endpoint failover, data loss, batching,
predecessor-only waking. The contract itself is the conformance suite's
(tests/test_conformance.py runs it on etcd like on every backend)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import leasehold
from leasehold._core.records import AcquireRequest, Busy, Granted, Holder, RenewItem
from leasehold._errors import InvalidArgument, StoreMisconfigured, StoreUnavailable
from leasehold.testing import FakeClock
from tests.conftest import unavailable

HOLDER = Holder(owner="t", host="h", pid=1)


def _servers() -> Any:
    from tests.servers import etcd

    if etcd.etcd_binary() is None:
        unavailable("etcd is not installed (apt-get install etcd-server)")
    return etcd


@pytest.fixture
def own_etcd() -> Iterator[Any]:
    """A private one-member cluster, for tests that wipe or reconfigure it."""
    cluster = _servers().EtcdCluster(1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def _unique(stem: str) -> str:
    return f"{stem}:{secrets.token_hex(6)}"


# -- URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "etcd://h:2379/some/path",
        "etcd://h:2379?nope=1",
        "etcd://h:99999",
        "etcd://h:2379?ca_cert=/x",  # TLS options need etcds://
        "etcds://h:2379?client_cert=/x",  # cert without key
        "etcd://user@h:2379",  # a user without a password
        "etcd://h:2379?timeout=0",
    ],
)
def test_bad_urls_fail_before_io(url: str) -> None:
    with pytest.raises(InvalidArgument):
        leasehold.Client(url)


def test_password_never_shows() -> None:
    client = leasehold.Client("etcd://alice:s3cret-pw@127.0.0.1:1,127.0.0.1:2?timeout=0.5")
    assert "s3cret" not in repr(client.store) and "s3cret" not in client.url
    assert "s3cret" not in repr(client.store._options)
    with pytest.raises(StoreUnavailable) as info:
        client.lock(_unique("pw")).acquire(timeout=0)
    assert "s3cret" not in str(info.value)
    client.close()


# -- endpoints ----------------------------------------------------------------------------


def test_a_dead_endpoint_is_skipped(etcd_server: Any) -> None:
    dead = "127.0.0.1:1"
    client = leasehold.Client(f"etcd://{dead},{etcd_server.endpoint(0)}?prefix=skip/")
    lease = client.lock(_unique("skip")).acquire(timeout=5)
    assert lease.held
    lease.release()
    client.close()


# -- data loss ----------------------------------------------------------------------------


def test_fences_and_versions_increase_across_a_wipe(own_etcd: Any) -> None:
    client = leasehold.Client(own_etcd.url)
    name = _unique("wipe")
    before = client.lock(name, ttl=30, renew=False).acquire(timeout=5)
    version = client.store.write_record("k", 0, b"v")
    assert version is not None
    time.sleep(1.1)  # the epoch is the wipe's second: it must be a later one
    own_etcd.wipe()
    # The old grant is gone with the data: renewing it answers False (lost).
    with pytest.raises(leasehold.LeaseLost):
        before.extend()
    after = client.lock(name, ttl=30).acquire(timeout=10)
    assert after.fence > before.fence
    assert client.store.restarts(name) == 1  # the changed epoch was noticed
    newer = client.store.write_record("k", 0, b"w")
    assert newer is not None and newer > version
    fresh = leasehold.Client(own_etcd.url)  # a client that never saw the old epoch
    other = fresh.lock(_unique("wipe")).acquire(timeout=5)
    assert other.fence > before.fence
    for lease in (after, other):
        lease.release()
    fresh.close()
    client.close()


# -- batching and waking ----------------------------------------------------------------


def _renewal_requests(store: Any, items: list[RenewItem]) -> tuple[list[bool], list[str]]:
    """One renewal round of ``items``: its answers and the etcd requests it made,
    counted where they leave the store (its HTTP client's ``call``)."""
    calls: list[str] = []
    original = store._http.call

    def counting(path: str, body: Any, **kwargs: Any) -> Any:
        calls.append(path)
        return original(path, body, **kwargs)

    store._http.call = counting
    try:
        answers = store.renew(items)
    finally:
        del store._http.call
    return answers, calls


def _one_keepalive(calls: list[str]) -> bool:
    """The session model's round: one keepalive, then one read (a transaction of
    ranges, or one range) that confirms the term and every key."""
    return calls in (["lease/keepalive", "kv/txn"], ["lease/keepalive", "kv/range"])


def _hold(store: Any, count: int, ttl: float = 5.0) -> list[RenewItem]:
    items = []
    for _ in range(count):
        name, token = _unique("b"), secrets.token_hex(16)
        assert isinstance(store.acquire(AcquireRequest(name, token, HOLDER, ttl)), Granted)
        items.append(RenewItem(name, token, ttl))
    return items


@pytest.mark.parametrize("count", [1, 100, 1000])
def test_a_renewal_round_is_one_keepalive_however_many_leases(etcd_server: Any, count: int) -> None:
    client = leasehold.Client(f"{etcd_server.url}?prefix=batch/")
    store = client.store
    # A TTL longer than the acquires take: a key past its own deadline is swept.
    items = _hold(store, count, ttl=60.0)
    leases = {store._held[(i.name, i.token)].lease for i in items}
    assert len(leases) == 1  # one session lease for every key of this TTL
    store.renew(items)  # the first round may find a key to move (none expected)
    answers, calls = _renewal_requests(store, items)
    assert answers == [True] * count
    assert _one_keepalive(calls), calls
    for item in items:
        store.release(item.name, item.token)
    client.close()


def _cycle_requests(store: Any, clock: Any, steps: list[float], ttl: float) -> list[list[str]]:
    """An acquire + release of a fresh name after each clock step: the etcd
    requests of each cycle, counted where they leave the store."""
    cycles: list[list[str]] = []
    original = store._http.call

    def counting(path: str, body: Any, **kwargs: Any) -> Any:
        cycles[-1].append(path)
        return original(path, body, **kwargs)

    store._http.call = counting
    try:
        for step in steps:
            clock.advance(step)
            cycles.append([])
            name, token = _unique("s"), secrets.token_hex(16)
            assert isinstance(store.acquire(AcquireRequest(name, token, HOLDER, ttl)), Granted)
            assert store.release(name, token)
    finally:
        del store._http.call
    return cycles


def test_a_keepalive_sent_within_the_slack_covers_the_next_acquires(etcd_server: Any) -> None:
    """The session lease lasts a tenth of the ttl longer than its keys' ttl, so an
    acquire needs no keepalive of its own while the last refresh was sent less
    than that before it: an acquire + release is two requests, and a process
    acquiring in a loop with a 30 s ttl sends one keepalive every 3 s."""
    from leasehold._core.etcd import session_seconds, session_slack

    ttl = 30.0
    slack = session_slack(session_seconds(ttl))
    assert slack == 3
    clock = FakeClock()
    client = leasehold.Client(f"{etcd_server.url}?prefix=slack/", clock=clock)
    store = client.store
    first, *within, after = _cycle_requests(store, clock, [0.0] + [slack / 4] * 3 + [slack], ttl)
    print(f"\nfirst {first}, then {within}, after the slack {after}")
    assert "lease/grant" in first  # the session lease is granted once
    assert within == [["kv/txn", "kv/txn"]] * 3  # the grant, the release
    assert after == ["lease/keepalive", "kv/txn", "kv/txn"]
    # Every grant's etcd expiry is after its send time + ttl: the session lease,
    # refreshed at the last keepalive, has its whole length left from there.
    session = store._sessions.current(session_seconds(ttl))
    assert session is not None and store._http.time_to_live(session.lease) >= ttl
    # What holders() reports is the key's time left, not the slack on top.
    name = _unique("s")
    assert isinstance(store.acquire(AcquireRequest(name, "tok", HOLDER, ttl)), Granted)
    [info] = store.holders(name)
    assert ttl - 2 <= info.expires_in <= ttl
    store.release(name, "tok")
    client.close()


def test_slack_is_a_tenth_of_the_ttl_and_read_back_from_the_grant() -> None:
    from leasehold._core.etcd import lease_seconds, session_seconds, session_slack

    ttls = (0.5, 2.0, 9.9, 10.0, 10.5, 30.0, 60.5, 99.5, 100.0, 3600.0)
    assert [session_seconds(t) for t in ttls] == [1, 2, 11, 11, 12, 33, 67, 110, 110, 3960]
    for seconds in range(1, 5000):
        assert session_slack(session_seconds(seconds)) == seconds // 10
    assert all(session_slack(session_seconds(t)) == lease_seconds(t) // 10 for t in ttls)


def test_control_without_slack_every_acquire_sends_a_keepalive(
    etcd_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request counter above fires when the session lease is only as long as
    the ttl: then only a keepalive sent after the acquire began covers it."""
    monkeypatch.setattr("leasehold._core.etcd.SLACK_SHARE", 10**9)
    clock = FakeClock()
    client = leasehold.Client(f"{etcd_server.url}?prefix=slack/", clock=clock)
    _first, *rest = _cycle_requests(client.store, clock, [0.0, 0.75, 0.75, 0.75], 30.0)
    print(f"\nwithout slack: {rest}")
    assert rest == [["lease/keepalive", "kv/txn", "kv/txn"]] * 3
    client.close()


class _PerGrantLeases:
    """The control's lease layout: every grant on an etcd lease of its own (the
    design before session leases), through the real store and etcd."""

    def __init__(self, sessions: Any) -> None:
        self._sessions = sessions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sessions, name)

    def current(self, seconds: int) -> Any:
        return None  # no lease is shared

    def fresh(self, seconds: int, since: float, ttl: float) -> Any:
        self._sessions.forget()
        return self._sessions.fresh(seconds, since, ttl)


def test_control_the_round_counter_fires_on_one_lease_per_grant(etcd_server: Any) -> None:
    client = leasehold.Client(f"{etcd_server.url}?prefix=batch/")
    store = client.store
    store._sessions = _PerGrantLeases(store._sessions)
    items = _hold(store, 20)
    assert len({store._held[(i.name, i.token)].lease for i in items}) == 20
    answers, calls = _renewal_requests(store, items)
    assert answers == [True] * 20
    print(f"\none lease per grant, 20 leases: {calls}")
    assert not _one_keepalive(calls), calls
    for item in items:
        store.release(item.name, item.token)
    client.close()


def _key_of(store: Any, name: str, token: str) -> dict[str, Any] | None:
    from leasehold._core.etcd import token_id

    kvs = store._http.range(store._keys.holder(name, token_id(token))).get("kvs", [])
    return kvs[0] if kvs else None


def _unrenewed_key_life(store: Any) -> tuple[float, bool, int]:
    """Two leases of one TTL on one session lease: ``kept`` renewed by the keeper,
    ``dropped`` held with renewal off. How long the dropped one's key lived after
    its acquire (capped), whether the kept one was held throughout, and how many
    session leases their keys shared (1)."""
    ttl = 2.0
    client = leasehold.Client(store=store)
    kept = client.lock(_unique("kept"), ttl=ttl).acquire(timeout=5)
    sent = time.monotonic()
    dropped = client.lock(_unique("dropped"), ttl=ttl, renew=False).acquire(timeout=5)
    shared = {
        int(_key_of(store, lease.name, lease._token)["lease"])  # type: ignore[index]
        for lease in (kept, dropped)
    }
    lived = CAP
    held_throughout = True
    while time.monotonic() - sent < CAP:  # bounded: CAP seconds
        held_throughout = held_throughout and kept.held
        if _key_of(store, dropped.name, dropped._token) is None:
            lived = time.monotonic() - sent
            break
        time.sleep(0.05)
    held_throughout = (
        held_throughout and kept.held and _key_of(store, kept.name, kept._token) is not None
    )
    kept.release()
    dropped.release()
    client.close()
    return lived, held_throughout, len(shared)


# Long enough to see a key outlive its TTL by far more than the bound.
CAP = 6.0
# TTL 2 s, renewal interval TTL/3, and room for the round's requests.
EXPIRY_BOUND = 2.0 + 2.0 / 3 + 0.5


def test_a_name_not_renewed_expires_while_its_session_lease_is_kept(etcd_server: Any) -> None:
    store = leasehold.Client(f"{etcd_server.url}?prefix=sweep/").store
    lived, held_throughout, shared = _unrenewed_key_life(store)
    print(f"\nunrenewed 2 s key deleted {lived:.2f} s after its acquire (bound {EXPIRY_BOUND:.2f})")
    assert shared == 1  # both keys on one session lease, which the keeper kept alive
    assert held_throughout
    # Never before its own TTL (less the holder's margin), at most one interval after.
    assert 2.0 - 0.1 <= lived <= EXPIRY_BOUND, lived


def test_control_without_the_sweep_the_unrenewed_name_lives_on(etcd_server: Any) -> None:
    """The checker above fires when nothing deletes a key whose own deadline
    passed: the session lease, kept alive for the other key, keeps it too."""
    store = leasehold.Client(f"{etcd_server.url}?prefix=sweep/").store

    def no_sweep(now: float, keep: Any) -> None:
        del now, keep

    store._sweep = no_sweep
    lived, held_throughout, shared = _unrenewed_key_life(store)
    print(f"\nwithout the sweep: still there {lived:.2f} s after its acquire")
    assert shared == 1 and held_throughout
    assert lived > EXPIRY_BOUND


def test_close_revokes_the_session_lease(etcd_server: Any) -> None:
    url = f"{etcd_server.url}?prefix=close/"
    client = leasehold.Client(url)
    lease = client.lock(_unique("c"), ttl=30, renew=False).acquire(timeout=5)
    session = int(_key_of(client.store, lease.name, lease._token)["lease"])  # type: ignore[index]
    watcher = leasehold.Client(url)
    other = watcher.lock(_unique("w"), ttl=30, renew=False).acquire(timeout=5)
    other_session = int(_key_of(watcher.store, other.name, other._token)["lease"])  # type: ignore[index]
    # The checker's control: a session lease that is not closed is alive.
    assert watcher.store._http.time_to_live(session) > 0
    client.close()
    assert watcher.store._http.time_to_live(session) == -1  # revoked, not left to expire
    assert watcher.store._http.time_to_live(other_session) > 0
    other.release()
    watcher.close()
    probe = leasehold.Client(url)
    assert probe.store._http.time_to_live(other_session) == -1
    probe.close()


def test_a_long_renewal_batch_is_answered_whole(etcd_server: Any) -> None:
    """The gateway answers only the first leases of a long keepalive request; the
    rest go again until every lease has its answer."""
    client = leasehold.Client(f"{etcd_server.url}?prefix=batch/")
    store = client.store
    leases = [client.lock(_unique("b"), ttl=5, renew=False).acquire(timeout=5) for _ in range(80)]
    released = leases[::7]
    for lease in released:
        lease.release()
    answers = store.renew([RenewItem(lease.name, lease._token, 5.0) for lease in leases])
    assert answers == [lease not in released for lease in leases]
    for lease in leases:
        lease.release()
    client.close()


def test_a_release_wakes_only_the_head_waiter(etcd_server: Any) -> None:
    client = leasehold.Client(f"{etcd_server.url}?prefix=herd/")
    store = client.store
    name = _unique("herd")
    holder = secrets.token_urlsafe(24)
    assert isinstance(store.acquire(AcquireRequest(name, holder, HOLDER, ttl=30)), Granted)
    waiters = [secrets.token_urlsafe(24) for _ in range(6)]
    for position, token in enumerate(waiters):
        result = store.acquire(AcquireRequest(name, token, HOLDER, ttl=30, queue_ttl=30))
        assert result == Busy(retry_after=None, position=position)
    woken: dict[int, bool] = {}

    def wait(index: int) -> None:
        woken[index] = bool(store.wait(name, waiters[index], 2.0))

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(waiters))]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # every watch is in place (and would replay the release anyway)
    assert store.release(name, holder)
    for thread in threads:
        thread.join(10)
    assert woken == {0: True, **{i: False for i in range(1, len(waiters))}}
    assert isinstance(store.acquire(AcquireRequest(name, waiters[0], HOLDER, ttl=30)), Granted)
    for token in waiters:
        store.release(name, token)
    client.close()


def _txns(store: Any, kinds: list[str] | None = None) -> list[bool]:
    """Record whether each transaction ``store`` sends succeeds (and, in ``kinds``,
    "read" for one of reads only, which etcd serves without a Raft entry, else
    "write")."""
    outcomes: list[bool] = []
    real = store._http.txn

    def counted(compare: Any, success: Any, failure: Any = (), **kwargs: Any) -> Any:
        response = real(compare, success, failure, **kwargs)
        outcomes.append(bool(response.get("succeeded")))
        if kinds is not None:
            ops = [*success, *failure]
            reads = not compare and all("request_range" in op for op in ops)
            kinds.append("read" if reads else "write")
        return response

    store._http.txn = counted
    return outcomes


def test_a_waiter_whose_predecessor_was_granted_waits_for_the_release(etcd_server: Any) -> None:
    """The second waiter watches the first one's queue key. When the first is
    granted (its queue key goes), the second is head, but a holder stands in its
    way: its wait() reads the name once and watches the holders instead of waking
    its caller for an attempt that would fail (a transaction etcd commits through
    Raft, with a WAL write). The release then wakes it, and its attempt succeeds:
    no failed transaction. Control: the wait does not end at the first one's grant
    (it did before), and it does end, promptly, at the release."""
    client = leasehold.Client(f"{etcd_server.url}?prefix=next/")
    store = client.store
    name = _unique("next")
    holder, first, second = (secrets.token_urlsafe(24) for _ in range(3))
    assert isinstance(store.acquire(AcquireRequest(name, holder, HOLDER, ttl=30)), Granted)
    for position, token in enumerate((first, second)):
        result = store.acquire(AcquireRequest(name, token, HOLDER, ttl=30, queue_ttl=30))
        assert result == Busy(retry_after=None, position=position)
    ended: list[tuple[bool, float]] = []

    def wait() -> None:
        woken = bool(store.wait(name, second, 5.0))
        ended.append((woken, time.monotonic()))

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)  # its watch is in place (and would replay the events anyway)
    assert store.release(name, holder)
    outcomes = _txns(store)
    granted = store.acquire(AcquireRequest(name, first, HOLDER, ttl=30, queue_ttl=30))
    assert isinstance(granted, Granted)
    time.sleep(0.5)
    assert ended == [], "woken by the grant of its predecessor"
    released = time.monotonic()
    assert store.release(name, first)
    thread.join(10)
    assert len(ended) == 1 and ended[0][0] is True
    assert ended[0][1] - released < 1.0
    assert isinstance(
        store.acquire(AcquireRequest(name, second, HOLDER, ttl=30, queue_ttl=30)), Granted
    )
    # The grant, the release and the second's grant: no transaction failed.
    assert outcomes == [True, True, True], outcomes
    store.release(name, second)
    client.close()


def test_a_newcomer_to_a_name_with_waiters_reads_instead_of_failing(etcd_server: Any) -> None:
    """Once the store has seen waiters on a name, a token that is not queued asks
    with a transaction of reads only (no Raft entry) instead of a one-step grant
    that would fail (a Raft entry all the same), then queues. A name seen without
    waiters goes back to the one-step grant, after one read. Control: the first
    newcomer, before any waiter was seen, sends the one-step grant, which fails."""
    client = leasehold.Client(f"{etcd_server.url}?prefix=crowd/")
    store = client.store
    name = _unique("crowd")
    tokens = [secrets.token_urlsafe(24) for _ in range(6)]
    holder, first, second, third, later, last = tokens

    def ask(token: str, queue: bool = True) -> Any:
        return store.acquire(
            AcquireRequest(name, token, HOLDER, ttl=30, queue_ttl=30 if queue else None)
        )

    assert isinstance(ask(holder), Granted)
    kinds: list[str] = []
    outcomes = _txns(store, kinds)
    assert ask(first) == Busy(retry_after=None, position=0)  # sees a holder, no waiter
    assert list(zip(kinds, outcomes, strict=True)) == [("write", False), ("write", True)]
    del kinds[:], outcomes[:]
    assert ask(second) == Busy(retry_after=None, position=1)  # sees the first waiter
    assert list(zip(kinds, outcomes, strict=True)) == [("write", False), ("write", True)]
    del kinds[:], outcomes[:]
    assert ask(third) == Busy(retry_after=None, position=2)  # the name is crowded now
    assert list(zip(kinds, outcomes, strict=True)) == [("read", True), ("write", True)]
    assert store.release(name, holder)
    for token in (first, second, third):
        store.release(name, token)  # waiters giving up (False: they held nothing)
    del kinds[:], outcomes[:]
    assert isinstance(ask(later), Granted)  # a read finds it free: granted after it
    assert list(zip(kinds, outcomes, strict=True)) == [("read", True), ("write", True)]
    assert store.release(name, later)
    del kinds[:], outcomes[:]
    assert isinstance(ask(last), Granted)  # no longer crowded: one step
    assert list(zip(kinds, outcomes, strict=True)) == [("write", True)]
    store.release(name, last)
    client.close()


def test_a_wake_up_before_wait_is_not_lost(etcd_server: Any) -> None:
    client = leasehold.Client(f"{etcd_server.url}?prefix=early/")
    store = client.store
    name = _unique("early")
    holder, waiter = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    store.acquire(AcquireRequest(name, holder, HOLDER, ttl=30))
    store.acquire(AcquireRequest(name, waiter, HOLDER, ttl=30, queue_ttl=30))
    store.release(name, holder)  # before the waiter waits
    started = time.monotonic()
    assert store.wait(name, waiter, 5.0) is True
    assert time.monotonic() - started < 2.0
    store.release(name, waiter)
    client.close()


# -- auth and TLS -------------------------------------------------------------------------


def _enable_auth(cluster: Any, password: str) -> None:
    cluster.post(0, "auth/user/add", {"name": "root", "password": password})
    cluster.post(0, "auth/role/add", {"name": "root"})
    cluster.post(0, "auth/user/grant", {"user": "root", "role": "root"})
    cluster.post(0, "auth/enable", {})


def test_user_password_auth_and_token_refresh() -> None:
    servers = _servers()
    # Simple tokens expire after 1 s idle: the client must fetch new ones.
    cluster = servers.EtcdCluster(1, extra_args=("--auth-token-ttl", "1"))
    cluster.start()
    try:
        password = "pw-" + secrets.token_hex(8)
        cluster.post(0, "auth/user/add", {"name": "narrow", "password": password})
        cluster.post(0, "auth/role/add", {"name": "narrow"})  # no permission at all
        cluster.post(0, "auth/user/grant", {"user": "narrow", "role": "narrow"})
        _enable_auth(cluster, password)
        wrong = leasehold.Client(f"etcd://root:wrong-{password}@{cluster.endpoint(0)}")
        # A rejected password is misconfiguration: raised at once, never retried.
        with pytest.raises(StoreMisconfigured) as info:
            wrong.lock("x").acquire(timeout=0)
        wrong.close()
        assert "user name or password" in str(info.value) and password not in str(info.value)
        # A user whose roles do not cover leasehold's keys: the same, with its cause.
        narrow = leasehold.Client(f"etcd://narrow:{password}@{cluster.endpoint(0)}")
        with pytest.raises(StoreMisconfigured) as info:
            narrow.lock("x").acquire(timeout=5)
        narrow.close()
        assert "permission denied" in str(info.value) and password not in str(info.value)
        client = leasehold.Client(f"etcd://root:{password}@{cluster.endpoint(0)}")
        first = client.lock(_unique("auth")).acquire(timeout=5)
        first.release()
        time.sleep(2.5)  # the token expired meanwhile
        second = client.lock(_unique("auth")).acquire(timeout=5)
        assert second.fence > first.fence
        second.release()
        client.close()
    finally:
        cluster.cleanup()


@pytest.mark.parametrize("client_cert_auth", [False, True])
def test_tls(client_cert_auth: bool) -> None:
    servers = _servers()
    if servers.shutil.which("openssl") is None:
        unavailable("openssl is not installed")
    cluster = servers.EtcdCluster(1, tls=True, client_cert_auth=client_cert_auth)
    cluster.start()
    try:
        files = cluster.tls_files
        url = f"etcds://{cluster.endpoint(0)}?ca_cert={files.ca_cert}"
        if client_cert_auth:
            refused = leasehold.Client(url)
            with pytest.raises(StoreUnavailable):
                refused.lock("x").acquire(timeout=0)
            refused.close()
            url += f"&client_cert={files.cert}&client_key={files.key}"
        client = leasehold.Client(url)
        lease = client.lock(_unique("tls")).acquire(timeout=5)
        assert lease.held
        lease.release()
        client.close()
        untrusted = leasehold.Client(f"etcds://{cluster.endpoint(0)}")
        with pytest.raises(StoreUnavailable):
            untrusted.lock("x").acquire(timeout=0)
        untrusted.close()
    finally:
        cluster.cleanup()


def test_a_forked_child_makes_its_own_connections(etcd_server: Any) -> None:
    import os

    client = leasehold.Client(f"{etcd_server.url}?prefix=fork/")
    held = client.lock(_unique("parent")).acquire(timeout=5)
    parent_http = client.store._http.http()
    # The child must not put its keys on the parent's session lease (the parent
    # renews it; closing, the parent revokes it).
    parent_session = client.store._held[(held.name, held._token)].lease
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own connections, none of the parent's grants
        code = 1
        try:
            store = client.store
            lease = client.lock(_unique("child")).acquire(timeout=5)
            lease.release()
            fresh = store._http.http() is not parent_http
            forgot = all(name != held.name for name, _token in store._held)
            mine = client.lock(_unique("child")).acquire(timeout=5)
            child_lease = store._held[(mine.name, mine._token)].lease
            mine.release()
            own_session = child_lease != parent_session
            code = 0 if fresh and forgot and own_session else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    status = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert status == bytes([0])
    assert held.held and client.store._http.http() is parent_http
    held.release()
    client.close()


def test_the_password_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="leasehold")
    client = leasehold.Client("etcd://bob:Pa55-word@127.0.0.1:1?timeout=0.2&connect_timeout=0.2")
    with pytest.raises(StoreUnavailable):
        client.lock(_unique("log")).acquire(timeout=0.5)
    client.close()
    assert "Pa55-word" not in caplog.text
