"""Fenced writes for Redis: one Lua script checks the fence and applies the writes.

The script (``leasehold/_shared/redis/fenced_write.lua``) states its KEYS/ARGV contract.
Keys travel as KEYS and values as ARGV; nothing the caller passes is ever spliced
into the script text, and only the allow-listed commands below can run.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias

from leasehold._core import validate
from leasehold._errors import InvalidArgument, StaleFence
from leasehold.fence import _sql

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

    SyncRedis: TypeAlias = redis.Redis | redis.cluster.RedisCluster
    AsyncRedis: TypeAlias = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

DEFAULT_KEY_PREFIX = "leasehold:fence:"

Arg: TypeAlias = str | bytes | int | float
Command: TypeAlias = Sequence[Arg]

# name -> (fewest arguments, most arguments or None, do all arguments name keys).
# Arguments count everything after the command name, the key included. Checking
# arity here matters: Redis has no rollback, so a command that fails half-way
# through a batch leaves the earlier ones applied.
_COMMANDS: dict[str, tuple[int, int | None, bool]] = {
    "SET": (2, None, False),
    "SETNX": (2, 2, False),
    "SETEX": (3, 3, False),
    "PSETEX": (3, 3, False),
    "GETSET": (2, 2, False),
    "GETDEL": (1, 1, False),
    "APPEND": (2, 2, False),
    "SETRANGE": (3, 3, False),
    "INCR": (1, 1, False),
    "INCRBY": (2, 2, False),
    "INCRBYFLOAT": (2, 2, False),
    "DECR": (1, 1, False),
    "DECRBY": (2, 2, False),
    "HSET": (3, None, False),
    "HSETNX": (3, 3, False),
    "HDEL": (2, None, False),
    "HINCRBY": (3, 3, False),
    "HINCRBYFLOAT": (3, 3, False),
    "LPUSH": (2, None, False),
    "RPUSH": (2, None, False),
    "LPOP": (1, 2, False),
    "RPOP": (1, 2, False),
    "LREM": (3, 3, False),
    "LSET": (3, 3, False),
    "LTRIM": (3, 3, False),
    "SADD": (2, None, False),
    "SREM": (2, None, False),
    "ZADD": (3, None, False),
    "ZREM": (2, None, False),
    "ZINCRBY": (3, 3, False),
    "XADD": (4, None, False),
    "EXPIRE": (2, 3, False),
    "PEXPIRE": (2, 3, False),
    "EXPIREAT": (2, 3, False),
    "PEXPIREAT": (2, 3, False),
    "PERSIST": (1, 1, False),
    "DEL": (1, None, True),
    "UNLINK": (1, None, True),
}

ALLOWED_COMMANDS = frozenset(_COMMANDS)


@cache
def _script() -> tuple[str, str]:
    """The script's source and SHA1, read once from the package data."""
    path = resources.files("leasehold").joinpath("_shared", "redis", "fenced_write.lua")
    source = path.read_text(encoding="utf-8")
    return source, hashlib.sha1(source.encode()).hexdigest()


def _key(value: object, where: str) -> str | bytes:
    if not isinstance(value, (str, bytes)) or not value:
        raise InvalidArgument(f"{where}: a key must be a non-empty str or bytes, got {value!r}")
    return value


def _value(value: object, where: str) -> Arg:
    if isinstance(value, bool) or not isinstance(value, (str, bytes, int, float)):
        raise InvalidArgument(
            f"{where}: values must be str, bytes, int or float, got {type(value).__name__}"
        )
    return value


def encode(
    name: str, fence: int, commands: object, key_prefix: str
) -> tuple[list[str | bytes], list[Arg]]:
    """Validate the batch and lay it out as the script's KEYS and ARGV."""
    if isinstance(commands, (str, bytes)) or not isinstance(commands, Sequence):
        raise InvalidArgument(
            "commands must be a list of command tuples such as [('SET', 'key', 'value')]"
        )
    fence_key = key_prefix + name
    keys: list[str | bytes] = [fence_key]
    args: list[Arg] = [str(fence), len(commands)]
    for index, command in enumerate(commands):
        where = f"commands[{index}]"
        if isinstance(command, (str, bytes)) or not isinstance(command, Sequence) or not command:
            raise InvalidArgument(
                f"{where} must be a non-empty tuple like ('SET', key, value), got {command!r}"
            )
        verb = command[0]
        if not isinstance(verb, str) or verb.upper() not in _COMMANDS:
            raise InvalidArgument(
                f"{where}: command {verb!r} is not allowed; allowed: "
                + ", ".join(sorted(_COMMANDS))
            )
        verb = verb.upper()
        fewest, most, all_keys = _COMMANDS[verb]
        rest = list(command[1:])
        if len(rest) < fewest or (most is not None and len(rest) > most):
            wanted = f"{fewest}" if most == fewest else f"at least {fewest}"
            if most is not None and most != fewest:
                wanted = f"{fewest} to {most}"
            raise InvalidArgument(f"{where}: {verb} takes {wanted} arguments, got {len(rest)}")
        if verb == "HSET" and len(rest) % 2 == 0:
            raise InvalidArgument(f"{where}: HSET takes a key and field/value pairs")
        command_keys = [_key(k, where) for k in (rest if all_keys else rest[:1])]
        command_args = [] if all_keys else [_value(v, where) for v in rest[1:]]
        for k in command_keys:
            if k in (fence_key, fence_key.encode()):
                raise InvalidArgument(f"{where}: commands may not write the fence key {k!r}")
        keys.extend(command_keys)
        args.extend([verb, len(command_keys), len(command_args), *command_args])
    return keys, args


def _check_slots(client: object, keys: list[str | bytes]) -> None:
    """In a cluster every key of one script must live in one hash slot; say how."""
    cluster_types: list[type] = []
    if "redis.cluster" in sys.modules:
        import redis.cluster

        cluster_types.append(redis.cluster.RedisCluster)
    if "redis.asyncio.cluster" in sys.modules:
        import redis.asyncio.cluster

        cluster_types.append(redis.asyncio.cluster.RedisCluster)
    if not isinstance(client, tuple(cluster_types)):
        return
    from redis.crc import key_slot

    slots = {key_slot(k.encode() if isinstance(k, str) else k) for k in keys}
    if len(slots) > 1:
        raise InvalidArgument(
            "in Redis Cluster the fence key and every data key must share a hash slot: "
            "put the same hash tag in the lease name and the keys, e.g. name "
            "'{order:42}' (fence key 'leasehold:fence:{order:42}') with keys "
            "'{order:42}:total'"
        )


def _result(reply: Any, name: str, fence: int) -> list[Any]:
    if int(reply[0]) == 1:
        return list(reply[1])
    raise StaleFence(name, fence, int(reply[1]))


def _prepare(
    name: str, fence: int, commands: object, key_prefix: str
) -> tuple[str, int, list[str | bytes], list[Arg]]:
    name = validate.name(name)
    fence = _sql.fence(fence)  # the same bound as SQL, so a fence works everywhere
    prefix = validate.prefix(key_prefix)
    keys, args = encode(name, fence, commands, prefix)
    return name, fence, keys, args


def redis_write(
    client: SyncRedis,
    name: str,
    fence: int,
    commands: Sequence[Command],
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
) -> list[Any]:
    """Apply ``commands`` atomically if ``fence`` is not stale, and record it.

    ``commands`` are simple writes such as ``("SET", key, value)``,
    ``("HSET", key, field, value)``, ``("INCRBY", key, n)``, ``("DEL", key)``,
    ``("RPUSH", key, v, ...)``, ``("EXPIRE", key, seconds)``. The highest fence for
    ``name`` is kept under ``key_prefix + name`` (never expiring). In Redis Cluster
    that key and the data keys must share a hash slot: use a hash tag in the name.

    Returns the commands' replies, in order.

    Raises:
        StaleFence: a higher fence was already seen; nothing was written.
        InvalidArgument: bad client type, name, fence, key prefix or commands.
    """
    name, fence, keys, args = _prepare(name, fence, commands, key_prefix)
    obj: object = client
    if "redis.asyncio" in sys.modules:
        import redis.asyncio
        import redis.asyncio.cluster

        if isinstance(obj, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)):
            raise InvalidArgument(
                "redis.asyncio clients need `await leasehold.fence.redis_write_async(...)`"
            )
    sync_client = _sync_client(obj)
    _check_slots(sync_client, keys)
    from redis.exceptions import NoScriptError

    source, sha = _script()
    try:
        reply = sync_client.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        # First use on this server (or after SCRIPT FLUSH / restart): EVAL loads it.
        reply = sync_client.eval(source, len(keys), *keys, *args)
    return _result(reply, name, fence)


def _sync_client(obj: object) -> SyncRedis:
    if "redis" in sys.modules:
        import redis
        import redis.client
        import redis.cluster

        # A pipeline would only queue the script, and its reply is not ours to read.
        if isinstance(obj, (redis.client.Pipeline, redis.cluster.ClusterPipeline)):
            raise InvalidArgument(
                "pass the Redis client, not a pipeline: the fenced write is one script "
                "and is atomic on its own"
            )
        if isinstance(obj, (redis.Redis, redis.cluster.RedisCluster)):
            return obj
    raise InvalidArgument(
        f"unsupported Redis client {type(obj).__module__}.{type(obj).__qualname__}; "
        "pass a redis.Redis or redis.cluster.RedisCluster"
    )


async def redis_write_async(
    client: AsyncRedis,
    name: str,
    fence: int,
    commands: Sequence[Command],
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
) -> list[Any]:
    """The async twin of :func:`redis_write` for ``redis.asyncio`` clients."""
    name, fence, keys, args = _prepare(name, fence, commands, key_prefix)
    obj: object = client
    async_client: AsyncRedis | None = None
    if "redis.asyncio" in sys.modules:
        import redis.asyncio
        import redis.asyncio.client
        import redis.asyncio.cluster

        if isinstance(obj, (redis.asyncio.client.Pipeline, redis.asyncio.cluster.ClusterPipeline)):
            raise InvalidArgument(
                "pass the Redis client, not a pipeline: the fenced write is one script "
                "and is atomic on its own"
            )
        if isinstance(obj, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)):
            async_client = obj
    if async_client is None:
        raise InvalidArgument(
            f"unsupported Redis client {type(obj).__module__}.{type(obj).__qualname__}; "
            "pass a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster "
            "(use leasehold.fence.redis_write for sync clients)"
        )
    _check_slots(async_client, keys)
    from redis.exceptions import NoScriptError

    source, sha = _script()
    try:
        reply = await async_client.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        reply = await async_client.eval(source, len(keys), *keys, *args)
    return _result(reply, name, fence)
