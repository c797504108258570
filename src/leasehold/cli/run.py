"""``leasehold run NAME -- CMD``: run a command while holding a lease on NAME."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from types import FrameType

import click
from rich.console import Console
from rich.text import Text

from leasehold._core import validate
from leasehold._core.records import HolderInfo
from leasehold._errors import AcquireTimeout, LeaseholdError, LeaseLost
from leasehold._sync.client import Client
from leasehold._sync.lease import Lease
from leasehold._sync.lock import Lock
from leasehold.cli import _common
from leasehold.cli._common import (
    EXIT_BUSY,
    EXIT_CANNOT_EXECUTE,
    EXIT_LOST,
    EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
    SIGNAL_BASE,
    checked,
    common_options,
    describe_holders,
    duration,
    open_client,
    say,
    stderr_console,
    warn,
)
from leasehold.cli._supervise import (
    FORWARDED,
    INTERRUPTING,
    POLL,
    Child,
    Interrupted,
    Watchdog,
    raise_interrupted,
    signal_handlers,
    signal_name,
)

DEFAULT_TTL = 30.0
DEFAULT_KILL_AFTER = 10.0
STATUS_REFRESH = 0.2  # seconds between redraws of the waiting line
HOLDERS_REFRESH = 1.0  # seconds between store queries for who holds the lease


class RunCommand(click.Command):
    """Options may come before or after NAME; the command starts at ``--`` or, when
    there is none, at the first argument after NAME (``leasehold run n cmd -x``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.allow_interspersed_args = False
        opts, _rest, _order = self.make_parser(ctx).parse_args(args=list(args))
        # Without interspersing, parsing stops at NAME and the rest is the command;
        # a command starting with an option-like word means "options after NAME",
        # which the first `--` then ends.
        command = opts.get("command")
        if not isinstance(command, (list, tuple)):
            command = ()  # click >= 8.3 marks a missing value with a sentinel
        if command and str(command[0]).startswith("-") and command[0] != "--":
            ctx.allow_interspersed_args = True
        return super().parse_args(ctx, args)


check_limit = checked(validate.limit)

EPILOG = _common.exit_codes_epilog(
    ("0-255", "the command's own exit status (128+N if it was killed by signal N)"),
    (EXIT_BUSY, "--no-wait and the lease is held (EX_TEMPFAIL; see --conflict-exit-code)"),
    (EXIT_TIMEOUT, "--wait S passed without getting the lease (see --timeout-exit-code)"),
    (EXIT_LOST, "the lease was lost and the command was stopped (see --lost-exit-code)"),
    (EXIT_CANNOT_EXECUTE, "the command cannot be executed (permission, format)"),
    (EXIT_NOT_FOUND, "the command was not found"),
    (f"{SIGNAL_BASE}+N", "interrupted by signal N while waiting for the lease"),
    note="The command's own status can collide with these: change them with the options.",
)


@click.command(
    "run",
    cls=RunCommand,
    epilog=EPILOG,
    short_help="Run a command while holding a lease.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@click.argument("name", callback=_common.check_name)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] CMD [ARGS]...")
@click.option(
    "--ttl",
    type=float,
    default=DEFAULT_TTL,
    show_default=True,
    metavar="S",
    callback=_common.check_ttl,
    help="Lease time-to-live in seconds. Renewed every TTL/3 while the command runs; "
    "if leasehold dies, others can take over after at most TTL.",
)
@click.option(
    "--wait",
    "wait",
    type=float,
    default=None,
    metavar="S",
    callback=_common.check_seconds,
    help="Give up after waiting S seconds for the lease (default: wait forever).",
)
@click.option(
    "--no-wait",
    "-n",
    is_flag=True,
    help="If the lease is held, say by whom and exit at once.",
)
@click.option(
    "--limit",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    callback=check_limit,
    help="Let up to N holders run at once (a semaphore). Use the same N everywhere.",
)
@click.option(
    "--kill-after",
    type=float,
    default=DEFAULT_KILL_AFTER,
    show_default=True,
    metavar="S",
    callback=_common.check_seconds,
    help="When the lease is lost: seconds between SIGTERM and SIGKILL to the command's "
    "process group.",
)
@click.option(
    "--conflict-exit-code",
    "-E",
    type=int,
    default=EXIT_BUSY,
    show_default=True,
    metavar="N",
    callback=_common.check_exit_code,
    help="Exit code when --no-wait finds the lease held.",
)
@click.option(
    "--timeout-exit-code",
    type=int,
    default=EXIT_TIMEOUT,
    show_default=True,
    metavar="N",
    callback=_common.check_exit_code,
    help="Exit code when --wait runs out.",
)
@click.option(
    "--lost-exit-code",
    type=int,
    default=EXIT_LOST,
    show_default=True,
    metavar="N",
    callback=_common.check_exit_code,
    help="Exit code when the lease was lost and the command stopped.",
)
@click.option("--quiet", "-q", is_flag=True, help="Do not say who holds a busy lease.")
@click.option("--verbose", "-v", is_flag=True, help="Say when the lease is acquired and released.")
@common_options
def run_command(
    *,
    name: str,
    command: tuple[str, ...],
    ttl: float,
    wait: float | None,
    no_wait: bool,
    limit: int,
    kill_after: float,
    conflict_exit_code: int,
    timeout_exit_code: int,
    lost_exit_code: int,
    quiet: bool,
    verbose: bool,
) -> int:
    """Run CMD while holding the lease NAME; stop CMD if the lease is lost.

    Acquires NAME (waiting in line by default), runs CMD directly (no shell) in a
    process group of its own with LEASEHOLD_NAME, LEASEHOLD_FENCE and LEASEHOLD_OWNER
    in its environment, renews the lease while CMD runs and releases it when CMD
    exits. Pass LEASEHOLD_FENCE to the resources the job writes so that they can
    reject a superseded holder (see leasehold.fence).

    If the lease is lost (broken, expired while leasehold was frozen, store
    unreachable until the deadline), CMD's whole process group gets SIGTERM, then
    SIGKILL after --kill-after seconds. If leasehold itself is killed, a watchdog
    does the same. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are
    forwarded to CMD's process group; the lease is released once CMD has exited.

    \b
    Examples:
      leasehold run nightly-import -- ./import.sh --full
      leasehold run --no-wait backup -- restic backup /srv     # skip if running
      leasehold run --wait 60 --ttl 10 deploy -- make deploy
      leasehold run --limit 3 encoder -- ffmpeg -i in.mp4 out.webm
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError(
            "missing the command to run: leasehold run NAME -- CMD [ARGS]...",
            ctx=click.get_current_context(),
        )
    if no_wait and wait is not None:
        raise click.UsageError(
            "--wait and --no-wait exclude each other", ctx=click.get_current_context()
        )
    options = RunOptions(
        name=name,
        command=tuple(command),
        ttl=ttl,
        wait=wait,
        no_wait=no_wait,
        limit=limit,
        kill_after=kill_after,
        conflict_exit_code=conflict_exit_code,
        timeout_exit_code=timeout_exit_code,
        lost_exit_code=lost_exit_code,
        quiet=quiet,
        verbose=verbose,
    )
    with open_client() as client:
        return Runner(client, options).run()


@dataclass(frozen=True)
class RunOptions:
    name: str
    command: tuple[str, ...]
    ttl: float
    wait: float | None  # None: forever
    no_wait: bool
    limit: int
    kill_after: float
    conflict_exit_code: int
    timeout_exit_code: int
    lost_exit_code: int
    quiet: bool
    verbose: bool


def _not_loss_warning(record: logging.LogRecord) -> bool:
    return record.funcName != "_mark_lost"


class Runner:
    def __init__(self, client: Client, options: RunOptions) -> None:
        self.client = client
        self.options = options
        self.lost = threading.Event()
        self.err = stderr_console()
        self.holding = False
        self.child: Child | None = None
        self.pending: list[int] = []  # signals that arrived before the command started

    # -- acquiring --------------------------------------------------------------

    def _lock(self) -> Lock:
        opts = self.options

        def on_lost(lease: Lease) -> None:
            # Called on the keeper thread: only wake the supervising main thread.
            del lease
            self.lost.set()

        if opts.limit > 1:
            return self.client.semaphore(opts.name, opts.limit, opts.ttl, on_lost=on_lost)
        return self.client.lock(opts.name, opts.ttl, on_lost=on_lost)

    def run(self) -> int:
        # Loss is announced by _lost() with what is done about it; the library's
        # own warning would say the same thing a line earlier.
        logger = logging.getLogger("leasehold")
        logger.addFilter(_not_loss_warning)
        try:
            return self._run()
        finally:
            logger.removeFilter(_not_loss_warning)

    def _run(self) -> int:
        opts = self.options
        lock = self._lock()
        started = time.monotonic()
        # One handler for the whole run: while waiting, a signal ends the wait (the
        # lock leaves the queue on the way out); once the lease is held, it is
        # forwarded to the command (or kept for it if it is just starting).
        with signal_handlers(FORWARDED, self._on_signal):
            try:
                lease = self._acquire(lock)
                # From here on signals are the command's (kept until it starts).
                self.holding = True
            except Interrupted as exc:
                # A grant may have landed just before the signal: the lease is still
                # alive (in a local or the traceback) and closing releases it.
                self.client.close()
                say(f"{signal_name(exc.signum)} while waiting for {opts.name!r}; not running")
                return SIGNAL_BASE + exc.signum
            if lease is None:
                return self._not_acquired(started)
            try:
                if opts.verbose:
                    waited = duration(time.monotonic() - started)
                    say(f"acquired {opts.name!r} (fence {lease.fence}) after {waited}")
                return self._supervise(lease)
            finally:
                still_held = lease.held
                released = lease.release()
                if still_held and not released:
                    warn(f"{opts.name!r} was no longer held when the command finished")
                elif opts.verbose and released:
                    say(f"released {opts.name!r}")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            if self.child is None:
                self.pending.append(signum)
            else:
                self.child.signal_group(signum)
        elif signum in INTERRUPTING:
            raise_interrupted(signum, frame)
        # Other forwarded signals (SIGQUIT, SIGUSR1/2) while waiting: nobody to tell.

    def _acquire(self, lock: Lock) -> Lease | None:
        opts = self.options
        if opts.no_wait:
            return lock.try_acquire()
        if not self.err.is_terminal:
            try:
                return lock.acquire(timeout=opts.wait)
            except AcquireTimeout:
                return None
        # A terminal: try once quietly, then show who we are waiting for.
        lease = lock.try_acquire()
        if lease is not None:
            return lease
        with WaitingLine(self.client, opts.name, self.err):
            try:
                lease = lock.acquire(timeout=opts.wait)
            except AcquireTimeout:
                return None
        return lease

    def _not_acquired(self, started: float) -> int:
        opts = self.options
        if opts.no_wait:
            code = opts.conflict_exit_code
            what = f"{opts.name!r} is busy"
        else:
            code = opts.timeout_exit_code
            what = f"gave up waiting for {opts.name!r} after {duration(time.monotonic() - started)}"
        if not opts.quiet:
            try:
                holders = self.client.holders(opts.name)
            except LeaseholdError:
                holders = []
            say(f"{what}: {describe_holders(holders)} (exit {code})")
        return code

    # -- running ------------------------------------------------------------------

    def _environment(self, lease: Lease) -> dict[str, str]:
        env = dict(os.environ)
        env["LEASEHOLD_NAME"] = lease.name
        env["LEASEHOLD_FENCE"] = str(lease.fence)
        env["LEASEHOLD_OWNER"] = lease.owner
        return env

    def _supervise(self, lease: Lease) -> int:
        opts = self.options
        if self.pending:
            return SIGNAL_BASE + self.pending[0]
        if not lease.held:
            return self._lost(lease, None)
        watchdog = Watchdog()
        try:
            try:
                child = Child(opts.command, self._environment(lease))
            except FileNotFoundError:
                _common.error(f"command not found: {opts.command[0]}")
                return EXIT_NOT_FOUND
            except OSError as exc:
                _common.error(f"cannot execute {opts.command[0]}: {exc.strerror or exc}")
                return EXIT_CANNOT_EXECUTE
            watchdog.guard(child.pgid, opts.kill_after)
            self.child = child
            for signum in self.pending:
                child.signal_group(signum)
            return self._watch(lease, child)
        finally:
            watchdog.dismiss()

    def _watch(self, lease: Lease, child: Child) -> int:
        opts = self.options
        while True:
            status = child.poll()
            if status is not None:
                break
            if self.lost.is_set() or not lease.held:
                return self._lost(lease, child)
            # Wakes at once on loss; the command's exit is noticed within POLL.
            self.lost.wait(min(POLL, max(0.001, lease.remaining())))
        if child.group_alive():
            # The lease covers the whole group: nothing of the job may outlive it.
            warn(
                f"the command exited but left processes in its group {child.pgid}; "
                "stopping them before releasing the lease"
            )
            child.stop_group(opts.kill_after, warn)
        return status

    def _lost(self, lease: Lease, child: Child | None) -> int:
        opts = self.options
        try:
            lease.check()
            reason = "lost"
        except LeaseLost as exc:
            reason = exc.reason
        if child is None:
            say(
                f"lost the lease on {opts.name!r} before the command started: {reason}",
                style="bold red",
            )
            return opts.lost_exit_code
        say(
            f"lost the lease on {opts.name!r} (fence {lease.fence}): {reason}; stopping the "
            f"command: SIGTERM to process group {child.pgid}, SIGKILL after "
            f"{opts.kill_after:g}s",
            style="bold red",
        )
        child.stop_group(opts.kill_after, say)
        status = child.poll()
        detail = "" if status is None else f"; the command's own status was {status}"
        say(f"command stopped because the lease was lost (exit {opts.lost_exit_code}){detail}")
        return opts.lost_exit_code


class WaitingLine:
    """A live "waiting for NAME, held by ..." line on a terminal's stderr."""

    def __init__(self, client: Client, name: str, console: Console) -> None:
        self._client = client
        self._name = name
        self._status = console.status("", spinner="dots")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leasehold-status", daemon=True)
        self._started = time.monotonic()
        self._holders: list[HolderInfo] | None = None
        self._queried = self._started
        self._problem: str | None = None

    def __enter__(self) -> WaitingLine:
        self._status.update(self._text())
        self._status.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._status.stop()

    def _text(self) -> Text:
        now = time.monotonic()
        line = f"waiting {duration(now - self._started)} for {self._name!r}"
        if self._problem is not None:
            line += f": {self._problem}"
        elif self._holders:
            # Between queries the holders' ages are advanced locally.
            since = now - self._queried
            held = ", ".join(
                f"{info.owner} for {duration(info.held_for + since)}" for info in self._holders
            )
            line += f": held by {held}"
        # One line whatever the terminal's width: a wrapped live line redraws badly.
        return Text(line, no_wrap=True, overflow="ellipsis")

    def _loop(self) -> None:
        next_query = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_query:
                next_query = now + HOLDERS_REFRESH
                try:
                    self._holders = self._client.holders(self._name)
                    self._problem = None
                except LeaseholdError as exc:
                    self._problem = f"cannot list holders ({exc})"
                self._queried = time.monotonic()
            self._status.update(self._text())
            self._stop.wait(STATUS_REFRESH)
