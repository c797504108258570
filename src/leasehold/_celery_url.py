"""Which store the Celery integration uses: one module for both ``leasehold.celery``
(tasks, workers) and ``leasehold._celery_beat`` (``LeaderScheduler``)."""

from __future__ import annotations

import sys

from leasehold._core.defaults import ENV_URL, configured_url
from leasehold._errors import InvalidArgument


def explicit_url(url: str | None) -> str:
    """``url``, else $LEASEHOLD_URL; never the host-local default SQLite file, with
    which workers on different hosts would not see each other's leases."""
    chosen = url if url is not None else configured_url()
    if chosen is None:
        raise InvalidArgument(
            f"leasehold's Celery integration needs a store URL: set app.conf.leasehold_url "
            f"or {ENV_URL}. The default SQLite file is local to one host, so workers on "
            "other hosts would run the same singleton at once (to use SQLite on "
            "purpose, set leasehold_url = 'sqlite:///PATH')"
        )
    return chosen


def _django_store_url() -> str | None:
    """In a worker of a Django project (settings configured, ``LEASEHOLD`` set):
    the store ``settings.LEASEHOLD`` names, as ``leasehold.django`` uses it."""
    if "django.conf" not in sys.modules:
        return None
    from django.conf import settings

    if not settings.configured or getattr(settings, "LEASEHOLD", None) is None:
        return None
    from leasehold.django import store_url

    return store_url()
