"""Log lines on-call can use: rate-limited renewal failures, loss at ERROR with its
cause, structured fields on every record (``extra=``)."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from typing import Any

import pytest

import leasehold
from leasehold import _observe

FIELDS = ("leasehold_name", "leasehold_fence", "leasehold_owner", "leasehold_event")


def wait_until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def renewal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "leasehold_event", None) in ("renewal_failed", "renewal_failing")
    ]


def test_renewal_failures_in_an_outage_are_rate_limited(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.servers.redis import RedisServer

    caplog.set_level(logging.INFO, logger="leasehold")
    outage = 7.0
    with RedisServer() as server:
        client = leasehold.Client(server.url)
        try:
            lease = client.lock("outage", ttl=30).acquire(timeout=5)
            server.stop()
            wait_until(lambda: client.statistics().renewal_failures >= 1)
            time.sleep(outage)
            failures = client.statistics().renewal_failures
            server.start()
            wait_until(lambda: lease.lost or client.statistics().renewed >= 1)
            lease.release()
        finally:
            client.close()
    lines = renewal_lines(caplog)
    ours = [r for r in caplog.records if r.name.startswith("leasehold")]
    assert all(hasattr(r, "leasehold_event") for r in ours), [r.getMessage() for r in ours]
    first, *summaries = lines
    assert failures >= 8, "enough failures for rate limiting to matter"
    assert first.levelno == logging.WARNING and first.leasehold_event == "renewal_failed"  # type: ignore[attr-defined]
    assert "the soonest" in first.getMessage()
    assert 0 < first.leasehold_time_left <= 30  # type: ignore[attr-defined]
    # One line at most every SUMMARY_INTERVAL, each with the count and time left.
    assert 1 <= len(summaries) <= outage / _observe.SUMMARY_INTERVAL + 1, [
        r.getMessage() for r in lines
    ]
    for line in summaries:
        assert line.leasehold_event == "renewal_failing"  # type: ignore[attr-defined]
        assert "failed attempt(s)" in line.getMessage()
        assert "the soonest safe deadline" in line.getMessage()
    for earlier, later in itertools.pairwise(lines):
        assert later.created - earlier.created >= _observe.SUMMARY_INTERVAL - 0.5


def test_loss_is_logged_at_error_with_its_cause_and_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="leasehold")
    client = leasehold.Client(f"memory://{uuid.uuid4().hex}", identity="worker-7")
    lease = client.lock("job:1", ttl=0.6).acquire()
    token = lease._token
    client.break_lease("job:1")

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "leasehold_event", None) == "lost"]

    # The keeper logs the loss just after it marks the lease lost, so `lease.lost`
    # alone may be seen before the record exists (a parallel run met that).
    wait_until(lambda: lease.lost and bool(logged()))
    lease.release()
    client.close()
    [record] = logged()
    assert record.levelno == logging.ERROR
    assert "no longer held" in record.getMessage() and "refused" in record.getMessage()
    for field in FIELDS:
        assert hasattr(record, field), field
    assert record.leasehold_name == "job:1"  # type: ignore[attr-defined]
    assert record.leasehold_fence == lease.fence  # type: ignore[attr-defined]
    assert record.leasehold_owner == lease.owner  # type: ignore[attr-defined]
    assert lease.owner.startswith("worker-7")
    assert record.leasehold_reason == "refused"  # type: ignore[attr-defined]
    assert record.leasehold_primitive == "lock"  # type: ignore[attr-defined]
    # The secret token is nowhere in any record.
    for r in caplog.records:
        assert token not in r.getMessage()
        assert all(token not in str(v) for v in vars(r).values())


def test_a_clean_close_logs_no_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="leasehold")
    client = leasehold.Client(f"memory://{uuid.uuid4().hex}")
    lease = client.lock("c", ttl=0.3).acquire()
    time.sleep(0.3)
    election = client.election("e", ttl=1)
    election.campaign()
    client.close()
    assert not lease.held
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_clean_asgi_shutdown_on_redis_logs_nothing(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Shutdown used to close the store under the leader's vacancy announcement
    # (sent in the background): "could not announce a change (... Connection
    # closed by server.)" on every clean shutdown.
    import asyncio

    import leasehold.asgi

    async def tick(lease: leasehold.AsyncLease) -> None:
        lease.check()

    async def main() -> None:
        election = f"closer-{uuid.uuid4().hex}"
        lifespan = leasehold.asgi.lifespan(
            redis_server.url, leader=tick, every=0.05, election=election, ttl=2
        )
        context = lifespan(None)
        state = await context.__aenter__()
        candidate = state["leasehold_election"]
        while not candidate.leading:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        await context.__aexit__(None, None, None)

    caplog.set_level(logging.INFO, logger="leasehold")
    for _ in range(3):
        asyncio.run(main())
    noisy = [r.getMessage() for r in caplog.records if r.name.startswith("leasehold")]
    assert noisy == []
