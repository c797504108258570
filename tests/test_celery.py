"""leasehold.celery with a real broker, a real worker and real beat processes.

A redis-server started by the tests is the broker and result backend; the lease
store is a SQLite file in a temp dir. One prefork worker (3 processes) serves the
whole module; the tasks are in tests/_celery_app.py. In-process tests at the top
run tasks eagerly (``task.apply``) on a memory store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import leasehold

celery = pytest.importorskip(
    "celery", reason="celery is not installed (pip install 'leasehold[celery]')"
)

pytestmark = [
    # Celery and kombu emit deprecation notices of their own; ours stay errors.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:kombu.*"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:celery.*"),
    pytest.mark.timeout(90),
]

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_SERVERS = os.environ.get("LEASEHOLD_REQUIRE_SERVERS") == "1"
BOUND = 2.5  # seconds beyond a TTL that a takeover may take on a busy CI box


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def lc() -> Any:
    """leasehold.celery, imported on first use (it needs celery)."""
    import leasehold.celery

    return leasehold.celery


# -- in process: eager runs on a memory store -----------------------------------------


@pytest.fixture
def eager_app(lc: Any) -> Iterator[Any]:
    app = celery.Celery(f"eager-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(leasehold_url=f"memory://{uuid.uuid4().hex}", task_store_eager_result=False)
    yield app


def test_key_template_uses_the_task_arguments(eager_app: Any, lc: Any) -> None:
    seen: list[str] = []

    @eager_app.task(base=lc.SingletonTask, lock_key="meeting:{meeting_id}:{kind}")
    def close(meeting_id: int, kind: str = "video", **extra: Any) -> str:
        seen.append(lc.current_lease().name)
        return "closed"

    assert close.apply(args=(7,)).get() == "closed"
    assert close.apply(kwargs={"meeting_id": 8, "kind": "audio"}).get() == "closed"
    assert seen == ["meeting:7:video", "meeting:8:audio"]

    @eager_app.task(base=lc.SingletonTask, lock_key="x:{missing}")
    def broken(meeting_id: int) -> None:
        pass

    result = broken.apply(args=(1,))
    assert result.failed() and isinstance(result.result, leasehold.InvalidArgument)
    assert "missing" in str(result.result) and "meeting_id" in str(result.result)

    @eager_app.task(base=lc.SingletonTask, lock_key=lambda user, **_: f"user:{user.lower()}")
    def by_callable(user: str) -> str:
        return lc.current_lease().name

    assert by_callable.apply(args=("ALICE",)).get() == "user:alice"
    with pytest.raises(LookupError):
        lc.current_lease()


def test_busy_singleton_is_skipped_and_counted(eager_app: Any, lc: Any) -> None:
    ran: list[int] = []

    @eager_app.task(base=lc.SingletonTask, lock_key="job:{n}")
    def job(n: int) -> int:
        ran.append(n)
        return n

    client = lc.client_for(eager_app.conf.leasehold_url)
    before = lc.statistics().get("skipped", 0)
    told: list[dict[str, Any]] = []

    def on_skip(sender: Any = None, **fields: Any) -> None:
        told.append(fields)

    lc.task_skipped.connect(on_skip)
    try:
        with client.lock("job:1"):
            skipped = job.apply(args=(1,))
            assert skipped.state == "FAILURE"  # never SUCCESS with None
            with pytest.raises(lc.Skipped) as caught:
                skipped.get()
            assert caught.value.reason == "busy" and caught.value.key == "job:1"
            assert job.apply(args=(2,)).get() == 2  # another key is free
    finally:
        lc.task_skipped.disconnect(on_skip)
    assert [(t["key"], t["reason"]) for t in told] == [("job:1", "busy")]
    with client.lock("job:1"):
        pass
    assert job.apply(args=(1,)).get() == 1
    assert ran == [2, 1]
    assert lc.statistics()["skipped"] == before + 1


def test_wait_policy_times_out_clearly(eager_app: Any, lc: Any) -> None:
    @eager_app.task(base=lc.SingletonTask, when_busy="wait", lock_wait_timeout=0.2)
    def patient() -> str:
        return "ran"

    client = lc.client_for(eager_app.conf.leasehold_url)
    with client.lock(patient.name):
        result = patient.apply()
    assert result.failed() and "could not acquire" in str(result.result)
    # Celery rebuilds exceptions from their args; leasehold's multi-argument errors
    # come back as their nearest rebuildable base class, message intact.
    assert isinstance(result.result, leasehold.LeaseholdError)
    assert patient.apply().get() == "ran"


def test_bad_policy_is_rejected(eager_app: Any, lc: Any) -> None:
    @eager_app.task(base=lc.SingletonTask, when_busy="sometimes")
    def odd() -> None:
        pass

    result = odd.apply()
    assert result.failed() and isinstance(result.result, leasehold.InvalidArgument)


def test_lost_lease_fails_the_task(eager_app: Any, lc: Any) -> None:
    @eager_app.task(base=lc.SingletonTask, lock_key="fragile", lock_ttl=0.5)
    def fragile() -> str:
        lease = lc.current_lease()
        lc.client_for(eager_app.conf.leasehold_url).break_lease("fragile")
        wait_until(lambda: lease.lost, 5, "the keeper to notice")
        with pytest.raises(leasehold.LeaseLost):
            lease.check()
        return "pretended success"

    result = fragile.apply()
    assert result.failed()
    assert isinstance(result.result, leasehold.LeaseholdError), result.result
    assert "'fragile'" in str(result.result) and "lost" in str(result.result)
    assert lc.statistics()["lost"] >= 1


def test_once_task_returns_the_stored_result(eager_app: Any, lc: Any) -> None:
    runs: list[int] = []

    @eager_app.task(base=lc.OnceTask)
    def render(doc_id: int) -> dict[str, Any]:
        runs.append(doc_id)
        return {"doc": doc_id}

    assert render.apply(args=(1,)).get() == {"doc": 1}
    assert render.apply(args=(1,)).get() == {"doc": 1}  # same arguments: stored
    assert render.apply(args=(2,)).get() == {"doc": 2}
    assert runs == [1, 2]


# -- real broker, real worker -----------------------------------------------------------


class Cluster:
    """A redis broker, a SQLite lease store and the processes of one test module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store_url = f"sqlite:///{tmp / 'leases.db'}"
        self.server: Any = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.producer: Any = None

    def env(self, **extra: str) -> dict[str, str]:
        return dict(
            os.environ,
            LH_CELERY_BROKER=self.server.url,
            LH_CELERY_STORE=self.store_url,
            LH_CELERY_DIR=str(self.tmp),
            **extra,
        )

    def celery(self, *args: str, log: str, **env: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{log}.out").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests._celery_app", *args],
                cwd=ROOT,
                env=self.env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its pool children share the group we end
            )
        self.procs.append(proc)
        return proc

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.tmp / "events.jsonl"
        if not path.exists():
            return []
        found = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [e for e in found if kind is None or e["kind"] == kind]

    def send(self, task: str, **kwargs: Any) -> Any:
        return self.producer.send_task(f"tests._celery_app.{task}", kwargs=kwargs)

    @staticmethod
    def end(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 15) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group we started
        proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, lc: Any) -> Iterator[Cluster]:
    from tests.servers import redis as redis_servers

    if redis_servers.redis_server_binary() is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if REQUIRE_SERVERS:
            pytest.fail(f"{reason} (LEASEHOLD_REQUIRE_SERVERS=1 forbids skipping)")
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("celery"))
    cluster.server = redis_servers.RedisServer()
    cluster.server.start()
    cluster.producer = celery.Celery(
        "producer", broker=cluster.server.url, backend=cluster.server.url, set_as_current=False
    )
    cluster.producer.conf.broker_connection_retry_on_startup = True
    try:
        yield cluster
    finally:
        for proc in cluster.procs:
            Cluster.end(proc)
        cluster.producer.close()
        cluster.server.stop()


@pytest.fixture(scope="module")
def worker(cluster: Cluster) -> Iterator[subprocess.Popen[bytes]]:
    proc = cluster.celery(
        "worker",
        "-P", "prefork",
        "-c", "3",
        "-O", "fair",
        "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--logfile", str(cluster.tmp / "worker.log"),
        log="worker",
    )  # fmt: skip
    try:
        assert cluster.send("ping").get(timeout=60) == "pong"
        yield proc
    finally:
        Cluster.end(proc)


@pytest.fixture
def store(cluster: Cluster) -> Iterator[leasehold.Client]:
    client = leasehold.Client(cluster.store_url)
    yield client
    client.close()


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
def test_two_enqueues_of_a_singleton_one_runs_one_skips(cluster: Cluster, worker: Any) -> None:
    meeting = int(uuid.uuid4().int % 10**9)
    first = cluster.send("close_meeting", meeting_id=meeting, hold=1.5, tag="a")
    second = cluster.send("close_meeting", meeting_id=meeting, hold=1.5, tag="b")
    other = cluster.send("close_meeting", meeting_id=meeting + 1, hold=0.2, tag="c")
    results = [r.get(timeout=30, propagate=False) for r in (first, second, other)]
    ran = [r for r in results[:2] if isinstance(r, dict)]
    skipped = [r for r in results[:2] if isinstance(r, Exception)]
    assert len(ran) == 1 and len(skipped) == 1, results
    # A skip is never SUCCESS with None: its own exception type, state FAILURE.
    from leasehold.celery import Skipped

    assert isinstance(skipped[0], Skipped) and skipped[0].reason == "busy", skipped
    assert {first.state, second.state} == {"SUCCESS", "FAILURE"}
    assert results[2] == {"closed": meeting + 1, "tag": "c"}  # other keys never wait
    starts = [
        e
        for e in cluster.events("close_meeting")
        if e["meeting_id"] == meeting and e["edge"] == "start"
    ]
    assert [e["tag"] for e in starts] == [ran[0]["tag"]]
    log = (cluster.tmp / "worker.log").read_text()
    assert f"skipped: 'meeting:{meeting}' is busy" in log


@pytest.mark.slow
def test_busy_singleton_retries_later_with_jitter(cluster: Cluster, worker: Any) -> None:
    item = unique("item")
    first = cluster.send("process_item", item=item, hold=1.0, tag="x")
    second = cluster.send("process_item", item=item, hold=1.0, tag="y")
    results = [first.get(timeout=45), second.get(timeout=45)]
    assert sorted(r["tag"] for r in results) == ["x", "y"]  # both ran in the end
    assert max(r["retries"] for r in results) >= 1  # one of them had to retry
    events = [e for e in cluster.events("process_item") if e["item"] == item]
    spans = {}
    for event in events:
        spans.setdefault(event["tag"], {})[event["edge"]] = event["t"]
    (a, b) = sorted(spans.values(), key=lambda span: span["start"])
    assert a["end"] <= b["start"], "two runs of one key overlapped"


@pytest.mark.slow
def test_killed_task_releases_its_lease_after_the_ttl(
    cluster: Cluster, worker: Any, store: leasehold.Client
) -> None:
    name = unique("hog")
    cluster.send("hog", name=name)
    event = wait_until(
        lambda: next((e for e in cluster.events("hog") if e["name"] == name), None),
        30,
        "the task to start",
    )
    assert store.holders(f"hog:{name}"), "the running task holds its lease"
    os.kill(event["pid"], signal.SIGKILL)  # a pool process of the worker we started
    killed = time.monotonic()
    lease = store.lock(f"hog:{name}", ttl=5).acquire(timeout=1.0 + BOUND + 5)
    took = time.monotonic() - killed
    lease.release()
    assert took < 1.0 + BOUND, f"re-acquired {took:.2f} s after the kill (TTL 1 s)"


@pytest.mark.slow
def test_revoked_task_releases_its_lease_at_once(
    cluster: Cluster, worker: Any, store: leasehold.Client
) -> None:
    name = unique("revocable")
    result = cluster.send("revocable", name=name)
    wait_until(
        lambda: any(e["name"] == name for e in cluster.events("revocable")),
        30,
        "the task to start",
    )
    cluster.producer.control.revoke(result.id, terminate=True)
    revoked = time.monotonic()
    lease = store.lock(f"revocable:{name}").acquire(timeout=20)
    took = time.monotonic() - revoked
    lease.release()
    assert took < 10, f"the lease (TTL 30 s) was free only after {took:.2f} s"
    wait_until(lambda: result.state == "REVOKED", 10, "the revoked state")


@pytest.mark.slow
def test_once_task_returns_the_stored_result_to_duplicates(cluster: Cluster, worker: Any) -> None:
    doc = int(uuid.uuid4().int % 10**9)
    duplicates = [cluster.send("render", doc_id=doc) for _ in range(2)]
    results = [r.get(timeout=30) for r in duplicates]
    later = cluster.send("render", doc_id=doc).get(timeout=30)
    assert results[0] == results[1] == later
    assert results[0]["url"] == f"/files/{doc}.pdf"
    assert len([e for e in cluster.events("render") if e["doc_id"] == doc]) == 1


@pytest.mark.slow
def test_two_beats_only_the_leader_sends(cluster: Cluster, store: leasehold.Client) -> None:
    ttl = 1.5

    def beat(tag: str) -> subprocess.Popen[bytes]:
        return cluster.celery(
            "beat",
            "-S", "leasehold.celery:LeaderScheduler",
            "-l", "INFO",
            "--pidfile", str(cluster.tmp / f"beat-{tag}.pid"),
            "-s", str(cluster.tmp / f"beat-{tag}.schedule"),
            "--logfile", str(cluster.tmp / f"beat-{tag}.log"),
            log=f"beat-{tag}",
            LH_BEAT_TTL=str(ttl),
        )  # fmt: skip

    def sends() -> list[dict[str, Any]]:
        return cluster.events("beat_send")

    first, second = beat("a"), beat("b")
    wait_until(lambda: len(sends()) >= 6, 30, "the leader to send")
    time.sleep(1.0)  # both beats have been up for a while now
    pids = {e["pid"] for e in sends()}
    assert len(pids) == 1, f"two beats sent: {pids}"
    leader_pid = pids.pop()
    leader, follower = (first, second) if first.pid == leader_pid else (second, first)
    assert follower.poll() is None and leader.poll() is None

    # The leader dies without a word: the follower takes over after the TTL.
    leader.send_signal(signal.SIGKILL)
    killed = time.time()
    before = len(sends())
    wait_until(lambda: any(e["pid"] == follower.pid for e in sends()), 30, "the takeover")
    new_sends = [e for e in sends()[before:] if e["pid"] == follower.pid]
    took = new_sends[0]["t"] - killed
    assert took < ttl + BOUND, f"took over after {took:.2f} s (TTL {ttl} s)"
    assert all(e["pid"] == follower.pid for e in sends() if e["t"] > new_sends[0]["t"])

    # The schedule state is shared: the new leader counts on from the old one's runs.
    state = json.loads(store.store.read_record("test-beat:schedule").value or b"{}")
    assert state["entries"]["tick"]["total_run_count"] >= len(sends()) - 1

    # A third beat queues; the leader stops cleanly and resigns, so the handover
    # needs no TTL at all.
    third = beat("c")
    time.sleep(2.0)  # let it start and queue behind the leader
    assert all(e["pid"] != third.pid for e in sends())
    follower.send_signal(signal.SIGTERM)
    stopped = time.time()
    assert follower.wait(15) is not None
    wait_until(lambda: any(e["pid"] == third.pid for e in sends()), 30, "the handover")
    took = next(e["t"] for e in sends() if e["pid"] == third.pid) - stopped
    assert took < ttl, f"handover after a clean stop took {took:.2f} s"
    assert (
        "resigned the leadership"
        in (cluster.tmp / "beat-b.log").read_text() + (cluster.tmp / "beat-a.log").read_text()
    )


@pytest.fixture
def producer_task(cluster: Cluster, lc: Any) -> Any:
    """``close_meeting`` as a producer sees it: a SingletonTask whose apply_async
    dedupes against the store the worker uses."""
    cluster.producer.conf.leasehold_url = cluster.store_url

    def close_meeting(meeting_id: int, hold: float = 1.0, tag: str = "") -> None:
        raise AssertionError("runs in the worker only")

    return cluster.producer.task(
        name="tests._celery_app.close_meeting",
        base=lc.SingletonTask,
        lock_key="meeting:{meeting_id}",
        lock_ttl=5,
        shared=False,
    )(close_meeting)


@pytest.mark.slow
def test_enqueue_of_a_queued_or_running_singleton_returns_its_result(
    cluster: Cluster, worker: Any, producer_task: Any
) -> None:
    meeting = int(uuid.uuid4().int % 10**9)
    first = producer_task.delay(meeting_id=meeting, hold=1.5, tag="a")
    queued_again = producer_task.delay(meeting_id=meeting, hold=1.5, tag="b")
    assert queued_again.id == first.id  # deduped while queued
    wait_until(
        lambda: [e for e in cluster.events("close_meeting") if e["meeting_id"] == meeting],
        30,
        "the run to start",
    )
    running_again = producer_task.apply_async(kwargs={"meeting_id": meeting, "tag": "c"})
    assert running_again.id == first.id  # deduped while running
    assert first.get(timeout=30) == {"closed": meeting, "tag": "a"}
    starts = [
        e
        for e in cluster.events("close_meeting")
        if e["meeting_id"] == meeting and e["edge"] == "start"
    ]
    assert [e["tag"] for e in starts] == ["a"]
    # Finished: the next enqueue is a new run.
    later = producer_task.delay(meeting_id=meeting, hold=0.1, tag="d")
    assert later.id != first.id
    assert later.get(timeout=30) == {"closed": meeting, "tag": "d"}


@pytest.mark.slow
def test_once_per_period_runs_each_item_once_across_workers(cluster: Cluster, worker: Any) -> None:
    # Three sweeps (as from three schedulers or workers) over the same 20 meetings,
    # all at once: every meeting runs once; every other request is a visible skip.
    base = int(uuid.uuid4().int % 10**8) * 100
    meetings = [base + i for i in range(20)]
    sent = [
        cluster.send("sweep_meeting", meeting_id=m, sweep=f"s{n}")
        for n in range(3)
        for m in meetings
    ]
    outcomes = [r.get(timeout=60, propagate=False) for r in sent]
    ran = [e["meeting_id"] for e in cluster.events("sweep_meeting") if e["meeting_id"] in meetings]
    assert sorted(ran) == meetings, ran  # 20 runs, not 60 (or 45)
    from leasehold.celery import Skipped

    skipped = [o for o in outcomes if isinstance(o, Skipped)]
    assert len(skipped) == 40 and {s.reason for s in skipped} <= {"busy", "period"}
    assert sorted(o for o in outcomes if isinstance(o, int)) == meetings


@pytest.mark.slow
def test_a_killed_run_stops_deduplicating_when_its_lease_expires(
    cluster: Cluster, worker: Any, store: leasehold.Client, lc: Any
) -> None:
    cluster.producer.conf.leasehold_url = cluster.store_url

    def hog(name: str) -> None:
        raise AssertionError("runs in the worker only")

    task = cluster.producer.task(
        name="tests._celery_app.hog", base=lc.SingletonTask, lock_key="hog:{name}", shared=False
    )(hog)
    name = unique("hog-dedupe")
    running = task.delay(name=name)
    event = wait_until(
        lambda: next((e for e in cluster.events("hog") if e["name"] == name), None),
        30,
        "the task to start",
    )
    assert task.delay(name=name).id == running.id  # deduped while it runs
    os.kill(event["pid"], signal.SIGKILL)  # a pool process of the worker we started
    killed = time.monotonic()

    # The enqueue record says "running", but the run's lease (TTL 1 s) expires:
    # from then on an enqueue publishes a new run. Never an eternal key.
    def new_run() -> Any:
        result = task.delay(name=name)
        return result if result.id != running.id else None

    fresh = wait_until(
        new_run,
        1.0 + BOUND + 5,
        "an enqueue after the lease expired",
    )
    assert time.monotonic() - killed < 1.0 + BOUND + 1
    wait_until(
        lambda: len([e for e in cluster.events("hog") if e["name"] == name]) == 2,
        30,
        "the new run to start",
    )
    cluster.producer.control.revoke(fresh.id, terminate=True)


@pytest.mark.slow
def test_a_retrying_singleton_stays_the_one_queued(
    cluster: Cluster, worker: Any, store: leasehold.Client, lc: Any
) -> None:
    cluster.producer.conf.leasehold_url = cluster.store_url

    def process_item(item: str, hold: float = 1.0, tag: str = "") -> None:
        raise AssertionError("runs in the worker only")

    task = cluster.producer.task(
        name="tests._celery_app.process_item",
        base=lc.SingletonTask,
        lock_key="item:{item}",
        when_busy="retry",
        shared=False,
    )(process_item)
    item = unique("retrying")
    with store.lock(f"item:{item}", ttl=30):
        first = task.delay(item=item, hold=0.1, tag="a")
        wait_until(lambda: _retries_seen(cluster, first.id), 30, "the first retry")
        assert task.delay(item=item, hold=0.1, tag="b").id == first.id  # still joins it
    outcome = first.get(timeout=60)
    assert outcome["tag"] == "a" and outcome["retries"] >= 1
    starts = [e for e in cluster.events("process_item") if e["item"] == item]
    assert [e["tag"] for e in starts if e["edge"] == "start"] == ["a"]


def _retries_seen(cluster: Cluster, task_id: str) -> bool:
    """The worker has handled a retry of ``task_id`` (Celery logs ``retry: Retry
    in`` after the task's Retry unwound, so leasehold's bookkeeping is done)."""
    log = cluster.tmp / "worker.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return any(task_id in line and "retry: Retry in" in line for line in lines)


def test_once_per_skips_within_the_period_and_runs_after(eager_app: Any, lc: Any) -> None:
    runs: list[int] = []
    failing = [True]

    @eager_app.task(base=lc.SingletonTask, lock_key="tick:{n}", once_per=1.0)
    def tick(n: int) -> int:
        if failing[0]:
            failing[0] = False
            raise RuntimeError("a failed run does not count")
        runs.append(n)
        return n

    assert isinstance(tick.apply(args=(1,)).result, RuntimeError)
    assert tick.apply(args=(1,)).get() == 1  # the failure did not use the period
    skipped = tick.apply(args=(1,))
    assert isinstance(skipped.result, lc.Skipped) and skipped.result.reason == "period"
    assert tick.apply(args=(2,)).get() == 2  # per key
    time.sleep(1.2)
    assert tick.apply(args=(1,)).get() == 1  # a new period
    assert runs == [1, 2, 1]
