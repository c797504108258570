"""``leasehold exporter``, ``top`` and the observability parts of ``ls``, end to end:
real subprocesses on a SQLite store, a real HTTP scrape parsed by prometheus_client,
and a pseudo-terminal for the interactive ``top``."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import leasehold
from leasehold._core.records import AcquireRequest, Holder
from leasehold.cli import _view
from leasehold.cli.exporter import StoreCollector
from tests.test_cli import LH, cli_env, lh

WAITER = Holder(owner="queued-one", host="elsewhere", pid=4242)


def queue(client: leasehold.Client, name: str, count: int) -> list[str]:
    """Put ``count`` waiters in ``name``'s queue (as blocked acquires do)."""
    tokens = [secrets.token_urlsafe(16) for _ in range(count)]
    for token in tokens:
        request = AcquireRequest(name=name, token=token, holder=WAITER, ttl=30, queue_ttl=60)
        client.store.acquire(request)
    return tokens


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[dict[str, str], leasehold.Client]]:
    env = cli_env(tmp_path)
    client = leasehold.Client(env["LEASEHOLD_URL"])
    try:
        yield env, client
    finally:
        client.close()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_exporter_serves_the_whole_store(store: tuple[dict[str, str], leasehold.Client]) -> None:
    env, client = store
    held = [
        client.lock(f"meeting:{secrets.token_hex(8)}", ttl=60).acquire(timeout=5) for _ in range(3)
    ]
    queued = [(held[0].name, t) for t in queue(client, held[0].name, 2)]
    queued += [(held[1].name, t) for t in queue(client, held[1].name, 1)]
    leader = client.election("nightly", identity="scheduler-a")
    leader.campaign(timeout=5)
    room = client.presence("lobby")
    epoch = room.open(lambda number: {"n": number})
    room.join("alice", epoch=epoch)
    room.intend("bob", epoch=epoch)
    proc = subprocess.Popen(
        [*LH, "exporter", "--port", "0", "--bind", "127.0.0.1", "--interval", "0.2",
         "--election", "nightly", "--election", "idle", "--room", "lobby"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, line
        base = f"http://127.0.0.1:{match.group(1)}"
        got = scrape(base + "/metrics")
        assert got[("leasehold_store_up", frozenset())] == 1
        group = frozenset({("name_group", "meeting:*")})
        assert got[("leasehold_store_holders", group)] == 3
        assert got[("leasehold_store_waiters", group)] == 3  # queue depth of the group
        assert got[("leasehold_store_oldest_lease_seconds", group)] >= 0
        info = {
            ("election", "nightly"), ("leader", "scheduler-a"), ("host", socket.gethostname())
        }  # fmt: skip
        assert got[("leasehold_store_leader_info", frozenset(info))] == 1
        nobody = frozenset({("election", "idle"), ("leader", ""), ("host", "")})
        assert got[("leasehold_store_leader_info", nobody)] == 0
        assert got[("leasehold_store_leader_term", frozenset({("election", "nightly")}))] >= 1
        members = {
            state: got[
                (
                    "leasehold_store_presence_members",
                    frozenset({("room", "lobby"), ("state", state)}),
                )
            ]
            for state in ("active", "intent")
        }
        assert members == {"active": 1, "intent": 1}
        assert got[("leasehold_store_presence_open", frozenset({("room", "lobby")}))] == 1
        # No name is a label: ids never reach the series.
        assert not any(lease.name in dict(labels).values() for lease in held for _, labels in got)
        # Leaving the queue and releasing show at the next poll.
        for name, token in queued:
            client.store.release(name, token)
        for lease in held:
            lease.release()
        deadline = time.monotonic() + 20
        while got.get(("leasehold_store_holders", group)) and time.monotonic() < deadline:
            time.sleep(0.1)
            got = scrape(base + "/metrics")
        assert ("leasehold_store_holders", group) not in got
        with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + "/nope", timeout=10)
        assert missing.value.code == 404
        missing.value.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        leader.resign()


def test_exporter_health_turns_red_when_polls_fail() -> None:
    collector = StoreCollector(interval=1.0)
    assert collector.health()[0] is False  # nothing polled yet
    collector.record(_view.StoreSnapshot(leases=[], waiters=[]))
    assert collector.health() == (True, "ok")
    collector.record(None, "connection refused")
    healthy, detail = collector.health()
    assert not healthy and "connection refused" in detail
    assert [f.name for f in collector.collect()] == ["leasehold_store_up"]


def test_exporter_refuses_a_bad_store_at_once(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    result = lh(env, "exporter", "--port", "0", "--url", "redis://127.0.0.1:1/0", timeout=60)
    assert result.returncode == 69, result
    assert "store unavailable" in result.stderr


def test_ls_shows_queue_depth_waiters_and_gone_holders(
    store: tuple[dict[str, str], leasehold.Client],
) -> None:
    env, client = store
    busy = client.lock("reports/daily", ttl=60).acquire(timeout=5)
    queue(client, "reports/daily", 2)
    # A holder on this host that died without releasing (kill -9): its lease lingers.
    code = (
        "import leasehold, os, sys; c = leasehold.Client(sys.argv[1]); "
        "l = c.lock('reports/orphan', ttl=60).acquire(timeout=5); print(os.getpid(), flush=True); "
        "os._exit(0)"
    )
    dead = subprocess.run(
        [sys.executable, "-c", code, env["LEASEHOLD_URL"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 0, dead.stderr
    dead_pid = int(dead.stdout)
    table = lh(env, "ls")
    assert table.returncode == 0, table
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:] if line.strip()}
    assert rows["reports/daily"][-1] == "2"  # WAITING
    assert f"{dead_pid} (gone)" in table.stdout
    assert "1 holder(s) on this host whose process is gone" in table.stdout
    listed = {row["name"]: row for row in json.loads(lh(env, "ls", "--json").stdout)}
    assert listed["reports/daily"]["queue_depth"] == 2
    assert listed["reports/daily"]["pid_alive"] is True
    assert listed["reports/orphan"]["pid_alive"] is False
    waiters = json.loads(lh(env, "ls", "--waiters", "--json").stdout)
    assert [(w["name"], w["position"], w["owner"], w["pid"]) for w in waiters] == [
        ("reports/daily", 0, "queued-one", 4242),
        ("reports/daily", 1, "queued-one", 4242),
    ]
    assert "queued-one" in lh(env, "ls", "--waiters").stdout
    busy.release()


def test_top_once_lists_the_busiest_names_first(
    store: tuple[dict[str, str], leasehold.Client],
) -> None:
    env, client = store
    quiet = client.lock("quiet", ttl=60).acquire(timeout=5)
    hot = client.lock("hot:1", ttl=60).acquire(timeout=5)
    queue(client, "hot:1", 3)
    result = lh(env, "top", "--once", "--interval", "0.2")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].startswith("leasehold top")
    assert "2 held, 3 waiting" in lines[0]
    assert lines[1].split() == ["NAME", "HOLDERS", "WAITERS", "HANDOFFS/S", "WAIT", "P99", "OLDEST"]
    assert lines[2].split()[:3] == ["hot:1", "1/1", "3"]
    assert lines[3].split()[:3] == ["quiet", "1/1", "0"]
    grouped = lh(env, "top", "--groups", "--interval", "0.2")  # not a terminal: one frame
    assert grouped.stdout.splitlines()[2].split()[:3] == ["hot:*", "1/1", "3"]
    quiet.release()
    hot.release()


def test_top_counts_handoffs_and_observed_waits() -> None:
    from leasehold._core.records import HolderInfo, WaiterInfo
    from leasehold.cli.top import Tracker

    def holder(fence: int) -> HolderInfo:
        return HolderInfo("job", "o", "h", 1, fence, 1, 0.0, 10.0)

    def waiter(owner: str) -> WaiterInfo:
        return WaiterInfo("job", owner, "h", 2, 0, 10.0)

    tracker = Tracker()
    (row,) = tracker.update(_view.StoreSnapshot([holder(1)], [waiter("a")]), now=0.0)
    assert row.handoffs_per_s is None and row.wait_p99 is None  # nothing to compare yet
    assert row.waiters == 1
    tracker.update(_view.StoreSnapshot([holder(4)], [waiter("b")]), now=1.0)  # a got it
    tracker.update(_view.StoreSnapshot([holder(4)], [waiter("b")]), now=2.0)
    (row,) = tracker.update(_view.StoreSnapshot([holder(5)], []), now=4.0)  # b got it
    assert row.handoffs_per_s == pytest.approx(2 / 4.0)  # two new fences in four seconds
    waits = sorted([1.0 - 0.0, 4.0 - 1.0])  # first seen -> first poll without it
    assert row.wait_p99 == pytest.approx(waits[-1])
    assert row.waiters == 0 and row.holders == 1


def test_top_quits_on_q_in_a_terminal(store: tuple[dict[str, str], leasehold.Client]) -> None:
    env, client = store
    lease = client.lock("shown", ttl=60).acquire(timeout=5)
    master, slave = pty.openpty()
    # A wide terminal, so that the title line (with the store's long tmp path) is
    # not wrapped in the middle of "(q quits)".
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    proc = subprocess.Popen(
        [*LH, "top", "--interval", "0.2"],
        env={**env, "TERM": "xterm"},
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while not (b"q quits" in seen and b"shown" in seen) and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal (it exited)
                    break
        assert b"q quits" in seen and b"shown" in seen, (proc.poll(), seen)
        os.write(master, b"q")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        lease.release()


def test_exporter_health_follows_the_store(tmp_path: Path) -> None:
    """A real Redis stopped under a running exporter: /healthz turns 503 and the
    store series go (leasehold_store_up 0), then both come back after a restart."""
    from tests.conftest import unavailable
    from tests.servers.redis import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        unavailable("redis-server is not installed")
    env = cli_env(tmp_path)
    with RedisServer() as server:
        with leasehold.Client(server.url) as client:
            # A grant made at the store level: nothing releases it when the client closes.
            request = AcquireRequest(
                name="job:7", token=secrets.token_urlsafe(16), holder=WAITER, ttl=60
            )
            client.store.acquire(request)
        proc = subprocess.Popen(
            [*LH, "exporter", "--port", "0", "--bind", "127.0.0.1", "--interval", "0.2", server.url],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", proc.stderr.readline())
            assert match
            base = f"http://127.0.0.1:{match.group(1)}"

            def health() -> int:
                try:
                    with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
                        return int(response.status)
                except urllib.error.HTTPError as exc:
                    exc.close()
                    return int(exc.code)

            def wait_for(status: int) -> None:
                deadline = time.monotonic() + 30
                while health() != status and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert health() == status

            assert (
                scrape(base + "/metrics")[
                    ("leasehold_store_holders", frozenset({("name_group", "job:*")}))
                ]
                == 1
            )
            server.stop()
            wait_for(503)
            down = scrape(base + "/metrics")
            assert down == {("leasehold_store_up", frozenset()): 0}
            server.start()
            wait_for(200)
            assert scrape(base + "/metrics")[("leasehold_store_up", frozenset())] == 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            _, err = proc.communicate()
            assert "polling the store failed" in err
            assert "polling the store works again" in err
            assert err.count("polling the store failed") <= 3  # not once per poll
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_election_patterns_report_the_held_elections_that_match() -> None:
    with leasehold.Client("memory://") as client:
        leaders = [client.election(f"beat-{i}", identity=f"node-{i}") for i in range(3)]
        for candidate in leaders:
            candidate.campaign(timeout=5)
        other = client.lock("unrelated", ttl=30).acquire(timeout=5)
        snapshot = _view.poll(client, elections=["beat-*", "idle"])
        assert {name: info and info.owner for name, info in snapshot.leaders.items()} == {
            "beat-0": "node-0",
            "beat-1": "node-1",
            "beat-2": "node-2",
            "idle": None,  # named in full: reported while nobody leads
        }
        for candidate in leaders:
            candidate.resign()
        other.release()
