"""The project's one leasehold client per process.

Created lazily on first use, so that neither ``manage.py`` commands that never
lock nor the autoreloader's parent process connect anywhere; keyed by pid, so a
process forked by gunicorn, Celery prefork or ``multiprocessing`` builds its own
instead of sharing its parent's sockets; closed at interpreter exit (releasing
what it still holds) and when ``settings.LEASEHOLD`` changes (tests'
``override_settings``).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

from leasehold._sync.client import Client
from leasehold.django import conf

logger = logging.getLogger("leasehold.django")

_guard = threading.Lock()
_client: Client | None = None
_client_pid: int | None = None
_source: conf.Source | None = None


def _after_fork_in_child() -> None:
    global _guard, _client, _client_pid
    _guard = threading.Lock()  # a lock held at fork time stays held in the child
    # The parent's client belongs to the parent: the child never uses or closes it.
    _client, _client_pid = None, None


os.register_at_fork(after_in_child=_after_fork_in_child)


def source() -> conf.Source:
    """Where the store is, from the current settings (cached until they change)."""
    global _source
    found = _source
    if found is None:
        from django.conf import settings
        from django.db import connections

        databases = {alias: connections[alias].settings_dict for alias in connections}
        found = _source = conf.read(getattr(settings, conf.SETTING, None), databases)
    return found


def get_client() -> Client:
    """This process's client for ``settings.LEASEHOLD``, created on first use."""
    global _client, _client_pid
    with _guard:
        client = _client
        if client is not None and _client_pid == os.getpid():
            return client
        where = source()
        client = Client(where.url, identity=where.identity)
        _client, _client_pid = client, os.getpid()
        logger.debug("leasehold client for %s (from %s)", client.url, where.origin)
        return client


def reset() -> None:
    """Close this process's client (releasing its leases); the next use makes a
    new one from the settings as they are then."""
    global _client, _client_pid, _source
    with _guard:
        client, pid = _client, _client_pid
        _client, _client_pid, _source = None, None, None
    if client is not None and pid == os.getpid():
        try:
            client.close()
        except Exception as exc:  # at exit or in a settings change: report, go on
            logger.warning("closing the leasehold client failed: %s", exc)


atexit.register(reset)
