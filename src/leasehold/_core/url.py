"""Store URLs: scheme dispatch and credential redaction.

A URL's password must never reach a repr, a log line or an exception message, so
everything that prints a URL prints ``StoreURL.redacted``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from leasehold._errors import InvalidArgument

SCHEMES = {
    "memory": "memory",
    "sqlite": "sqlite",
    "redis": "redis",
    "rediss": "redis",
    "redis+cluster": "redis",
    "rediss+cluster": "redis",
    "unix": "redis",
    "postgresql": "postgres",
    "postgres": "postgres",
    "etcd": "etcd",
    "etcds": "etcd",
}


@dataclass(frozen=True)
class StoreURL:
    raw: str = field(repr=False)
    scheme: str
    backend: str
    redacted: str

    def __repr__(self) -> str:
        return f"StoreURL({self.redacted!r})"

    def __str__(self) -> str:
        return self.redacted


def redact(raw: str) -> str:
    """Replace the password (userinfo and ``password=`` query values) with ``***``."""
    try:
        parts = urllib.parse.urlsplit(raw)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if sep else f"{userinfo}@{hostport}"
    query = parts.query
    secret_keys = ("password", "pass", "sslpassword")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(key.lower() in secret_keys for key, _ in pairs):
        query = "&".join(
            f"{key}={'***' if key.lower() in secret_keys else value}" for key, value in pairs
        )
    if netloc == parts.netloc and query == parts.query:
        return raw  # nothing secret; urlunsplit would also mangle sqlite:////abs paths
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def parse(raw: object) -> StoreURL:
    if not isinstance(raw, str):
        raise InvalidArgument(f"store url must be a str, got {type(raw).__name__}")
    if "://" not in raw:
        raise InvalidArgument(
            f"store url {redact(raw)!r} has no scheme; expected one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    scheme = raw.split("://", 1)[0].lower()
    backend = SCHEMES.get(scheme)
    if backend is None:
        raise InvalidArgument(
            f"unknown store url scheme {scheme!r}; expected one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if any(ord(ch) < 32 for ch in raw):
        raise InvalidArgument("store url contains control characters")
    try:
        urllib.parse.urlsplit(raw)
    except ValueError as exc:
        raise InvalidArgument(f"malformed store url {redact(raw)!r}: {exc}") from None
    return StoreURL(raw=raw, scheme=scheme, backend=backend, redacted=redact(raw))


def query_options(raw: str) -> dict[str, str]:
    parts = urllib.parse.urlsplit(raw)
    return dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
