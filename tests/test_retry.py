"""leasehold.retry: full-jitter backoff that never synchronises a crowd of callers."""

from __future__ import annotations

import asyncio
import random
import statistics
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

import leasehold
from leasehold import retry

params = st.tuples(
    st.floats(min_value=0.001, max_value=10.0),  # initial
    st.floats(min_value=1.0, max_value=1000.0),  # maximum / initial
    st.floats(min_value=1.0, max_value=4.0),  # multiplier
)


@given(params=params, attempt=st.integers(min_value=0, max_value=200), seed=st.integers())
def test_delay_is_within_the_full_jitter_window(
    params: tuple[float, float, float], attempt: int, seed: int
) -> None:
    initial, ratio, multiplier = params
    maximum = initial * ratio
    ceiling = min(maximum, initial * multiplier ** min(attempt, 64))
    value = retry.delay(
        attempt,
        initial=initial,
        maximum=maximum,
        multiplier=multiplier,
        rng=random.Random(seed),
    )
    assert 0.0 <= value <= ceiling * (1 + 1e-12)


@settings(max_examples=50)
@given(params=params, attempt=st.integers(min_value=0, max_value=30), seed=st.integers())
def test_a_crowd_of_callers_is_spread_over_the_window(
    params: tuple[float, float, float], attempt: int, seed: int
) -> None:
    """100 callers failing at the same instant, each with its own random source:
    their retries cover the window instead of arriving together."""
    initial, ratio, multiplier = params
    maximum = initial * ratio
    ceiling = min(maximum, initial * multiplier**attempt)
    seeds = random.Random(seed)
    crowd = [
        retry.delay(
            attempt,
            initial=initial,
            maximum=maximum,
            multiplier=multiplier,
            rng=random.Random(seeds.getrandbits(64)),
        )
        for _ in range(100)
    ]
    # Synchronised retries would be (nearly) equal; uniform ones spread. For 100
    # uniform draws, P(range < half the window) is about 1e-28 and P(fewer than 50
    # distinct millisecond-of-window slots) is as negligible.
    assert max(crowd) - min(crowd) > ceiling / 2
    assert len({round(d / ceiling, 3) for d in crowd}) > 50
    # Full jitter: the mean is half the ceiling (6 standard errors of slack).
    assert abs(statistics.fmean(crowd) / ceiling - 0.5) < 6 * (1 / 12) ** 0.5 / 10


def test_ceilings_grow_exponentially_to_the_maximum() -> None:
    rng = random.Random(7)
    samples = {
        attempt: [retry.delay(attempt, initial=0.1, maximum=5.0, rng=rng) for _ in range(2000)]
        for attempt in range(10)
    }
    for attempt, values in samples.items():
        ceiling = min(5.0, 0.1 * 2**attempt)
        assert max(values) <= ceiling
        assert max(values) > 0.95 * ceiling
        assert min(values) < 0.05 * ceiling  # full jitter reaches down to zero


def test_delays_iterator() -> None:
    source = retry.delays(initial=1.0, maximum=8.0, rng=random.Random(1))
    for attempt in range(6):
        value = next(source)
        assert 0 <= value <= min(8.0, 2.0**attempt)


def test_attempts_loop_retries_listed_errors_then_raises() -> None:
    slept: list[float] = []
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("not yet")
        return "ok"

    result = None
    for attempt in retry.attempts(5, on=ConnectionError, sleep=slept.append):
        with attempt:
            result = flaky()
    assert result == "ok" and calls == 3 and len(slept) == 2

    calls, slept = -100, []
    with pytest.raises(ConnectionError):
        for attempt in retry.attempts(4, on=ConnectionError, sleep=slept.append):
            with attempt:
                flaky()
    assert len(slept) == 3  # 4 tries, 3 pauses, then the last error propagates

    # Errors not listed are never swallowed.
    with pytest.raises(KeyError):
        for attempt in retry.attempts(5, on=ConnectionError, sleep=slept.append):
            with attempt:
                raise KeyError("bug")


def test_attempts_loop_without_with() -> None:
    seen = []
    for attempt in retry.attempts(3, sleep=lambda _: None):
        seen.append((attempt.number, attempt.last))
    assert seen == [(1, False), (2, False), (3, True)]


def test_attempts_timeout_stops_retrying() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    tries = 0
    with pytest.raises(TimeoutError):
        for attempt in retry.attempts(
            None, timeout=5.0, initial=1.0, maximum=1.0, sleep=sleep, clock=lambda: now[0]
        ):
            with attempt:
                tries += 1
                raise TimeoutError
    assert now[0] <= 5.0
    assert tries >= 5  # delays are at most 1 s each, so at least 5 tries fit


def test_async_attempts() -> None:
    async def main() -> int:
        calls = 0
        async for attempt in retry.attempts(5, on=OSError, initial=0.001, maximum=0.002):
            async with attempt:
                calls += 1
                if calls < 3:
                    raise OSError("again")
        return calls

    assert asyncio.run(main()) == 3


def test_decorator_on_sync_and_async_functions() -> None:
    calls = {"sync": 0, "async": 0}

    @leasehold.retry.retry(on=(ConnectionError,), max_tries=3, initial=0.001, maximum=0.002)
    def sync_fn(x: int) -> int:
        calls["sync"] += 1
        if calls["sync"] < 3:
            raise ConnectionError
        return x * 2

    @leasehold.retry.retry(on=ConnectionError, max_tries=2, initial=0.001, maximum=0.002)
    async def async_fn(x: int) -> int:
        calls["async"] += 1
        raise ConnectionError(f"down {x}")

    assert sync_fn(21) == 42
    assert sync_fn.__name__ == "sync_fn"
    with pytest.raises(ConnectionError, match="down 1"):
        asyncio.run(async_fn(1))
    assert calls == {"sync": 3, "async": 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tries": 0},
        {"max_tries": True},
        {"max_tries": None},  # and no timeout: forever
        {"initial": 0},
        {"initial": float("nan")},
        {"maximum": 0.01, "initial": 1.0},
        {"multiplier": 0.5},
        {"on": "ConnectionError"},
        {"on": ()},
        {"timeout": -1},
    ],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(leasehold.InvalidArgument):
        retry.attempts(**kwargs)
    with pytest.raises(leasehold.InvalidArgument):
        retry.retry(**kwargs)


def test_delay_rejects_bad_attempts() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(leasehold.InvalidArgument):
            retry.delay(bad)  # type: ignore[arg-type]
