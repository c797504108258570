"""Public surface: exports, bad input before any I/O, secrets never shown."""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

import leasehold

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_honest() -> None:
    exported = set(leasehold.__all__)
    public = {name for name in dir(leasehold) if not name.startswith("_")}
    modules = {"testing", "fence", "cli", "asgi", "celery"}
    assert exported - {"__version__"} == public - modules, (
        f"missing from __all__: {sorted(public - modules - exported)}; "
        f"not defined: {sorted(exported - public - {'__version__'})}"
    )
    for name in exported:
        assert hasattr(leasehold, name)


def test_sync_mirrors_async() -> None:
    pairs = [
        (leasehold.AsyncClient, leasehold.Client),
        (leasehold.AsyncLock, leasehold.Lock),
        (leasehold.AsyncLease, leasehold.Lease),
    ]
    for async_cls, sync_cls in pairs:
        async_api = {n for n in dir(async_cls) if not n.startswith("_")} - {"aclose"}
        sync_api = {n for n in dir(sync_cls) if not n.startswith("_")} - {"close"}
        assert async_api == sync_api, (async_cls, async_api ^ sync_api)


def test_generated_sync_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_sync.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


BAD_NAMES = ["", "x" * 513, "a\nb", "tab\there", "nul\x00", 42, None, b"bytes"]
BAD_TTLS = [0, -1, -0.5, math.nan, math.inf, -math.inf, True, False, 10**9, "30", None]


class _NoIOStore(leasehold.Store):
    """Fails the test on any I/O: proves validation happens first."""

    capabilities = leasehold.Capabilities(False, False, False, False, False)

    def __getattribute__(self, item: str) -> object:
        if item in {"acquire", "renew", "release", "holders", "leases", "break_lease", "wait"}:
            raise AssertionError(f"I/O ({item}) before validation")
        return object.__getattribute__(self, item)


@pytest.fixture
def client() -> leasehold.Client:
    return leasehold.Client("memory://")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names(client: leasehold.Client, name: object) -> None:
    with pytest.raises(leasehold.InvalidArgument) as info:
        client.lock(name)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "name" in str(info.value)


@pytest.mark.parametrize("ttl", BAD_TTLS)
def test_bad_ttls(client: leasehold.Client, ttl: object) -> None:
    with pytest.raises(leasehold.InvalidArgument, match="ttl"):
        client.lock("ok", ttl=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan, math.inf, True, "5"])
def test_bad_timeouts(client: leasehold.Client, timeout: object) -> None:
    with pytest.raises(leasehold.InvalidArgument, match="timeout"):
        client.lock("ok").acquire(timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [0, -1, True, 2.5, "3", 10**7])
def test_bad_limits(client: leasehold.Client, limit: object) -> None:
    with pytest.raises(leasehold.InvalidArgument, match="limit"):
        client.semaphore("ok", limit)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "nope://x",
        "no-scheme",
        "sqlite://relative-without-slash.db",
        "sqlite:///",
        "sqlite:///x.db?bogus=1",
        "sqlite:///x.db?busy_timeout=abc",
        "sqlite:///:memory:",
        42,
    ],
)
def test_bad_urls(url: object) -> None:
    with pytest.raises(leasehold.InvalidArgument):
        leasehold.Client(url)  # type: ignore[arg-type]


def test_bad_extend_ttl_before_io(client: leasehold.Client) -> None:
    lease = client.lock("x").acquire()
    with pytest.raises(leasehold.InvalidArgument):
        lease.extend(ttl=-1)
    lease.release()


def test_password_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-pa55"
    with pytest.raises(leasehold.InvalidArgument) as info:
        leasehold.Client(f"bogus://user:{secret}@host:1/0")
    assert secret not in str(info.value)
    from leasehold._core.url import parse

    url = parse(f"redis://user:{secret}@127.0.0.1:1/0?password={secret}")
    assert secret not in repr(url) and secret not in str(url)
    assert "***" in url.redacted


def test_default_url_is_state_dir_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEASEHOLD_URL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    client = leasehold.Client()
    assert client.url == f"sqlite:///{tmp_path / 'state' / 'leasehold' / 'leasehold.db'}"
    with client.lock("default") as lease:
        assert lease.held
    directory = tmp_path / "state" / "leasehold"
    assert directory.is_dir() and (directory.stat().st_mode & 0o777) == 0o700
    client.close()
    monkeypatch.setenv("LEASEHOLD_URL", "memory://from-env")
    assert leasehold.Client().url == "memory://from-env"


def test_lease_reports_itself(client: leasehold.Client) -> None:
    with client.lock("report", ttl=5.0) as lease:
        assert lease.name == "report" and lease.ttl == 5.0
        assert 4.0 < lease.remaining() <= 5.0
        assert lease.owner == client.holder.owner
        assert "report" in repr(lease) and "held" in repr(lease)
        lease.check()
    assert lease.released and not lease.lost and not lease.held
    with pytest.raises(leasehold.LeaseLost, match="released"):
        lease.check()


def test_lease_as_context_manager_from_acquire(client: leasehold.Client) -> None:
    with client.lock("ctx").acquire(timeout=1) as lease:
        assert lease.held
    assert client.holders("ctx") == []


def test_with_block_exit_raises_when_lease_was_lost(client: leasehold.Client) -> None:
    with pytest.raises(leasehold.LeaseLost, match="broken by test"):
        with client.lock("lost0") as lease:
            lease._mark_lost("refused", "broken by test")  # what the keeper does on loss
    with pytest.raises(leasehold.LeaseLost), client.lock("lost", renew=False) as lease:
        client.break_lease("lost")
        lease.extend()  # the store refuses: LeaseLost escapes the body itself
    with pytest.raises(leasehold.LeaseLost) as info, client.lock("lost2") as lease:
        lease._mark_lost("refused", "broken by test")
        raise KeyError("body failed too")
    assert isinstance(info.value.__cause__, KeyError)


def test_statistics_count(client: leasehold.Client) -> None:
    lease = client.lock("s").acquire()
    assert client.lock("s").try_acquire() is None
    with pytest.raises(leasehold.AcquireTimeout):
        client.lock("s").acquire(timeout=0.05)
    lease.release()
    stats = client.statistics()
    assert (stats.acquired, stats.skipped, stats.timed_out, stats.released) == (1, 1, 1, 1)
    assert stats.hold_time > 0 and stats.wait_time > 0


def test_logs_never_contain_tokens(
    client: leasehold.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="leasehold")
    lease = client.lock("logged", renew=False).acquire()
    token = lease._token
    lease._mark_lost("refused", "test")
    assert caplog.records
    assert all(token not in record.getMessage() for record in caplog.records)
    assert token not in repr(lease)


def test_async_client_mirrors_sync() -> None:
    async def scenario() -> None:
        async with leasehold.AsyncClient("memory://") as client:
            async with client.lock("a") as lease:
                assert lease.held
                assert await client.lock("a").try_acquire() is None
                assert [h.fence for h in await client.holders("a")] == [lease.fence]
            assert await client.leases() == []

    asyncio.run(scenario())


def test_lease_fence_sql_rejects_a_superseded_holder(tmp_path: Path) -> None:
    import sqlite3

    client = leasehold.Client(f"sqlite:///{tmp_path / 'leases.db'}")
    data = sqlite3.connect(tmp_path / "data.db", isolation_level=None)
    old = client.lock("ledger", renew=False).acquire()
    client.break_lease("ledger")
    new = client.lock("ledger").acquire()
    data.execute("BEGIN")
    assert new.fence_sql(data) == new.fence
    data.execute("COMMIT")
    old._lost_reason = None  # pretend the old holder has not noticed yet (a pause)
    data.execute("BEGIN")
    with pytest.raises(leasehold.StaleFence):
        old.fence_sql(data)
    data.execute("ROLLBACK")
    new.release()
    data.close()
    client.close()


def test_errors_survive_pickling() -> None:
    import pickle

    errors = [
        leasehold.AcquireTimeout("n", 1.5),
        leasehold.LeaseLost("n", 7, "expired"),
        leasehold.StaleFence("n", 3, 9),
        leasehold.StaleEpoch("room", 4, None),
        leasehold.MemberGone("room", "alice", 4),
        leasehold.OnceFailed("k", "ValueError", "bad"),
    ]
    for error in errors:
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)
