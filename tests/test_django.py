"""leasehold.django under Django's own test runner, against a real PostgreSQL.

Each Django test class runs in a subprocess (``python -m django test``) on the
project in tests/djproject, so Django's global state (settings, app registry,
connections) never leaks into other test modules. The management command runs as
``python -m django leasehold ...`` like ``manage.py`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def django(server: Any, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.djproject.settings",
        LH_DJ_PG_PORT=str(server.port),
        PYTHONPATH=str(ROOT),
    )
    env.pop("LEASEHOLD_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "case", ["SettingsTests", "LockTests", "OnceTests", "FenceTests", "RaceTests", "AdminTests"]
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
        doctor = django(postgres_server, "leasehold", "doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        unknown = django(postgres_server, "leasehold", "frobnicate")
        assert unknown.returncode == 2 and "unknown subcommand" in unknown.stderr


def test_check_deploy_fails_without_a_shared_store(postgres_server: Any, tmp_path: Path) -> None:
    ok = django(postgres_server, "check", "--deploy", "--tag", "leasehold")
    assert ok.returncode == 0, ok.stderr
