"""``leasehold break NAME``: forced release, for a holder that is stuck or gone."""

from __future__ import annotations

import click

from leasehold.cli import _common
from leasehold.cli._common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    common_options,
    describe_holder,
    fail,
    open_client,
    say,
    stdout_console,
    terminal_stdin,
)


@click.command(
    "break",
    epilog=_common.exit_codes_epilog(
        (0, "broken, or nobody held it"),
        (EXIT_FAILURE, "declined at the confirmation prompt"),
        usage="bad command line, or not on a terminal and no --yes (nothing was changed)",
    ),
    short_help="Forcibly release a lease.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@click.argument("name", callback=_common.check_name)
@click.option(
    "--yes", "-y", is_flag=True, help="Do not ask for confirmation (required off a terminal)."
)
@common_options
def break_command(name: str, yes: bool) -> int:
    """Forcibly release every holder of NAME.

    The holders are not told directly: each one learns at its next renewal (within
    a third of its TTL) that the lease is gone, and `leasehold run` (or `leasehold
    leader`, for an election's name) then stops its command. The next grant of NAME
    gets a higher fence than every broken holder, so fenced writes of the broken
    holders are rejected from now on.

    Asks for confirmation on a terminal; elsewhere (scripts, cron) --yes is
    required.
    """
    with open_client() as client:
        holders = client.holders(name)
        if not holders:
            say(f"nobody holds {name!r}; nothing to break")
            return 0
        if not yes:
            if not terminal_stdin():
                fail(
                    f"refusing to break {name!r} without confirmation: stdin is not a "
                    "terminal; pass --yes to break it",
                    EXIT_USAGE,
                )
            say(f"{name!r} is held by:")
            for info in holders:
                say(f"  {describe_holder(info)}")
            if not click.confirm(f"Break the lease on {name!r}?", default=False, err=True):
                say("not broken")
                return EXIT_FAILURE
        removed = client.break_lease(name)
    fences = ", ".join(str(info.fence) for info in holders)
    noun = "holder" if removed == 1 else "holders"
    stdout_console().print(
        f"broke {name!r}: removed {removed} {noun} (fence {fences}); the next holder "
        "gets a higher fence",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0
