"""``redis://``, ``rediss://`` (TLS), ``unix://`` and, for a Redis Cluster,
``redis+cluster://`` and ``rediss+cluster://``: Redis 7.0+ through redis-py.

Every store operation is one Lua script call: one round trip, atomic on the server,
with expiry decided by the server's clock (``TIME`` inside the script). The scripts
live in ``leasehold/_shared/redis``; each states its KEYS, ARGV and reply. A
standalone server runs them as the functions of one library (``FCALL``), a cluster
as scripts (``EVALSHA``): see ``scripts.py``.

Layout (see ``KeyLayout``; docs/backends.md (Redis) has the whole story):

* A name hashes to one of ``BUCKETS`` buckets. Every key of the name, and its
  bucket's fence floor and name index, carry the bucket as their hash tag, so one
  script call touches one cluster slot and names may contain any character.
* Fences are ``max(bucket floor + 1, server time in microseconds)``: strictly
  increasing while Redis keeps its data, and still increasing after it loses it.
* Waiters block on a signal list of their own (``BLPOP``, on connections reserved
  for blocking calls); a release hands its place to the first waiter in the same
  script and pushes to that waiter's list only.
* The server's ``run_id`` (restart detection) is read once per connection, not per
  script: see ``_stamp``. In a cluster, once per node: a grant is stamped with the
  run_id of the node that owns its name's slot.
* In a cluster, redis-py's cluster client routes each script by its keys and
  follows MOVED and ASK. The two operations that span buckets are split per slot
  and pipelined (one round trip per node): a renewal batch, and ``leases()``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Final

from redis import exceptions as redis_errors

from leasehold._async._concurrency import cancellations, resume_cancellation, sleep
from leasehold._async.backends.redis.connection import (
    _POOL_POLL,
    _SCRIPT_ATTEMPTS,
    _Connections,
)
from leasehold._async.backends.redis.errors import _DRIVER_ERRORS, _server_warnings
from leasehold._async.backends.redis.layout import KeyLayout, _bucket_slot
from leasehold._async.backends.redis.options import parse_options
from leasehold._async.backends.redis.scripts import _Script, _script
from leasehold._async.backends.redis.waiting import RedisWaiting
from leasehold._async.store import (
    AsyncSubscription,
    HubSubscription,
)
from leasehold._core import validate
from leasehold._core.clock import Clock
from leasehold._core.records import (
    MAX_RECORD_BYTES,
    AcquireRequest,
    AcquireResult,
    Busy,
    Capabilities,
    Granted,
    Holder,
    HolderInfo,
    Record,
    RenewItem,
    WaiterInfo,
)
from leasehold._core.url import StoreURL
from leasehold._errors import InvalidArgument, StoreUnavailable

# renew() sends its items in scripts of at most this many, pipelined in one round
# trip, so that no single script blocks Redis for long (10,000 items: ~50 ms each
# instead of one ~500 ms script).
RENEW_CHUNK: Final = 1000


@lru_cache(maxsize=256)
def _holder_json(holder: Holder) -> str:
    return json.dumps(
        [holder.owner, holder.host, holder.pid], ensure_ascii=False, separators=(",", ":")
    )


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


def _value_bytes(value: str | bytes) -> bytes:
    """Undo the lossless decoding of a record value (decode_responses + surrogateescape)."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _holder_info(name: str, now: int, expiry: int, meta: str) -> HolderInfo:
    fence, acquired, limit, _run_id, holder = meta.split(" ", 4)
    owner, host, pid = json.loads(holder)
    return HolderInfo(
        name=name,
        owner=str(owner),
        host=str(host),
        pid=int(pid),
        fence=int(fence),
        limit=int(limit),
        held_for=max(0.0, (now - int(acquired)) / 1e6),
        expires_in=max(0.0, (int(expiry) - now) / 1e6),
    )


def _waiter_infos(now: int, triples: Sequence[Any]) -> list[WaiterInfo]:
    """waiters.lua's (name, queue expiry, "<limit> <ttl_us> <holder json>") triples,
    each name's in queue order, as WaiterInfo with 0-based positions."""
    infos: list[WaiterInfo] = []
    for i in range(0, len(triples), 3):
        name, expiry, info = str(triples[i]), int(triples[i + 1]), str(triples[i + 2])
        owner, host, pid = "", "", 0
        if info:
            owner, host, pid = json.loads(info.split(" ", 2)[2])
        position = infos[-1].position + 1 if infos and infos[-1].name == name else 0
        infos.append(
            WaiterInfo(
                name=name,
                owner=str(owner),
                host=str(host),
                pid=int(pid),
                position=position,
                expires_in=max(0.0, (expiry - now) / 1e6),
            )
        )
    return infos


class AsyncRedisStore(RedisWaiting):
    capabilities = Capabilities(
        server_clock=True,
        # Depends on the server: appendonly yes + appendfsync always keeps grants.
        durable=False,
        cross_host=True,
        notifications=True,
        fence_survives_data_loss=True,
        hand_over=True,
        notes=(
            "durable only with appendonly yes and appendfsync always",
            "fences stay increasing after data loss unless the server clock stepped back across it",
            "leases granted before a restart or failover are reported lost at their next renewal",
            "maxmemory-policy must be noeviction",
        ),
        announcements=True,
        cancels_cleanly=True,
    )

    # -- the contract --------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        keys = self.keys.for_name(request.name)
        holder = _holder_json(request.holder)
        queue_ttl = "" if request.queue_ttl is None else _us(request.queue_ttl)
        connections = self._connect()
        for attempt in range(3):
            stamp = await self._stamp(connections, keys.state, "acquire")
            reply = await self._run(
                "acquire",
                keys.script_keys(),
                [
                    request.name,
                    keys.signal_prefix,
                    request.token,
                    _us(request.ttl),
                    request.limit,
                    queue_ttl,
                    holder,
                    stamp.run_id,
                ],
                connections,
            )
            granted = isinstance(reply, list) and bool(reply) and reply[0] == 1
            # A connection made during the call may have met a restarted server, or
            # (cluster) the name's slot may have moved to another node, so the grant
            # may carry the wrong run_id: acquire again (idempotent for a holder:
            # same fence) to stamp the right one.
            if (
                not granted
                or attempt == 2
                or self._stamp_is_current(connections, keys.state, stamp)
            ):
                break
        try:
            if reply[0] == 1:
                return Granted(fence=int(reply[1]))
            retry_after, position = int(reply[1]), int(reply[2])
        except (TypeError, ValueError, IndexError):
            raise self._malformed("acquire", reply) from None
        return Busy(
            retry_after=None if retry_after < 0 else retry_after / 1e6,
            position=None if position < 0 else position,
        )

    async def renew(self, items: Sequence[RenewItem]) -> list[bool | None]:
        if not items:
            return []
        # Scripts of at most RENEW_CHUNK items, so that no one script blocks Redis
        # for long; all of them in one pipelined round trip (in a cluster, one per
        # node, all nodes at once). Each item is renewed atomically on its own,
        # which is all the contract asks.
        batches = self._renew_batches(items)
        calls: list[tuple[list[str], list[str | int]]] = []
        for positions in batches:
            keys: list[str] = []
            args: list[str | int] = []
            for position in positions:
                item = items[position]
                name_keys = self.keys.for_name(item.name)
                keys += (name_keys.state, name_keys.index)
                args += (item.name, item.token, _us(item.ttl))
            calls.append((keys, args))
        if len(calls) == 1:
            replies = [await self._run("renew", *calls[0])]
        else:
            # In a cluster, a node that does not answer leaves its items unanswered
            # (None) rather than failing the whole batch: the keeper retries them,
            # and the leases kept on the other nodes are renewed meanwhile.
            replies = await self._run_many("renew", calls, partial=self.options.cluster)
        answers: list[bool | None] = [None] * len(items)
        refused: list[str] = []  # a key of each script call with a refusal
        stale: list[str] = []  # ... with a grant stamped by an earlier server process
        for reply, positions, (keys, _args) in zip(replies, batches, calls, strict=True):
            if reply is None:
                continue
            if not isinstance(reply, list) or len(reply) != len(positions):
                raise self._malformed("renew", reply)
            for position, answer in zip(positions, reply, strict=True):
                answers[position] = answer == 1
            if any(answer != 1 for answer in reply):
                refused.append(keys[0])
            if any(answer == 2 for answer in reply):
                stale.append(keys[0])
        if refused:
            await self._notice_restarts(refused, stale)
        return answers

    async def _notice_restarts(self, refused: Sequence[str], stale: Sequence[str]) -> None:
        """After refused renewals: find out whether their servers restarted, so the
        holders are told why (``restarts()``). A grant stamped by an earlier server
        process (renew.lua answered 2) is proof; without persistence the grant is
        simply gone, and a changed run_id (read again, as every connection to a
        restarted server is new) tells. Best effort: the refusal stands anyway."""
        connections = self._connect()
        for key in stale:
            where, _target = await self._owner(connections, key)
            self._count_restart(where)
        for key in refused:
            try:
                await self._stamp(connections, key, "INFO server")
            except StoreUnavailable:
                return

    def _renew_batches(self, items: Sequence[RenewItem]) -> list[list[int]]:
        """The items of each renew.lua call, as positions in ``items``: chunks of
        RENEW_CHUNK in order; in a cluster, where a script's keys must share one
        slot, chunks of the items of each slot."""
        if self.options.cluster:
            by_slot: dict[int, list[int]] = {}
            for position, item in enumerate(items):
                slot = _bucket_slot(KeyLayout.bucket(item.name))
                by_slot.setdefault(slot, []).append(position)
            groups = list(by_slot.values())
        else:
            groups = [list(range(len(items)))]
        return [
            group[start : start + RENEW_CHUNK]
            for group in groups
            for start in range(0, len(group), RENEW_CHUNK)
        ]

    async def _run_many(
        self,
        name: str,
        calls: Sequence[tuple[Sequence[str], Sequence[str | int]]],
        *,
        partial: bool = False,
    ) -> list[Any]:
        """Run one script once per (keys, args) in one pipelined round trip (in a
        cluster, redis-py's pipeline sends each node its calls, all nodes at once).
        ``partial``: if that fails, run each node's calls on their own, and answer
        None for the calls of a node that fails too (unless every node failed)."""
        script = _script(name)
        connections = self._connect()
        with self._translated(name):
            try:
                replies = await self._pipelined(connections, script, calls)
            except _DRIVER_ERRORS:
                if not partial:
                    raise
                replies = await self._pipelined_per_node(connections, script, calls)
            for _attempt in range(1, _SCRIPT_ATTEMPTS):
                # As in _run: the calls that met NOSCRIPT (or no function, or FCALL
                # refused) did not run, so load what they need and run them again.
                missing = [i for i, reply in enumerate(replies) if self._script_not_run(reply)]
                if not missing:
                    break
                await self._load_script(
                    connections, script, [calls[i][0][0] for i in missing], replies[missing[0]]
                )
                again = await self._pipelined(connections, script, [calls[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def _pipelined_per_node(
        self,
        connections: _Connections,
        script: _Script,
        calls: Sequence[tuple[Sequence[str], Sequence[str | int]]],
    ) -> list[Any]:
        """``calls`` as one pipeline per node, one node after another: the replies,
        with None for the calls of a node that failed. Raises if every node failed.
        (redis-py fails a cluster pipeline as a whole when one node cannot be
        reached.) A node that refuses connections costs nothing; one that does not
        answer at all costs its socket_connect_timeout once per renewal round."""
        by_node: dict[str, list[int]] = {}
        for index, (keys, _args) in enumerate(calls):
            where, _target = await self._owner(connections, keys[0])
            by_node.setdefault(where, []).append(index)
        replies: list[Any] = [None] * len(calls)
        failure: BaseException | None = None
        for indices in by_node.values():
            try:
                part = await self._pipelined(
                    connections, script, [calls[index] for index in indices]
                )
            except _DRIVER_ERRORS as exc:
                failure = exc
                continue
            for index, reply in zip(indices, part, strict=True):
                replies[index] = reply
        if failure is not None and all(reply is None for reply in replies):
            raise failure
        return replies

    async def _pipelined(
        self,
        connections: _Connections,
        script: _Script,
        calls: Sequence[tuple[Sequence[str], Sequence[str | int]]],
    ) -> list[Any]:
        client = connections.commands
        # In a cluster, each call names its node: redis-py's sync cluster pipeline
        # would otherwise ask a default node for the keys of every script call (COMMAND
        # GETKEYS, a round trip per call, failing whenever that node is down).
        targets = [(await self._owner(connections, keys[0]))[1] for keys, _args in calls]
        before = cancellations()
        deadline: float | None = None
        while True:
            pipe = client.pipeline(transaction=False)
            for (keys, args), target in zip(calls, targets, strict=True):
                pipe.execute_command(*self._script_call(script, keys, args), **target)
            try:
                replies = await pipe.execute(raise_on_error=False)
                break
            except redis_errors.ConnectionError as exc:
                # Every connection to a node was busy. Repeating the whole pipeline
                # is safe for the scripts pipelined (renewals, leases()), even if
                # other nodes ran their part.
                deadline = self._wait_for_connection(exc, deadline, True)
                await sleep(_POOL_POLL)
        # As in _execute: a cancellation swallowed while sending is raised again.
        resume_cancellation(before)
        return list(replies)

    async def release(self, name: str, token: str) -> bool:
        keys = self.keys.for_name(name)
        connections = self._connect()
        # Stamped on the place handed to the next waiter (see hand_over).
        stamp = await self._stamp(connections, keys.state, "release")
        reply = await self._run(
            "release",
            keys.script_keys(),
            [name, keys.signal_prefix, token, stamp.run_id],
            connections,
        )
        return bool(reply == 1)

    async def break_lease(self, name: str) -> int:
        keys = self.keys.for_name(name)
        connections = self._connect()
        stamp = await self._stamp(connections, keys.state, "break")
        reply = await self._run(
            "break", keys.script_keys(), [name, keys.signal_prefix, stamp.run_id], connections
        )
        if not isinstance(reply, int):
            raise self._malformed("break", reply)
        return reply

    async def holders(self, name: str) -> list[HolderInfo]:
        keys = self.keys.for_name(name)
        reply = await self._run("holders", [keys.state], [])
        try:
            now = int(reply[0])
            infos = [
                _holder_info(name, now, int(reply[i]), reply[i + 1])
                for i in range(1, len(reply), 2)
            ]
        except (TypeError, ValueError, IndexError):
            raise self._malformed("holders", reply) from None
        return sorted(infos, key=lambda info: info.fence)

    async def leases(self, prefix: str = "") -> list[HolderInfo]:
        # Standalone: one script over every bucket, an atomic snapshot. Cluster: one
        # script per slot, each a snapshot of its buckets on its node's clock.
        groups = self._index_groups
        if len(groups) == 1:
            replies = [await self._run("leases", groups[0], [prefix])]
        else:
            replies = await self._run_many("leases", [(group, [prefix]) for group in groups])
        infos: list[HolderInfo] = []
        for reply in replies:
            try:
                now = int(reply[0])
                infos += [
                    _holder_info(reply[i], now, int(reply[i + 1]), reply[i + 2])
                    for i in range(1, len(reply), 3)
                ]
            except (TypeError, ValueError, IndexError):
                raise self._malformed("leases", reply) from None
        return sorted(infos, key=lambda info: (info.name, info.fence))

    async def waiters(self, prefix: str = "") -> list[WaiterInfo]:
        # As leases(): one snapshot standalone, one per slot in a cluster.
        groups = self._index_groups
        if len(groups) == 1:
            replies = [await self._run("waiters", groups[0], [prefix])]
        else:
            replies = await self._run_many("waiters", [(group, [prefix]) for group in groups])
        infos: list[WaiterInfo] = []
        for reply in replies:
            try:
                now = int(reply[0])
                infos += _waiter_infos(now, reply[1:])
            except (TypeError, ValueError, IndexError):
                raise self._malformed("waiters", reply) from None
        return sorted(infos, key=lambda info: (info.name, info.position))

    async def read_record(self, key: str) -> Record:
        record_key, _floor = self.keys.for_record(key)
        reply = await self._run("record_read", [record_key], [])
        try:
            now, version, value = reply
            return Record(
                key=key,
                value=None if value is None else _value_bytes(value),
                version=int(version),
                now=int(now) / 1e6,
            )
        except (TypeError, ValueError):
            raise self._malformed("record_read", reply) from None

    async def write_record(
        self, key: str, expected_version: int, value: bytes | None, ttl: float | None = None
    ) -> int | None:
        if value is not None and len(value) > MAX_RECORD_BYTES:
            raise InvalidArgument(
                f"record {key!r} is {len(value)} bytes; at most {MAX_RECORD_BYTES} are allowed"
            )
        record_key, floor = self.keys.for_record(key)
        ttl_ms = "" if ttl is None else max(1, math.ceil(ttl * 1000))
        reply = await self._run(
            "record_write",
            [record_key, floor],
            [expected_version, "1" if value is None else "0", value or b"", ttl_ms],
        )
        if not isinstance(reply, int):
            raise self._malformed("record_write", reply)
        return None if reply < 0 else reply

    async def ping(self) -> None:
        connections = self._connect()
        client = connections.commands
        # A cluster is reachable when every primary answers (all at once).
        target: dict[str, Any] = {}
        if connections.cluster is not None:
            target["target_nodes"] = connections.cluster.PRIMARIES
        with self._translated("ping"):
            if self._server_facts:
                await self._execute(client, "PING", **target)
                return
            # The first ping reads INFO instead (still one round trip) so that
            # warnings() can report the servers' configuration without I/O.
            info = await self._execute(client, "INFO", **target)
        if connections.cluster is None:
            info = {"": info}
        if isinstance(info, dict):
            self._server_facts = {
                str(where): dict(facts) for where, facts in info.items() if isinstance(facts, dict)
            }

    async def server_time(self) -> float | None:
        client = self._connect().commands
        with self._translated("time"):
            reply = await self._execute(client, "TIME")
        try:
            seconds, micros = reply
            return int(seconds) + int(micros) / 1e6
        except (TypeError, ValueError):
            raise self._malformed("TIME", reply) from None

    # -- announcements -------------------------------------------------------

    async def announce(self, topic: str) -> None:
        topic = validate.topic(topic)
        client = self._connect().commands
        with self._translated("announce"):
            await self._execute(client, "PUBLISH", self.announce_channel, topic)

    def subscribe(self, topic: str) -> AsyncSubscription:
        return HubSubscription(validate.topic(topic), self._topics, self._announcements)

    async def aclose(self) -> None:
        await self._announcements.aclose()
        with self._guard:
            current, self._connections = self._connections, None
            if current is not None and current.pid == os.getpid():
                self._abandoned = current
            self._closed = True
        if current is None or current.pid != os.getpid():
            return
        await self._disconnect(current)

    def warnings(self) -> list[str]:
        found: list[str] = []
        if self.options.password and not self.options.tls and self.options.unix_path is None:
            found.append("the password travels unencrypted: use rediss:// across hosts")
        if self._announcements.error is not None:
            found.append(
                f"cannot SUBSCRIBE for announcements ({self._announcements.error}); "
                "election observers poll"
            )
        if self._functions_refused is not None:
            found.append(
                f"functions refused ({self._functions_refused}); the scripts run with "
                "EVALSHA, about 7 µs more server time per acquire + release: allow "
                "+fcall +function|load"
            )
        # A cluster's servers each warn for themselves; one warning names them all.
        servers: dict[str, list[str]] = {}
        for where, facts in sorted(self._server_facts.items()):
            for warning in _server_warnings(facts):
                servers.setdefault(warning, []).append(where)
        for warning, wheres in servers.items():
            if self.options.cluster:
                warning = f"{', '.join(wheres)}: {warning}"
            found.append(warning)
        return found


def from_url(url: StoreURL, clock: Clock) -> AsyncRedisStore:
    """Build a store from a URL; validates options now, connects on first use.

    ``clock`` is unused: Redis decides expiry on its own clock.
    """
    del clock
    return AsyncRedisStore(url, parse_options(url))
