"""The ``leasehold`` command, end to end: each test runs ``python -m leasehold`` in a
real subprocess on a SQLite store in tmp_path.

The helpers here are shared with tests/test_cli_run.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import leasehold

LH = [sys.executable, "-m", "leasehold"]
TIMEOUT = 60.0


def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: the store in tmp_path, no colour, no user state."""
    env = dict(os.environ)
    for key in ("FORCE_COLOR", "LEASEHOLD_URL", "COLUMNS", "LINES"):
        env.pop(key, None)
    env["NO_COLOR"] = "1"
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["LEASEHOLD_URL"] = f"sqlite:///{tmp_path / 'leases.db'}"
    # Create the store before processes race to: several processes opening a
    # brand-new SQLite store at the same instant can fail with "database is
    # locked" (a store issue, reported separately, not the CLI's to test here).
    with leasehold.Client(env["LEASEHOLD_URL"]) as client:
        client.store.ping()
    return env


def lh(
    env: dict[str, str], *args: str, timeout: float = TIMEOUT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LH, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def lh_many(
    env: dict[str, str], commands: Sequence[Sequence[str]]
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent invocations side by side (Python starts slowly)."""
    procs = [
        subprocess.Popen(
            [*LH, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess([*LH, *args], proc.returncode, out, err))
    return results


class Started:
    """A background ``leasehold`` process; always reaped, even when a test fails."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*LH, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = ""
        self.err = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self, timeout: float = TIMEOUT) -> int:
        self.out, self.err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM is forwarded to the command, so nothing is left behind.
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.communicate()


def reaped() -> Iterator[list[Started]]:
    """Collects background processes and stops whatever is left at the end."""
    procs: list[Started] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.close()


started = pytest.fixture(reaped, name="started")


def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if text.endswith("\n"):
                return text
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout} s")


# A child that records its leasehold environment, then sleeps or exits with a code.
RECORD_ENV = (
    "import json, os, sys, time; "
    "env = {k: os.environ.get(k) for k in "
    "('LEASEHOLD_NAME', 'LEASEHOLD_FENCE', 'LEASEHOLD_OWNER', 'LEASEHOLD_URL')}; "
    "env['pid'] = os.getpid(); env['pgid'] = os.getpgid(0); "
    "open(sys.argv[1], 'w').write(json.dumps(env) + '\\n'); "
    "time.sleep(float(sys.argv[2])); sys.exit(int(sys.argv[3]))"
)


def record_env(path: Path, sleep: float = 0.0, code: int = 0) -> list[str]:
    return [sys.executable, "-c", RECORD_ENV, str(path), str(sleep), str(code)]


def one_clean_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- help, version, bad input -------------------------------------------------------


def test_help_of_every_subcommand_documents_exit_codes(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    names = ["run", "ls", "break", "doctor", "demo", "leader", "top", "exporter"]
    results = lh_many(env, [["--help"], *([name, "--help"] for name in names)])
    for result in results:
        assert result.returncode == 0, result
        assert "Exit codes:" in result.stdout
        for code in ("2", "69", "70"):
            assert f"  {code}  " in result.stdout, (result.args, result.stdout)
    top = results[0].stdout
    for name in names:
        assert name in top
    run_help = results[1].stdout
    for code in ("75", "76", "77", "126", "127", "128+N", "0-255"):
        assert f"{code}  " in run_help, code
    for option in ("--conflict-exit-code", "--timeout-exit-code", "--lost-exit-code"):
        assert option in run_help
    assert "declined" in results[3].stdout  # break: 1 when the prompt is declined
    leader_help = results[6].stdout
    for code in ("77", "126", "127", "128+N", "0-255"):
        assert f"{code}  " in leader_help, code
    assert "--lost-exit-code" in leader_help


def test_version(tmp_path: Path) -> None:
    result = lh(cli_env(tmp_path), "--version")
    assert result.returncode == 0
    assert leasehold.__version__ in result.stdout


BAD_INPUT = [
    (["run", "--ttl", "-1", "job", "--", "true"], "--ttl"),
    (["run", "--ttl", "nan", "job", "--", "true"], "--ttl"),
    (["run", "", "--", "true"], "name must not be empty"),
    (["run", "job"], "missing the command"),
    (["run", "--wait", "1", "--no-wait", "job", "--", "true"], "exclude each other"),
    (["run", "--limit", "0", "job", "--", "true"], "--limit"),
    (["run", "--kill-after", "-1", "job", "--", "true"], "--kill-after"),
    (["run", "-E", "300", "job", "--", "true"], "between 0 and 255"),
    (["break", "", "--yes"], "name must not be empty"),
    (["ls", "--bogus"], "--bogus"),
    (["--url", "bogus://x", "ls"], "unknown store url scheme"),
    (["nosuchcommand"], "nosuchcommand"),
]


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    results = lh_many(env, [args for args, _ in BAD_INPUT])
    for (args, expected), result in zip(BAD_INPUT, results, strict=True):
        assert result.returncode == 2, (args, result)
        line = one_clean_line(result.stderr)
        assert line.startswith("leasehold: error: "), line
        assert expected in line, (args, line)
        assert result.stdout == "", (args, result.stdout)


def test_a_url_password_never_appears_in_output(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    secret = "s3cret-Pa55"
    urls = [
        f"redis://user:{secret}@127.0.0.1:1/0",
        f"postgresql://user:{secret}@127.0.0.1:1/db?connect_timeout=2",
    ]
    commands: list[list[str]] = []
    for url in urls:
        commands += [
            ["--url", url, "ls"],
            ["--debug", "--url", url, "ls", "--json"],
            ["doctor", "--url", url],
            ["--url", url, "run", "--no-wait", "job", "--", "true"],
            ["--url", url, "break", "--yes", "job"],
        ]
    env_with_secret = dict(env, LEASEHOLD_URL=urls[0])
    results = [*lh_many(env, commands), lh(env_with_secret, "doctor")]
    for result in results:
        # 69: unreachable; 2: the optional driver is not installed.
        assert result.returncode in (2, 69), result
        assert secret not in result.stdout + result.stderr, result
        if "--debug" not in result.args:
            assert "Traceback" not in result.stderr
    assert any("***" in r.stdout + r.stderr for r in results)


# -- run: basics -----------------------------------------------------------------


def test_run_passes_environment_and_exit_status(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    record = tmp_path / "env.json"
    # Options after NAME, up to `--`, are leasehold's; everything after is the command.
    result = lh(env, "run", "nightly", "--ttl", "5", "--", *record_env(record, code=3))
    assert result.returncode == 3, result
    assert result.stderr == ""
    seen = json.loads(record.read_text())
    assert seen["LEASEHOLD_NAME"] == "nightly"
    assert int(seen["LEASEHOLD_FENCE"]) > 0
    assert seen["LEASEHOLD_OWNER"]
    # The store URL is not handed down (it may carry a password) unless the user's
    # own environment already had it.
    assert seen["LEASEHOLD_URL"] == env["LEASEHOLD_URL"]
    no_env = {k: v for k, v in env.items() if k != "LEASEHOLD_URL"}
    record2 = tmp_path / "env2.json"
    url = env["LEASEHOLD_URL"]
    result = lh(no_env, "--url", url, "run", "nightly", *record_env(record2))
    assert result.returncode == 0, result
    seen2 = json.loads(record2.read_text())
    assert seen2["LEASEHOLD_URL"] is None
    # The child runs in a process group of its own.
    assert seen2["pgid"] == seen2["pid"]
    assert int(seen2["LEASEHOLD_FENCE"]) > int(seen["LEASEHOLD_FENCE"])


def test_run_status_of_a_child_killed_by_a_signal_and_missing_commands(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    not_executable = tmp_path / "data.txt"
    not_executable.write_text("hello\n")
    results = lh_many(
        env,
        [
            ["run", "a", "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
            ["run", "b", "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"],
            ["run", "c", "--", str(tmp_path / "no-such-program")],
            ["run", "d", "--", str(not_executable)],
            ["run", "e", sys.executable, "-c", "raise SystemExit(0)"],
        ],
    )
    assert [r.returncode for r in results] == [128 + 9, 128 + 15, 127, 126, 0], results
    assert "command not found" in one_clean_line(results[2].stderr)
    assert "cannot execute" in one_clean_line(results[3].stderr)
    # Every lease was released afterwards.
    assert json.loads(lh(env, "ls", "--json").stdout) == []


# -- ls, break, doctor -----------------------------------------------------------------


def test_ls_json_matches_what_is_held_and_break_bumps_the_fence(
    tmp_path: Path, started: list[Started]
) -> None:
    env = cli_env(tmp_path)
    record = tmp_path / "held.json"
    holder = Started(env, "run", "--ttl", "20", "reports/daily", "--", *record_env(record, 60))
    started.append(holder)
    seen = json.loads(wait_for_file(record))
    fence = int(seen["LEASEHOLD_FENCE"])

    listing, table, other, refused = lh_many(
        env,
        [
            ["ls", "--json"],
            ["ls", "reports/"],
            ["ls", "--json", "backups/"],
            ["break", "reports/daily"],
        ],
    )
    rows = json.loads(listing.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == {
        "name", "owner", "host", "pid", "fence", "limit", "held_for", "expires_in",
        "queue_depth", "pid_alive",
    }  # fmt: skip
    assert row["queue_depth"] == 0
    assert row["pid_alive"] is True
    assert row["name"] == "reports/daily"
    assert row["pid"] == holder.pid
    assert row["fence"] == fence
    assert row["owner"] == seen["LEASEHOLD_OWNER"]
    assert row["limit"] == 1
    assert 0 <= row["held_for"] < 60
    assert 0 < row["expires_in"] <= 20
    assert "reports/daily" in table.stdout and str(holder.pid) in table.stdout
    assert json.loads(other.stdout) == []
    # Off a terminal, break refuses without --yes and changes nothing.
    assert refused.returncode == 2
    assert "--yes" in one_clean_line(refused.stderr)
    assert holder.proc.poll() is None

    broken = lh(env, "break", "reports/daily", "--yes")
    assert broken.returncode == 0, broken
    assert "removed 1 holder" in broken.stdout
    assert holder.finish() == 77  # lost: the command was stopped
    after = tmp_path / "after.json"
    assert lh(env, "run", "reports/daily", "--", *record_env(after)).returncode == 0
    assert int(json.loads(after.read_text())["LEASEHOLD_FENCE"]) > fence
    nothing = lh(env, "break", "reports/daily", "--yes")
    assert nothing.returncode == 0
    assert "nobody holds" in nothing.stderr


def test_doctor_reports_a_usable_store_and_an_unusable_one(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    good, bad = lh_many(env, [["doctor"], ["doctor", "--url", f"sqlite:///{blocker / 'x.db'}"]])
    assert good.returncode == 0, good
    for word in ("round trip", "clock offset", "acquire + renew + release", "durable", "usable"):
        assert word in good.stdout
    assert bad.returncode == 69, bad
    assert "not usable" in bad.stdout
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_demo_shows_no_lost_update_with_the_lock_and_a_rejected_stale_write(
    tmp_path: Path,
) -> None:
    started_at = time.monotonic()
    result = lh(cli_env(tmp_path), "demo", timeout=60)
    elapsed = time.monotonic() - started_at
    assert result.returncode == 0, result
    out = result.stdout
    assert "0 updates lost ✓" in out
    assert "rejected (StaleFence" in out
    assert "written by B" in out
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"


# -- small pieces, in process -------------------------------------------------------


def test_printed_text_is_scrubbed_of_the_url_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from leasehold.cli import _common

    monkeypatch.setattr(_common.STATE, "url", "postgresql://u:p%40ss-word@h/db?sslpassword=key1")
    text = "driver said: bad login u:p%40ss-word, p@ss-word, key1"
    assert _common.scrub(text) == "driver said: bad login u:***, ***, ***"
    monkeypatch.setattr(_common.STATE, "url", None)
    monkeypatch.setenv("LEASEHOLD_URL", "redis://:hunter2@localhost/0")
    assert _common.scrub("auth hunter2 failed") == "auth *** failed"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.04, "0.0s"),
        (3.25, "3.2s"),
        (42.9, "42s"),
        (185, "3m 05s"),
        (7300, "2h 01m"),
        (90000, "1d 01h"),
    ],
)
def test_durations_are_short(seconds: float, shown: str) -> None:
    from leasehold.cli._common import duration

    assert duration(seconds) == shown
