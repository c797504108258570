"""Stateful property tests of the lease model on every backend.

A simple model (one dict per name) runs next to the real clients; after every step
at most one live holder exists, fences strictly increase, and only the owner of a
lease can extend or release it. Backends whose store clock can be faked also get
clock jumps; server-clock backends run without them (expiry has its own tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import leasehold
from leasehold.testing import BackendHarness

TTL = 10.0
MARGIN = 0.5


@dataclass
class Grant:
    lease: leasehold.Lease
    owner: int
    granted_at: float
    store_expiry: float
    client_deadline: float
    released: bool = False


def run_machine(harness: BackendHarness, examples: int) -> None:
    names = [harness.unique("sm") for _ in range(2)]
    clients = [harness.client() for _ in range(3)]
    fake = harness.clock is not None

    class LeaseMachine(RuleBasedStateMachine):
        leases = Bundle("leases")

        def __init__(self) -> None:
            super().__init__()
            # Read time from the harness clock itself, so the model's float arithmetic
            # matches the store's exactly at the expiry boundaries.
            self.now = harness.clock.monotonic() if harness.clock is not None else 0.0
            self.current: dict[str, Grant | None] = {name: None for name in names}
            self.last_fence: dict[str, int] = {name: 0 for name in names}
            for client in clients:
                for info in client.leases("sm:"):
                    client.break_lease(info.name)

        def live(self, name: str) -> Grant | None:
            grant = self.current[name]
            if grant is None or grant.released or self.now >= grant.store_expiry:
                return None
            return grant

        @rule(target=leases, owner=st.integers(0, 2), index=st.integers(0, 1))
        def try_acquire(self, owner: int, index: int) -> Grant | None:
            name = names[index]
            lease = clients[owner].lock(name, ttl=TTL, renew=False, margin=MARGIN).try_acquire()
            if self.live(name) is not None:
                assert lease is None, "granted while another lease is live"
                return None
            assert lease is not None, "refused although nobody holds the name"
            assert lease.fence > self.last_fence[name], "fence did not increase"
            self.last_fence[name] = lease.fence
            grant = Grant(lease, owner, self.now, self.now + TTL, self.now + TTL - MARGIN)
            self.current[name] = grant
            return grant

        @rule(grant=consumes(leases))
        def release(self, grant: Grant | None) -> None:
            if grant is None:
                return
            name = grant.lease.name
            holds = self.live(name) is grant
            result = grant.lease.release()
            if grant.released:
                assert result is False
            elif holds and self.now < grant.client_deadline:
                assert result is True
            elif not holds:
                assert result is False
            grant.released = True
            if holds:
                self.current[name] = None

        @rule(grant=leases)
        def extend(self, grant: Grant | None) -> None:
            if grant is None:
                return
            name = grant.lease.name
            holds = self.live(name) is grant and not grant.released
            if holds and self.now < grant.client_deadline:
                grant.lease.extend()
                grant.store_expiry = self.now + TTL
                grant.client_deadline = self.now + TTL - MARGIN
            else:
                with pytest.raises(leasehold.LeaseLost):
                    grant.lease.extend()

        @precondition(lambda self: fake)
        @rule(seconds=st.sampled_from([0.1, 3.0, 9.0, 9.7, 10.0, 25.0]))
        def advance(self, seconds: float) -> None:
            harness.advance(seconds)
            assert harness.clock is not None
            self.now = harness.clock.monotonic()

        @invariant()
        def at_most_one_live_holder(self) -> None:
            for name in names:
                holders = clients[0].holders(name)
                assert len(holders) <= 1
                live = self.live(name)
                if live is None:
                    assert holders == []
                else:
                    assert [h.fence for h in holders] == [live.lease.fence]

    run_state_machine_as_test(
        LeaseMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_lease_state_machine(lh_backend: BackendHarness) -> None:
    examples = {"memory": 150, "sqlite": 60}.get(lh_backend.name, 25)
    run_machine(lh_backend, examples)
