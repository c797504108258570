"""The examples/ projects, run as a user would run them, against real servers.

examples/django_audio: ``manage.py migrate`` and ``runserver`` on a PostgreSQL the
tests start; two concurrent HTTP requests per view. examples/celery_meetings: a
real Celery worker (prefork, 3 processes) on a Redis broker, PostgreSQL for the
lease store and the data, three concurrent sweeps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django", reason="Django is not installed (pip install 'leasehold[django]')")
pytest.importorskip("celery", reason="celery is not installed (pip install 'leasehold[celery]')")
httpx = pytest.importorskip("httpx")
psycopg = pytest.importorskip("psycopg")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:kombu.*"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:celery.*"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def new_database(server: Any) -> str:
    name = f"ex_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


@contextlib.contextmanager
def process(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[Any]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only the group we started
        proc.wait()


def at_once(calls: int, fn: Any) -> list[Any]:
    """``fn()`` in ``calls`` threads released together; their results."""
    barrier = threading.Barrier(calls)
    results: list[Any] = [None] * calls

    def run(i: int) -> None:
        barrier.wait(10)
        try:
            results[i] = fn()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def wait_all_closed(db_url: str, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "SELECT id, status, runs, fence FROM meetings ORDER BY id"
            ).fetchall()
        if all(status == "closed" for _, status, _, _ in rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def test_django_audio_example(postgres_server: Any, tmp_path: Path) -> None:
    project = EXAMPLES / "django_audio"
    env = dict(
        os.environ,
        PGHOST="127.0.0.1",
        PGPORT=str(postgres_server.port),
        PGUSER="postgres",
        PGDATABASE=new_database(postgres_server),
        PYTHONPATH=str(project),
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("LEASEHOLD_URL", None)
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
    with process(args, project, env, tmp_path / "runserver.log") as server:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "runserver.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/files/0", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "runserver did not come up"
            time.sleep(0.1)

        naive = at_once(2, lambda: httpx.get(f"{base}/naive/1", timeout=30).json()["id"])
        guarded = at_once(2, lambda: httpx.get(f"{base}/once/2", timeout=30).json()["id"])
        naive_files = httpx.get(f"{base}/files/1", timeout=10).json()["ids"]
        guarded_files = httpx.get(f"{base}/files/2", timeout=10).json()["ids"]
    assert len(set(naive)) == 2 and len(naive_files) == 2, (naive, naive_files)  # the race
    assert guarded[0] == guarded[1] and guarded_files == [guarded[0]], (guarded, guarded_files)


def test_celery_meetings_example(postgres_server: Any, redis_server: Any, tmp_path: Path) -> None:
    project = EXAMPLES / "celery_meetings"
    database = new_database(postgres_server)
    db_url = f"postgresql://postgres@127.0.0.1:{postgres_server.port}/{database}"
    env = dict(
        os.environ,
        BROKER_URL=redis_server.url.rsplit("/", 1)[0] + "/7",  # a db of its own
        LEASEHOLD_URL=db_url,
        DATABASE_URL=db_url,
        PYTHONPATH=str(project),
        SLOW_CALL_SECONDS="3",
    )
    meetings = 6
    init = subprocess.run(
        [sys.executable, "meetings.py", "init", str(meetings)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    worker_args = [
        sys.executable, "-m", "celery", "-A", "meetings", "worker",
        "-P", "prefork", "-c", "3", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    log = tmp_path / "worker.log"
    with process(worker_args, project, env, log):
        sweeps = [
            subprocess.Popen(
                [sys.executable, "meetings.py", "sweep"],
                cwd=project,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        for sweep in sweeps:
            _, err = sweep.communicate(timeout=120)
            assert sweep.returncode == 0, err
        rows = wait_all_closed(db_url, 90)
        assert [runs for _, _, runs, _ in rows] == [1] * meetings, rows  # three sweeps
        # A duplicate that bypasses the enqueue dedupe (sent by name) while a run
        # holds the meeting: skipped, visibly.
        from celery import Celery

        import leasehold

        producer = Celery("p", broker=env["BROKER_URL"], backend=env["BROKER_URL"])
        producer.conf.broker_connection_retry_on_startup = True
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("UPDATE meetings SET status = 'open' WHERE id = 1")
            first = producer.send_task("meetings.process_meeting", args=(1,))
            with leasehold.Client(db_url) as watcher:
                deadline = time.monotonic() + 60
                while not watcher.holders("meeting:1"):  # the first run has started
                    assert time.monotonic() < deadline, "the run did not start"
                    time.sleep(0.05)
            second = producer.send_task("meetings.process_meeting", args=(1,))
            outcome = second.get(timeout=60, propagate=False)
            assert type(outcome).__name__ == "Skipped", outcome
            assert isinstance(first.get(timeout=60), int)
            # A late duplicate of a meeting whose run has ended (what a sweep that read
            # it as open just before that run closed it enqueues): it finds the
            # meeting closed under its lease and does nothing.
            late = producer.send_task("meetings.process_meeting", args=(2,))
            assert late.get(timeout=60) is None
        finally:
            producer.close()
        rows = wait_all_closed(db_url, 90)
    # Meeting 1 once more (reopened), the others once.
    assert [runs for _, _, runs, _ in rows] == [2] + [1] * (meetings - 1), rows
    text = log.read_text()
    assert "skipped" in text and "is busy" in text
    assert "meeting 2 is closed already: nothing to do" in text
    # Every write was fenced: a write with an older fence is refused by the database.
    import leasehold.fence

    with psycopg.connect(db_url) as conn:
        with pytest.raises(leasehold.StaleFence), conn.transaction():
            leasehold.fence.check(conn, "meeting:2", rows[1][3] - 1)
