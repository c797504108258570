"""leasehold.django under Django's own test runner, against a real PostgreSQL.

Each Django test class runs in a subprocess (``python -m django test``) on the
project in tests/djproject, so Django's global state (settings, app registry,
connections) never leaks into other test modules. The management command runs as
``python -m django leasehold ...`` like ``manage.py`` would.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import leasehold

pytest.importorskip("django", reason="Django is not installed (pip install 'leasehold[django]')")
pytest.importorskip("psycopg2", reason="psycopg2 is not installed (the test extra has it)")
pytest.importorskip("django_tasks", reason="django-tasks is not installed (the test extra has it)")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(180)


def _env(server: Any, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.djproject.settings",
        LH_DJ_PG_PORT=str(server.port),
        PYTHONPATH=str(ROOT),
        **(extra or {}),
    )
    env.pop("LEASEHOLD_URL", None)
    return env


def django(
    server: Any, *args: str, timeout: float = 150, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=_env(server, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "case",
    [
        "SettingsTests",
        "LockTests",
        "OnceTests",
        "FenceTests",
        "RaceTests",
        "AdminTests",
        "AsyncAndLossTests",
    ],
)
def test_django_suite(postgres_server: Any, case: str) -> None:
    done = django(
        postgres_server, "test", f"tests.djproject.dj_tests.{case}", "--noinput", "-v", "2"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " OK" in done.stderr or "\nOK" in done.stderr, done.stderr


def test_management_command_ls_and_break(postgres_server: Any) -> None:
    # The command reads DATABASES["default"] (not the test database).
    name = f"mgmt:{uuid.uuid4().hex[:8]}"
    with leasehold.Client(postgres_server.url) as client:
        lease = client.lock(name, ttl=60).acquire()
        listed = django(postgres_server, "leasehold", "ls")
        assert listed.returncode == 0, listed.stderr
        assert name in listed.stdout
        broken = django(postgres_server, "leasehold", "break", name, "--yes")
        assert broken.returncode == 0, broken.stderr
        assert client.holders(name) == []
        assert not lease.held or lease.remaining() >= 0
        lease = client.lock(name, ttl=60).acquire()
        doctor = django(postgres_server, "leasehold", "doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        ran = django(
            postgres_server, "leasehold", "run", name + "-run", "--",
            sys.executable, "-c", "print('under the lease')",
        )  # fmt: skip
        assert ran.returncode == 0 and "under the lease" in ran.stdout, ran.stderr
        led = django(
            postgres_server, "leasehold", "leader", name + "-leader", "--",
            sys.executable, "-c", "import os; print('term', os.environ['LEASEHOLD_FENCE'])",
        )  # fmt: skip
        assert led.returncode == 0 and "term " in led.stdout, led.stderr
        busy = django(postgres_server, "leasehold", "run", name, "--no-wait", "--", "true")
        assert busy.returncode == 75, busy.stderr  # EX_TEMPFAIL: the lease is held
        unknown = django(postgres_server, "leasehold", "frobnicate")
        assert unknown.returncode == 2 and "unknown subcommand" in unknown.stderr


def test_check_deploy_fails_without_a_shared_store(postgres_server: Any, tmp_path: Path) -> None:
    ok = django(postgres_server, "check", "--deploy", "--tag", "leasehold")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_celery_worker_uses_the_django_store_and_fences_orm_writes(
    postgres_server: Any, redis_server: Any, tmp_path: Path
) -> None:
    import signal

    import psycopg

    celery = pytest.importorskip("celery")
    database = f"djc_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    broker = redis_server.url.rsplit("/", 1)[0] + "/6"
    extra = {"LH_DJ_PG_NAME": database, "LH_DJ_BROKER": broker}
    extra["LH_DJ_EVENTS"] = str(tmp_path / "events.jsonl")
    migrate = django(postgres_server, "migrate", "--noinput", env=extra)
    assert migrate.returncode == 0, migrate.stderr
    env = _env(postgres_server, extra)
    with (tmp_path / "worker.log").open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.djproject.celery_app", "worker",
             "-P", "prefork", "-c", "2", "-l", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    producer = celery.Celery("p", broker=broker, backend=broker, set_as_current=False)
    producer.conf.broker_connection_retry_on_startup = True
    try:
        first = producer.send_task("tests.djproject.celery_app.close_meeting", args=(5, 2.0))
        events = tmp_path / "events.jsonl"
        deadline = time.monotonic() + 90  # the worker may still be starting
        while not (events.exists() and events.read_text().strip()):
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        second = producer.send_task("tests.djproject.celery_app.close_meeting", args=(5, 0.1))
        fence = first.get(timeout=90)
        skipped = second.get(timeout=90, propagate=False)
        assert type(skipped).__name__ == "Skipped", skipped
        db_url = f"postgresql://postgres@127.0.0.1:{postgres_server.port}/{database}"
        with psycopg.connect(db_url) as conn:
            rows = conn.execute("SELECT name, fence FROM audio_ledger").fetchall()
        assert rows == [("dj-meeting:5", fence)], rows
        # The lease store is the Django database (settings.LEASEHOLD): its next
        # grant of the name comes after the worker's.
        with leasehold.Client(db_url) as client, client.lock("dj-meeting:5") as lease:
            assert lease.fence > fence
    finally:
        producer.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)  # only the group we started
        worker.wait()
