"""``leasehold leader`` with real processes on a SQLite store: one candidate runs the
command, the others wait; a dead or deposed leader's command is stopped and the next
candidate takes over with a higher term; the command's status is passed through."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import (
    LH,
    Started,
    cli_env,
    lh,
    lh_many,
    one_clean_line,
    reaped,
    wait_for_file,
)
from tests.test_cli_run import pid_alive, read_pty, wait_all_gone

started_fixture = pytest.fixture(reaped, name="started")

TTL = 1.0  # renewals every 1/3 s
KILL_AFTER = 1.0
SLACK = 3.0  # a busy 2-core CI box, Python start-up included

# A command that records what leasehold told it, then sleeps and exits with a code.
RECORD = (
    "import json, os, sys, time; "
    "env = {k: os.environ.get(k) for k in "
    "('LEASEHOLD_NAME', 'LEASEHOLD_FENCE', 'LEASEHOLD_IDENTITY')}; "
    "env.update(pid=os.getpid(), pgid=os.getpgid(0), at=time.time()); "
    "open(sys.argv[1], 'w').write(json.dumps(env) + '\\n'); "
    "time.sleep(float(sys.argv[2])); sys.exit(int(sys.argv[3]))"
)


def record(path: Path, sleep: float = 60.0, code: int = 0) -> list[str]:
    return [sys.executable, "-c", RECORD, str(path), str(sleep), str(code)]


def candidate(env: dict[str, str], identity: str, *command: str, ttl: float = TTL) -> Started:
    return Started(
        env,
        "leader",
        "--ttl",
        str(ttl),
        "--kill-after",
        str(KILL_AFTER),
        "--identity",
        identity,
        "elect",
        "--",
        *command,
    )


def test_leader_bad_input_is_exit_2_and_a_missing_command_127(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    bad = [
        (["leader", "elect"], "missing the command"),
        (["leader", "--identity", "", "elect", "--", "true"], "identity"),
        (["leader", "--ttl", "0", "elect", "--", "true"], "--ttl"),
        (["leader", "--lost-exit-code", "256", "elect", "--", "true"], "between 0 and 255"),
    ]
    results = lh_many(
        env,
        [*(args for args, _ in bad), ["leader", "elect", "--", str(tmp_path / "nope")]],
    )
    for (args, expected), result in zip(bad, results[:-1], strict=True):
        assert result.returncode == 2, (args, result)
        line = one_clean_line(result.stderr)
        assert line.startswith("leasehold: error: ") and expected in line, (args, line)
    assert results[-1].returncode == 127, results[-1]
    assert "command not found" in one_clean_line(results[-1].stderr)
    assert json.loads(lh(env, "ls", "--json").stdout) == []  # stepped down


@pytest.mark.slow
def test_one_leads_the_other_waits_and_takes_over_when_the_leader_is_killed(
    tmp_path: Path, started: list[Started]
) -> None:
    env = cli_env(tmp_path)
    a_seen, b_seen = tmp_path / "a.json", tmp_path / "b.json"
    a = candidate(env, "alpha", *record(a_seen))
    started.append(a)
    first = json.loads(wait_for_file(a_seen))
    b = candidate(env, "beta", *record(b_seen))
    started.append(b)
    pool = [Started(env, "run", "--limit", "3", "pool", "--", "sleep", "30") for _ in range(2)]
    started.extend(pool)

    assert first["LEASEHOLD_NAME"] == "elect"
    assert first["LEASEHOLD_IDENTITY"] == "alpha"
    assert first["pgid"] == first["pid"]  # its own process group
    term = int(first["LEASEHOLD_FENCE"])

    # Several TTLs pass: alpha keeps leading (renewed), beta keeps waiting.
    deadline = time.monotonic() + 20
    while True:
        rows = json.loads(lh(env, "ls", "--json").stdout)
        if len([row for row in rows if row["name"] == "pool"]) == 2:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    time.sleep(max(0.0, 2 * TTL - (time.time() - first["at"])))
    rows = json.loads(lh(env, "ls", "--json").stdout)
    table = lh(env, "ls").stdout
    assert not b_seen.exists()
    assert b.proc.poll() is None and a.proc.poll() is None
    elect = [row for row in rows if row["name"] == "elect"]
    assert len(elect) == 1, rows
    assert elect[0]["owner"] == "alpha"  # the leader's identity
    assert elect[0]["fence"] == term
    assert elect[0]["pid"] == a.pid
    assert elect[0]["limit"] == 1
    assert [row["limit"] for row in rows if row["name"] == "pool"] == [3, 3]
    assert all(set(row) >= {"name", "owner", "fence", "limit", "expires_in"} for row in rows)
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert lines["elect"][1:3] == ["1/1", "alpha"], table
    assert lines["pool"][1] == "2/3", table

    # SIGKILL alpha's leasehold: nobody renews; the watchdog stops its command, and
    # beta leads once the lease has expired, with a higher term.
    a.proc.kill()
    killed_at = time.time()
    assert a.finish() == -signal.SIGKILL
    assert wait_all_gone([first["pid"]], KILL_AFTER + SLACK), "the watchdog did not act"
    second = json.loads(wait_for_file(b_seen, timeout=TTL + SLACK + 5))
    assert second["at"] - killed_at < TTL + SLACK, second["at"] - killed_at
    assert second["LEASEHOLD_IDENTITY"] == "beta"
    assert int(second["LEASEHOLD_FENCE"]) > term
    assert "leasehold watchdog" in a.err

    # SIGTERM is forwarded to the command; leasehold exits with its status.
    b.proc.send_signal(signal.SIGTERM)
    assert b.finish(timeout=20) == 128 + signal.SIGTERM, b.err
    assert not pid_alive(second["pid"])
    assert [row["name"] for row in json.loads(lh(env, "ls", "--json").stdout)] == ["pool"] * 2


# A leader's command: a shell that ignores SIGTERM (so SIGKILL is needed) with a
# grandchild that inherits that, recording every pid.
FAMILY = """\
trap '' TERM
echo $$ > "$1.tmp"
sleep 120 &
echo $! >> "$1.tmp"
mv "$1.tmp" "$1"
wait
"""


@pytest.mark.slow
def test_break_stops_the_leaders_process_group_and_exits_with_the_lost_code(
    tmp_path: Path, started: list[Started]
) -> None:
    env = cli_env(tmp_path)
    script, pids_file = tmp_path / "family.sh", tmp_path / "pids"
    script.write_text(FAMILY)
    leader = candidate(env, "alpha", "sh", str(script), str(pids_file))
    started.append(leader)
    deadline = time.monotonic() + 20
    while not pids_file.exists():
        assert time.monotonic() < deadline, "the command did not start"
        assert leader.proc.poll() is None, leader.finish()
        time.sleep(0.02)
    pids = [int(line) for line in pids_file.read_text().split()]
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)

    broken = lh(env, "break", "--yes", "elect")
    assert broken.returncode == 0, broken
    broke_at = time.monotonic()
    # Noticed at the next renewal (TTL/3), then SIGTERM, ignored, then SIGKILL.
    assert leader.finish(timeout=TTL + KILL_AFTER + SLACK + 10) == 77, leader.err
    took = time.monotonic() - broke_at
    assert took < TTL / 3 + KILL_AFTER + SLACK, f"took {took:.2f} s"
    assert wait_all_gone(pids, 2.0), [pid for pid in pids if pid_alive(pid)]
    assert "lost leadership of 'elect' (term " in leader.err
    assert "SIGKILL" in leader.err
    assert "Traceback" not in leader.err


@pytest.mark.slow
def test_the_commands_status_is_passed_through_and_the_next_candidate_leads_at_once(
    tmp_path: Path, started: list[Started]
) -> None:
    env = cli_env(tmp_path)
    go, b_seen = tmp_path / "go", tmp_path / "b.json"
    ready = tmp_path / "ready"
    # A long TTL: a hand-over within it is a resignation, not an expiry.
    ttl = 30.0
    exits_3 = (
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(ready)!r}).write_text('x\\n')\n"
        f"while not pathlib.Path({str(go)!r}).exists():\n"
        "    time.sleep(0.02)\n"
        "sys.exit(3)\n"
    )
    a = candidate(env, "alpha", sys.executable, "-c", exits_3, ttl=ttl)
    started.append(a)
    wait_for_file(ready)
    b = candidate(env, "beta", *record(b_seen, sleep=0, code=0), ttl=ttl)
    started.append(b)
    time.sleep(1.0)  # beta is queued
    assert not b_seen.exists()
    go.write_text("")
    released_at = time.time()
    assert a.finish() == 3, a.err
    assert b.finish() == 0, b.err
    took_over = json.loads(b_seen.read_text())["at"] - released_at
    assert took_over < SLACK, took_over
    assert a.err == "" and b.err == ""


@pytest.mark.slow
def test_on_a_terminal_a_waiting_candidate_shows_the_leader_and_term(
    tmp_path: Path, started: list[Started]
) -> None:
    env = cli_env(tmp_path)
    env.pop("NO_COLOR")
    env["TERM"] = "xterm"
    seen_path = tmp_path / "a.json"
    a = candidate(env, "alpha", *record(seen_path), ttl=10)
    started.append(a)
    term = json.loads(wait_for_file(seen_path))["LEASEHOLD_FENCE"]
    main, secondary = pty.openpty()
    try:
        waiter = subprocess.Popen(
            [*LH, "leader", "elect", "--", "true"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=secondary,
        )
        try:
            expected = f"led by alpha (term {term})".encode()
            seen = read_pty(main, expected, timeout=20)
            assert b"waiting" in seen and b"to lead 'elect'" in seen and expected in seen, seen
            # A signal while waiting ends the wait: nothing runs, exit 128+N.
            waiter.send_signal(signal.SIGINT)
            assert waiter.wait(20) == 128 + signal.SIGINT
            assert b"while waiting to lead 'elect'; not running" in read_pty(
                main, b"not running", timeout=5
            )
        finally:
            if waiter.poll() is None:
                waiter.kill()
            waiter.wait()
    finally:
        os.close(main)
        os.close(secondary)
    assert a.proc.poll() is None  # still leading
