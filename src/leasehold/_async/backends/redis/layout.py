"""Where each name's keys live (buckets, hash tags) and which cluster slot serves them."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Final

from redis.crc import key_slot

from leasehold._async.backends.redis.options import DEFAULT_PREFIX

# Part of the key layout: changing it moves every name to other keys, so two
# versions with different values would not see each other's leases.
BUCKETS: Final = 1024


# -------------------------------------------------------------------- key layout


@dataclass(frozen=True, slots=True)
class NameKeys:
    """The keys of one lease name (all in one cluster slot)."""

    state: str  # MessagePack: limit hint, holders, index mark (see _prelude.lua)
    floor: str  # per bucket: highest fence issued
    index: str  # per bucket: zset name -> latest holder expiry_us
    queue: str  # zset token -> arrival
    queue_expiry: str  # zset token -> queue expiry_us
    queue_info: str  # hash token -> "<limit> <ttl_us> <holder json>"
    signal_prefix: str  # + token: a waiter's signal list

    def script_keys(self) -> list[str]:
        """KEYS[1..6] of acquire.lua, release.lua and break.lua, in order."""
        return [
            self.state,
            self.floor,
            self.index,
            self.queue,
            self.queue_expiry,
            self.queue_info,
        ]

    def signal(self, token: str) -> str:
        return self.signal_prefix + token


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Where a name's state lives: ``<prefix>{<bucket>}:<kind>:<name>``.

    The hash tag is the bucket number, not the name: names may contain braces, and
    a bounded number of tags keeps the per-bucket fence floors and name indexes
    bounded too. The bucket is CRC-32 of the UTF-8 name modulo ``BUCKETS``.
    """

    prefix: str = DEFAULT_PREFIX

    @staticmethod
    def bucket(name: str) -> int:
        return zlib.crc32(name.encode("utf-8")) % BUCKETS

    def tag(self, bucket: int) -> str:
        return f"{self.prefix}{{{bucket}}}"

    def for_name(self, name: str) -> NameKeys:
        return _name_keys(self, name)

    def _for_name(self, name: str) -> NameKeys:
        tag = self.tag(self.bucket(name))
        # The name's byte length makes "<name>:<token>" unambiguous when either
        # contains ':'.
        size = len(name.encode("utf-8"))
        return NameKeys(
            state=f"{tag}:n:{name}",
            floor=f"{tag}:fence",
            index=f"{tag}:index",
            queue=f"{tag}:qa:{name}",
            queue_expiry=f"{tag}:qe:{name}",
            queue_info=f"{tag}:qi:{name}",
            signal_prefix=f"{tag}:w:{size}:{name}:",
        )

    def for_record(self, key: str) -> tuple[str, str]:
        """The record's own key and the fence floor its versions are drawn from.
        Records are a namespace apart from lease names (kind ``r``)."""
        tag = self.tag(self.bucket(key))
        return f"{tag}:r:{key}", f"{tag}:fence"

    def indexes(self) -> list[str]:
        """The name index of every bucket, bucket 0 first (KEYS of leases.lua)."""
        return [f"{self.tag(bucket)}:index" for bucket in range(BUCKETS)]


@lru_cache(maxsize=4096)
def _name_keys(layout: KeyLayout, name: str) -> NameKeys:
    # Hot names are few: computing their keys (CRC-32, four strings) once each
    # takes that work off every acquire and release.
    return layout._for_name(name)


@cache
def _bucket_slot(bucket: int) -> int:
    # The bucket number is the hash tag of every key of the bucket (see KeyLayout).
    return key_slot(str(bucket).encode())


def _node_name(connection: Any) -> str:
    # redis-py's name of a cluster node ("host:port"), from one of its connections.
    return f"{connection.host}:{connection.port}"
