"""The Redis URL's options: parsed and checked once, before any connection."""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass
from typing import Final

from leasehold._core.url import StoreURL
from leasehold._errors import InvalidArgument

DEFAULT_PREFIX: Final = "leasehold:"
DEFAULT_SOCKET_TIMEOUT: Final = 5.0
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_MAX_CONNECTIONS: Final = 32
DEFAULT_MAX_BLOCKING_CONNECTIONS: Final = 64
DEFAULT_CLIENT_NAME: Final = "leasehold"


# --------------------------------------------------------------------------- URL


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Everything a ``redis[s]://``, ``redis[s]+cluster://`` or ``unix://`` URL says,
    validated."""

    tls: bool
    host: str
    port: int
    unix_path: str | None
    db: int
    username: str | None
    password: str | None = None
    prefix: str = DEFAULT_PREFIX
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_blocking_connections: int = DEFAULT_MAX_BLOCKING_CONNECTIONS
    client_name: str = DEFAULT_CLIENT_NAME
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    # host:port is then a seed node: any node of the cluster will do.
    cluster: bool = False

    def __repr__(self) -> str:
        # The password never reaches a repr.
        where = self.unix_path or f"{self.host}:{self.port}"
        mode = ", cluster=True" if self.cluster else ""
        return (
            f"RedisOptions({where!r}, db={self.db}, prefix={self.prefix!r}, tls={self.tls}{mode})"
        )


_OPTIONS: Final = {
    "db": (
        "database number (unix:// URLs; redis:// URLs may also use the path /N; "
        "a cluster has only database 0)"
    ),
    "prefix": f"key prefix, default {DEFAULT_PREFIX!r}",
    "socket_timeout": f"seconds to wait for a reply, default {DEFAULT_SOCKET_TIMEOUT:g}",
    "socket_connect_timeout": f"seconds to connect, default {DEFAULT_CONNECT_TIMEOUT:g}",
    "max_connections": f"connections for commands, default {DEFAULT_MAX_CONNECTIONS}",
    "max_blocking_connections": (
        f"connections for waiting (BLPOP), default {DEFAULT_MAX_BLOCKING_CONNECTIONS}"
    ),
    "client_name": f"CLIENT SETNAME value, default {DEFAULT_CLIENT_NAME!r}",
    "username": "ACL user (or put it in the URL's user part)",
    "password": "password (or put it in the URL's user part)",
    "ssl_ca_certs": "rediss:// only: CA bundle file to verify the server with",
    "ssl_certfile": "rediss:// only: client certificate file",
    "ssl_keyfile": "rediss:// only: client private key file",
    "ssl_cert_reqs": "rediss:// only: none, optional or required (default)",
    "ssl_check_hostname": "rediss:// only: true (default with required) or false",
}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _bad(url: StoreURL, message: str) -> InvalidArgument:
    return InvalidArgument(f"redis store url {url.redacted!r}: {message}")


def _seconds(url: StoreURL, key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _bad(url, f"{key} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise _bad(url, f"{key} must be > 0 and <= 3600 seconds, got {raw!r}")
    return value


def _count(url: StoreURL, key: str, raw: str, low: int, high: int) -> int:
    if not raw.isdigit():
        raise _bad(url, f"{key} must be a whole number, got {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise _bad(url, f"{key} must be between {low} and {high}, got {value}")
    return value


def _flag(url: StoreURL, key: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise _bad(url, f"{key} must be true or false, got {raw!r}")


def _printable(url: StoreURL, key: str, raw: str, forbidden: str = "") -> str:
    if not raw or not raw.isprintable() or any(ch in forbidden for ch in raw):
        extra = f" and none of {forbidden!r}" if forbidden else ""
        raise _bad(url, f"{key} must be non-empty printable text{extra}, got {raw!r}")
    return raw


def parse_options(url: StoreURL) -> RedisOptions:
    """Validate every part of the URL before any I/O (``InvalidArgument`` if bad)."""
    try:
        parts = urllib.parse.urlsplit(url.raw)
        port_number = parts.port
    except ValueError as exc:
        raise _bad(url, f"invalid host or port: {exc}") from None
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in _OPTIONS:
            allowed = "; ".join(f"{name}: {doc}" for name, doc in _OPTIONS.items())
            raise _bad(url, f"unknown option {key!r}. Allowed options: {allowed}")
        if key in query:
            raise _bad(url, f"option {key!r} is given twice")
        query[key] = value
    cluster = url.scheme.endswith("+cluster")
    tls = url.scheme in ("rediss", "rediss+cluster")
    if not tls and any(key.startswith("ssl_") for key in query):
        raise _bad(url, "ssl_* options need a rediss:// or rediss+cluster:// URL")

    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    if "username" in query:
        if username is not None:
            raise _bad(url, "the user name is given both in the URL and as ?username=")
        username = query["username"] or None
    if "password" in query:
        if password is not None:
            raise _bad(url, "the password is given both in the URL and as ?password=")
        password = query["password"] or None

    unix_path: str | None = None
    db: int | None = None
    host, port = "localhost", 6379
    if url.scheme == "unix":
        if parts.hostname:
            raise _bad(url, "write unix:///absolute/path/to/redis.sock (three slashes)")
        unix_path = urllib.parse.unquote(parts.path)
        if not unix_path or unix_path == "/":
            raise _bad(url, "the socket path is missing: unix:///path/to/redis.sock")
    else:
        host = parts.hostname or host
        port = port_number if port_number is not None else port
        path = parts.path.strip("/")
        if path:
            db = _count(url, "the database number in the path", path, 0, 1_000_000)
    if "db" in query:
        from_query = _count(url, "db", query["db"], 0, 1_000_000)
        if db is not None and db != from_query:
            raise _bad(url, f"database {db} in the path but db={from_query} in the query")
        db = from_query
    if cluster and db:
        raise _bad(url, f"a Redis Cluster has only database 0, got {db}")

    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in ("none", "optional", "required"):
        raise _bad(url, f"ssl_cert_reqs must be none, optional or required, got {cert_reqs!r}")
    check_hostname = cert_reqs == "required"
    if "ssl_check_hostname" in query:
        check_hostname = _flag(url, "ssl_check_hostname", query["ssl_check_hostname"])
        if check_hostname and cert_reqs != "required":
            raise _bad(url, "ssl_check_hostname=true needs ssl_cert_reqs=required")

    return RedisOptions(
        tls=tls,
        host=host,
        port=port,
        unix_path=unix_path,
        db=db or 0,
        username=username,
        password=password,
        # Braces would change the hash tag of every key (see KeyLayout).
        prefix=_printable(url, "prefix", query.get("prefix", DEFAULT_PREFIX), "{} "),
        socket_timeout=_seconds(
            url, "socket_timeout", query.get("socket_timeout", str(DEFAULT_SOCKET_TIMEOUT))
        ),
        socket_connect_timeout=_seconds(
            url,
            "socket_connect_timeout",
            query.get("socket_connect_timeout", str(DEFAULT_CONNECT_TIMEOUT)),
        ),
        max_connections=_count(
            url,
            "max_connections",
            query.get("max_connections", str(DEFAULT_MAX_CONNECTIONS)),
            1,
            10_000,
        ),
        max_blocking_connections=_count(
            url,
            "max_blocking_connections",
            query.get("max_blocking_connections", str(DEFAULT_MAX_BLOCKING_CONNECTIONS)),
            1,
            10_000,
        ),
        # CLIENT SETNAME refuses spaces.
        client_name=_printable(url, "client_name", query.get("client_name", "leasehold"), " "),
        ssl_ca_certs=query.get("ssl_ca_certs") or None,
        ssl_certfile=query.get("ssl_certfile") or None,
        ssl_keyfile=query.get("ssl_keyfile") or None,
        ssl_cert_reqs=cert_reqs,
        ssl_check_hostname=check_hostname,
        cluster=cluster,
    )
