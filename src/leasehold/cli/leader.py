"""``leasehold leader NAME -- CMD``: run a command only while leading an election."""

from __future__ import annotations

from dataclasses import dataclass

import click

from leasehold._core import validate
from leasehold._core.election import current_holder
from leasehold._core.records import HolderInfo
from leasehold._errors import AcquireTimeout, LeaseholdError
from leasehold._sync.client import Client
from leasehold._sync.lease import Lease
from leasehold.cli import _common
from leasehold.cli._common import (
    EXIT_CANNOT_EXECUTE,
    EXIT_LOST,
    EXIT_NOT_FOUND,
    SIGNAL_BASE,
    checked,
    common_options,
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

check_identity = checked(lambda value: validate.name(value, what="identity"))

EPILOG = _common.exit_codes_epilog(
    ("0-255", "the command's own exit status (128+N if it was killed by signal N)"),
    (EXIT_LOST, "leadership was lost and the command was stopped (see --lost-exit-code)"),
    (EXIT_CANNOT_EXECUTE, "the command cannot be executed (permission, format)"),
    (EXIT_NOT_FOUND, "the command was not found"),
    (f"{SIGNAL_BASE}+N", "interrupted by signal N while waiting to lead"),
    note="The command's own status can collide with 77: change it with --lost-exit-code.",
)


@click.command(
    "leader",
    cls=NameThenCommand,
    epilog=EPILOG,
    short_help="Run a command only while leading an election.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@name_and_command
@click.option(
    "--identity",
    "-i",
    metavar="ID",
    default=None,
    callback=check_identity,
    help="How this candidate is known while it leads (leasehold ls, LEASEHOLD_IDENTITY). "
    "Default: host:pid:random, unique per process.",
)
@ttl_option(
    "Leadership time-to-live in seconds. Renewed every TTL/3 while the command runs; "
    "if leasehold dies, another candidate takes over after at most TTL."
)
@kill_after_option("leadership is lost")
@exit_code_option(
    "--lost-exit-code",
    default=EXIT_LOST,
    when="leadership was lost and the command stopped",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Say who leads while waiting, and when leadership begins and ends.",
)
@common_options
def leader_command(
    *,
    name: str,
    command: tuple[str, ...],
    identity: str | None,
    ttl: float,
    kill_after: float,
    lost_exit_code: int,
    verbose: bool,
) -> int:
    """Wait to lead the election NAME, then run CMD for as long as this leads.

    Run the same line on every host: one of them leads and runs CMD, the others
    wait in line and take over when it stops, dies or loses leadership. CMD runs
    directly (no shell) in a process group of its own with LEASEHOLD_NAME,
    LEASEHOLD_FENCE (the term, higher for every new leader) and LEASEHOLD_IDENTITY
    in its environment; leadership is renewed while CMD runs.

    When CMD exits, leasehold steps down (the next candidate leads at once) and
    exits with CMD's status: let your service manager (systemd, Kubernetes) start
    it again so that it rejoins the election. If leadership is lost (broken,
    expired while leasehold was frozen, store unreachable until the deadline),
    CMD's whole process group gets SIGTERM, then SIGKILL after --kill-after seconds,
    and leasehold exits 77 (--lost-exit-code). If leasehold itself is killed, a
    watchdog stops CMD and another candidate leads within TTL.
    SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to CMD's
    process group; leadership is kept until CMD has exited.

    \b
    Examples:
      leasehold leader --identity "$(hostname)" celery-beat -- celery -A proj beat
      leasehold leader --ttl 10 importer -- python -m app.scheduler
    """
    options = LeaderOptions(
        name=name,
        command=command_to_run(command, "leasehold leader NAME -- CMD [ARGS]..."),
        identity=identity,
        ttl=ttl,
        kill_after=kill_after,
        lost_exit_code=lost_exit_code,
        verbose=verbose,
    )
    with open_client() as client:
        return LeaderRunner(client, options).run()


@dataclass(frozen=True)
class LeaderOptions:
    name: str
    command: tuple[str, ...]
    identity: str | None  # None: the client's unique owner label
    ttl: float
    kill_after: float
    lost_exit_code: int
    verbose: bool


def describe_leader(holders: list[HolderInfo], since: float) -> str:
    """Who leads, for the waiting line: led by web-3 (term 7) for 3m 05s."""
    info = current_holder(holders)
    if info is None:
        return "no leader right now"
    return f"led by {info.owner} (term {info.fence}) for {duration(info.held_for + since)}"


class LeaderRunner(HeldCommand):
    """``leasehold leader``: the lease is the leadership of an election; its fence is
    the term."""

    fence_word = "term"
    lost_clause = "leadership was lost"
    release_clause = "stepping down"

    def __init__(self, client: Client, options: LeaderOptions) -> None:
        super().__init__(
            client,
            options.command,
            kill_after=options.kill_after,
            lost_exit_code=options.lost_exit_code,
        )
        self.options = options
        self.election = client.election(options.name, options.ttl, identity=options.identity)
        self.subject = f"leadership of {options.name!r}"
        self.waiting_for = f"to lead {options.name!r}"

    def acquire(self) -> Lease:
        election = self.election
        try:
            # One quiet attempt first: no waiting line, no message, when nobody leads.
            return election.campaign(timeout=0)
        except AcquireTimeout:
            pass
        if self.options.verbose:
            try:
                holders = self.client.holders(self.options.name)
            except LeaseholdError:
                holders = []
            say(f"waiting {self.waiting_for}: {describe_leader(holders, 0.0)}")
        if not self.err.is_terminal:
            return election.campaign()
        waiting = WaitingLine(
            self.client,
            self.options.name,
            self.err,
            waiting_for=self.waiting_for,
            describe=describe_leader,
        )
        with waiting:
            return election.campaign()

    def not_acquired(self, started: float) -> int:  # pragma: no cover - never gives up
        raise AssertionError("campaign() without a timeout does not give up")

    def acquired(self, lease: Lease, waited: float) -> None:
        if self.options.verbose:
            say(
                f"leading {lease.name!r} as {lease.owner} (term {lease.fence}) "
                f"after waiting {duration(waited)}"
            )

    def released(self, lease: Lease) -> None:
        if self.options.verbose:
            say(f"stepped down from {lease.name!r} (term {lease.fence})")

    def environment(self, lease: Lease) -> dict[str, str]:
        env = super().environment(lease)
        env["LEASEHOLD_IDENTITY"] = lease.owner
        return env
