"""The Redis backend (standalone and Cluster).

``options`` (the URL), ``layout`` (keys, buckets, cluster slots), ``scripts`` (Lua
loading), ``connection`` (pools, cluster client, error translation, listener),
``waiting`` (``wait``: BLPOP on a waiter's signal list), ``store`` (the store
operations), ``io`` and ``pubsub`` (hand-written per flavour).
"""

from leasehold._async.backends.redis.options import RedisOptions, parse_options
from leasehold._async.backends.redis.store import AsyncRedisStore, from_url

__all__ = ["AsyncRedisStore", "RedisOptions", "from_url", "parse_options"]
