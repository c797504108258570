"""Fault-suite fixtures: each backend as a ``Target`` behind FaultProxy instances.

To run the suite on a new backend, add a fixture here that yields a ``Target``
(tests/faults/targets.py) and its name to ``TARGETS``; every scenario then runs on it.

``LEASEHOLD_SAFETY_FULL=1`` runs the full set (every scenario on both APIs, several
trials: scripts/gen_safety.py sets it); otherwise a CI-sized subset runs.
``LEASEHOLD_SAFETY_RESULTS=path`` appends every trial's summary there as a JSON line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.faults.targets import (
    ProxyPool,
    Target,
    build_clock_shim,
    clock_shifted_redis,
    cluster_target,
    single_server_target,
)

FULL = os.environ.get("LEASEHOLD_SAFETY_FULL") == "1"
RESULTS = os.environ.get("LEASEHOLD_SAFETY_RESULTS")
TARGETS = ["redis", "postgres", "redis-cluster", "etcd"]


def record(summary: dict[str, Any]) -> None:
    if RESULTS:
        with open(RESULTS, "a") as out:
            out.write(json.dumps(summary) + "\n")


@pytest.fixture(scope="session")
def fault_target_redis(redis_server: Any) -> Iterator[Target]:
    target = single_server_target("redis", redis_server.url, redis_server.port, ProxyPool())
    try:
        yield target
    finally:
        target.close()


@pytest.fixture(scope="session")
def fault_target_postgres(postgres_server: Any) -> Iterator[Target]:
    target = single_server_target(
        "postgres", postgres_server.url, postgres_server.port, ProxyPool()
    )
    try:
        yield target
    finally:
        target.close()


@pytest.fixture(scope="session")
def fault_target_etcd(etcd_server: Any) -> Iterator[Target]:
    # One member; its gateway's HTTP connections go through the proxies. etcd leases
    # have whole seconds and are expired by a check twice a second, so a 1 s TTL can
    # last up to 1.5 s in the store: the conformance harness's 2 s TTL, here too.
    port = etcd_server.client_ports[0]
    url = f"{etcd_server.member_url(0)}?prefix=faults/"
    target = single_server_target("etcd", url, port, ProxyPool())
    target.ttl = 2.0
    try:
        yield target
    finally:
        target.close()


@pytest.fixture(scope="session")
def fault_target_redis_cluster(redis_server: Any) -> Iterator[Target]:
    # A cluster of its own: its nodes are told to announce the proxies' ports.
    from tests.servers.redis_cluster import RedisClusterServers

    cluster = RedisClusterServers(3)
    cluster.start()
    try:
        target = cluster_target(cluster, ProxyPool())
        try:
            yield target
        finally:
            target.close()
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def fault_target_redis_clock(
    redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """A redis-server whose wall clock the test steps (LD_PRELOAD shim, built here)."""
    shim = build_clock_shim(tmp_path_factory.mktemp("clockshim"))
    if shim is None:
        unavailable("gcc is not installed: cannot build the clock-step shim (apt-get install gcc)")
    assert shim is not None
    pool = ProxyPool()
    with clock_shifted_redis(shim) as (server, stepper):
        target = single_server_target("redis", server.url, server.port, pool)
        target.clock_step = stepper.step
        try:
            yield target
        finally:
            target.close()


@pytest.fixture(scope="session")
def fault_target_redis_failover(redis_server: Any) -> Target:
    """The failover scenario starts its own primary and replica for every trial."""

    def no_path() -> Any:
        raise AssertionError("the failover scenario makes its own servers and routes")

    return Target(name="redis primary+replica", isolated=True, direct_url="", new_path=no_path)


def target_fixture(request: pytest.FixtureRequest, backend: str) -> Target:
    target: Target = request.getfixturevalue(f"fault_target_{backend.replace('-', '_')}")
    return target


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
