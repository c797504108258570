"""``leasehold doctor``: can this machine use the store, and how well?"""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid

import click
from rich.table import Table
from rich.text import Text

from leasehold._errors import LeaseholdError, StoreUnavailable
from leasehold._sync.client import Client
from leasehold.cli import _common
from leasehold.cli._common import (
    EXIT_UNAVAILABLE,
    common_options,
    open_client,
    stdout_console,
)

PINGS = 7
# Beyond this a lease's renewals spend a noticeable part of a short TTL in transit.
SLOW_RTT = 0.1
# Leases never compare clocks across machines (docs/design.md), but logs and
# anything else that does will be confused by an offset this large.
LARGE_OFFSET = 1.0


def ms(seconds: float) -> str:
    if abs(seconds) < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1000:.1f} ms"


@dataclasses.dataclass
class Report:
    rows: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    usable: bool = True

    def add(self, check: str, result: str, style: str = "green") -> None:
        self.rows.append((check, result, style))


def measure(client: Client, report: Report) -> None:
    store = client.store
    started = time.perf_counter()
    store.ping()  # the first call also connects and creates the schema
    report.add("connect + first ping", ms(time.perf_counter() - started))
    rtts = []
    for _ in range(PINGS):
        sent = time.perf_counter()
        store.ping()
        rtts.append(time.perf_counter() - sent)
    rtt = statistics.median(rtts)
    report.add(
        f"round trip (median of {PINGS})",
        f"{ms(rtt)} (min {ms(min(rtts))}, max {ms(max(rtts))})",
        "yellow" if rtt > SLOW_RTT else "green",
    )
    if rtt > SLOW_RTT:
        report.warnings.append(f"round trips take {ms(rtt)}: use TTLs of several seconds at least")

    before = time.time()
    sent = time.perf_counter()
    server = store.server_time()
    trip = time.perf_counter() - sent
    if server is None:
        report.add("clock offset", "none: the store uses this host's clock", "green")
    else:
        # The server read its clock about half-way through the round trip.
        offset = server - (before + trip / 2)
        style = "yellow" if abs(offset) > LARGE_OFFSET else "green"
        report.add(
            "clock offset (store - local)", f"{offset * 1000:+.1f} ms ± {ms(trip / 2)}", style
        )
        if abs(offset) > LARGE_OFFSET:
            report.warnings.append(
                f"the store's clock is {offset:+.1f} s off this host's; leases do not "
                "depend on it, but logs and timestamps will disagree"
            )

    # A real lease round: proves the store accepts writes, not only pings.
    name = f"leasehold-doctor/{uuid.uuid4().hex}"
    sent = time.perf_counter()
    lease = client.lock(name, ttl=10.0).try_acquire()
    if lease is None:
        report.add("acquire + renew + release", "a fresh name was busy?!", "red")
        report.usable = False
        return
    lease.extend()
    lease.release()
    report.add("acquire + renew + release", ms(time.perf_counter() - sent))


@click.command(
    "doctor",
    epilog=_common.exit_codes_epilog(
        (0, "the store is usable (warnings may have been printed)"),
    ),
    short_help="Check the store: reachability, latency, clock, capabilities.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@common_options
def doctor_command() -> int:
    """Check the store: connect, measure round trips, compare clocks, take and
    release a real lease, and show the backend's capabilities and warnings."""
    out = stdout_console()
    report = Report()
    with open_client() as client:
        out.print(Text.assemble(("store", "bold"), "  ", client.url))
        problem: str | None = None
        try:
            measure(client, report)
            report.warnings.extend(client.store.warnings())
        except StoreUnavailable as exc:
            problem = f"store unavailable: {exc}"
        except LeaseholdError as exc:
            problem = str(exc)
        capabilities = client.store.capabilities

    checks = Table.grid(padding=(0, 2))
    checks.add_column(style="bold")
    checks.add_column()
    for check, result, style in report.rows:
        checks.add_row(Text(check), Text(result, style=style))
    if problem is not None:
        checks.add_row(Text("store"), Text(_common.scrub(problem), style="bold red"))
        report.usable = False
    out.print(checks)

    out.print(Text("\ncapabilities", style="bold"))
    caps = Table.grid(padding=(0, 2))
    caps.add_column()
    caps.add_column()
    for field in dataclasses.fields(capabilities):
        if field.name == "notes":
            continue
        value = getattr(capabilities, field.name)
        caps.add_row(
            Text(f"  {field.name.replace('_', ' ')}"),
            Text("yes" if value else "no", style="green" if value else "dim"),
        )
    out.print(caps)
    for note in capabilities.notes:
        out.print(Text(f"  note: {note}", style="dim"), soft_wrap=True)
    if report.warnings:
        out.print()
    for message in report.warnings:
        out.print(Text(f"warning: {_common.scrub(message)}", style="yellow"), soft_wrap=True)
    out.print()
    if not report.usable:
        out.print(Text("not usable from here", style="bold red"))
        return EXIT_UNAVAILABLE
    out.print(Text("usable", style="bold green"))
    return 0
