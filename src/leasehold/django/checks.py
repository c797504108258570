"""System checks: ``manage.py check`` and ``manage.py check --deploy``.

* ``leasehold.E001`` (always): ``settings.LEASEHOLD`` is malformed.
* ``leasehold.E002`` (``--deploy``): no ``LEASEHOLD`` setting and no
  ``$LEASEHOLD_URL``, so the store would be a SQLite file on this host: every
  host would hold its own locks, and nothing would be coordinated.
* ``leasehold.W001`` (``--deploy``): ``LEASEHOLD`` names a host-local store
  (``sqlite://``, ``memory://``) explicitly.
"""

from __future__ import annotations

from typing import Any

from django.core import checks

from leasehold._errors import InvalidArgument
from leasehold.django import conf


def _source() -> conf.Source:
    from django.conf import settings
    from django.db import connections

    databases = {alias: connections[alias].settings_dict for alias in connections}
    return conf.read(getattr(settings, conf.SETTING, None), databases)


def check_settings(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    try:
        _source()
    except InvalidArgument as exc:
        return [checks.Error(str(exc), id="leasehold.E001")]
    return []


def check_deploy(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    try:
        source = _source()
    except InvalidArgument:
        return []  # reported by check_settings
    if source.origin == "default":
        return [
            checks.Error(
                "settings.LEASEHOLD is not set and $LEASEHOLD_URL is empty: leases would "
                "live in a SQLite file on this host, so other hosts would not see them",
                hint="set LEASEHOLD = {'DATABASE': 'default'} (PostgreSQL) or "
                "{'URL': 'redis://...'}",
                id="leasehold.E002",
            )
        ]
    if source.host_local:
        return [
            checks.Warning(
                "settings.LEASEHOLD names a host-local store: it coordinates the "
                "processes of one host only",
                hint="use a PostgreSQL or Redis store for a fleet",
                id="leasehold.W001",
            )
        ]
    return []


def register() -> None:
    checks.register(check_settings, "leasehold")
    checks.register(check_deploy, "leasehold", deploy=True)
