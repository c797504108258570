"""The Redis backend (standalone and Cluster): options, scripts, store operations, pub/sub."""

from leasehold._async.backends.redis.store import (
    AsyncRedisStore,
    RedisOptions,
    from_url,
    parse_options,
)

__all__ = ["AsyncRedisStore", "RedisOptions", "from_url", "parse_options"]
