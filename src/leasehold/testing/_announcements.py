"""The conformance suite's announcement tests (re-exported by leasehold.testing.conformance)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from leasehold._errors import InvalidArgument
from leasehold._sync.store import Store
from leasehold.testing.harness import BackendHarness

# -- announcements ---------------------------------------------------------------------


def _announcing(lh_backend: BackendHarness) -> tuple[Store, Store]:
    """Two independent stores of the backend (two clients: separate connections), or
    a skip when it has no announcements."""
    a, b = lh_backend.client().store, lh_backend.client().store
    if not a.capabilities.announcements:
        pytest.skip(f"{lh_backend.name} has no announcements; subscribers poll")
    return a, b


def test_announce_wakes_a_subscriber_promptly(lh_backend: BackendHarness) -> None:
    announcer, listener = _announcing(lh_backend)
    topic = lh_backend.unique("topic")
    with listener.subscribe(topic) as subscription:
        timer = threading.Timer(0.2, announcer.announce, args=(topic,))
        started = time.monotonic()
        timer.start()
        try:
            assert subscription.wait(10.0) is True
        finally:
            timer.join()
        assert 0.15 <= time.monotonic() - started < 1.5
        # Announced before anyone waits (but after subscribing): not lost either.
        announcer.announce(topic)
        started = time.monotonic()
        assert subscription.wait(10.0) is True
        assert time.monotonic() - started < 1.0


def test_announce_reaches_every_subscriber_of_its_topic_only(lh_backend: BackendHarness) -> None:
    announcer, listener = _announcing(lh_backend)
    third = lh_backend.client().store
    # Topics are data, never code: quotes, braces, globs, non-ASCII all travel as is.
    topic = lh_backend.unique("topic") + " {1}*?[x]'; DROP TABLE x; -- ☃"
    other = topic + ":other"
    with contextlib.ExitStack() as stack:
        many = [
            stack.enter_context(store.subscribe(topic))
            for store in (listener, listener, third, announcer, third)
        ]
        bystander = stack.enter_context(listener.subscribe(other))
        announcer.announce(topic)
        started = time.monotonic()
        assert all(subscription.wait(10.0) for subscription in many)
        assert time.monotonic() - started < 1.5
        assert bystander.wait(0.3) is False
        announcer.announce(other)
        assert bystander.wait(10.0) is True
        assert not any(subscription.wait(0.05) for subscription in many)


def test_announcement_between_waits_is_not_lost(lh_backend: BackendHarness) -> None:
    announcer, listener = _announcing(lh_backend)
    topic = lh_backend.unique("topic")
    with listener.subscribe(topic) as subscription:
        assert subscription.wait(0.05) is False
        for _ in range(3):  # several announcements between two waits count as one
            announcer.announce(topic)
        time.sleep(0.2)  # delivered while nobody waits
        assert subscription.wait(10.0) is True
        assert subscription.wait(0.2) is False
        announcer.announce(topic)
        assert subscription.wait(10.0) is True
    # A closed subscription is forgotten: announcing to nobody is fine.
    announcer.announce(topic)


def test_subscription_times_out_and_checks_topics(lh_backend: BackendHarness) -> None:
    store = lh_backend.client().store
    topic = lh_backend.unique("topic")
    with store.subscribe(topic) as subscription:
        assert subscription.notified is store.capabilities.announcements
        started = time.monotonic()
        assert subscription.wait(0.3) is False
        assert 0.25 <= time.monotonic() - started < 2.0
        assert subscription.wait(0) is False
        # wake() ends a wait from any thread, on every backend (Election.stop uses it).
        threading.Timer(0.1, subscription.wake).start()
        assert subscription.wait(10.0) is True
    for bad in ("", "line\nbreak", "x" * 10_000, None):
        with pytest.raises(InvalidArgument):
            store.announce(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            store.subscribe(bad)  # type: ignore[arg-type]


def test_subscription_fallback_polls(lh_backend: BackendHarness) -> None:
    """The base class's subscription (what stores without announcements give) only
    sleeps: an announcement does not end its wait, its timeout does."""
    store = lh_backend.client().store
    topic = lh_backend.unique("topic")
    with Store.subscribe(store, topic) as subscription:
        assert subscription.notified is False
        store.announce(topic)
        started = time.monotonic()
        assert subscription.wait(0.3) is False
        assert time.monotonic() - started >= 0.25
    if not store.capabilities.announcements:
        with store.subscribe(topic) as subscription:
            store.announce(topic)
            assert subscription.wait(0.3) is False


def test_announcements_in_async_code(lh_backend: BackendHarness) -> None:
    topic = lh_backend.unique("topic")

    async def scenario() -> None:
        async with lh_backend.async_client() as a, lh_backend.async_client() as b:
            if not a.store.capabilities.announcements:
                pytest.skip(f"{lh_backend.name} has no announcements; subscribers poll")
            async with b.store.subscribe(topic) as subscription:
                assert await subscription.wait(0.05) is False
                loop = asyncio.get_running_loop()
                loop.call_later(0.1, lambda: asyncio.ensure_future(a.store.announce(topic)))
                started = time.monotonic()
                assert await subscription.wait(10.0) is True
                assert time.monotonic() - started < 1.5
                # A wait is cancellable like any await, and the subscription survives it.
                waiting = asyncio.ensure_future(subscription.wait(10.0))
                await asyncio.sleep(0.05)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                await a.store.announce(topic)
                assert await subscription.wait(10.0) is True

    asyncio.run(scenario())
