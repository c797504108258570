"""``leasehold run`` with several real processes: waiting and skipping, signal
forwarding, and a lost lease that takes the command's whole process group down."""

from __future__ import annotations

import json
import os
import pty
import select
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
    record_env,
    wait_for_file,
)

pytestmark = pytest.mark.slow

started_fixture = pytest.fixture(reaped, name="started")

TTL = 1.5  # renewals every 0.5 s
SLACK = 3.0  # a busy 2-core CI box, Python start-up included


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; only its parent's wait() removes it.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_all_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


# A child that stamps when it starts and ends, holding the lease for a while.
STAMP = (
    "import json, sys, time; "
    "start = time.time(); time.sleep(float(sys.argv[2])); "
    "open(sys.argv[1], 'w').write(json.dumps([start, time.time()]) + '\\n')"
)


def stamp(path: Path, hold: float) -> list[str]:
    return [sys.executable, "-c", STAMP, str(path), str(hold)]


def test_second_run_waits_skips_or_times_out(tmp_path: Path, started: list[Started]) -> None:
    env = cli_env(tmp_path)
    marker = tmp_path / "first.started"
    first_stamps, second_stamps = tmp_path / "first.json", tmp_path / "second.json"
    hold = (
        f"import pathlib, runpy, sys; pathlib.Path({str(marker)!r}).write_text('x\\n'); "
        f"sys.argv = ['-c', {str(first_stamps)!r}, '3']; "
        f"exec({STAMP!r})"
    )
    first = Started(env, "run", "--ttl", str(TTL), "job", "--", sys.executable, "-c", hold)
    started.append(first)
    wait_for_file(marker)
    waiter = Started(env, "run", "--ttl", str(TTL), "job", "--", *stamp(second_stamps, 0))
    started.append(waiter)
    busy, custom, timed_out = lh_many(
        env,
        [
            ["run", "--no-wait", "job", "--", "true"],
            ["run", "-n", "-E", "9", "--quiet", "job", "--", "true"],
            ["run", "--wait", "0.5", "job", "--", "true"],
        ],
    )
    assert busy.returncode == 75, busy
    line = one_clean_line(busy.stderr)
    assert "'job' is busy" in line and f"pid {first.pid}" in line, line
    assert custom.returncode == 9 and custom.stderr == ""
    assert timed_out.returncode == 76, timed_out
    assert "gave up waiting" in one_clean_line(timed_out.stderr)

    assert first.finish() == 0, first.err
    assert waiter.finish() == 0, waiter.err
    first_end = json.loads(first_stamps.read_text())[1]
    second_start = json.loads(second_stamps.read_text())[0]
    assert second_start >= first_end  # never both at once


def test_limit_makes_a_semaphore(tmp_path: Path, started: list[Started]) -> None:
    env = cli_env(tmp_path)
    records = [tmp_path / f"holder{i}.json" for i in range(2)]
    for record in records:
        holder = Started(env, "run", "--limit", "2", "pool", "--", *record_env(record, 30))
        started.append(holder)
    fences = {json.loads(wait_for_file(record))["LEASEHOLD_FENCE"] for record in records}
    assert len(fences) == 2
    third = lh(env, "run", "--limit", "2", "--no-wait", "pool", "--", "true")
    assert third.returncode == 75, third
    assert len(json.loads(lh(env, "ls", "--json", "pool").stdout)) == 2


def test_sigterm_is_forwarded_and_the_lease_released_after_the_child_exits(
    tmp_path: Path, started: list[Started]
) -> None:
    env = cli_env(tmp_path)
    ready, marker, proceed = tmp_path / "ready", tmp_path / "got-term", tmp_path / "proceed"
    trap = (
        "import pathlib, signal, sys, time\n"
        "def on_term(signum, frame):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('TERM\\n')\n"
        "    # Clean-up takes a while; meanwhile the lease must still be held.\n"
        f"    while not pathlib.Path({str(proceed)!r}).exists():\n"
        "        time.sleep(0.02)\n"
        "    sys.exit(5)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        f"pathlib.Path({str(ready)!r}).write_text('ready\\n')\n"
        "time.sleep(60)\n"
    )
    runner = Started(env, "run", "--ttl", str(TTL), "job", "--", sys.executable, "-c", trap)
    started.append(runner)
    wait_for_file(ready)
    runner.proc.send_signal(signal.SIGTERM)
    assert wait_for_file(marker) == "TERM\n"
    assert lh(env, "run", "--no-wait", "-q", "job", "--", "true").returncode == 75
    proceed.write_text("")
    assert runner.finish(timeout=20) == 5, runner.err  # the child's own status
    assert json.loads(lh(env, "ls", "--json").stdout) == []


# The command: a shell that ignores SIGTERM (so SIGKILL is needed) and starts a
# grandchild that inherits that, recording every pid.
FAMILY = """\
trap '' TERM
echo $$ > "$1.tmp"
sleep 120 &
echo $! >> "$1.tmp"
mv "$1.tmp" "$1"
wait
"""


def start_family(env: dict[str, str], tmp_path: Path, *options: str) -> tuple[Started, list[int]]:
    script = tmp_path / "family.sh"
    script.write_text(FAMILY)
    pids_file = tmp_path / "pids"
    runner = Started(env, "run", *options, "family", "--", "sh", str(script), str(pids_file))
    deadline = time.monotonic() + 20
    while not pids_file.exists():
        assert time.monotonic() < deadline, "the family did not start"
        assert runner.proc.poll() is None, runner.finish()
        time.sleep(0.02)
    pids = [int(line) for line in pids_file.read_text().split()]
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
    return runner, pids


def test_lost_lease_kills_the_whole_process_group(tmp_path: Path, started: list[Started]) -> None:
    env = cli_env(tmp_path)
    kill_after = 1.0
    runner, pids = start_family(env, tmp_path, "--ttl", str(TTL), "--kill-after", str(kill_after))
    started.append(runner)
    broken = lh(env, "break", "--yes", "family")
    assert broken.returncode == 0, broken
    broke_at = time.monotonic()
    # Noticed at the next renewal (TTL/3), then SIGTERM, ignored, then SIGKILL.
    assert runner.finish(timeout=TTL / 3 + kill_after + SLACK + 10) == 77, runner.err
    took = time.monotonic() - broke_at
    assert took < TTL / 3 + kill_after + SLACK, f"took {took:.2f} s"
    assert wait_all_gone(pids, 2.0), [pid for pid in pids if pid_alive(pid)]
    assert "lost the lease on 'family'" in runner.err
    assert "SIGKILL" in runner.err
    assert "Traceback" not in runner.err


def test_a_killed_leasehold_takes_its_command_down(tmp_path: Path, started: list[Started]) -> None:
    env = cli_env(tmp_path)
    kill_after = 1.0
    runner, pids = start_family(env, tmp_path, "--ttl", str(TTL), "--kill-after", str(kill_after))
    started.append(runner)
    runner.proc.kill()  # SIGKILL: no clean-up in leasehold itself
    assert runner.finish() == -signal.SIGKILL
    assert wait_all_gone(pids, kill_after + SLACK), [pid for pid in pids if pid_alive(pid)]
    # And the name is free again within the TTL.
    free = lh(env, "run", "--wait", str(TTL + SLACK), "family", "--", "true")
    assert free.returncode == 0, free


def read_pty(fd: int, until: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            data += chunk
    return data


def test_on_a_terminal_run_shows_who_it_waits_for_and_break_asks(
    tmp_path: Path, started: list[Started]
) -> None:
    env = cli_env(tmp_path)
    env.pop("NO_COLOR")
    env["TERM"] = "xterm"
    record = tmp_path / "holder.json"
    holder = Started(env, "run", "--ttl", "10", "job", "--", *record_env(record, 60))
    started.append(holder)
    owner = json.loads(wait_for_file(record))["LEASEHOLD_OWNER"]

    main, secondary = pty.openpty()
    try:
        waiter = subprocess.Popen(
            [*LH, "run", "--wait", "30", "job", "--", "true"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=secondary,
        )
        try:
            seen = read_pty(main, owner.encode(), timeout=20)
            assert b"waiting" in seen and owner.encode() in seen, seen

            asker = subprocess.Popen(
                [*LH, "break", "job"], env=env, stdin=secondary, stdout=secondary, stderr=secondary
            )
            prompt = read_pty(main, b"[y/N]", timeout=20)
            assert b"Break the lease on 'job'?" in prompt, prompt
            os.write(main, b"n\n")
            assert asker.wait(20) == 1
            assert holder.proc.poll() is None  # declined: still held

            asker = subprocess.Popen(
                [*LH, "break", "job"], env=env, stdin=secondary, stdout=secondary, stderr=secondary
            )
            read_pty(main, b"[y/N]", timeout=20)
            os.write(main, b"y\n")
            assert asker.wait(20) == 0
            # The waiter gets the lease; the broken holder is stopped.
            assert waiter.wait(20) == 0
            assert holder.finish() == 77
        finally:
            if waiter.poll() is None:
                waiter.kill()
            waiter.wait()
    finally:
        os.close(main)
        os.close(secondary)
