"""``leasehold ls [PREFIX]``: the live leases, as a table or as JSON."""

from __future__ import annotations

import json

import click
from rich import box
from rich.table import Table
from rich.text import Text

from leasehold._core import validate
from leasehold._core.records import HolderInfo
from leasehold.cli import _common
from leasehold.cli._common import common_options, duration, open_client, stdout_console

check_prefix = _common.checked(validate.prefix)


def as_json(info: HolderInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "owner": info.owner,
        "host": info.host,
        "pid": info.pid,
        "fence": info.fence,
        "limit": info.limit,
        "held_for": round(info.held_for, 3),
        "expires_in": round(info.expires_in, 3),
    }


def limit_cell(group: list[HolderInfo]) -> str:
    """Live holders of a name out of its limit, as in 2/3. Callers normally agree on the
    limit; while a change rolls out they may not, and every limit in use is shown
    ("4/3,5")."""
    limits = ",".join(str(limit) for limit in sorted({info.limit for info in group}))
    return f"{len(group)}/{limits}"


def grouped(holders: list[HolderInfo]) -> list[list[HolderInfo]]:
    """Holders of one name together, names in order, oldest grant (lowest fence)
    first: for an election that is its leader."""
    groups: dict[str, list[HolderInfo]] = {}
    for info in sorted(holders, key=lambda info: (info.name, info.fence)):
        groups.setdefault(info.name, []).append(info)
    return list(groups.values())


@click.command(
    "ls",
    epilog=_common.exit_codes_epilog((0, "listed (also when nothing is held)")),
    short_help="List live leases.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@click.argument("prefix", default="", callback=check_prefix)
@click.option(
    "--json",
    "as_json_output",
    is_flag=True,
    help="Print a JSON array, one object per holder: name, owner, host, pid, fence, "
    "limit, held_for, expires_in (seconds).",
)
@common_options
def ls_command(prefix: str, as_json_output: bool) -> int:
    """List the live leases whose name starts with PREFIX (default: all).

    One row per holder, the holders of a name together: how many hold it out of
    its limit (LIMIT: 1/1 for a lock or an election, 2/3 for a semaphore with two
    of three permits taken), who holds it (owner, host, pid), its fence, how long
    it has been held and when it expires unless renewed. The leader of an election
    is the holder of the election's name; its owner is the leader's identity and
    its fence is the term.
    """
    with open_client() as client:
        holders = client.leases(prefix)
    groups = grouped(holders)
    out = stdout_console()
    if as_json_output:
        rows = [as_json(info) for group in groups for info in group]
        out.file.write(json.dumps(rows, indent=2) + "\n")
        return 0
    if not holders:
        where = f" starting with {prefix!r}" if prefix else ""
        out.print(f"no live leases{where}", markup=False, soft_wrap=True)
        return 0
    terminal = out.is_terminal
    table = Table(box=box.SIMPLE_HEAD if terminal else None, pad_edge=False)
    table.add_column("NAME", overflow="fold")
    table.add_column("LIMIT", justify="right")
    table.add_column("OWNER", overflow="fold")
    table.add_column("HOST")
    table.add_column("PID", justify="right")
    table.add_column("FENCE", justify="right")
    table.add_column("HELD FOR", justify="right")
    table.add_column("EXPIRES IN", justify="right")
    for group in groups:
        limit = limit_cell(group)
        for index, info in enumerate(group):
            # On a terminal a name is shown once, over its holders; in a pipe every
            # row is complete, so that `leasehold ls | grep NAME` finds them all.
            first = index == 0 or not terminal
            cells = (
                info.name if first else "",
                limit if first else "",
                info.owner,
                info.host,
                str(info.pid),
                str(info.fence),
                duration(info.held_for),
                duration(info.expires_in),
            )
            # Text, not str: names and owners are data, never rich markup.
            table.add_row(*(Text(cell) for cell in cells))
    out.print(table)
    return 0
