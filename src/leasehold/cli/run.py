"""``leasehold run NAME -- CMD``: run a command while holding a lease on NAME."""

from __future__ import annotations

import time
from dataclasses import dataclass

import click

from leasehold._core import validate
from leasehold._core.records import HolderInfo
from leasehold._errors import AcquireTimeout, LeaseholdError
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
)
from leasehold.cli._held import (
    HeldCommand,
    NameThenCommand,
    WaitingLine,
    command_to_run,
    exit_code_option,
    kill_after_option,
    name_and_command,
    ttl_option,
)

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
    cls=NameThenCommand,
    epilog=EPILOG,
    short_help="Run a command while holding a lease.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@name_and_command
@ttl_option(
    "Lease time-to-live in seconds. Renewed every TTL/3 while the command runs; "
    "if leasehold dies, others can take over after at most TTL."
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
@kill_after_option("the lease is lost")
@exit_code_option(
    "--conflict-exit-code", "-E", default=EXIT_BUSY, when="--no-wait finds the lease held"
)
@exit_code_option("--timeout-exit-code", default=EXIT_TIMEOUT, when="--wait runs out")
@exit_code_option(
    "--lost-exit-code",
    default=EXIT_LOST,
    when="the lease was lost and the command stopped",
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
    command = command_to_run(command, "leasehold run NAME -- CMD [ARGS]...")
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


def describe_waiting(holders: list[HolderInfo], since: float) -> str | None:
    """Who holds the lease, for the waiting line; their ages advance between queries."""
    if not holders:
        return None
    held = ", ".join(f"{info.owner} for {duration(info.held_for + since)}" for info in holders)
    return f"held by {held}"


class Runner(HeldCommand):
    """``leasehold run``: the lease comes from a lock (or a semaphore with --limit)."""

    fence_word = "fence"
    lost_clause = "the lease was lost"
    release_clause = "releasing the lease"

    def __init__(self, client: Client, options: RunOptions) -> None:
        super().__init__(
            client,
            options.command,
            kill_after=options.kill_after,
            lost_exit_code=options.lost_exit_code,
        )
        self.options = options
        self.subject = f"the lease on {options.name!r}"
        self.waiting_for = f"for {options.name!r}"

    def _lock(self) -> Lock:
        opts = self.options
        if opts.limit > 1:
            return self.client.semaphore(opts.name, opts.limit, opts.ttl)
        return self.client.lock(opts.name, opts.ttl)

    def acquire(self) -> Lease | None:
        opts = self.options
        lock = self._lock()
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
        waiting = WaitingLine(
            self.client,
            opts.name,
            self.err,
            waiting_for=self.waiting_for,
            describe=describe_waiting,
        )
        with waiting:
            try:
                lease = lock.acquire(timeout=opts.wait)
            except AcquireTimeout:
                return None
        return lease

    def not_acquired(self, started: float) -> int:
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

    def acquired(self, lease: Lease, waited: float) -> None:
        if self.options.verbose:
            say(f"acquired {lease.name!r} (fence {lease.fence}) after {duration(waited)}")

    def released(self, lease: Lease) -> None:
        if self.options.verbose:
            say(f"released {lease.name!r}")

    def environment(self, lease: Lease) -> dict[str, str]:
        env = super().environment(lease)
        env["LEASEHOLD_OWNER"] = lease.owner
        return env
