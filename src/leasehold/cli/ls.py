"""``leasehold ls [PREFIX]``: the live leases, as a table or as JSON."""

from __future__ import annotations

import json

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from leasehold._core import validate
from leasehold._core.records import HolderInfo, WaiterInfo
from leasehold.cli import _common, _view
from leasehold.cli._common import CliError, common_options, duration, open_client, stdout_console

check_prefix = _common.checked(validate.prefix)


def as_json(info: HolderInfo, queue_depth: int | None) -> dict[str, object]:
    return {
        "name": info.name,
        "owner": info.owner,
        "host": info.host,
        "pid": info.pid,
        "fence": info.fence,
        "limit": info.limit,
        "held_for": round(info.held_for, 3),
        "expires_in": round(info.expires_in, 3),
        "queue_depth": queue_depth,
        "pid_alive": _view.pid_alive(info.host, info.pid),
    }


def waiter_json(info: WaiterInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "position": info.position,
        "owner": info.owner,
        "host": info.host,
        "pid": info.pid,
        "expires_in": round(info.expires_in, 3),
    }


def pid_cell(info: HolderInfo) -> str:
    alive = _view.pid_alive(info.host, info.pid)
    return f"{info.pid} (gone)" if alive is False else str(info.pid)


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
    "limit, held_for, expires_in (seconds), queue_depth (null if the store cannot "
    "tell), pid_alive (null for another host). With --waiters, one object per waiter: "
    "name, position, owner, host, pid, expires_in.",
)
@click.option(
    "--waiters",
    "list_waiters",
    is_flag=True,
    help="List the queued waiters instead of the holders, in queue order.",
)
@common_options
def ls_command(prefix: str, as_json_output: bool, list_waiters: bool) -> int:
    """List the live leases whose name starts with PREFIX (default: all).

    One row per holder, the holders of a name together: how many hold it out of
    its limit (LIMIT: 1/1 for a lock or an election, 2/3 for a semaphore with two
    of three permits taken), who holds it (owner, host, pid), its fence, how long
    it has been held and when it expires unless renewed, and how many wait for it
    (WAITING: its queue depth). A holder on this host whose process is gone shows
    "(gone)" after its pid: its lease lasts until it expires (or `leasehold break`).
    The leader of an election is the holder of the election's name; its owner is
    the leader's identity and its fence is the term.
    """
    with open_client() as client:
        holders = client.leases(prefix)
        waiters = client.waiters(prefix)
    out = stdout_console()
    if list_waiters:
        return _print_waiters(out, waiters, prefix, as_json_output)
    depths = None if waiters is None else _view.queue_depths(waiters)
    groups = grouped(holders)
    if as_json_output:
        rows = [
            as_json(info, None if depths is None else depths.get(info.name, 0))
            for group in groups
            for info in group
        ]
        out.file.write(json.dumps(rows, indent=2) + "\n")
        return 0
    if not holders:
        where = f" starting with {prefix!r}" if prefix else ""
        queued = f"; {len(waiters)} queued waiter(s) (see --waiters)" if waiters else ""
        out.print(f"no live leases{where}{queued}", markup=False, soft_wrap=True)
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
    table.add_column("WAITING", justify="right")
    gone = 0
    for group in groups:
        limit = limit_cell(group)
        for index, info in enumerate(group):
            # On a terminal a name is shown once, over its holders; in a pipe every
            # row is complete, so that `leasehold ls | grep NAME` finds them all.
            first = index == 0 or not terminal
            depth = "?" if depths is None else str(depths.get(info.name, 0))
            pid = pid_cell(info)
            gone += pid != str(info.pid)
            cells = (
                info.name if first else "",
                limit if first else "",
                info.owner,
                info.host,
                pid,
                str(info.fence),
                duration(info.held_for),
                duration(info.expires_in),
                depth if first else "",
            )
            # Text, not str: names and owners are data, never rich markup.
            table.add_row(*(Text(cell) for cell in cells))
    out.print(table)
    if gone:
        out.print(
            f"{gone} holder(s) on this host whose process is gone: the lease stays until it "
            "expires, or free it with `leasehold break NAME`",
            markup=False,
            soft_wrap=True,
        )
    return 0


def _print_waiters(
    out: Console, waiters: list[WaiterInfo] | None, prefix: str, as_json_output: bool
) -> int:
    if waiters is None:
        raise CliError("this store cannot list its wait queues")
    if as_json_output:
        out.file.write(json.dumps([waiter_json(w) for w in waiters], indent=2) + "\n")
        return 0
    if not waiters:
        where = f" for names starting with {prefix!r}" if prefix else ""
        out.print(f"nobody is waiting{where}", markup=False, soft_wrap=True)
        return 0
    table = Table(box=box.SIMPLE_HEAD if out.is_terminal else None, pad_edge=False)
    for column in ("NAME", "POSITION", "OWNER", "HOST", "PID", "EXPIRES IN"):
        right = column in ("POSITION", "PID", "EXPIRES IN")
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for w in waiters:
        cells = (w.name, str(w.position), w.owner, w.host, str(w.pid), duration(w.expires_in))
        table.add_row(*(Text(cell) for cell in cells))
    out.print(table)
    return 0
