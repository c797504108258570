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

    One row per holder (a semaphore has up to LIMIT of them): who holds it (owner,
    host, pid), its fence, how long it has been held and when it expires unless
    renewed.
    """
    with open_client() as client:
        holders = client.leases(prefix)
    out = stdout_console()
    if as_json_output:
        out.file.write(json.dumps([as_json(info) for info in holders], indent=2) + "\n")
        return 0
    if not holders:
        where = f" starting with {prefix!r}" if prefix else ""
        out.print(f"no live leases{where}", markup=False, soft_wrap=True)
        return 0
    table = Table(box=box.SIMPLE_HEAD if out.is_terminal else None, pad_edge=False)
    table.add_column("NAME", overflow="fold")
    table.add_column("OWNER", overflow="fold")
    table.add_column("HOST")
    table.add_column("PID", justify="right")
    table.add_column("FENCE", justify="right")
    table.add_column("HELD FOR", justify="right")
    table.add_column("EXPIRES IN", justify="right")
    for info in holders:
        name = info.name if info.limit == 1 else f"{info.name} (limit {info.limit})"
        cells = (
            name,
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
