"""The etcd backend's pure parts: URL options, key layout and the queue decision.

No I/O and no clock reads; ``_async/backends/etcd`` does the talking.

Key layout under the prefix ``P`` (default ``leasehold/``):

* ``P n/<name>\\0h<tid>``: a holder of ``name``, attached to its store's session
  lease for its TTL (shared with the store's other keys of that TTL, see
  ``_async/backends/etcd/leases.py``); its ``create_revision`` (plus the epoch,
  below) is the fence.
* ``P n/<name>\\0q<tid>``: a waiter queued on ``name``, attached to the session
  lease of the queue TTL; the queue is ordered by ``create_revision``.
* ``P r/<key>``: a record; its version is the epoch plus its ``mod_revision``.
* ``P t/<topic>``: announcements (a put wakes the watchers of the prefix).
* ``P epoch``: the epoch, see ``epoch_for``.

``<tid>`` is a hash of the secret token: the token itself never reaches etcd, and
only its bearer can name the keys it owns. Names never contain NUL (validated), so
``P n/<name>\\0`` is a range holding exactly one name's keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import urllib.parse
from dataclasses import dataclass

from leasehold._core.records import Holder, HolderInfo, WaiterInfo
from leasehold._errors import InvalidArgument

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "leasehold/"
KNOWN_OPTIONS = frozenset(
    {"prefix", "timeout", "connect_timeout", "ca_cert", "client_cert", "client_key"}
)


@dataclass(frozen=True)
class EtcdOptions:
    endpoints: tuple[str, ...]  # base URLs, e.g. http://127.0.0.1:2379
    user: str | None
    password: str | None
    prefix: bytes
    timeout: float
    connect_timeout: float
    ca_cert: str | None
    client_cert: str | None
    client_key: str | None

    def __repr__(self) -> str:  # the password never reaches a repr
        return f"EtcdOptions(endpoints={self.endpoints!r}, user={self.user!r})"


def _seconds(options: dict[str, str], key: str, default: float) -> float:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > 300:
        raise InvalidArgument(f"etcd url option {key}={raw!r}: expected seconds in (0, 300]")
    return value


def parse_options(raw: str) -> EtcdOptions:
    """``etcd://[user:password@]host[:port][,host[:port]...][/][?options]``;
    ``etcds://`` for TLS. Raises InvalidArgument (without the password)."""
    scheme, _, rest = raw.partition("://")
    tls = scheme.lower() == "etcds"
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/"):
        raise InvalidArgument("an etcd url has no path; use ?prefix= to choose a key prefix")
    user = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user_raw, sep, password_raw = userinfo.partition(":")
        user = urllib.parse.unquote(user_raw)
        password = urllib.parse.unquote(password_raw) if sep else None
        if not user or password is None:
            raise InvalidArgument("etcd url: give both a user and a password, or neither")
    endpoints = []
    for part in netloc.split(","):
        part = part.strip()
        if part.startswith("["):  # [IPv6]:port
            host, _, after = part.partition("]")
            host, port_raw = host + "]", after.removeprefix(":")
        else:
            host, _, port_raw = part.partition(":")
        if not host:
            raise InvalidArgument("etcd url: every endpoint needs a host")
        try:
            port = int(port_raw) if port_raw else DEFAULT_PORT
        except ValueError:
            raise InvalidArgument(f"etcd url: bad port {port_raw!r}") from None
        if not 0 < port < 65536:
            raise InvalidArgument(f"etcd url: bad port {port}")
        endpoints.append(f"{'https' if tls else 'http'}://{host}:{port}")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise InvalidArgument(
            f"unknown etcd url option(s) {sorted(unknown)}; known: {sorted(KNOWN_OPTIONS)}"
        )
    prefix = options.get("prefix", DEFAULT_PREFIX)
    if not prefix or any(ord(ch) < 32 for ch in prefix):
        raise InvalidArgument("etcd url option prefix: non-empty, no control characters")
    tls_options = [k for k in ("ca_cert", "client_cert", "client_key") if k in options]
    if tls_options and not tls:
        raise InvalidArgument(f"etcd url options {tls_options} need the etcds:// scheme")
    if ("client_cert" in options) != ("client_key" in options):
        raise InvalidArgument("etcd url: client_cert and client_key go together")
    return EtcdOptions(
        endpoints=tuple(endpoints),
        user=user,
        password=password,
        prefix=prefix.encode(),
        timeout=_seconds(options, "timeout", 5.0),
        connect_timeout=_seconds(options, "connect_timeout", 2.0),
        ca_cert=options.get("ca_cert"),
        client_cert=options.get("client_cert"),
        client_key=options.get("client_key"),
    )


def prefix_end(key: bytes) -> bytes:
    """The range_end that makes a range of every key starting with ``key``."""
    trimmed = key.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"  # every key
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def token_id(token: str) -> bytes:
    return hashlib.sha256(token.encode()).hexdigest()[:40].encode()


@dataclass(frozen=True)
class Keys:
    prefix: bytes

    def name(self, name: str) -> bytes:
        return self.prefix + b"n/" + name.encode() + b"\x00"

    def names(self, prefix: str) -> bytes:
        return self.prefix + b"n/" + prefix.encode()

    def holder(self, name: str, tid: bytes) -> bytes:
        return self.name(name) + b"h" + tid

    def holders(self, name: str) -> bytes:
        return self.name(name) + b"h"

    def waiters(self, name: str) -> bytes:
        return self.name(name) + b"q"

    def waiter(self, name: str, tid: bytes) -> bytes:
        return self.name(name) + b"q" + tid

    def record(self, key: str) -> bytes:
        return self.prefix + b"r/" + key.encode()

    def topics(self) -> bytes:
        return self.prefix + b"t/"

    def topic(self, topic: str) -> bytes:
        return self.topics() + topic.encode()

    @property
    def epoch(self) -> bytes:
        return self.prefix + b"epoch"

    def split_name_key(self, key: bytes) -> tuple[str, str, bytes] | None:
        """``(name, "h" or "q", tid)`` of a key in a name's range, else None."""
        head = self.prefix + b"n/"
        if not key.startswith(head) or b"\x00" not in key:
            return None
        name, _, rest = key[len(head) :].partition(b"\x00")
        if not rest or rest[:1] not in (b"h", b"q"):
            return None
        return name.decode(), rest[:1].decode(), rest[1:]


@dataclass(frozen=True, slots=True)
class Entry:
    """A holder or waiter key as read from etcd."""

    kind: str  # "h" or "q"
    tid: bytes
    create_revision: int
    lease: int
    value: bytes


def holder_value(holder: Holder, limit: int, ttl: float, granted_at: float) -> bytes:
    return json.dumps(
        {"o": holder.owner, "h": holder.host, "p": holder.pid, "l": limit, "t": ttl,
         "a": granted_at},
        separators=(",", ":"),
    ).encode()  # fmt: skip


def waiter_info(name: str, entry: Entry, position: int, expires_in: float) -> WaiterInfo:
    """A queue key's value is the waiter's latest request (as a holder's)."""
    try:
        data = json.loads(entry.value)
        owner, host, pid = str(data["o"]), str(data["h"]), int(data["p"])
    except (ValueError, KeyError, TypeError):
        owner, host, pid = "", "", 0
    return WaiterInfo(
        name=name, owner=owner, host=host, pid=pid, position=position, expires_in=expires_in
    )


def holder_info(name: str, entry: Entry, epoch: int, now: float, expires_in: float) -> HolderInfo:
    try:
        data = json.loads(entry.value)
        owner, host, pid = str(data["o"]), str(data["h"]), int(data["p"])
        limit, granted_at = int(data["l"]), float(data["a"])
    except (ValueError, KeyError, TypeError):
        owner, host, pid, limit, granted_at = "?", "?", 0, 1, now
    return HolderInfo(
        name=name,
        owner=owner,
        host=host,
        pid=pid,
        fence=epoch + entry.create_revision,
        limit=limit,
        held_for=max(0.0, now - granted_at),
        expires_in=max(0.0, expires_in),
    )


@dataclass(frozen=True, slots=True)
class Decision:
    """What an acquire attempt does with one consistent view of a name.

    ``grant``: take a place now. Otherwise ``position`` is the number of waiters
    ahead (the token's place if it queues), and ``watch`` the key whose deletion
    may let it in: the waiter just ahead, or, at the head, every holder (a range
    ``(key, range_end)``), so that a release wakes one waiter, not all of them.
    """

    grant: bool
    mine: Entry | None  # the token's holder entry, when it already holds
    queued: Entry | None  # the token's waiter entry, when it is queued
    position: int
    # (key, range end or None, the keys seen there that must be gone to wake)
    watch: tuple[bytes, bytes | None, tuple[bytes, ...]] | None


def decide(keys: Keys, name: str, entries: list[Entry], tid: bytes, limit: int) -> Decision:
    holders = sorted((e for e in entries if e.kind == "h"), key=lambda e: e.create_revision)
    queue = sorted((e for e in entries if e.kind == "q"), key=lambda e: e.create_revision)
    mine = next((e for e in holders if e.tid == tid), None)
    queued = next((e for e in queue if e.tid == tid), None)
    if mine is not None:
        return Decision(True, mine, queued, 0, None)
    ahead = queue.index(queued) if queued is not None else len(queue)
    free = limit - len(holders)
    if free > ahead:
        return Decision(True, None, queued, ahead, None)
    if ahead == 0:
        start = keys.holders(name)
        seen = tuple(keys.holder(name, e.tid) for e in holders)
        watch: tuple[bytes, bytes | None, tuple[bytes, ...]] = (start, prefix_end(start), seen)
    else:
        predecessor = keys.waiter(name, queue[ahead - 1].tid)
        watch = (predecessor, None, (predecessor,))
    return Decision(False, None, queued, ahead, watch)


def epoch_for(server_seconds: float) -> int:
    """The epoch a new (or wiped) etcd keyspace starts from: the server's time in
    microseconds, rounded up to the next second.

    Fences and record versions are ``epoch + revision``. Revisions restart at 1
    when etcd loses its data; the epoch written afresh then is later by the time
    that passed, in microseconds, which is more than the revisions the lost data
    could have used (etcd commits far fewer than 10^6 revisions a second). So fences
    keep increasing across the loss, as long as the servers' clocks do not step
    back across it.
    """
    return (math.floor(server_seconds) + 1) * 1_000_000


def lease_seconds(ttl: float) -> int:
    """etcd leases have whole seconds: round up, so etcd never expires a grant
    before the client's safe deadline."""
    return max(1, math.ceil(ttl - 1e-9))


# How much longer a session lease lasts than the ttl of its keys: a tenth of the
# ttl's whole seconds, rounded down (none for a ttl of 9 s or less). A grant needs
# a session lease whose etcd expiry comes after the acquire's send time + ttl;
# without slack only a keepalive sent after the acquire began gives that, one more
# request per acquire. With it, a keepalive sent up to the slack before the acquire covers it,
# so a process that acquires in a loop with a 30 s ttl sends one keepalive every
# 3 s, not one per acquire. The price: a holder that dies, or a lease left to expire
# by a process that renews nothing, keeps its name up to the slack longer (a lease
# the process dropped while renewing others still goes at its own deadline: the
# sweep, backends.md).
SLACK_SHARE = 10


def session_seconds(ttl: float) -> int:
    """The length of the session lease that holds keys of ``ttl``."""
    seconds = lease_seconds(ttl)
    return seconds + seconds // SLACK_SHARE


def session_slack(granted: int) -> int:
    """The slack in a session lease granted for ``granted`` seconds: n + n // 10
    grows with n, and (10a + b) + a = 11a + b with b < 10, so it is granted // 11."""
    return granted // (SLACK_SHARE + 1)
