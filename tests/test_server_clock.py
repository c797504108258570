"""The server clock estimate built from whole-second Date headers (pure)."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from leasehold._core.server_clock import DRIFT, ServerClock


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


def test_slow_round_trips_end_the_calibration_at_the_first_change_of_second() -> None:
    """One prober, answers 80 ms apart on a loaded machine: 20 ms bounds are out of
    reach for good, so the first change of second ends the calibration, with an
    estimate as good as those round trips allow."""
    rng = random.Random(11)
    for _trial in range(50):
        offset = rng.uniform(-1e6, 1e6)
        clock = ServerClock()
        local = rng.uniform(0, 1000)
        probes = 0
        while clock.calibrating(local, 0.02):
            assert probes < 40, "never calibrated"  # a second is about 11 probes
            _answer(clock, local, offset, 0.08)
            local += 0.08 + 0.01
            probes += 1
        assert clock.width(local) > 0.02  # the old rule (width alone) would still wait
        assert clock.width(local) <= 2 * 0.08 + 0.01 + 0.001  # and a little DRIFT
        estimate = clock.read(local)
        assert estimate is not None and abs(estimate - (local + offset)) <= 0.09


def test_answers_within_one_second_do_not_end_the_calibration() -> None:
    clock = ServerClock()
    local = 0.25  # server = local + 1000.0: answers of second 1000 until local 1.0
    while local < 0.9:
        _answer(clock, local, 1000.0, 0.002)
        local += 0.011
        assert clock.calibrating(local, 0.02)
    assert 0.02 < clock.width(local) < 1.0


def test_one_prober_at_a_time_and_a_stuck_one_is_replaced() -> None:
    clock = ServerClock()
    assert clock.claim_probe(10.0, 0.5)
    assert not clock.claim_probe(10.1, 0.5)  # the others wait for its answer
    clock.probe_done()
    assert clock.claim_probe(10.2, 0.5)
    assert not clock.claim_probe(10.69, 0.5)
    assert clock.claim_probe(10.71, 0.5)  # its probe hangs: another one goes


@settings(max_examples=300, deadline=None)
@given(
    offset=st.floats(min_value=-1e6, max_value=1e6),
    start=st.floats(min_value=0, max_value=1e4),
    answers=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=0.4),  # sent after the previous sending
            st.floats(min_value=0.0001, max_value=0.5),  # round trip
            st.floats(min_value=0.0, max_value=1.0),  # where in it the server stamped
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_the_bounds_always_hold_the_true_offset(
    offset: float, start: float, answers: list[tuple[float, float, float]]
) -> None:
    """Whatever the round trips, and with answers overlapping and arriving out of
    order (many callers), the estimate never excludes the server's real clock: a
    change of second that ends the calibration has narrowed it soundly."""
    flights = []
    sent = start
    for gap, rtt, at in answers:
        sent += gap
        stamp = sent + at * rtt + offset
        flights.append((sent + rtt, sent, float(math.floor(stamp))))
    clock = ServerClock()
    for received, sent_at, date in sorted(flights):
        clock.observe(sent_at, received, date)
        assert clock.low is not None and clock.high is not None
        now = received
        low = clock.low - DRIFT * (now - clock.low_at)
        high = clock.high + DRIFT * (now - clock.high_at)
        slack = 1e-6 * max(1.0, abs(offset))  # float rounding of large offsets
        assert low - slack <= offset <= high + slack, (low, offset, high)
        estimate = clock.read(now)
        assert estimate is not None
        assert abs(estimate - (now + offset)) <= clock.width(now) / 2 + slack
