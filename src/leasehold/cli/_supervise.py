"""Running a command whose life must not outlast a lease.

The command starts in a session (and so a process group) of its own, so that one
``killpg`` reaches it and everything it started: shells, pipelines, grandchildren.
Terminal signals reach leasehold alone and are forwarded once to that group.

A lease is renewed by leasehold's own threads, so if leasehold is killed with
SIGKILL (OOM killer, ``kill -9``) the lease expires while the command could run on
unprotected. A tiny watchdog process guards against that: it holds the read end
of a pipe from leasehold and stops the command's group when the pipe closes
without a goodbye.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

# Signals a supervisor passes on to the command rather than acting on itself.
FORWARDED = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
# Signals that end the wait for a lease (before the command has started).
INTERRUPTING = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    if hasattr(signal, name)
)

POLL = 0.05  # how often the supervisor looks at its child when nothing wakes it


class Interrupted(BaseException):
    """A terminating signal arrived while waiting for the lease.

    A BaseException, like KeyboardInterrupt, so that it goes through ``except
    Exception`` untouched and the lock's own clean-up (leave the wait queue) runs.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


@contextlib.contextmanager
def signal_handlers(
    signums: Sequence[int], handler: Callable[[int, FrameType | None], None]
) -> Iterator[None]:
    """Install ``handler`` for ``signums`` (main thread only), restore on exit."""
    previous: dict[int, Handler] = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    del frame
    raise Interrupted(signum)


def exit_status(wait_status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def kill_group(pgid: int, signum: int) -> bool:
    """Signal every process in group ``pgid``; False if the group is gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member changed its credentials (setuid program); the rest got it.
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` still runs. Zombies do not count:
    they are dead, and an init that reaps lazily can keep them for seconds."""
    if not kill_group(pgid, 0):
        return False
    members = _running_members(pgid)
    return True if members is None else members


def _running_members(pgid: int) -> bool | None:
    """Whether a non-zombie process is in group ``pgid``; None without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may contain anything, even ")".
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


class Child:
    """The command, started in its own session; reaped with waitpid, not Popen,
    so that a supervisor running as PID 1 (a container) can also reap orphans."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(list(argv), env=env, start_new_session=True)
        self.pid = self.process.pid
        self.pgid = self.pid  # a new session's leader leads its process group too
        self.status: int | None = None
        self._reap_orphans = os.getpid() == 1

    def poll(self) -> int | None:
        """The exit status once the command has exited (128+N if killed by N)."""
        if self.status is None:
            try:
                pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, wait_status = self.pid, 0
            if pid == self.pid:
                self._set_status(wait_status)
        if self._reap_orphans:
            self._reap_others()
        return self.status

    def _set_status(self, wait_status: int) -> None:
        self.status = exit_status(wait_status)
        # Popen must not think the process is still running (and warn about it).
        self.process.returncode = os.waitstatus_to_exitcode(wait_status)

    def _reap_others(self) -> None:
        # As PID 1, orphaned grandchildren are ours to reap; unreaped, they would
        # keep the process group "alive" as zombies.
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid and self.status is None:
                self._set_status(wait_status)

    def group_alive(self) -> bool:
        self.poll()
        return group_alive(self.pgid)

    def signal_group(self, signum: int) -> bool:
        return kill_group(self.pgid, signum)

    def wait_group_gone(self, timeout: float) -> bool:
        """Wait until no process of the group is left; True if that happened."""
        deadline = time.monotonic() + timeout
        while self.group_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    def stop_group(self, grace: float, report: Callable[[str], None]) -> None:
        """SIGTERM the whole group, SIGKILL whatever is left after ``grace`` s."""
        if not self.signal_group(signal.SIGTERM):
            self.poll()
            return
        if self.wait_group_gone(grace):
            return
        report(
            f"still running {grace:g}s after SIGTERM; sending SIGKILL to process group {self.pgid}"
        )
        self.signal_group(signal.SIGKILL)
        # SIGKILL cannot be ignored, but zombies reaped by someone else linger a bit.
        self.wait_group_gone(5.0)


# The watchdog runs with -I -S: no site, no environment, only these few lines.
WATCHDOG_SOURCE = """\
import os, signal, sys, time
line = sys.stdin.readline().split()
if len(line) != 3:
    sys.exit(0)
pgid, grace, parent = int(line[0]), float(line[1]), int(line[2])
if sys.stdin.read().startswith("done"):
    sys.exit(0)
sys.stderr.write(
    "leasehold watchdog: leasehold (pid %d) died while its command ran; its lease is no "
    "longer renewed, so the command's process group %d is being stopped\\n" % (parent, pgid)
)
sys.stderr.flush()
def kill(sig):
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
def running():
    if not kill(0):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        try:
            with open("/proc/%s/stat" % entry, "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[-1].split()
        except (OSError, ValueError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False
if kill(signal.SIGTERM):
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and running():
        time.sleep(0.05)
    if running():
        kill(signal.SIGKILL)
"""


class Watchdog:
    """Stops the command's group if leasehold dies without saying goodbye."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        if os.getpid() == 1:
            # In a container, the kernel kills everything when PID 1 dies.
            return
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", WATCHDOG_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            self._process = None

    @property
    def active(self) -> bool:
        return self._process is not None

    def guard(self, pgid: int, grace: float) -> None:
        self._send(f"{pgid} {grace!r} {os.getpid()}\n".encode())

    def dismiss(self) -> None:
        """The command's group is gone or no longer ours: stand down."""
        process = self._process
        if process is None:
            return
        self._send(b"done\n")
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None

    def _send(self, data: bytes) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        try:
            process.stdin.write(data)
            process.stdin.flush()
        except OSError:
            # The watchdog died (killed along with a whole cgroup, say): carry on.
            self._process = None
