"""How the Redis store reports errors: driver errors become ``StoreUnavailable`` or,
for answers that waiting cannot change, ``StoreMisconfigured``; risky server settings
become warnings. Used by connection.py and store.py."""

from __future__ import annotations

import urllib.parse
from typing import Any, Final

from redis import exceptions as redis_errors

from leasehold._async.backends.redis.options import RedisOptions
from leasehold._errors import StoreMisconfigured, StoreUnavailable

# PEXPIRE ... GT/NX in the scripts.
MIN_REDIS_VERSION: Final = (7, 0)

# Errors of redis-py, of its cluster client (some of which are no RedisError) and of
# sockets: each becomes StoreUnavailable in _translated.
_DRIVER_ERRORS: Final = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)


def _pool_exhausted(exc: BaseException) -> bool:
    """Whether redis-py refused to open another connection (nothing was sent).
    redis-py 6+ raises MaxConnectionsError (without a message from the asyncio
    cluster client), older versions a ConnectionError saying so."""
    exhausted = getattr(redis_errors, "MaxConnectionsError", None)
    return (exhausted is not None and isinstance(exc, exhausted)) or (
        "Too many connections" in str(exc)
    )


def _scrub(options: RedisOptions, text: str) -> str:
    password = options.password
    if password:
        for secret in {password, urllib.parse.quote(password, safe="")}:
            text = text.replace(secret, "***")
    return text


def unavailable(
    redacted_url: str, options: RedisOptions, doing: str, exc: BaseException
) -> StoreUnavailable:
    """The one place a redis-py (or socket/TLS) error becomes a leasehold error."""
    detail = str(exc) or type(exc).__name__
    # Answers that waiting cannot change: StoreMisconfigured, never retried.
    misconfigured = True
    if isinstance(exc, redis_errors.AuthenticationError) or "WRONGPASS" in detail:
        detail = f"authentication failed: check the user name and password in the URL ({detail})"
    elif isinstance(exc, redis_errors.NoPermissionError) or "can't run this command" in detail:
        detail = f"the Redis user lacks a permission (see the ACL in the docs): {detail}"
    elif "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail:
        detail = f"TLS certificate verification failed (check ssl_ca_certs): {detail}"
    elif isinstance(exc, redis_errors.ReadOnlyError):
        detail = f"connected to a read-only replica: {detail}"
    elif "DB index is out of range" in detail or "invalid DB index" in detail:
        detail = f"the database number in the URL does not exist on the server: {detail}"
    elif "Cluster mode is not enabled" in detail:
        # redis-py says so both for a standalone server and for an ACL user
        # that may not read the slot map.
        detail = (
            "the seed node is not a cluster node (use redis:// for a standalone "
            "server), or the Redis user lacks +cluster|slots and +command: "
            f"{detail}"
        )
    else:
        misconfigured = False
    if misconfigured:
        pass  # explained above
    elif isinstance(exc, redis_errors.TimeoutError):
        detail = f"no reply within {options.socket_timeout:g} s: {detail}"
    elif isinstance(exc, redis_errors.OutOfMemoryError):
        detail = f"Redis is out of memory (maxmemory): {detail}"
    elif isinstance(exc, redis_errors.BusyLoadingError):
        detail = f"Redis is still loading its data set: {detail}"
    elif isinstance(exc, redis_errors.ClusterDownError | redis_errors.SlotNotCoveredError):
        detail = f"the Redis Cluster is down or a slot has no master: {detail}"
    # Only the driver's text is scrubbed: the URL is redacted already, and a short
    # password would otherwise also be blotted out of the user name.
    kind = StoreMisconfigured if misconfigured else StoreUnavailable
    return kind(f"redis store {redacted_url}: {doing} failed: {_scrub(options, detail)}")


class _Translated:
    """``with store._translated(doing):`` turns a driver error into the store's
    (``_unavailable``). A class, not a generator-based context manager: it runs
    around every store call."""

    __slots__ = ("_doing", "_store")

    def __init__(self, store: Any, doing: str) -> None:
        self._store = store
        self._doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if exc is not None and isinstance(exc, _DRIVER_ERRORS):
            # `from None`: the driver's exception may carry connection details;
            # what matters is already in the message.
            raise self._store._unavailable(self._doing, exc) from None


def _server_warnings(facts: dict[str, Any]) -> list[str]:
    """What is risky in one server's INFO."""
    found: list[str] = []
    policy = facts.get("maxmemory_policy")
    if policy not in (None, "noeviction"):
        found.append(
            f"maxmemory-policy is {policy}: under memory pressure Redis may evict "
            "lease keys and grant a held lease again; use noeviction"
        )
    if facts.get("aof_enabled") == 0:
        found.append(
            "persistence is off (appendonly no): a restart forgets every lease; "
            "holders learn it at their next renewal and fences stay increasing"
        )
    if facts.get("role") == "slave":
        found.append("connected to a replica: writes will fail")
    too_old = _too_old(facts)
    if too_old is not None:
        found.append(too_old)
    return found


def _too_old(info: dict[str, Any]) -> str | None:
    """Why the server of this INFO is too old for leasehold, or None."""
    version = str(info.get("redis_version", ""))
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if len(numbers) == 2 and numbers < MIN_REDIS_VERSION:
        return f"Redis {version} is too old: leasehold needs 7.0 or newer"
    return None
