"""leasehold for Django: an app, settings, decorators and a management command.

    pip install 'leasehold[django]'

    INSTALLED_APPS = [..., "leasehold.django"]
    LEASEHOLD = {"DATABASE": "default"}     # or {"URL": "redis://..."}

    from leasehold.django import lock, once

    @lock("meeting:{meeting_id}", ttl=60, when_busy="skip")
    def close_meeting(meeting_id): ...

    @once("audio:{text_id}")
    def generate_audio(text_id): ...       # one file, whoever asks at once

``client()`` is the process's :class:`leasehold.Client` for the settings (for
elections, semaphores, presence, fencing). ``manage.py leasehold ls|break|doctor|
run|leader`` is the ``leasehold`` command on the same store. See docs/django.md.
"""

from __future__ import annotations

from leasehold._sync.client import Client
from leasehold.django import _client
from leasehold.django.locks import lock, once

__all__ = ["client", "close", "lock", "once", "store_url"]


def client() -> Client:
    """This process's client for ``settings.LEASEHOLD``, created on first use
    (and again in a forked child)."""
    return _client.get_client()


def store_url() -> str:
    """The store URL the settings give (it may hold a password: never log it)."""
    return _client.source().url


def close() -> None:
    """Close this process's client (releasing its leases); the next ``client()``
    makes a new one from the settings as they are then."""
    _client.reset()
