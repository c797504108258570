"""The PostgreSQL backend.

``options`` (the URL), ``schema`` (schema.sql and its queries), ``waiting`` (wake-up
keys, waiters, the announcement listener), ``connection`` (pool, fork safety,
installation, calls), ``store`` (the store operations), ``relaxed`` (the stores of
``?durability=relaxed``), ``listener`` (LISTEN, hand-written per flavour).
"""

from leasehold._async.backends.postgres.options import PostgresOptions, parse_options
from leasehold._async.backends.postgres.relaxed import (
    AsyncRelaxedPooledPostgresStore,
    AsyncRelaxedPostgresStore,
)
from leasehold._async.backends.postgres.store import (
    AsyncPooledPostgresStore,
    AsyncPostgresStore,
    from_url,
)

__all__ = [
    "AsyncPooledPostgresStore",
    "AsyncPostgresStore",
    "AsyncRelaxedPooledPostgresStore",
    "AsyncRelaxedPostgresStore",
    "PostgresOptions",
    "from_url",
    "parse_options",
]
