"""``leasehold exporter``: the whole store as Prometheus series, on /metrics."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click

from leasehold._core import validate
from leasehold._core.presence import MEMBER_STATES
from leasehold._errors import LeaseholdError
from leasehold._sync.client import Client
from leasehold.cli import _common, _view
from leasehold.cli._common import CliError, common_options, open_client, say

DEFAULT_PORT = 9464  # OpenTelemetry's Prometheus exporter port, what scrapers expect
DEFAULT_INTERVAL = 15.0

check_prefix = _common.checked(validate.prefix)
check_interval = _common.checked(lambda value: validate.ttl(value, what="--interval"))


def _require_prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise CliError(
            "leasehold exporter needs prometheus_client: pip install 'leasehold[prometheus]'"
        ) from None
    return prometheus_client


class StoreCollector:
    """Serves the latest poll (never polls on a scrape: a scrape storm must not
    become a store storm). A failed poll drops the store series, so stale numbers
    are never served as current; ``leasehold_store_up`` says so."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._guard = threading.Lock()
        self._snapshot: _view.StoreSnapshot | None = None
        self._error: str | None = None
        self._polled_at = float("-inf")  # monotonic time of the last successful poll

    def record(self, snapshot: _view.StoreSnapshot | None, error: str | None = None) -> None:
        with self._guard:
            self._snapshot, self._error = snapshot, error
            if snapshot is not None:
                self._polled_at = time.monotonic()

    def health(self) -> tuple[bool, str]:
        with self._guard:
            error, age = self._error, time.monotonic() - self._polled_at
        if error is not None:
            return False, f"store unavailable: {error}"
        if age > 3 * self.interval + 5:
            return False, f"last successful poll {age:.0f} s ago"
        return True, "ok"

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        with self._guard:
            snapshot = self._snapshot
        up = GaugeMetricFamily(
            "leasehold_store_up", "1 if the last poll of the store succeeded, else 0"
        )
        up.add_metric([], 0 if snapshot is None else 1)
        yield up
        if snapshot is None:
            return
        took = GaugeMetricFamily(
            "leasehold_store_poll_duration_seconds", "How long the last poll of the store took"
        )
        took.add_metric([], snapshot.took)
        yield took
        labels = ["name_group"]
        holders = GaugeMetricFamily(
            "leasehold_store_holders",
            "Live holders in the whole store, by name group",
            labels=labels,
        )
        waiters = GaugeMetricFamily(
            "leasehold_store_waiters",
            "Queued waiters (queue depth) in the whole store, by name group",
            labels=labels,
        )
        oldest = GaugeMetricFamily(
            "leasehold_store_oldest_lease_seconds",
            "How long the oldest live lease of the group has been held",
            labels=labels,
        )
        for group, stats in sorted(_view.by_group(snapshot).items()):
            holders.add_metric([group], stats.holders)
            waiters.add_metric([group], stats.waiters)
            oldest.add_metric([group], stats.oldest)
        yield holders
        if snapshot.waiters is not None:  # a store that cannot list its queues: no series
            yield waiters
        yield oldest
        yield from self._elections(snapshot)
        yield from self._rooms(snapshot)

    @staticmethod
    def _elections(snapshot: _view.StoreSnapshot) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily(
            "leasehold_store_leader_info",
            "1 with the leader's identity and host while the election has a leader; "
            '0 with leader="" while nobody leads',
            labels=["election", "leader", "host"],
        )
        term = GaugeMetricFamily(
            "leasehold_store_leader_term",
            "The current leader's term (its lease's fence)",
            labels=["election"],
        )
        for election, leader in sorted(snapshot.leaders.items()):
            if leader is None:
                info.add_metric([election, "", ""], 0)
            else:
                info.add_metric([election, leader.owner, leader.host], 1)
                term.add_metric([election], leader.fence)
        if snapshot.leaders:
            yield info
            yield term

    @staticmethod
    def _rooms(snapshot: _view.StoreSnapshot) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        members = GaugeMetricFamily(
            "leasehold_store_presence_members",
            "Live members of the room's open epoch, by state (intent: announced, "
            "not yet joined; active: joined)",
            labels=["room", "state"],
        )
        open_ = GaugeMetricFamily(
            "leasehold_store_presence_open", "1 while the room has an open epoch", labels=["room"]
        )
        for room, seen in sorted(snapshot.rooms.items()):
            counts = dict.fromkeys(MEMBER_STATES, 0)
            for member in seen.members:
                counts[member.state] = counts.get(member.state, 0) + 1
            for state, count in sorted(counts.items()):
                members.add_metric([room, state], count)
            open_.add_metric([room], 0 if seen.epoch is None else 1)
        if snapshot.rooms:
            yield members
            yield open_


def _handler(registry: Any, collector: StoreCollector) -> type[BaseHTTPRequestHandler]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                healthy, detail = collector.health()
                self._send(200 if healthy else 503, "text/plain; charset=utf-8", f"{detail}\n")
            elif path == "/":
                self._send(
                    200, "text/plain; charset=utf-8", "leasehold exporter: /metrics /healthz\n"
                )
            else:
                self._send(404, "text/plain; charset=utf-8", "not found\n")

        def _send(self, status: int, content_type: str, body: bytes | str) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            del format, args  # scrapes are not news; errors are logged by the poller

    return Handler


def _poll_forever(
    client: Client,
    collector: StoreCollector,
    stop: threading.Event,
    *,
    prefix: str,
    elections: Sequence[str],
    rooms: Sequence[str],
) -> None:
    failing: str | None = None
    while not stop.wait(collector.interval):
        try:
            collector.record(_view.poll(client, prefix, elections, rooms))
        except LeaseholdError as exc:
            collector.record(None, str(exc))
            if str(exc) != failing:  # once per distinct failure, not every interval
                _common.warn(f"polling the store failed: {exc}")
            failing = str(exc)
        else:
            if failing is not None:
                say("polling the store works again")
            failing = None


@click.command(
    "exporter",
    epilog=_common.exit_codes_epilog(
        (0, "stopped by SIGTERM or Ctrl-C"),
        (1, "prometheus_client is not installed, or the port is taken"),
    ),
    short_help="Serve the whole store as Prometheus metrics.",
    context_settings=_common.CONTEXT_SETTINGS,
)
@click.argument("url_argument", metavar="[URL]", required=False)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to serve on (0: any free port, printed on stderr).",
)
@click.option(
    "--bind", default="0.0.0.0", show_default=True, metavar="ADDRESS", help="Address to listen on."
)
@click.option(
    "--prefix",
    default="",
    callback=check_prefix,
    metavar="P",
    help="Only names (and queues) starting with P.",
)
@click.option(
    "--interval",
    type=float,
    default=DEFAULT_INTERVAL,
    show_default=True,
    callback=check_interval,
    metavar="S",
    help="Seconds between polls of the store; scrapes serve the latest poll.",
)
@click.option(
    "--election",
    "elections",
    multiple=True,
    metavar="NAME",
    help="Report this election's leader (repeatable): the store cannot tell "
    "an election from a lock by itself. A shell pattern (beat-*) reports every "
    "held name that matches; only a name given in full shows 0 while nobody leads.",
)
@click.option(
    "--room",
    "rooms",
    multiple=True,
    metavar="ROOM",
    help="Report this presence room's members (repeatable).",
)
@common_options
def exporter_command(
    *,
    url_argument: str | None,
    port: int,
    bind: str,
    prefix: str,
    interval: float,
    elections: tuple[str, ...],
    rooms: tuple[str, ...],
) -> int:
    """Serve /metrics for the whole store: what every process of every host holds
    and waits for, which per-process metrics cannot show.

    \b
    Series (see docs/observability.md):
      leasehold_store_holders{name_group}             live holders
      leasehold_store_waiters{name_group}             queue depth
      leasehold_store_oldest_lease_seconds{name_group}
      leasehold_store_leader_info{election,leader,host}   (--election)
      leasehold_store_leader_term{election}
      leasehold_store_presence_members{room,state}    (--room)
      leasehold_store_presence_open{room}
      leasehold_store_up, leasehold_store_poll_duration_seconds

    Names are grouped (ids become *: meeting:8f3a... -> meeting:*), so the
    series stay few however many names there are. /healthz answers 200 while
    polls succeed, 503 otherwise. URL may also be given with --url.
    """
    prometheus_client = _require_prometheus_client()
    if url_argument is not None:
        _common.STATE.url = url_argument
    for election in elections:
        if not _view.is_pattern(election):
            validate.name(election)
    collector = StoreCollector(interval)
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    with open_client() as client:
        # The first poll before serving: a wrong URL or password is one clear error
        # (and exit status) now, not a /healthz that never turns green.
        collector.record(_view.poll(client, prefix, elections, rooms))
        registry.register(collector)
        try:
            server = ThreadingHTTPServer((bind, port), _handler(registry, collector))
        except OSError as exc:
            raise CliError(f"cannot serve on {bind}:{port}: {exc.strerror or exc}") from None
        server.daemon_threads = True
        stop = threading.Event()
        previous = {
            signum: signal.signal(signum, lambda *_: stop.set())
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        poller = threading.Thread(
            target=_poll_forever,
            args=(client, collector, stop),
            kwargs={"prefix": prefix, "elections": elections, "rooms": rooms},
            name="leasehold-exporter-poll",
            daemon=True,
        )
        serving = threading.Thread(
            target=server.serve_forever, name="leasehold-exporter-http", daemon=True
        )
        say(
            f"serving http://{bind}:{server.server_port}/metrics "
            f"for {client.url} every {interval:g} s"
        )
        poller.start()
        serving.start()
        try:
            stop.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            server.shutdown()
            server.server_close()
            poller.join(timeout=collector.interval + 30)
    return 0
