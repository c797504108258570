"""Ending a lease when the surrounding database transaction ends, not before.

A lock released inside ``transaction.atomic()`` lets the next holder in before the
writes it guarded are visible: it reads the old rows and the update is lost.
``after_transaction(fn, using)`` runs ``fn`` when the transaction commits --
and at once when it rolls back.

Django has no rollback hook. It keeps ``on_commit`` callbacks in a list that a
rollback (of the whole transaction, or of the savepoint they were registered
in) throws away. The callback registered here is a small object whose
``weakref.finalize`` runs when the last reference goes: after it ran (commit),
or the moment Django drops it (rollback). Either way ``fn`` runs exactly once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

logger = logging.getLogger("leasehold.django")


def _finish(fn: Callable[[bool], None], state: list[bool]) -> None:
    try:
        fn(state[0])
    except Exception:  # a finalizer cannot raise to anyone: say it loudly instead
        logger.exception("leasehold: ending a lease after the transaction failed")


def in_atomic_block(using: str | None) -> bool:
    from django.db import transaction

    return bool(transaction.get_connection(using).in_atomic_block)


def after_transaction(fn: Callable[[bool], None], using: str | None) -> None:
    """Run ``fn(committed)`` once the current transaction of ``using`` ends.

    ``committed`` is True after a commit, False after a rollback. Outside an
    atomic block ``fn(True)`` runs at once (autocommit: the writes are visible).
    """
    from django.db import transaction

    if not in_atomic_block(using):
        fn(True)
        return
    state = [False]
    # The finalizer holds ``state``, never the callback: it fires when Django drops
    # the callback after running it (commit) or without running it (rollback).
    callback = _Callback(state)
    weakref.finalize(callback, _finish, fn, state)
    transaction.on_commit(callback, using=using)


class _Callback:
    """What Django keeps in its on_commit list: a plain callable object, so a
    weakref finalizer can watch its lifetime."""

    __slots__ = ("__weakref__", "_state")

    def __init__(self, state: list[bool]) -> None:
        self._state = state

    def __call__(self) -> None:
        self._state[0] = True  # committed; the finalizer runs fn when Django drops us
