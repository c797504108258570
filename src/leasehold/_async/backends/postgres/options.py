"""The PostgreSQL URL: leasehold's own options, libpq defaults, checks before any connection."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from leasehold._core.url import StoreURL
from leasehold._errors import InvalidArgument

# URL query parameters that are leasehold's, not libpq's: removed before the rest
# of the URL reaches libpq (which rejects parameters it does not know).
OWN_OPTIONS = frozenset(
    {
        "schema",
        "pooler",
        "pool_min_size",
        "pool_max_size",
        "create_schema",
        "statement_timeout",
        "durability",
    }
)

# libpq settings leasehold supplies when the URL (or the matching PG* environment
# variable) does not. They bound how long a dead server or network path can go
# unnoticed -- about 10 s -- which must stay well inside a lease's safe deadline.
LIBPQ_DEFAULTS: dict[str, tuple[str, str | None]] = {
    "connect_timeout": ("5", "PGCONNECT_TIMEOUT"),
    "keepalives": ("1", None),
    "keepalives_idle": ("4", None),
    "keepalives_interval": ("2", None),
    "keepalives_count": ("2", None),
    "tcp_user_timeout": ("9000", None),  # ms: unacknowledged data fails the socket
    "application_name": ("leasehold", "PGAPPNAME"),
}
_INT_PARAMS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_POOLERS = ("none", "session", "transaction")
_DURABILITIES = ("durable", "relaxed")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_STATEMENT_TIMEOUT_DEFAULT = 5.0


@dataclass(frozen=True)
class PostgresOptions:
    """Everything the URL says, validated before any I/O."""

    conninfo: str = ""
    schema: str = "leasehold"
    pooler: str = "none"
    pool_min_size: int = 1
    pool_max_size: int = 1
    create_schema: bool = True
    statement_timeout: float = _STATEMENT_TIMEOUT_DEFAULT
    connect_timeout: float = 5.0
    secrets: tuple[str, ...] = ()
    # "relaxed": grants commit without waiting for their WAL flush (schema v6's
    # *_relaxed functions; docs/backends.md, "Relaxed durability").
    durability: str = "durable"

    @property
    def relaxed(self) -> bool:
        return self.durability == "relaxed"

    @property
    def listen(self) -> bool:
        return self.pooler != "transaction"

    def __repr__(self) -> str:  # never show the conninfo: it holds the password
        return (
            f"PostgresOptions(schema={self.schema!r}, pooler={self.pooler!r}, "
            f"pool={self.pool_min_size}..{self.pool_max_size}, durability={self.durability!r})"
        )


def _scrub(text: str, hidden: Sequence[str]) -> str:
    for secret in hidden:
        if secret:
            text = text.replace(secret, "***")
    return text


def _seconds(key: str, value: str, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number >= 0 if allow_zero else number > 0) or number == float("inf"):
        raise InvalidArgument(f"?{key}= must be a positive number of seconds, got {value!r}")
    return number


def _count(key: str, value: str, lowest: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"?{key}= must be an integer, got {value!r}") from None
    if number < lowest:
        raise InvalidArgument(f"?{key}= must be at least {lowest}, got {number}")
    return number


def parse_options(url: StoreURL) -> PostgresOptions:
    """Split leasehold's options from libpq's and validate both; no I/O."""
    parts = urllib.parse.urlsplit(url.raw)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    hidden = [p for p in (parts.password, urllib.parse.unquote(parts.password or "")) if p]
    hidden += [v for k, v in pairs if k.lower() in ("password", "sslpassword") and v]
    own: dict[str, str] = {}
    passthrough: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in OWN_OPTIONS:
            if key in own:
                raise InvalidArgument(f"?{key}= is given twice in {url.redacted!r}")
            own[key] = value
        else:
            passthrough.append((key, value))

    schema = own.get("schema", "leasehold")
    if not _SCHEMA_RE.fullmatch(schema):
        raise InvalidArgument(
            f"?schema={schema!r} is not a plain identifier: use letters, digits and "
            "underscores, at most 63 characters, not starting with a digit"
        )
    pooler = own.get("pooler", "none").lower() or "none"
    if pooler == "statement":
        raise InvalidArgument(
            "?pooler=statement is not supported: installing the schema needs a "
            "multi-statement transaction; use transaction pooling"
        )
    if pooler not in _POOLERS:
        raise InvalidArgument(f"?pooler= must be one of {', '.join(_POOLERS)}, got {pooler!r}")
    durability = own.get("durability", "durable").lower() or "durable"
    if durability not in _DURABILITIES:
        raise InvalidArgument(
            f"?durability= must be one of {', '.join(_DURABILITIES)}, got {durability!r}"
        )
    create = own.get("create_schema", "true").lower()
    if create not in _TRUE + _FALSE:
        raise InvalidArgument(f"?create_schema= must be true or false, got {create!r}")
    pool_min = _count("pool_min_size", own.get("pool_min_size", "1"), 0)
    # One operation connection by default: every call is one short round trip, so
    # threads queue for it briefly (?pool_max_size= for heavily threaded processes).
    pool_max = _count("pool_max_size", own.get("pool_max_size", str(max(1, pool_min))), 1)
    if pool_max < pool_min:
        raise InvalidArgument(
            f"?pool_max_size={pool_max} is smaller than ?pool_min_size={pool_min}"
        )
    statement_timeout = _seconds(
        "statement_timeout",
        own.get("statement_timeout", str(_STATEMENT_TIMEOUT_DEFAULT)),
        allow_zero=True,
    )

    # Rebuild the URL without our parameters, then let libpq's own parser (no I/O)
    # check the rest: unknown parameters and malformed URLs fail here, not later.
    libpq_url = urllib.parse.urlunsplit(
        (
            parts.scheme,
            parts.netloc,
            parts.path,
            urllib.parse.urlencode(passthrough, quote_via=urllib.parse.quote),
            parts.fragment,
        )
    )
    try:
        given = conninfo_to_dict(libpq_url)
    except psycopg.Error as exc:
        raise InvalidArgument(
            f"invalid PostgreSQL url {url.redacted!r}: {_scrub(str(exc), hidden)}"
        ) from None
    for key in _INT_PARAMS:
        setting = given.get(key)
        if setting is not None and not re.fullmatch(r"-?\d+", str(setting)):
            raise InvalidArgument(f"?{key}= must be an integer, got {setting!r}")
    for port in str(given.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise InvalidArgument(f"invalid port {port!r} in {url.redacted!r}")
    sslmode = given.get("sslmode")
    if sslmode is not None and str(sslmode) not in _SSLMODES:
        raise InvalidArgument(f"?sslmode= must be one of {', '.join(_SSLMODES)}, got {sslmode!r}")

    extra: dict[str, Any] = {}
    for key, (default, env) in LIBPQ_DEFAULTS.items():
        if key not in given and not (env and os.environ.get(env)):
            extra[key] = default
    if statement_timeout > 0 and pooler != "transaction":
        # A startup option: transaction poolers (pgbouncer) reject unknown startup
        # parameters, so behind them only the functions' own lock_timeout applies.
        setting = f"-c statement_timeout={int(statement_timeout * 1000)}"
        current = str(given.get("options") or os.environ.get("PGOPTIONS") or "")
        if "statement_timeout" not in current:
            extra["options"] = f"{current} {setting}".strip()
    connect_timeout = float(given.get("connect_timeout") or extra.get("connect_timeout") or 5)
    return PostgresOptions(
        conninfo=make_conninfo(libpq_url, **extra),
        schema=schema,
        pooler=pooler,
        pool_min_size=pool_min,
        pool_max_size=pool_max,
        create_schema=create in _TRUE,
        statement_timeout=statement_timeout,
        # libpq treats values below 2 s as 2 s; the pool waits a little longer.
        connect_timeout=max(2.0, connect_timeout) + 1.0,
        secrets=tuple(hidden),
        durability=durability,
    )
