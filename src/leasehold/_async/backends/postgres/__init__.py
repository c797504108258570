"""The PostgreSQL backend: options, schema and migrations, store operations, listener."""

from leasehold._async.backends.postgres.store import (
    AsyncPooledPostgresStore,
    AsyncPostgresStore,
    PostgresOptions,
    from_url,
    parse_options,
)

__all__ = [
    "AsyncPooledPostgresStore",
    "AsyncPostgresStore",
    "PostgresOptions",
    "from_url",
    "parse_options",
]
