"""Django signals of leasehold.django: a skip is never silent.

``lease_skipped`` is sent (``sender`` = the decorated function, ``name`` = the
lease name, ``holders`` = who held it) whenever ``lock(..., when_busy="skip")``
skipped a call because another holder had the lease.
"""

from __future__ import annotations

from django.dispatch import Signal

lease_skipped = Signal()

__all__ = ["lease_skipped"]
