"""The server clock estimate built from whole-second Date headers (pure)."""

from __future__ import annotations

import math
import random

from leasehold._core.server_clock import ServerClock


def _answer(clock: ServerClock, local: float, offset: float, rtt: float) -> None:
    server = local + rtt / 2 + offset  # the server stamps mid-flight
    clock.observe(local, local + rtt, float(math.floor(server)))


def test_estimate_narrows_to_about_a_round_trip() -> None:
    rng = random.Random(7)
    for _trial in range(50):
        offset = rng.uniform(-1e6, 1e6)
        clock = ServerClock()
        local = rng.uniform(0, 1000)
        assert clock.read(local) is None
        for _ in range(200):
            _answer(clock, local, offset, 0.002)
            local += 0.011
        assert not clock.calibrating(local, 0.02)
        estimate = clock.read(local)
        assert estimate is not None and abs(estimate - (local + offset)) < 0.01


def test_a_single_answer_is_within_a_second_and_not_calibrated() -> None:
    clock = ServerClock()
    _answer(clock, 100.0, 5000.25, 0.001)
    estimate = clock.read(100.0)
    assert estimate is not None and abs(estimate - 5100.25) <= 1.0
    assert clock.calibrating(100.0, 0.02)


def test_a_clock_step_starts_afresh() -> None:
    clock = ServerClock()
    local = 0.0
    for _ in range(200):
        _answer(clock, local, 1000.0, 0.002)
        local += 0.011
    assert not clock.calibrating(local, 0.02)
    _answer(clock, local, 1000.0 - 30.0, 0.002)  # the server's clock stepped back
    estimate = clock.read(local)
    assert estimate is not None and abs(estimate - (local + 970.0)) <= 1.0
    assert clock.calibrating(local, 0.02)
