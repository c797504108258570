"""Announcements on etcd: a put under ``P t/`` per announcement, one watch per store.

``announce(topic)`` puts ``P t/<topic>`` (attached to a short etcd lease of the
store, so idle topics leave no keys behind). The store's one listener watches the
whole ``P t/`` range (puts only) from the revision it read before it started, and
wakes the local subscriptions of each event's topic through the ``TopicHub``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from leasehold._async._concurrency import spawn
from leasehold._async.backends.etcd.client import AsyncEtcdHTTP, revision, unb64
from leasehold._async.store import TopicHub
from leasehold._core.etcd import Keys, prefix_end
from leasehold._errors import StoreUnavailable


class AsyncAnnouncementListener:
    """The ``Listener`` a ``ListenerSlot`` keeps for an etcd store."""

    def __init__(self, http: AsyncEtcdHTTP, keys: Keys, hub: TopicHub) -> None:
        self._http = http
        self._keys = keys
        self._hub = hub
        self._response: httpx.Response | None = None
        self._alive = False
        self._closed = False

    @property
    def alive(self) -> bool:
        return self._alive

    async def start(self) -> None:
        topics = self._keys.topics()
        since = revision(await self._http.range(self._keys.epoch, count_only=True))
        response = await self._http.open_watch(topics, prefix_end(topics), since + 1, ["NODELETE"])
        self._response = response
        try:
            if response.status_code != 200:
                await response.aread()
                raise StoreUnavailable(f"etcd: watch refused (HTTP {response.status_code})")
            lines = response.aiter_lines()
            first = json.loads(await anext(lines))
            if not first.get("result", {}).get("created"):
                raise StoreUnavailable("etcd: the announcement watch was not created")
        except (httpx.HTTPError, ValueError, StopAsyncIteration):
            await response.aclose()
            raise StoreUnavailable("etcd: the announcement watch failed to start") from None
        except StoreUnavailable:
            await response.aclose()
            raise
        self._alive = True
        spawn(lambda: self._run(lines), "leasehold-etcd-announcements")

    def _topics(self, result: dict[str, Any]) -> Iterator[str]:
        head = self._keys.topics()
        for event in result.get("events", ()):
            key = unb64(event.get("kv", {}).get("key", ""))
            if key.startswith(head):
                yield key[len(head) :].decode(errors="replace")

    async def _run(self, lines: Any) -> None:
        try:
            async for line in lines:
                if not line.strip():
                    continue
                result = json.loads(line).get("result")
                if result is None or result.get("canceled"):
                    break
                for topic in self._topics(result):
                    self._hub.wake(topic)
        except (httpx.HTTPError, ValueError, RuntimeError):
            pass  # the stream ended: the slot starts a new listener
        finally:
            self._alive = False
            if not self._closed:
                # Announcements may have been missed: every subscriber looks again
                # (and its next wait starts a new listener).
                self._hub.wake_all()
            response, self._response = self._response, None
            if response is not None:
                await response.aclose()

    async def aclose(self) -> None:
        self._closed = True
        self._alive = False
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()
