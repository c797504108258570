"""``leasehold demo``: lost updates without a lock, none with one, and a frozen
holder's late write rejected by its fence, on a throwaway SQLite store."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from leasehold._errors import LeaseholdError
from leasehold._sync.client import Client
from leasehold.cli import _common
from leasehold.cli._common import EXIT_FAILURE, CliError, stdout_console
from leasehold.cli._demo_worker import fenced_write, read_counter

WORKER_MODULE = "leasehold.cli._demo_worker"
WORKER_TIMEOUT = 60.0
STALE_TTL = 1.0
REPORT_NAME = "demo/report"


@dataclass
class Counted:
    expected: int
    final: int
    seconds: float

    @property
    def lost(self) -> int:
        return self.expected - self.final


def _worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", WORKER_MODULE, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _expect_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith(prefix):
        _failed(proc, f"expected {prefix!r}, got {line!r}")
    return line


def _finish(proc: subprocess.Popen[str]) -> str:
    """Close the pipes, reap the process, return what it said on stderr."""
    if proc.stdin is not None and not proc.stdin.closed:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    err = ""
    if proc.stderr is not None and not proc.stderr.closed:
        err = proc.stderr.read()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    proc.wait()
    return err


def _failed(proc: subprocess.Popen[str], what: str) -> None:
    proc.kill()
    err = _finish(proc)
    tail = " | ".join(err.strip().splitlines()[-3:]) if err else "no output"
    raise CliError(f"demo worker failed ({what}): {tail}", EXIT_FAILURE)


@contextlib.contextmanager
def _reaped(procs: Sequence[subprocess.Popen[str]]) -> Iterator[None]:
    """Whatever happens, no worker outlives the demo (or its temporary directory)."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                proc.kill()
            _finish(proc)


def count_in_parallel(
    url: str, workdir: Path, processes: int, rounds: int, locked: bool
) -> Counted:
    counter = workdir / ("locked" if locked else "unlocked")
    counter.write_text("0")
    mode = "lock" if locked else "nolock"
    procs = [_worker("count", url, str(counter), str(rounds), mode) for _ in range(processes)]
    with _reaped(procs):
        # Python starts slowly; without a common start line the first worker could
        # be done before the last one begins, and nothing would race.
        for proc in procs:
            _expect_line(proc, "ready")
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(WORKER_TIMEOUT)
            except subprocess.TimeoutExpired:
                _failed(proc, f"still running after {WORKER_TIMEOUT:g}s")
            if proc.returncode != 0:
                _failed(proc, f"exit status {proc.returncode}")
        seconds = time.monotonic() - started
    return Counted(processes * rounds, read_counter(counter), seconds)


@dataclass
class Fenced:
    stale_fence: int
    new_fence: int
    stale_result: str
    body: str


def frozen_holder(url: str, workdir: Path) -> Fenced:
    database = workdir / "report.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE report (body TEXT, fence INTEGER)")
        conn.execute("INSERT INTO report VALUES ('empty', 0)")
    conn.close()
    holder = _worker("stale", url, str(database), REPORT_NAME, str(STALE_TTL))
    with _reaped([holder]):
        stale_fence = int(_expect_line(holder, "ready").split()[1])
        holder.send_signal(signal.SIGSTOP)
        # Frozen: its keeper thread cannot renew, so the lease expires in the store.
        with Client(url) as client:
            lease = client.lock(REPORT_NAME, ttl=10.0).acquire(timeout=STALE_TTL * 10)
            try:
                new_result = fenced_write(str(database), REPORT_NAME, lease.fence, "written by B")
            finally:
                lease.release()
        new_fence = lease.fence
        if new_result != "written":
            raise CliError(f"B's fenced write failed: {new_result}")
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        holder.send_signal(signal.SIGCONT)
        stale_result = _expect_line(holder, "")
        holder.stdin.close()
        holder.wait(WORKER_TIMEOUT)
    with contextlib.closing(sqlite3.connect(database)) as conn:
        (body,) = conn.execute("SELECT body FROM report").fetchone()
    return Fenced(stale_fence, new_fence, stale_result, str(body))


def _check(ok: bool) -> str:
    return "[bold green]✓[/]" if ok else "[bold red]✗[/]"


def narrate(out: Console, processes: int, rounds: int, workdir: Path, url: str) -> bool:
    total = processes * rounds
    out.print(
        "[bold]leasehold demo[/]: three short experiments on a throwaway SQLite store\n"
        f"[dim]{escape(str(workdir))} (deleted afterwards)[/]\n"
    )

    out.print(
        f"[bold]1. No lock.[/] {processes} processes each add 1 to a counter in a file, "
        f"{rounds} times: read the number, work for 1 ms, write number + 1."
    )
    free = count_in_parallel(url, workdir, processes, rounds, locked=False)
    lost_word = "update lost" if free.lost == 1 else "updates lost"
    out.print(
        f"   counter = {free.final}, expected {total}: [bold]{free.lost} {lost_word}[/] "
        f"{_check(free.lost == 0)}"
    )
    if free.lost:
        out.print(
            "   [dim]Two processes read the same number and both write number + 1: "
            "one of the two updates vanishes.[/]\n"
        )
    else:
        out.print("   [dim]No update lost this time: lucky scheduling. Run it again.[/]\n")

    out.print(
        "[bold]2. With a lock.[/] The same, with each increment inside "
        '[cyan]with client.lock("demo/counter"):[/]'
    )
    locked = count_in_parallel(url, workdir, processes, rounds, locked=True)
    out.print(
        f"   counter = {locked.final}, expected {total}: [bold]{locked.lost} updates lost[/] "
        f"{_check(locked.lost == 0)} [dim]({total} lock handoffs in {locked.seconds:.1f} s)[/]\n"
    )

    out.print(
        "[bold]3. A frozen holder.[/] A lock cannot stop its holder from freezing (GC "
        "pause, VM stall, SIGSTOP) past its TTL, waking up and writing as if it still "
        "held the lock. Fencing can."
    )
    fenced = frozen_holder(url, workdir)
    rejected = fenced.stale_result.startswith("rejected")
    out.print(
        f"   A acquires [cyan]{REPORT_NAME}[/] with fence {fenced.stale_fence} "
        f"(TTL {STALE_TTL:g} s) and is frozen with SIGSTOP before it writes.\n"
        f"   The lease expires; B acquires it with fence {fenced.new_fence} and writes the "
        "report.\n"
        f"   A is resumed and writes with fence {fenced.stale_fence}: "
        + (
            f"[bold]rejected[/] (StaleFence: {fenced.stale_fence} < {fenced.new_fence}) "
            if rejected
            else f"[bold]{escape(fenced.stale_result)}[/] "
        )
        + _check(rejected)
    )
    out.print(f"   The report says: [italic]{escape(fenced.body)}[/]")
    if rejected:
        out.print(
            "   [dim]Without the fence check, A's late write would have silently replaced B's.[/]"
        )
    out.print()

    ok = locked.lost == 0 and rejected and fenced.body == "written by B"
    if ok:
        out.print(
            "Every grant carries a fence that only goes up. Check it where you write "
            "([cyan]leasehold.fence.check[/] in a SQL transaction, "
            "[cyan]leasehold.fence.redis_write[/] for Redis) and a superseded holder "
            "cannot do harm.\n"
            "Next: [cyan]leasehold run NAME -- CMD[/] runs any command under a lease "
            "([cyan]leasehold run --help[/])."
        )
    else:
        out.print("[bold red]The demo did not go as expected; please report this.[/]")
    return ok


@click.command(
    "demo",
    epilog=_common.exit_codes_epilog(
        (0, "the lock lost no update and the stale write was rejected"),
        (EXIT_FAILURE, "something else happened (please report it)"),
    ),
    short_help="Show lost updates, a lock, and fencing, in under 30 s.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@click.option("--processes", type=click.IntRange(2, 32), default=4, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 10_000), default=100, show_default=True)
def demo_command(processes: int, rounds: int) -> int:
    """Three short experiments on a temporary SQLite store (never your --url):

    \b
    1. several processes update a shared counter without a lock: updates get lost;
    2. the same with a leasehold lock: none are lost;
    3. a lock holder frozen past its TTL wakes up and writes: its fence gets the
       late write rejected.
    """
    out = stdout_console()
    with tempfile.TemporaryDirectory(prefix="leasehold-demo-") as tmp:
        workdir = Path(tmp)
        url = f"sqlite:///{workdir / 'leases.db'}"
        try:
            # Create the store once up front: several processes creating a fresh
            # SQLite store at the same instant can see "database is locked".
            with Client(url) as client:
                client.store.ping()
            ok = narrate(out, processes, rounds, workdir, url)
        except LeaseholdError as exc:
            raise CliError(f"demo failed: {exc}") from None
    return 0 if ok else EXIT_FAILURE
