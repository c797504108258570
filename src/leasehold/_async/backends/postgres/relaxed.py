"""``?durability=relaxed``: the PostgreSQL store whose grants commit without waiting
for their WAL flush (schema version 6, docs/backends.md "Relaxed durability").

The store operations are the same; only the functions called differ (the
``*_relaxed`` twins, chosen in ``schema._function_queries``) and so do the
capabilities, which are class data: hence a subclass per pooler mode.
"""

from __future__ import annotations

from dataclasses import replace

from leasehold._async.backends.postgres.store import (
    _RELAXED_CLASSES,
    AsyncPooledPostgresStore,
    AsyncPostgresStore,
)

_RELAXED_NOTES = (
    "?durability=relaxed: grants, renewals and releases commit without waiting for "
    "their WAL flush; a crash may lose the last of them",
    "after a crash (found by an UNLOGGED marker table PostgreSQL empties in recovery) "
    "fences jump above every fence handed out, and nothing is granted for the "
    "longest ttl ever asked for (quarantine)",
)


class AsyncRelaxedPostgresStore(AsyncPostgresStore):
    """``AsyncPostgresStore`` with ``?durability=relaxed``."""

    capabilities = replace(
        AsyncPostgresStore.capabilities,
        durable=False,
        notes=(*AsyncPostgresStore.capabilities.notes, *_RELAXED_NOTES),
    )


class AsyncRelaxedPooledPostgresStore(AsyncPooledPostgresStore):
    """``AsyncPooledPostgresStore`` (``?pooler=transaction``) with ``?durability=relaxed``."""

    capabilities = replace(
        AsyncPooledPostgresStore.capabilities,
        durable=False,
        notes=(*AsyncPooledPostgresStore.capabilities.notes, *_RELAXED_NOTES),
    )


_RELAXED_CLASSES[:] = [AsyncRelaxedPostgresStore, AsyncRelaxedPooledPostgresStore]
