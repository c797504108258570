"""Reading ``settings.LEASEHOLD``: which store the Django project's client uses.

Pure functions of the settings (no I/O), so the system checks, the client and the
management command all agree on one answer:

* ``LEASEHOLD = {"URL": "redis://..."}``: that store.
* ``LEASEHOLD = {"DATABASE": "default"}``: the PostgreSQL store on that
  ``DATABASES`` alias -- host, port, credentials, TLS and other libpq ``OPTIONS``
  -- so the project configures its database once.
* neither: ``$LEASEHOLD_URL``, else a host-local SQLite file (which
  ``manage.py check --deploy`` reports as an error: it coordinates nothing
  across hosts).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from leasehold._core.defaults import ENV_URL, default_url
from leasehold._errors import InvalidArgument

SETTING = "LEASEHOLD"
KNOWN_KEYS = frozenset(
    {"URL", "DATABASE", "POOLER", "SCHEMA", "POOL_SIZE", "IDENTITY", "ON_COMMIT", "OPTIONS"}
)
POSTGRES_ENGINES = (
    "django.db.backends.postgresql",
    "django.contrib.gis.db.backends.postgis",
)
# DATABASES[...]["OPTIONS"] keys that are Django's or the driver's, not libpq's.
_NOT_LIBPQ = frozenset(
    {
        "isolation_level",
        "server_side_binding",
        "pool",
        "assume_role",
        "cursor_factory",
        "context",
        "autocommit",
    }
)
_POOLERS = ("none", "session", "transaction")


@dataclass(frozen=True)
class Source:
    """Where the store URL came from, for checks and messages."""

    url: str
    origin: str  # "URL", "DATABASE", "env", "default"
    alias: str | None = None
    on_commit: bool = True
    identity: str | None = None

    @property
    def host_local(self) -> bool:
        """A store only this host sees: coordinates nothing across a fleet."""
        return self.url.startswith(("sqlite:", "memory:"))

    def __repr__(self) -> str:  # the URL may hold a password
        return f"Source(origin={self.origin!r}, alias={self.alias!r})"


def read(setting: object, databases: Mapping[str, Mapping[str, Any]]) -> Source:
    """The store for ``settings.LEASEHOLD`` (None when unset) and ``DATABASES``."""
    if setting is None:
        env = os.environ.get(ENV_URL)
        return Source(url=env, origin="env") if env else Source(default_url(), "default")
    if not isinstance(setting, Mapping):
        raise InvalidArgument(f"settings.{SETTING} must be a dict, got {type(setting).__name__}")
    unknown = sorted(set(setting) - KNOWN_KEYS)
    if unknown:
        raise InvalidArgument(
            f"settings.{SETTING} has unknown keys {unknown}; known: {sorted(KNOWN_KEYS)}"
        )
    on_commit = setting.get("ON_COMMIT", True)
    if not isinstance(on_commit, bool):
        raise InvalidArgument(f"settings.{SETTING}['ON_COMMIT'] must be True or False")
    identity = setting.get("IDENTITY")
    if identity is not None and not isinstance(identity, str):
        raise InvalidArgument(f"settings.{SETTING}['IDENTITY'] must be a str")
    if ("URL" in setting) == ("DATABASE" in setting):
        raise InvalidArgument(f"settings.{SETTING} needs exactly one of 'URL' or 'DATABASE'")
    if "URL" in setting:
        url = setting["URL"]
        if not isinstance(url, str) or "://" not in url:
            raise InvalidArgument(f"settings.{SETTING}['URL'] must be a store URL string")
        url = _with_query(url, _own_options(setting))
        return Source(url=url, origin="URL", on_commit=on_commit, identity=identity)
    alias = setting["DATABASE"]
    if not isinstance(alias, str) or alias not in databases:
        raise InvalidArgument(
            f"settings.{SETTING}['DATABASE'] = {alias!r} is not a key of settings.DATABASES "
            f"({sorted(databases)})"
        )
    url = database_url(databases[alias], alias=alias, extra=_own_options(setting))
    return Source(url=url, origin="DATABASE", alias=alias, on_commit=on_commit, identity=identity)


def _own_options(setting: Mapping[str, Any]) -> dict[str, str]:
    """leasehold's URL options given as settings keys."""
    found: dict[str, str] = {}
    pooler = setting.get("POOLER")
    if pooler is not None:
        if pooler not in _POOLERS:
            raise InvalidArgument(
                f"settings.{SETTING}['POOLER'] must be one of {_POOLERS}, got {pooler!r}"
            )
        found["pooler"] = str(pooler)
    if setting.get("SCHEMA") is not None:
        found["schema"] = str(setting["SCHEMA"])
    size = setting.get("POOL_SIZE")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidArgument(f"settings.{SETTING}['POOL_SIZE'] must be an int >= 1")
        found["pool_max_size"] = str(size)
    options = setting.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise InvalidArgument(f"settings.{SETTING}['OPTIONS'] must be a dict of URL options")
    found.update({str(k): str(v) for k, v in options.items()})
    return found


def _with_query(url: str, options: Mapping[str, str]) -> str:
    if not options:
        return url
    glue = "&" if "?" in url else "?"
    return url + glue + urllib.parse.urlencode(options, quote_via=urllib.parse.quote)


def _socket_dir() -> str:
    """libpq's default socket directory, for an empty HOST (Debian's, else /tmp)."""
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def database_url(
    database: Mapping[str, Any], *, alias: str = "default", extra: Mapping[str, str] | None = None
) -> str:
    """A ``postgresql://`` store URL from one ``DATABASES`` entry.

    An empty HOST means the local unix socket, as in Django (libpq's default
    directory); a socket directory is percent-encoded into the authority.
    ``DISABLE_SERVER_SIDE_CURSORS = True`` is Django's sign of a transaction-mode
    pooler (PgBouncer): the store then uses ``?pooler=transaction`` unless the
    ``POOLER`` setting says otherwise.
    """
    engine = str(database.get("ENGINE", ""))
    if engine not in POSTGRES_ENGINES:
        raise InvalidArgument(
            f"settings.{SETTING}['DATABASE'] = {alias!r} uses {engine or 'no ENGINE'}; "
            "leasehold's store needs PostgreSQL (django.db.backends.postgresql), or "
            "give LEASEHOLD = {'URL': ...} instead"
        )

    def part(key: str) -> str:
        value = database.get(key)
        return "" if value in (None, "") else str(value)

    # Host (a unix socket directory too, percent-encoded), port, user and database
    # in the URL's authority and path; the password only as a query parameter,
    # which redaction and libpq both know.
    host = part("HOST") or os.environ.get("PGHOST") or _socket_dir()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    netloc = urllib.parse.quote(host, safe="[]:")
    if part("PORT"):
        netloc += ":" + part("PORT")
    if part("USER"):
        netloc = urllib.parse.quote(part("USER"), safe="") + "@" + netloc
    params: dict[str, str] = {}
    if part("PASSWORD"):
        params["password"] = part("PASSWORD")
    for key, value in dict(database.get("OPTIONS") or {}).items():
        if key in _NOT_LIBPQ or not isinstance(value, (str, int, float)):
            continue
        params[str(key)] = str(value)
    if database.get("DISABLE_SERVER_SIDE_CURSORS"):
        params["pooler"] = "transaction"
    params.update(extra or {})
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    path = "/" + urllib.parse.quote(part("NAME"), safe="")
    return f"postgresql://{netloc}{path}" + (f"?{query}" if query else "")
