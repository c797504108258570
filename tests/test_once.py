"""Once-only execution (``client.once(key)``): one run, one stored result, fenced.

In-process tests run on every backend; expiry is driven by a FakeClock where the
backend allows it. Real-process tests (marked slow) kill and pause runners.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import leasehold
from leasehold._core.url import parse
from leasehold._sync.backends import open_store
from leasehold.testing import BackendHarness, FakeClock, FaultyStore

ROOT = Path(__file__).resolve().parent.parent
TTL = 1.0
BOUND = 2.0  # seconds beyond the TTL a takeover may take on a busy CI box


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Runs:
    """A thread-safe record of real runs of the once-only function."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._guard = threading.Lock()

    def add(self, who: str) -> None:
        with self._guard:
            self.calls.append(who)


# -- one run, one result ------------------------------------------------------------


def test_twenty_threads_run_once(lh_backend: BackendHarness) -> None:
    key = lh_backend.unique("once")
    runs = Runs()
    results: list[Any] = []
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def work(caller: int) -> dict[str, Any]:
        runs.add(f"thread {caller}")
        time.sleep(0.2)
        return {"answer": 42, "tuple": (1, 2)}

    def call(caller: int) -> None:
        client = lh_backend.client()  # a client per thread, like separate workers
        start.wait()
        try:
            results.append(client.once(key).run(work, caller))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(runs.calls) == 1, runs.calls
    # Everyone gets the *stored* value, the runner included: JSON turns tuples into lists.
    assert results == [{"answer": 42, "tuple": [1, 2]}] * 20
    once = lh_backend.client().once(key)
    assert once.state() == "done"
    assert once.result() == {"answer": 42, "tuple": [1, 2]}


def test_twenty_async_tasks_run_once(lh_backend: BackendHarness) -> None:
    key = lh_backend.unique("once")
    runs = Runs()

    async def work(caller: int) -> str:
        runs.add(f"task {caller}")
        await asyncio.sleep(0.2)
        return "made"

    async def main() -> list[Any]:
        clients = [lh_backend.async_client() for _ in range(4)]
        try:
            return await asyncio.gather(*(clients[i % 4].once(key).run(work, i) for i in range(20)))
        finally:
            for client in clients:
                await client.aclose()

    assert asyncio.run(main()) == ["made"] * 20
    assert len(runs.calls) == 1


def test_async_client_runs_plain_functions_off_the_event_loop(
    local_backend: BackendHarness,
) -> None:
    seen: dict[str, Any] = {}

    def blocking() -> str:
        seen["thread"] = threading.get_ident()
        time.sleep(0.05)
        return "done in a thread"

    async def main() -> None:
        client = local_backend.async_client()
        try:
            seen["loop_thread"] = threading.get_ident()
            assert await client.once("plain").run(blocking) == "done in a thread"
            # A plain callable returning a coroutine is awaited too.
            assert await client.once("lambda").run(lambda: asyncio.sleep(0, "late")) == "late"
        finally:
            await client.aclose()

    asyncio.run(main())
    assert seen["thread"] != seen["loop_thread"]


def test_stored_result_is_returned_without_running(local_backend: BackendHarness) -> None:
    client = local_backend.client()
    runs = Runs()
    once = client.once("report", keep=60)
    assert once.state() == "absent"
    assert once.run(lambda: runs.add("first") or 1) == 1
    assert once.run(lambda: runs.add("second") or 2) == 1
    assert runs.calls == ["first"]
    assert client.once("report").result() == 1
    # keep is the record's TTL, on the store's clock.
    local_backend.advance(61)
    assert once.state() == "absent"
    with pytest.raises(leasehold.NoResult) as info:
        once.result()
    assert isinstance(info.value, LookupError) and info.value.state == "absent"
    assert once.run(lambda: runs.add("third") or 3) == 3
    assert runs.calls == ["first", "third"]


def test_forget_lets_the_next_call_run(local_backend: BackendHarness) -> None:
    client = local_backend.client()
    once = client.once("forgettable")
    assert once.forget() is False
    assert once.run(lambda: "a") == "a"
    assert once.forget() is True
    assert once.state() == "absent"
    assert once.run(lambda: "b") == "b"


def test_keep_none_keeps_forever(local_backend: BackendHarness) -> None:
    client = local_backend.client()
    once = client.once("forever", keep=None)
    once.run(lambda: "kept")
    local_backend.advance(30 * 24 * 3600)
    assert once.result() == "kept"


# -- failures -------------------------------------------------------------------------


def test_failure_is_recorded_then_retried_by_default(lh_backend: BackendHarness) -> None:
    client = lh_backend.client()
    key = lh_backend.unique("fails")
    once = client.once(key)

    def broken() -> None:
        raise ValueError("the printer is on fire")

    with pytest.raises(ValueError, match="on fire"):  # the runner gets fn's own error
        once.run(broken)
    assert once.state() == "failed"
    with pytest.raises(leasehold.OnceFailed) as info:
        once.result()
    assert info.value.error_type == "ValueError"
    assert info.value.message == "the printer is on fire"
    assert "ValueError: the printer is on fire" in str(info.value)
    # retry_failed=True (the default): the next call runs again.
    assert once.run(lambda: "fixed") == "fixed"
    assert once.state() == "done"


def test_failure_is_kept_when_not_retrying(local_backend: BackendHarness) -> None:
    client = local_backend.client()
    runs = Runs()
    once = client.once("strict", keep=100, retry_failed=False)

    class QuotaExceeded(Exception):
        pass

    def broken() -> None:
        runs.add("broken")
        raise QuotaExceeded("try tomorrow")

    with pytest.raises(QuotaExceeded):
        once.run(broken)
    for _ in range(3):
        with pytest.raises(leasehold.OnceFailed) as info:
            once.run(lambda: runs.add("never") or 1)
        assert info.value.error_type.endswith(
            "test_failure_is_kept_when_not_retrying.<locals>.QuotaExceeded"
        )
    assert runs.calls == ["broken"]
    local_backend.advance(101)  # the failure is kept for keep seconds, then forgotten
    assert once.run(lambda: runs.add("later") or 2) == 2


def test_callers_waiting_on_a_failing_run_get_once_failed(lh_backend: BackendHarness) -> None:
    key = lh_backend.unique("shared-failure")
    runs = Runs()
    release = threading.Event()
    outcomes: list[str] = []
    guard = threading.Lock()

    def broken() -> None:
        runs.add("run")
        release.wait(30)
        raise RuntimeError("upstream said no")

    def call() -> None:
        once = lh_backend.client().once(key)
        try:
            once.run(broken)
            result = "ok"
        except leasehold.OnceFailed as exc:
            result = f"OnceFailed {exc.error_type}: {exc.message}"
        except RuntimeError as exc:
            result = f"own {exc}"
        with guard:
            outcomes.append(result)

    first = threading.Thread(target=call)
    first.start()
    wait_until(lambda: runs.calls, 10, "the first run to start")
    waiters = [threading.Thread(target=call) for _ in range(5)]
    for thread in waiters:
        thread.start()
    time.sleep(0.2)  # let them queue behind the runner
    release.set()
    for thread in [first, *waiters]:
        thread.join(30)
    assert runs.calls == ["run"]
    assert sorted(outcomes) == ["OnceFailed RuntimeError: upstream said no"] * 5 + [
        "own upstream said no"
    ]


def test_unserializable_and_oversized_results_are_failures(local_backend: BackendHarness) -> None:
    client = local_backend.client()
    once = client.once("not-json")
    with pytest.raises(TypeError):
        once.run(lambda: {1, 2, 3})
    with pytest.raises(leasehold.OnceFailed, match="TypeError"):
        once.result()
    big = client.once("big")
    with pytest.raises(leasehold.InvalidArgument, match="store a reference"):
        big.run(lambda: "x" * (2 << 20))
    assert big.state() == "failed"


def test_pluggable_serializer(local_backend: BackendHarness) -> None:
    client = local_backend.client()
    once = client.once("pickled", serializer=pickle)
    assert once.run(lambda: {1, 2, 3}) == {1, 2, 3}
    assert once.result() == {1, 2, 3}

    class Upper:
        def dumps(self, obj: Any) -> str:
            return str(obj).upper()

        def loads(self, data: bytes) -> str:
            return data.decode()

    assert client.once("upper", serializer=Upper()).run(lambda: "shout") == "SHOUT"


# -- takeover and fencing ----------------------------------------------------------


def test_late_result_of_a_superseded_runner_is_rejected(local_backend: BackendHarness) -> None:
    """Runner A stalls past its TTL; B takes over and stores its result; A's late
    result is refused by the compare-and-set (fenced) and A is told LeaseLost."""
    clock = local_backend.clock
    assert clock is not None
    a_client, b_client = local_backend.client(), local_backend.client()
    a_started, a_release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def slow_a() -> str:
        a_started.set()
        a_release.wait(30)
        return "from A"

    def run_a() -> None:
        try:
            outcome["a"] = a_client.once("fenced", ttl=10).run(slow_a)
        except BaseException as exc:
            outcome["a"] = exc

    thread = threading.Thread(target=run_a)
    thread.start()
    assert a_started.wait(10)
    assert b_client.once("fenced").state() == "running"
    clock.advance(11)  # A's lease has expired in the store; A does not know yet
    assert b_client.once("fenced").state() == "absent"  # abandoned: the next call runs
    assert b_client.once("fenced", ttl=10).run(lambda: "from B") == "from B"
    a_release.set()
    thread.join(30)
    assert isinstance(outcome["a"], leasehold.LeaseLost), outcome
    assert b_client.once("fenced").result() == "from B"


def test_result_stands_when_the_lease_ran_out_but_nobody_took_over(
    local_backend: BackendHarness,
) -> None:
    """The compare-and-set is the fence: a runner whose lease expired while nobody
    else ran still stores its result (and returns it)."""
    clock = local_backend.clock
    assert clock is not None
    client = local_backend.client()

    def slow() -> str:
        clock.advance(60)  # far past the TTL and the safe deadline
        return "still mine"

    once = client.once("overtime", ttl=10)
    assert once.run(slow) == "still mine"
    assert once.result() == "still mine"


def test_result_write_is_retried_through_store_errors(local_backend: BackendHarness) -> None:
    inner = open_store(parse(local_backend.url), local_backend.clock or FakeClock())
    faulty = FaultyStore(inner)
    client = leasehold.Client(store=faulty, clock=local_backend.clock)
    try:

        def work() -> str:
            faulty.fail("write_record", times=2)  # the result write fails twice
            return "worth keeping"

        once = client.once("flaky-store")
        assert once.run(work) == "worth keeping"
        assert faulty.failures["write_record"] == 2
        assert once.result() == "worth keeping"
    finally:
        client.close()


def test_async_runner_is_cancelled_when_its_lease_is_broken(lh_backend: BackendHarness) -> None:
    url = lh_backend.fresh_url() if lh_backend.fake_clock else lh_backend.url
    key = lh_backend.unique("broken")

    async def main() -> None:
        client = leasehold.AsyncClient(url)
        other = leasehold.AsyncClient(url)
        try:
            started = asyncio.Event()
            was_cancelled = []

            async def work() -> str:
                started.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    was_cancelled.append(True)
                    raise
                return "never"

            task = asyncio.create_task(client.once(key, ttl=0.6).run(work))
            await started.wait()
            assert await other.break_lease("once:" + key) == 1
            with pytest.raises(leasehold.LeaseLost):
                await asyncio.wait_for(task, 10)
            assert was_cancelled == [True]
            # The record still says "running" for a runner that no longer holds the
            # lease: it reads as absent, and the next call runs.
            assert await other.once(key).state() == "absent"
            assert await other.once(key).run(lambda: "second try") == "second try"
        finally:
            await client.aclose()
            await other.aclose()

    asyncio.run(main())


# -- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": ""}, "key"),
        ({"key": "x" * 600}, "key"),
        ({"key": "a\nb"}, "key"),
        ({"key": "k", "keep": 0}, "keep"),
        ({"key": "k", "keep": -1}, "keep"),
        ({"key": "k", "keep": float("nan")}, "keep"),
        ({"key": "k", "retry_failed": "yes"}, "retry_failed"),
        ({"key": "k", "serializer": object()}, "serializer"),
        ({"key": "k", "ttl": 0}, "ttl"),
        ({"key": "k", "timeout": -1}, "timeout"),
    ],
)
def test_bad_arguments_fail_before_io(kwargs: dict[str, Any], match: str) -> None:
    client = leasehold.Client("memory://")
    with pytest.raises(leasehold.InvalidArgument, match=match):
        client.once(**kwargs)


def test_run_rejects_what_it_cannot_call() -> None:
    client = leasehold.Client("memory://")
    with pytest.raises(leasehold.InvalidArgument):
        client.once("k").run(42)  # type: ignore[arg-type]

    async def coro() -> None:
        pass

    with pytest.raises(leasehold.InvalidArgument, match="AsyncClient"):
        client.once("k").run(coro)


def test_timeout_while_another_caller_runs(local_backend: BackendHarness) -> None:
    url = local_backend.fresh_url()  # the timeout runs on the real clock
    client, other = leasehold.Client(url), leasehold.Client(url)
    started, release = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(30)
        return 1

    thread = threading.Thread(target=lambda: client.once("busy").run(slow))
    thread.start()
    try:
        assert started.wait(10)
        began = time.monotonic()
        with pytest.raises(leasehold.AcquireTimeout):
            other.once("busy", timeout=0.1).run(slow)
        assert time.monotonic() - began < 5
    finally:
        release.set()
        thread.join(10)
    assert other.once("busy", timeout=0).run(slow) == 1
    client.close()
    other.close()


def test_sync_and_async_once_have_the_same_api() -> None:
    async_api = {n for n in dir(leasehold.AsyncOnce) if not n.startswith("_")}
    sync_api = {n for n in dir(leasehold.Once) if not n.startswith("_")}
    assert async_api == sync_api
    assert repr(leasehold.Client("memory://").once("k", keep=None)).endswith("keep=forever>")


# -- real processes ---------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def spawn(procs: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "tests._once_workers", *args], cwd=ROOT)
    procs.append(proc)
    return proc


def read_json(path: Path, timeout: float) -> Any:
    wait_until(path.exists, timeout, path.name)
    return json.loads(path.read_text())


@pytest.mark.slow
def test_twenty_callers_in_processes_threads_and_tasks(
    shared_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    key = f"mixed:{os.getpid()}:{time.monotonic_ns()}"
    go, runs = tmp_path / "go", tmp_path / "runs.log"
    runs.touch()
    outs = []
    for i in range(6):
        out, ready = tmp_path / f"proc{i}.json", tmp_path / f"proc{i}.ready"
        spawn(procs, "caller", shared_url, key, "5", str(ready), str(go), str(runs), str(out))
        outs.append(out)
    for i in range(6):
        wait_until((tmp_path / f"proc{i}.ready").exists, 60, "the callers to start")

    results: list[Any] = []
    guard = threading.Lock()

    def work(who: str) -> dict[str, Any]:
        with runs.open("a") as fh:
            fh.write(who + "\n")
        time.sleep(0.5)
        return {"answer": 42, "by": who}

    def thread_caller(i: int) -> None:
        client = leasehold.Client(shared_url)
        try:
            result = client.once(key, ttl=5).run(work, f"thread {i}")
        finally:
            client.close()
        with guard:
            results.append(result)

    async def task_callers() -> None:
        client = leasehold.AsyncClient(shared_url)
        try:
            got = await asyncio.gather(
                *(client.once(key, ttl=5).run(work, f"task {i}") for i in range(7))
            )
        finally:
            await client.aclose()
        with guard:
            results.extend(got)

    threads = [threading.Thread(target=thread_caller, args=(i,)) for i in range(7)]
    threads.append(threading.Thread(target=lambda: asyncio.run(task_callers())))
    go.touch()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for out in outs:
        outcome = read_json(out, 60)
        assert outcome["ok"], outcome
        results.append(outcome["value"])
    lines = runs.read_text().splitlines()
    assert len(lines) == 1, lines
    assert len(results) == 20
    assert all(result == {"answer": 42, "by": lines[0]} for result in results), results


@pytest.mark.slow
def test_killed_runner_is_taken_over_after_the_ttl(
    shared_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    key = f"killed:{os.getpid()}:{time.monotonic_ns()}"
    started, out = tmp_path / "started", tmp_path / "out.json"
    proc = spawn(procs, "runner", shared_url, key, str(TTL), str(started), "3600", "A", str(out))
    read_json(started, 60)
    client = leasehold.Client(shared_url)
    try:
        runs = Runs()
        waited: dict[str, Any] = {}

        def waiter() -> None:  # queued behind the runner before it dies
            waited["result"] = client.once(key, ttl=TTL).run(lambda: runs.add("waiter") or "B")

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        assert client.once(key).state() == "running"
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
        thread.join(TTL + BOUND + 10)
        took = time.monotonic() - killed
        assert waited == {"result": "B"}
        assert runs.calls == ["waiter"]
        assert took < TTL + BOUND, took
        assert client.once(key).result() == "B"
        assert not out.exists()  # the killed runner never reported
    finally:
        client.close()


@pytest.mark.slow
def test_paused_runner_cannot_overwrite_its_successor(
    shared_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    key = f"paused:{os.getpid()}:{time.monotonic_ns()}"
    started, out = tmp_path / "started", tmp_path / "out.json"
    proc = spawn(procs, "runner", shared_url, key, str(TTL), str(started), "2", "from A", str(out))
    read_json(started, 60)
    proc.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    client = leasehold.Client(shared_url)
    try:
        assert client.once(key, ttl=TTL).run(lambda: "from B") == "from B"
        assert time.monotonic() - paused < TTL + BOUND
        time.sleep(max(0.0, 2.5 - (time.monotonic() - paused)))  # A's sleep is over
        proc.send_signal(signal.SIGCONT)
        outcome = read_json(out, 30)
        assert outcome["ok"] is False and outcome["type"] == "LeaseLost", outcome
        assert client.once(key).result() == "from B"  # exactly one result, B's
    finally:
        client.close()
