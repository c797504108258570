"""The asyncio SQLite store runs a call on the event loop only when it cannot wait.

``AsyncSQLiteStore._call`` tries each transaction on the loop thread with SQLite's
busy handling turned into "give up at once"; a database locked by another
connection sends the call to the worker thread, which waits there. Its commits do
not checkpoint the WAL (that writes and syncs the database file): the worker
thread does, every CHECKPOINT_EVERY commits.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path

from leasehold._async.backends.sqlite import AsyncSQLiteStore, from_url
from leasehold._core.clock import SYSTEM_CLOCK
from leasehold._core.records import AcquireRequest, Granted, Holder
from leasehold._core.url import parse
from leasehold._shared.sqlite.connection import CHECKPOINT_EVERY

HOLDER = Holder(owner="inline", host="test-host", pid=1)


def _store(path: Path) -> AsyncSQLiteStore:
    store = from_url(parse(f"sqlite:///{path}"), SYSTEM_CLOCK)
    assert isinstance(store, AsyncSQLiteStore)
    return store


def _request(name: str) -> AcquireRequest:
    return AcquireRequest(
        name=name, token=secrets.token_urlsafe(16), holder=HOLDER, ttl=30.0, limit=1
    )


def test_a_locked_database_never_blocks_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"

    async def main() -> None:
        store = _store(path)
        try:
            assert isinstance(await store.acquire(_request("warm-up")), Granted)
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process's write transaction
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            ticker = asyncio.get_running_loop().create_task(tick())
            acquiring = asyncio.get_running_loop().create_task(store.acquire(_request("n")))
            await asyncio.sleep(0.3)
            assert not acquiring.done()  # waits for the lock (on the worker thread) ...
            assert ticks >= 20, ticks  # ... while the loop runs on (60 ticks if idle)
            other.execute("COMMIT")
            other.close()
            assert isinstance(await asyncio.wait_for(acquiring, 5), Granted)
            ticker.cancel()
        finally:
            await store.aclose()

    asyncio.run(main())


def test_the_worker_thread_checkpoints_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    wal = Path(f"{path}-wal")
    rounds = 4 * CHECKPOINT_EVERY

    async def main() -> tuple[int, int]:
        store = _store(path)
        try:
            for i in range(rounds):
                request = _request(f"name-{i}")  # new rows: the WAL keeps growing
                assert isinstance(await store.acquire(request), Granted)
                await store.release(request.name, request.token)
                if i == CHECKPOINT_EVERY // 2:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)  # the last checkpoint, on the worker thread
            # Checkpoints copied the WAL into the database: its frames are reused
            # instead of appended, so the file stays a fraction of what it would be.
            reader = sqlite3.connect(path, isolation_level=None)
            try:
                busy, log_frames, copied = reader.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)"
                ).fetchone()
            finally:
                reader.close()
            del busy, copied
            return int(log_frames), wal.stat().st_size
        finally:
            await store.aclose()

    frames, size = asyncio.run(main())
    # 2 * rounds commits of a few pages each without any checkpoint: ~5,000 frames
    # and ~21 MB here. With one every CHECKPOINT_EVERY commits, the log never holds
    # much more than that many commits' frames (~500 frames, ~4 MB).
    assert frames < 2 * rounds, frames
    assert size < 2 * rounds * 4096, size
