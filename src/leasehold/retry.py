"""Retry loops with jittered exponential backoff ("full jitter").

When many workers fail at the same moment -- a database restarts, a lock holder
dies -- retries that wait a fixed or purely exponential time come back at the same
moment too, and fail together again (a retry storm). Full jitter draws every delay
uniformly from ``[0, min(maximum, initial * multiplier ** n)]``, so a crowd spreads
out over the whole window while the window still grows exponentially.

Three ways to use it::

    import leasehold

    # 1. a loop: ``with attempt`` swallows the listed errors until the last try
    for attempt in leasehold.retry.attempts(max_tries=5, on=(ConnectionError,)):
        with attempt:
            call_the_service()

    # the same in async code
    async for attempt in leasehold.retry.attempts(max_tries=5, on=(ConnectionError,)):
        async with attempt:
            await call_the_service()

    # 2. a decorator for sync or async functions
    @leasehold.retry.retry(on=(ConnectionError,), max_tries=5, initial=0.1, maximum=10)
    def call_the_service() -> None: ...

    # 3. just the numbers, for schedulers of your own (Celery countdowns, say)
    countdown = leasehold.retry.delay(attempt, initial=1.0, maximum=300.0)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar, cast

from leasehold._core.backoff import Backoff
from leasehold._errors import InvalidArgument

__all__ = ["Attempt", "attempts", "delay", "delays", "retry"]

logger = logging.getLogger("leasehold.retry")

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_INITIAL = 0.1
DEFAULT_MAXIMUM = 10.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_TRIES = 5


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a number, got {type(value).__name__}")
    number = float(value)
    if not 0 < number < float("inf"):
        raise InvalidArgument(f"{what} must be a positive finite number, got {value!r}")
    return number


def _backoff(initial: float, maximum: float, multiplier: float) -> Backoff:
    initial = _positive(initial, "initial")
    maximum = _positive(maximum, "maximum")
    multiplier = _positive(multiplier, "multiplier")
    if maximum < initial:
        raise InvalidArgument(f"maximum ({maximum:g}) must be >= initial ({initial:g})")
    if multiplier < 1:
        raise InvalidArgument(f"multiplier must be >= 1, got {multiplier:g}")
    return Backoff(initial=initial, maximum=maximum, multiplier=multiplier)


def _full_jitter(backoff: Backoff, attempt: int, rng: random.Random | None) -> float:
    return (rng or random).random() * backoff.ceiling(attempt)


def delay(
    attempt: int,
    *,
    initial: float = DEFAULT_INITIAL,
    maximum: float = DEFAULT_MAXIMUM,
    multiplier: float = DEFAULT_MULTIPLIER,
    rng: random.Random | None = None,
) -> float:
    """The pause before retry number ``attempt`` (0 = the first retry): uniform in
    ``[0, min(maximum, initial * multiplier ** attempt)]``."""
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise InvalidArgument(f"attempt must be an int >= 0, got {attempt!r}")
    return _full_jitter(_backoff(initial, maximum, multiplier), attempt, rng)


def delays(
    *,
    initial: float = DEFAULT_INITIAL,
    maximum: float = DEFAULT_MAXIMUM,
    multiplier: float = DEFAULT_MULTIPLIER,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """An endless sequence of full-jitter delays (retry 0, 1, 2, ...)."""
    backoff = _backoff(initial, maximum, multiplier)
    attempt = 0
    while True:
        yield _full_jitter(backoff, attempt, rng)
        attempt += 1


class Attempt:
    """One try of an ``attempts()`` loop.

    Used as ``with attempt:`` (or ``async with``), an exception of the listed types
    is swallowed and the loop sleeps and tries again -- except on the last try,
    where it propagates. A body that finishes without an exception ends the loop.
    """

    def __init__(self, loop: attempts, number: int, started: float) -> None:
        self._loop = loop
        self.number = number
        self._started = started
        self.succeeded = False
        self.error: BaseException | None = None
        self._decided = False
        self._pause: float | None = None

    def _decision(self) -> float | None:
        """The pause before the next try, or None if none follows; decided once, so
        ``last`` and what the loop then does never disagree."""
        if not self._decided:
            self._pause = self._loop._decide(self.number, self._started)
            self._decided = True
        return self._pause

    @property
    def last(self) -> bool:
        """True when no retry follows this try (tries or time are used up)."""
        return self._decision() is None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.succeeded = True
            return False
        if not isinstance(exc, self._loop.on) or self.last:
            return False
        self.error = exc
        return True

    async def __aenter__(self) -> Attempt:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        limit = "" if self._loop.max_tries is None else f"/{self._loop.max_tries}"
        return f"<Attempt {self.number}{limit}>"


class attempts:
    """Tries for a retry loop: ``for attempt in attempts(...)`` (sleeps with
    ``time.sleep``) or ``async for attempt in attempts(...)`` (``asyncio.sleep``).

    ``max_tries``: how many tries in all (None: no limit, then give ``timeout``).
    ``on``: exception types that ``with attempt:`` swallows before the last try.
    ``timeout``: no retry starts later than this many seconds after the first try.
    Delays are full jitter (see ``delay``). ``rng``, ``sleep`` and ``clock`` are for
    tests.

    The loop ends after a try whose ``with attempt:`` body succeeded. Without
    ``with``, every iteration is a try: ``break`` on success, and raise on
    ``attempt.last`` yourself.
    """

    def __init__(
        self,
        max_tries: int | None = DEFAULT_TRIES,
        *,
        on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        initial: float = DEFAULT_INITIAL,
        maximum: float = DEFAULT_MAXIMUM,
        multiplier: float = DEFAULT_MULTIPLIER,
        timeout: float | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_tries is not None and (
            isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1
        ):
            raise InvalidArgument(f"max_tries must be an int >= 1 or None, got {max_tries!r}")
        if max_tries is None and timeout is None:
            raise InvalidArgument("give max_tries or timeout (or both): retrying forever is a bug")
        types = on if isinstance(on, tuple) else (on,)
        if not types or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in types
        ):
            raise InvalidArgument("on must be an exception type or a tuple of them")
        self.max_tries = max_tries
        self.on: tuple[type[BaseException], ...] = types
        self.timeout = None if timeout is None else _positive(timeout, "timeout")
        self._backoff = _backoff(initial, maximum, multiplier)
        self._rng = rng
        self._sleep = sleep
        self._clock = clock

    def _decide(self, number: int, started: float) -> float | None:
        """After try ``number`` of a loop begun at ``started``: the pause before the
        next try, or None."""
        if self.max_tries is not None and number >= self.max_tries:
            return None
        pause = _full_jitter(self._backoff, number - 1, self._rng)
        if self.timeout is not None and self._clock() - started + pause > self.timeout:
            return None
        return pause

    def _pause(self, attempt: Attempt) -> float | None:
        """The delay before the next try, or None when the loop ends."""
        if attempt.succeeded:
            return None
        pause = attempt._decision()
        if pause is not None and attempt.error is not None:
            logger.info(
                "retrying in %.3f s after %s: %s (try %s)",
                pause,
                type(attempt.error).__name__,
                attempt.error,
                attempt,
            )
        return pause

    def __iter__(self) -> Iterator[Attempt]:
        started = self._clock()
        number = 1
        while True:
            attempt = Attempt(self, number, started)
            yield attempt
            pause = self._pause(attempt)
            if pause is None:
                return
            (self._sleep or time.sleep)(pause)
            number += 1

    async def __aiter__(self) -> AsyncIterator[Attempt]:
        started = self._clock()
        number = 1
        while True:
            attempt = Attempt(self, number, started)
            yield attempt
            pause = self._pause(attempt)
            if pause is None:
                return
            if self._sleep is None:
                await asyncio.sleep(pause)
            else:
                slept = self._sleep(pause)
                if inspect.isawaitable(slept):
                    await slept
            number += 1


def retry(
    on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    *,
    max_tries: int | None = DEFAULT_TRIES,
    initial: float = DEFAULT_INITIAL,
    maximum: float = DEFAULT_MAXIMUM,
    multiplier: float = DEFAULT_MULTIPLIER,
    timeout: float | None = None,
) -> Callable[[F], F]:
    """Decorate a sync or async function to be retried on ``on`` with full-jitter
    backoff; the last error propagates. Arguments as for ``attempts``."""
    # Validate now, at decoration time, not at the first failure.
    attempts(
        max_tries,
        on=on,
        initial=initial,
        maximum=maximum,
        multiplier=multiplier,
        timeout=timeout,
    )

    def loop() -> attempts:
        return attempts(
            max_tries,
            on=on,
            initial=initial,
            maximum=maximum,
            multiplier=multiplier,
            timeout=timeout,
        )

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async for attempt in loop():
                    async with attempt:
                        return await fn(*args, **kwargs)
                raise AssertionError("unreachable: the last try raises")  # pragma: no cover

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for attempt in loop():
                with attempt:
                    return fn(*args, **kwargs)
            raise AssertionError("unreachable: the last try raises")  # pragma: no cover

        return cast(F, wrapper)

    return decorate
