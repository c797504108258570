"""Talking to etcd's v3 JSON gateway over httpx: endpoints, failover, auth, errors.

Every call is one HTTP POST to ``/v3/...`` on the current endpoint. A connection
that cannot be made moves to the next endpoint at once (the request never left);
any other transport failure moves too but is raised as ``StoreUnavailable``, since
the request may have been applied: callers retry, and every write the store makes
is conditional, so a retry is harmless. Each request keeps the URL's ``timeout``.

With a user and password, a token from ``/v3/auth/authenticate`` goes in the
``Authorization`` header; etcd forgets idle tokens, so an "invalid auth token"
answer fetches a new one and retries once. Neither the password nor the token ever
reaches an exception, a log line or a repr.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import os
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from leasehold import _deadline
from leasehold._async._concurrency import AsyncMutex
from leasehold._async.backends.etcd.transport import bounded_transport
from leasehold._core.clock import Clock
from leasehold._core.etcd import EtcdOptions
from leasehold._core.server_clock import ServerClock
from leasehold._errors import StoreMisconfigured, StoreUnavailable

# gRPC status codes etcd answers with (in the gateway's JSON "code").
INVALID_ARGUMENT = 3
NOT_FOUND = 5
PERMISSION_DENIED = 7
UNAVAILABLE = 14
UNAUTHENTICATED = 16


class EtcdError(StoreUnavailable):
    """etcd answered a request with an error (its gRPC code and message)."""

    def __init__(self, endpoint: str, code: int, message: str) -> None:
        super().__init__(f"etcd {endpoint}: {message} (code {code})")
        self.code = code
        self.message = message

    @property
    def lease_not_found(self) -> bool:
        return self.code == NOT_FOUND and "lease not found" in self.message


class EtcdMisconfigured(EtcdError, StoreMisconfigured):
    """etcd rejected the credentials or the user lacks a permission: raised at once,
    never retried (waiting does not fix it)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def revision(response: dict[str, Any]) -> int:
    return int(response.get("header", {}).get("revision", 0))


_CLOCKS: dict[tuple[str, ...], ServerClock] = {}
_CLOCKS_GUARD = threading.Lock()


def shared_clock(endpoints: tuple[str, ...]) -> ServerClock:
    # Local monotonic time is one clock for the whole host, so the estimate stays
    # valid in forked children too.
    with _CLOCKS_GUARD:
        return _CLOCKS.setdefault(endpoints, ServerClock())


class AsyncEtcdHTTP:
    """One store's connections to one etcd cluster (re-made after fork)."""

    def __init__(self, options: EtcdOptions, clock: Clock) -> None:
        self._options = options
        self._clock = clock
        self._current = 0
        self._client: httpx.AsyncClient | None = None
        self._pid = os.getpid()
        self._inherited: list[httpx.AsyncClient] = []  # the parent's, never touched
        self._token: str | None = None
        self._auth_mutex = AsyncMutex()
        self._make_guard = threading.Lock()
        # Set by aclose: a late call (a background clean-up of an abandoned acquire)
        # must not open a new client that nobody would close.
        self._closed = False
        # The server's wall clock, estimated from the Date headers of its answers;
        # shared by every store of this process on the same endpoints, so that only
        # the first one waits for the estimate to narrow.
        self.server_clock = shared_clock(options.endpoints)

    # -- plumbing -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._options.endpoints[self._current % len(self._options.endpoints)]

    def _rotate(self, failed: str) -> None:
        if self.endpoint == failed:
            self._current += 1

    def _verify(self) -> ssl.SSLContext | bool:
        options = self._options
        if not options.endpoints[0].startswith("https"):
            return False
        context = ssl.create_default_context(cafile=options.ca_cert)
        if options.client_cert is not None:
            context.load_cert_chain(options.client_cert, options.client_key)
        return context

    def http(self) -> httpx.AsyncClient:
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        # Threads share a sync store: one of them makes the client (a client made
        # twice would leave the loser's connections unclosed).
        with self._make_guard:
            if self._closed and self._pid == os.getpid():
                raise StoreUnavailable("etcd: the store is closed")
            return self._make_client()

    def _make_client(self) -> httpx.AsyncClient:
        if self._pid != os.getpid():
            # A forked child must not share the parent's sockets or token.
            if self._client is not None:
                self._inherited.append(self._client)
            self._client = None
            self._token = None
            self._auth_mutex = AsyncMutex()
            self._make_guard = threading.Lock()
            self._pid = os.getpid()
        if self._client is None:
            try:
                verify = self._verify()
            except (OSError, ssl.SSLError) as exc:
                raise StoreUnavailable(f"etcd TLS files cannot be loaded: {exc}") from None
            limits = httpx.Limits(max_keepalive_connections=16)
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._options.timeout, connect=self._options.connect_timeout),
                limits=limits,
                transport=bounded_transport(verify, limits),
            )
        return self._client

    def _note_date(self, response: httpx.Response, sent: float) -> None:
        date = response.headers.get("date")
        if date:
            with contextlib.suppress(TypeError, ValueError):
                seconds = email.utils.parsedate_to_datetime(date).timestamp()
                received = self._clock.monotonic()
                with _CLOCKS_GUARD:
                    self.server_clock.observe(sent, received, seconds)

    @property
    def server_seconds(self) -> float | None:
        """The server's wall clock now (Unix seconds), None before any answer."""
        with _CLOCKS_GUARD:
            return self.server_clock.read(self._clock.monotonic())

    def clock_calibrating(self, precision: float) -> bool:
        with _CLOCKS_GUARD:
            return self.server_clock.calibrating(self._clock.monotonic(), precision)

    def clock_width(self) -> float:
        """How far apart the server clock's bounds are now (inf before any answer)."""
        with _CLOCKS_GUARD:
            return self.server_clock.width(self._clock.monotonic())

    def claim_clock_probe(self, hold: float) -> bool:
        with _CLOCKS_GUARD:
            return self.server_clock.claim_probe(self._clock.monotonic(), hold)

    def clock_probe_done(self) -> None:
        with _CLOCKS_GUARD:
            self.server_clock.probe_done()

    async def _headers(self, *, refresh: bool = False) -> dict[str, str]:
        options = self._options
        if options.user is None:
            return {}
        async with self._auth_mutex:
            if refresh:
                self._token = None
            if self._token is None:
                data = await self._post(
                    "auth/authenticate",
                    {"name": options.user, "password": options.password},
                    {},
                )
                token = data.get("token")
                if not isinstance(token, str):
                    raise StoreUnavailable(f"etcd {self.endpoint}: authentication gave no token")
                self._token = token
            return {"Authorization": self._token}

    def _error(self, endpoint: str, response: httpx.Response) -> EtcdError:
        try:
            data = json.loads(response.content)
            code, message = int(data.get("code", 2)), str(data.get("message") or data["error"])
        except (ValueError, KeyError, TypeError):
            code, message = 2, f"HTTP {response.status_code}"
        if code == INVALID_ARGUMENT and "authentication failed" in message:
            message = "authentication failed: etcd rejected the user name or password"
            return EtcdMisconfigured(endpoint, code, message)
        if code == PERMISSION_DENIED:
            message = "permission denied: the etcd user's roles do not cover leasehold's keys"
            return EtcdMisconfigured(endpoint, code, message)
        return EtcdError(endpoint, code, message)

    async def _post(
        self,
        path: str,
        body: dict[str, Any] | bytes,
        headers: dict[str, str],
        *,
        again: bool = True,
    ) -> dict[str, Any]:
        """One request, moving to the next endpoint when a connection cannot be made.

        ``again``: the request may be sent twice (every call but a record's
        compare-and-set, whose second sending would answer "changed" for its own
        write). Then a connection that breaks mid-request (the member died) sends it
        to the next endpoint at once; a timeout does not, its time is spent."""
        client = self.http()
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        tried = 0
        while True:
            endpoint = self.endpoint
            deadline = _deadline.current()
            if tried and deadline is not None and deadline.expired:
                # The operation's time is spent: no next endpoint (its connect would
                # be shut at once anyway).
                raise StoreUnavailable(f"etcd {endpoint}: no answer in time")
            sent = self._clock.monotonic()
            try:
                response = await client.post(
                    f"{endpoint}/v3/{path}", content=content, headers=headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self._rotate(endpoint)
                tried += 1
                if tried < len(self._options.endpoints):
                    continue
                raise StoreUnavailable(
                    f"etcd: no endpoint reachable (last {endpoint}: {type(exc).__name__})"
                ) from None
            except httpx.TimeoutException as exc:
                self._rotate(endpoint)
                raise StoreUnavailable(f"etcd {endpoint}: {type(exc).__name__}") from None
            except httpx.HTTPError as exc:
                self._rotate(endpoint)
                tried += 1
                if again and tried < len(self._options.endpoints):
                    continue
                raise StoreUnavailable(f"etcd {endpoint}: {type(exc).__name__}") from None
            self._note_date(response, sent)
            if response.status_code != 200:
                error = self._error(endpoint, response)
                if error.code == UNAVAILABLE:
                    # No leader here, the leader changed, or shutting down: another
                    # member may answer. Every write of ours is conditional, so
                    # sending it again is harmless even if this one was applied.
                    self._rotate(endpoint)
                    tried += 1
                    if again and tried < len(self._options.endpoints):
                        continue
                raise error
            if path == "lease/keepalive":
                return {"lines": response.content}
            try:
                data: dict[str, Any] = json.loads(response.content)
            except ValueError:
                raise StoreUnavailable(f"etcd {endpoint}: an answer that is not JSON") from None
            return data

    async def call(
        self, path: str, body: dict[str, Any] | bytes, *, again: bool = True
    ) -> dict[str, Any]:
        """POST ``/v3/<path>``; etcd's errors as ``EtcdError``, transport errors as
        ``StoreUnavailable``. ``again``: see ``_post``."""
        headers = await self._headers()
        try:
            return await self._post(path, body, headers, again=again)
        except EtcdError as exc:
            if exc.code != UNAUTHENTICATED or not headers:
                raise
        # The token expired (etcd drops idle ones): once more with a new one (etcd
        # refused the first sending, so this is not a second one).
        return await self._post(path, body, await self._headers(refresh=True), again=again)

    # -- operations -----------------------------------------------------------------

    async def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
        *,
        again: bool = True,
    ) -> dict[str, Any]:
        return await self.call(
            "kv/txn",
            {"compare": list(compare), "success": list(success), "failure": list(failure)},
            again=again,
        )

    async def range(
        self, key: bytes, range_end: bytes | None = None, **extra: Any
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"key": b64(key), **extra}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        return await self.call("kv/range", body)

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new etcd lease: (id, the Raft term of the answer)."""
        data = await self.call("lease/grant", {"TTL": ttl})
        return int(data["ID"]), int(data.get("header", {}).get("raft_term", 0))

    async def revoke(self, lease: int) -> bool:
        try:
            await self.call("lease/revoke", {"ID": lease})
        except EtcdError as exc:
            if exc.lease_not_found:
                return False
            raise
        return True

    async def keepalive(
        self, leases: Sequence[int], terms: set[int] | None = None
    ) -> dict[int, int]:
        """Refresh every lease: {lease: remaining ttl}, 0 for a lease that is gone.

        One request carries every lease (the gateway streams one answer per
        message). But the gateway stops reading a request body once it has started
        answering (Go's HTTP/1 server closes it), so a long batch comes back with
        only its first leases answered (about 15-20 measured); the rest go again in
        a new request. Every round answers at least one lease, or fails."""
        pending = list(dict.fromkeys(leases))
        answers: dict[int, int] = {}
        for _round in range(len(pending)):
            answered = await self._keepalive_once(pending, terms)
            if not answered:
                raise StoreUnavailable(f"etcd {self.endpoint}: a keepalive answered nothing")
            answers.update(answered)
            pending = [lease for lease in pending if lease not in answered]
            if not pending:
                break
        return answers

    async def _keepalive_once(
        self, leases: Sequence[int], terms: set[int] | None
    ) -> dict[int, int]:
        body = b"".join(json.dumps({"ID": lease}).encode() for lease in leases)
        data = await self.call("lease/keepalive", body)
        answers: dict[int, int] = {}
        for line in bytes(data["lines"]).splitlines():
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                raise StoreUnavailable(f"etcd {self.endpoint}: a garbled keepalive") from None
            result = message.get("result")
            if result is None:
                error = message.get("error", {})
                raise EtcdError(
                    self.endpoint, int(error.get("code", 2)), str(error.get("message", ""))
                )
            answers[int(result["ID"])] = int(result.get("TTL", 0))
            if terms is not None:
                terms.add(int(result.get("header", {}).get("raft_term", 0)))
        return answers

    async def time_to_live(self, lease: int) -> int:
        """Whole seconds the lease has left (etcd truncates), -1 if it has ended."""
        return (await self.lease_times(lease))[0]

    async def lease_times(self, lease: int) -> tuple[int, int]:
        """The lease's time to live (as ``time_to_live``) and the seconds it was
        granted for."""
        data = await self.call("lease/timetolive", {"ID": lease})
        # proto3 JSON omits a zero; an ended lease has TTL -1
        return int(data.get("TTL", 0)), int(data.get("grantedTTL", 0))

    async def watch_once(
        self,
        key: bytes,
        range_end: bytes | None,
        timeout: float,
        filters: Sequence[str],
        expected: Sequence[bytes],
    ) -> bool:
        """Watch ``key`` (or the range) from now until the first event: True. False
        when ``timeout`` passes first. Once the watch is in place, a read checks that
        every key in ``expected`` still exists; one that was deleted before the
        watch started answers True at once, so nothing since the caller's own read
        is missed. A cancelled or compacted watch answers True: the caller looks
        again, which is always safe.

        Why not a watch from the caller's read revision: etcd serves a watch that
        starts in the past from a catch-up loop that runs every 100 ms, which would
        add up to 100 ms to every hand-off."""
        deadline = self._clock.monotonic() + timeout
        create: dict[str, Any] = {"key": b64(key), "filters": list(filters)}
        if range_end is not None:
            create["range_end"] = b64(range_end)
        content = json.dumps({"create_request": create}).encode()
        headers = await self._headers()
        endpoint = self.endpoint
        client = self.http()
        request = client.build_request(
            "POST",
            f"{endpoint}/v3/watch",
            content=content,
            headers=headers,
            # Nothing arrives between "created" and the event: the read timeout
            # is the wait's bound.
            timeout=httpx.Timeout(
                self._options.timeout,
                connect=self._options.connect_timeout,
                read=max(0.001, timeout),
            ),
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            return False
        except httpx.HTTPError as exc:
            self._rotate(endpoint)
            raise StoreUnavailable(f"etcd {endpoint}: {type(exc).__name__}") from None
        try:
            if response.status_code != 200:
                await response.aread()
                raise self._error(endpoint, response)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                result = message.get("result")
                if result is None:
                    if headers and message.get("error", {}).get("code") == UNAUTHENTICATED:
                        self._token = None
                    return True
                if result.get("events") or result.get("canceled"):
                    return True
                if result.get("compact_revision"):
                    return True
                if result.get("created") and expected and not await self._all_exist(expected):
                    return True
                if self._clock.monotonic() >= deadline:
                    return False
            return True  # the stream ended: look again
        except httpx.TimeoutException:
            return False
        except httpx.HTTPError as exc:
            self._rotate(endpoint)
            raise StoreUnavailable(f"etcd {endpoint}: {type(exc).__name__}") from None
        except ValueError:
            raise StoreUnavailable(f"etcd {endpoint}: a garbled watch answer") from None
        finally:
            await response.aclose()

    async def _all_exist(self, keys: Sequence[bytes]) -> bool:
        body = {
            "compare": [],
            "success": [{"request_range": {"key": b64(k), "keys_only": True}} for k in keys],
        }
        data = await self.call("kv/txn", body)
        return all(r.get("response_range", {}).get("kvs") for r in data.get("responses", []))

    async def open_watch(
        self, key: bytes, range_end: bytes, start_revision: int, filters: Sequence[str]
    ) -> httpx.Response:
        """A watch stream, returned once etcd confirmed it (so nothing committed
        after ``start_revision`` is missed). The caller reads it and closes it."""
        create = {
            "key": b64(key),
            "range_end": b64(range_end),
            "start_revision": start_revision,
            "filters": list(filters),
        }
        headers = await self._headers()
        endpoint = self.endpoint
        client = self.http()
        request = client.build_request(
            "POST",
            f"{endpoint}/v3/watch",
            content=json.dumps({"create_request": create}).encode(),
            headers=headers,
            # An idle watch sends nothing; a listener that reads nothing for this
            # long starts again (and its subscribers look again once).
            timeout=httpx.Timeout(
                self._options.timeout, connect=self._options.connect_timeout, read=30.0
            ),
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            self._rotate(endpoint)
            raise StoreUnavailable(f"etcd {endpoint}: {type(exc).__name__}") from None
        return response

    async def aclose(self) -> None:
        with self._make_guard:
            self._closed = True
            client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            await client.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint}>"
