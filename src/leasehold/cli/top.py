"""``leasehold top``: the busiest names of the store, live."""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import click
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from leasehold._core import validate
from leasehold.cli import _common, _view
from leasehold.cli._common import common_options, duration, open_client, stdout_console
from leasehold.naming import name_group

check_prefix = _common.checked(validate.prefix)
check_interval = _common.checked(lambda value: validate.ttl(value, what="--interval"))
check_poll = _common.checked(lambda value: validate.ttl(value, what="--poll"))

# Rates and wait percentiles cover what was seen in this many seconds.
WINDOW = 60.0
# At most this many finished waits are kept per row (the p99 of a busy name).
MAX_WAITS = 1000


@dataclass(slots=True)
class Row:
    key: str
    holders: int = 0
    limit: str = ""
    waiters: int = 0
    oldest: float = 0.0
    handoffs_per_s: float | None = None
    wait_p99: float | None = None


@dataclass(slots=True)
class _History:
    fences: set[int] = field(default_factory=set)
    grants: deque[tuple[float, int]] = field(default_factory=deque)  # (seen at, new grants)
    waits: deque[tuple[float, float]] = field(default_factory=deque)  # (ended at, waited)


class Tracker:
    """What successive polls show about each name (or name group): new fences are
    hand-offs, and a waiter that leaves the queue waited from the poll that first
    saw it to the first poll that did not (right to within one poll interval).
    ``now`` is passed in, as in leasehold._core: this is pure bookkeeping."""

    def __init__(self, key: Callable[[str], str] = lambda name: name) -> None:
        self._key = key
        self._history: dict[str, _History] = {}
        self._waiting: dict[tuple[str, str, str, int], float] = {}  # -> first seen
        self._started: float | None = None
        self.polls = 0

    def update(self, snapshot: _view.StoreSnapshot, now: float) -> list[Row]:
        if self._started is None:
            self._started = now
        first = self.polls == 0
        self.polls += 1
        rows: dict[str, Row] = {}
        fences: dict[str, set[int]] = {}
        limits: dict[str, set[int]] = {}
        for info in snapshot.leases:
            key = self._key(info.name)
            row = rows.setdefault(key, Row(key))
            row.holders += 1
            row.oldest = max(row.oldest, info.held_for)
            fences.setdefault(key, set()).add(info.fence)
            limits.setdefault(key, set()).add(info.limit)
        seen: set[tuple[str, str, str, int]] = set()
        for waiter in snapshot.waiters or ():
            key = self._key(waiter.name)
            rows.setdefault(key, Row(key)).waiters += 1
            who = (key, waiter.owner, waiter.host, waiter.pid)
            seen.add(who)
            self._waiting.setdefault(who, now)
        for who in [w for w in self._waiting if w not in seen]:
            since = self._waiting.pop(who)
            waits = self._history.setdefault(who[0], _History()).waits
            waits.append((now, now - since))
            while len(waits) > MAX_WAITS:
                waits.popleft()
        for key in set(fences) | set(self._history):
            history = self._history.setdefault(key, _History())
            current = fences.get(key, set())
            if not first:
                history.grants.append((now, len(current - history.fences)))
            history.fences = current
        elapsed = min(WINDOW, now - self._started)
        for key, history in list(self._history.items()):
            while history.grants and history.grants[0][0] < now - WINDOW:
                history.grants.popleft()
            while history.waits and history.waits[0][0] < now - WINDOW:
                history.waits.popleft()
            if not history.grants and not history.waits and not history.fences:
                del self._history[key]
                continue
            row = rows.setdefault(key, Row(key))
            if elapsed > 0:
                row.handoffs_per_s = sum(n for _, n in history.grants) / elapsed
            if history.waits:
                row.wait_p99 = _p99([w for _, w in history.waits])
        for key, row in rows.items():
            row.limit = ",".join(str(n) for n in sorted(limits.get(key, ())))
        return sorted(
            rows.values(),
            key=lambda r: (-r.waiters, -(r.handoffs_per_s or 0.0), -r.holders, r.key),
        )


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def render(rows: list[Row], *, title: str, limit: int, boxed: bool) -> Group:
    table = Table(box=box.SIMPLE_HEAD if boxed else None, pad_edge=False)
    table.add_column("NAME", overflow="fold")
    table.add_column("HOLDERS", justify="right")
    table.add_column("WAITERS", justify="right")
    table.add_column("HANDOFFS/S", justify="right")
    table.add_column("WAIT P99", justify="right")
    table.add_column("OLDEST", justify="right")
    for row in rows[:limit]:
        holders = f"{row.holders}/{row.limit}" if row.limit else "0"
        rate = "-" if row.handoffs_per_s is None else f"{row.handoffs_per_s:.1f}"
        wait = "-" if row.wait_p99 is None else duration(row.wait_p99)
        oldest = duration(row.oldest) if row.holders else "-"
        cells = (row.key, holders, str(row.waiters), rate, wait, oldest)
        table.add_row(*(Text(cell) for cell in cells))
    more = f" ({len(rows) - limit} more)" if len(rows) > limit else ""
    return Group(Text(title + more), table)


def _title(url: str, rows: list[Row], snapshot: _view.StoreSnapshot, live: bool) -> str:
    holders = sum(r.holders for r in rows)
    waiters = "?" if snapshot.waiters is None else str(len(snapshot.waiters))
    stamp = time.strftime("%H:%M:%S")
    quit_hint = "  (q quits)" if live else ""
    return (
        f"leasehold top  {url}  {stamp}  {holders} held, {waiters} waiting, "
        f"poll {snapshot.took * 1000:.1f} ms{quit_hint}"
    )


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """Single keypresses from the terminal on stdin (cbreak mode, restored after);
    the callable waits up to its timeout for one and returns "" if none came."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:

        def key(timeout: float) -> str:
            ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
            if not ready:
                return ""
            data = os.read(fd, 32)
            return data.decode(errors="replace") if data else "q"  # EOF: quit

        yield key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@click.command(
    "top",
    epilog=_common.exit_codes_epilog((0, "quit with q, Ctrl-C or SIGTERM (or --once done)")),
    short_help="The busiest names, live.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@click.argument("prefix", default="", callback=check_prefix)
@click.option(
    "--interval",
    type=float,
    default=1.0,
    show_default=True,
    callback=check_interval,
    metavar="S",
    help="Seconds between refreshes of the table.",
)
@click.option(
    "--poll",
    type=float,
    default=0.2,
    show_default=True,
    callback=check_poll,
    metavar="S",
    help="Seconds between polls of the store (at most --interval): shorter sees "
    "more hand-offs and times waits better, and reads the store more often.",
)
@click.option(
    "--rows",
    "limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="How many names to show.",
)
@click.option(
    "--groups",
    is_flag=True,
    help="One row per name group (meeting:* for meeting:8f3a...) instead of per name.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Poll for --interval seconds, print one table and exit (implied when "
    "stdout is not a terminal).",
)
@common_options
def top_command(
    *, prefix: str, interval: float, poll: float, limit: int, groups: bool, once: bool
) -> int:
    """Show the names with the most waiters and hand-offs, refreshing in place;
    q quits.

    \b
    HOLDERS     live holders / the limit they were granted with
    WAITERS     queued waiters (queue depth)
    HANDOFFS/S  new grants per second (new fences seen between polls, over the
                last minute; a lower bound when a name changes hands faster
                than --poll)
    WAIT P99    99th percentile of how long waiters stayed queued, as seen by
                these polls over the last minute (resolution: --poll)
    OLDEST      how long the oldest live holder has held it
    """
    out = stdout_console()
    once = once or not out.is_terminal
    tracker = Tracker(name_group if groups else lambda name: name)
    with open_client() as client:
        url = client.url

        def step() -> tuple[list[Row], _view.StoreSnapshot]:
            snapshot = _view.poll(client, prefix)
            return tracker.update(snapshot, time.monotonic()), snapshot

        poll = min(poll, interval)
        if once:
            rows, snapshot = step()
            for _ in range(max(1, math.ceil(interval / poll))):
                time.sleep(poll)
                rows, snapshot = step()
            out.print(
                render(rows, title=_title(url, rows, snapshot, False), limit=limit, boxed=False)
            )
            return 0
        return _live(out, step, url=url, interval=interval, poll=poll, limit=limit)


def _live(
    out: Console,
    step: Callable[[], tuple[list[Row], _view.StoreSnapshot]],
    *,
    url: str,
    interval: float,
    poll: float,
    limit: int,
) -> int:
    stopped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    interactive = sys.stdin.isatty()
    try:
        with contextlib.ExitStack() as stack:
            key = stack.enter_context(_keys()) if interactive else None
            rows, snapshot = step()
            live = stack.enter_context(
                Live(
                    render(
                        rows,
                        title=_title(url, rows, snapshot, interactive),
                        limit=limit,
                        boxed=True,
                    ),
                    console=out,
                    auto_refresh=False,
                    transient=False,
                )
            )
            next_refresh = time.monotonic() + interval
            while not stopped:
                next_poll = time.monotonic() + poll
                while not stopped and (left := next_poll - time.monotonic()) > 0:
                    pressed = key(left) if key is not None else ""
                    if key is None:
                        time.sleep(min(left, 0.2))
                    if "q" in pressed.lower():
                        return 0
                rows, snapshot = step()
                if time.monotonic() < next_refresh:
                    continue
                next_refresh = time.monotonic() + interval
                live.update(
                    render(
                        rows,
                        title=_title(url, rows, snapshot, interactive),
                        limit=limit,
                        boxed=True,
                    ),
                    refresh=True,
                )
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
