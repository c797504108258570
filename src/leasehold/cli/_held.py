"""A command that runs only while a lease is held: what ``run`` and ``leader`` share.

Both get a lease (``run`` from a lock or semaphore, ``leader`` by campaigning in an
election), start the command in a process group of its own with a watchdog next to
it, forward signals to that group, stop the group if the lease is lost, and
release the lease once nothing of the command is left. They differ in how the
lease is obtained, what the command finds in its environment and how the lease is
named in messages; subclasses of ``HeldCommand`` supply those.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import click
from rich.console import Console
from rich.text import Text

from leasehold._core.records import HolderInfo
from leasehold._errors import LeaseholdError, LeaseLost
from leasehold._sync.client import Client
from leasehold._sync.lease import Lease
from leasehold.cli import _common
from leasehold.cli._common import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    SIGNAL_BASE,
    F,
    duration,
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


class NameThenCommand(click.Command):
    """``run`` and ``leader``: options may come before or after NAME; the command
    starts at ``--`` or, when there is none, at the first argument after NAME
    (``leasehold run n cmd -x``). The command argument must be named ``command``."""

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


def command_to_run(command: Sequence[str], usage: str) -> tuple[str, ...]:
    """The command after NAME without its leading ``--``; a usage error if empty."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError(
            f"missing the command to run: {usage}", ctx=click.get_current_context()
        )
    return tuple(command)


DEFAULT_TTL = 30.0
DEFAULT_KILL_AFTER = 10.0


def name_and_command(func: F) -> F:
    """NAME and the command after it (parsed by ``NameThenCommand``)."""
    func = click.argument(
        "command", nargs=-1, type=click.UNPROCESSED, metavar="[--] CMD [ARGS]..."
    )(func)
    return click.argument("name", callback=_common.check_name)(func)


def ttl_option(text: str) -> Callable[[F], F]:
    return click.option(
        "--ttl",
        type=float,
        default=DEFAULT_TTL,
        show_default=True,
        metavar="S",
        callback=_common.check_ttl,
        help=text,
    )


def kill_after_option(lost: str) -> Callable[[F], F]:
    """``--kill-after``; ``lost`` names the event, e.g. "the lease is lost"."""
    return click.option(
        "--kill-after",
        type=float,
        default=DEFAULT_KILL_AFTER,
        show_default=True,
        metavar="S",
        callback=_common.check_seconds,
        help=f"When {lost}: seconds between SIGTERM and SIGKILL to the command's process group.",
    )


def exit_code_option(flag: str, *short: str, default: int, when: str) -> Callable[[F], F]:
    """An option that changes the exit code leasehold uses ``when`` something happens."""
    return click.option(
        flag,
        *short,
        type=int,
        default=default,
        show_default=True,
        metavar="N",
        callback=_common.check_exit_code,
        help=f"Exit code when {when}.",
    )


STATUS_REFRESH = 0.2  # seconds between redraws of the waiting line
HOLDERS_REFRESH = 1.0  # seconds between store queries for who holds the lease


def _not_loss_warning(record: logging.LogRecord) -> bool:
    return getattr(record, "leasehold_event", None) != "lost"


class HeldCommand:
    """Get a lease, run the command under it, stop the command if it is lost.

    Subclasses implement ``acquire()`` and may override the hooks and the wording
    below; ``run()`` is the whole life of one invocation and returns its exit code.
    """

    # -- what subclasses provide -------------------------------------------------------

    #: "the lease on 'job'" / "leadership of 'job'": what can be lost.
    subject: str
    #: "fence" / "term": what the lease's fence is called in messages.
    fence_word = "fence"
    #: "the lease was lost" / "leadership was lost".
    lost_clause = "the lease was lost"
    #: "releasing the lease" / "stepping down".
    release_clause = "releasing the lease"
    #: "for 'job'" / "to lead 'job'": completes "waiting ...".
    waiting_for: str

    def acquire(self) -> Lease | None:
        """The lease, or None when giving up; may raise ``Interrupted``."""
        raise NotImplementedError

    def not_acquired(self, started: float) -> int:
        """The exit code when ``acquire()`` gave up (None)."""
        raise NotImplementedError

    def acquired(self, lease: Lease, waited: float) -> None:
        """Called once the lease is held, before the command starts."""

    def released(self, lease: Lease) -> None:
        """Called after the lease was released normally."""

    def environment(self, lease: Lease) -> dict[str, str]:
        """The command's environment: ours, plus what it needs to know of the lease."""
        env = dict(os.environ)
        env["LEASEHOLD_NAME"] = lease.name
        env["LEASEHOLD_FENCE"] = str(lease.fence)
        return env

    # -- the shared part ----------------------------------------------------------------

    def __init__(
        self,
        client: Client,
        command: Sequence[str],
        *,
        kill_after: float,
        lost_exit_code: int,
    ) -> None:
        self.client = client
        self.command = tuple(command)
        self.kill_after = kill_after
        self.lost_exit_code = lost_exit_code
        self.err = stderr_console()
        self.holding = False
        self.child: Child | None = None
        self.pending: list[int] = []  # signals that arrived before the command started

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
        started = time.monotonic()
        # One handler for the whole run: while waiting, a signal ends the wait (the
        # lock leaves the queue on the way out); once the lease is held, it is
        # forwarded to the command (or kept for it if it is just starting).
        with signal_handlers(FORWARDED, self._on_signal):
            try:
                lease = self.acquire()
                # From here on signals are the command's (kept until it starts).
                self.holding = True
            except Interrupted as exc:
                # A grant may have landed just before the signal: the lease is still
                # alive (in a local or the traceback) and closing releases it.
                self.client.close()
                say(f"{signal_name(exc.signum)} while waiting {self.waiting_for}; not running")
                return SIGNAL_BASE + exc.signum
            if lease is None:
                return self.not_acquired(started)
            try:
                self.acquired(lease, time.monotonic() - started)
                return self._supervise(lease)
            finally:
                still_held = lease.held
                released = lease.release()
                if still_held and not released:
                    warn(f"{self.subject} was no longer held when the command finished")
                elif released:
                    self.released(lease)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            if self.child is None:
                self.pending.append(signum)
            else:
                self.child.signal_group(signum)
        elif signum in INTERRUPTING:
            raise_interrupted(signum, frame)
        # Other forwarded signals (SIGQUIT, SIGUSR1/2) while waiting: nobody to tell.

    def _supervise(self, lease: Lease) -> int:
        if self.pending:
            return SIGNAL_BASE + self.pending[0]
        if not lease.held:
            return self._lost(lease, None)
        watchdog = Watchdog()
        try:
            try:
                child = Child(self.command, self.environment(lease))
            except FileNotFoundError:
                _common.error(f"command not found: {self.command[0]}")
                return EXIT_NOT_FOUND
            except OSError as exc:
                _common.error(f"cannot execute {self.command[0]}: {exc.strerror or exc}")
                return EXIT_CANNOT_EXECUTE
            watchdog.guard(child.pgid, self.kill_after)
            self.child = child
            for signum in self.pending:
                child.signal_group(signum)
            return self._watch(lease, child)
        finally:
            watchdog.dismiss()

    def _watch(self, lease: Lease, child: Child) -> int:
        while True:
            status = child.poll()
            if status is not None:
                break
            if not lease.held:
                return self._lost(lease, child)
            # Wakes at once on loss; the command's exit is noticed within POLL.
            lease.wait_lost(min(POLL, max(0.001, lease.remaining())))
        if child.group_alive():
            # The lease covers the whole group: nothing of the job may outlive it.
            warn(
                f"the command exited but left processes in its group {child.pgid}; "
                f"stopping them before {self.release_clause}"
            )
            child.stop_group(self.kill_after, warn)
        return status

    def _lost(self, lease: Lease, child: Child | None) -> int:
        try:
            lease.check()
            reason = "lost"
        except LeaseLost as exc:
            reason = exc.reason
        if child is None:
            say(f"lost {self.subject} before the command started: {reason}", style="bold red")
            return self.lost_exit_code
        say(
            f"lost {self.subject} ({self.fence_word} {lease.fence}): {reason}; stopping the "
            f"command: SIGTERM to process group {child.pgid}, SIGKILL after "
            f"{self.kill_after:g}s",
            style="bold red",
        )
        child.stop_group(self.kill_after, say)
        status = child.poll()
        detail = "" if status is None else f"; the command's own status was {status}"
        say(f"command stopped because {self.lost_clause} (exit {self.lost_exit_code}){detail}")
        return self.lost_exit_code


Describe = Callable[[list[HolderInfo], float], str | None]


class WaitingLine:
    """A live "waiting 12s for NAME: held by ..." line on a terminal's stderr.

    ``describe(holders, since)`` turns the name's holders, queried ``since`` seconds
    ago, into the part after the colon (None: nothing to add).
    """

    def __init__(
        self,
        client: Client,
        name: str,
        console: Console,
        *,
        waiting_for: str,
        describe: Describe,
    ) -> None:
        self._client = client
        self._name = name
        self._waiting_for = waiting_for
        self._describe = describe
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
        line = f"waiting {duration(now - self._started)} {self._waiting_for}"
        if self._problem is not None:
            line += f": {self._problem}"
        elif self._holders is not None:
            described = self._describe(self._holders, now - self._queried)
            if described:
                line += f": {described}"
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
