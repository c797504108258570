"""One SQLite file's connection: opening it (and refusing network filesystems), the
schema and its migrations, the reboot fence gap, busy retries, transactions and
checkpoints. The operations (tx.py) subclass it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from leasehold import _deadline
from leasehold._core.backoff import Backoff
from leasehold._errors import InvalidArgument, StoreMisconfigured, StoreUnavailable

# Commits that synchronous=NORMAL may lose in a power cut are fewer than this, so
# after a reboot the fence sequence jumps past anything that could have been issued.
REBOOT_FENCE_GAP = 1 << 32

SETUP_RETRY = Backoff(initial=0.002, maximum=0.1)

# While another connection holds the write lock. SQLite's own busy handler sleeps
# 1, 2, 5, 10 ... ms, during which a process cycling acquire/release takes the lock
# again and again (a caller that is not queued yet cannot be served in turn), so
# the connection has none and these short, jittered retries stand in for it.
BUSY_RETRY = Backoff(initial=0.00005, maximum=0.002, multiplier=1.5)

T = TypeVar("T")

# Columns lh_waiter gained after leasehold's first release, oldest first (opening
# an older file adds them): the wake-up address, then what a release needs to hand
# the waiter a place (its latest request's ttl, limit and holder). Rows queued by
# an older leasehold lack them (NULL) and are only woken.
WAITER_COLUMNS = (
    ("wake", "TEXT"),
    ("ttl", "REAL"),
    ("lim", "INTEGER"),
    ("owner", "TEXT"),
    ("host", "TEXT"),
    ("pid", "INTEGER"),
)


NETWORK_FILESYSTEMS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "ceph",
    "glusterfs",
    "fuse.sshfs",
    "afs",
    "lustre",
    "gpfs",
    "fuse.glusterfs",
}


def _busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        # No boot id: derive one from when the monotonic clock started (to 10 s).
        return f"t{round((time.time() - time.monotonic()) / 10)}"


def boot_clock() -> float:
    """Seconds since boot, counting suspend, immune to wall-clock jumps."""
    clock_id = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.clock_gettime(clock_id)


def filesystem_type(path: Path) -> str | None:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, best_type = mount_point, parts[2]
    return best_type


class WouldWait(Exception):
    """The database is locked by another connection; ``attempt_now`` gives up."""


# With checkpoints left to the caller (``autocheckpoint=False``), one is due after
# this many commits: SQLite's own default is 1,000 WAL pages, and a commit of
# leasehold writes a handful.
CHECKPOINT_EVERY = 256


# SQLite answers that waiting cannot change: the file or its directory may not be
# written (permissions, a read-only mount) or is not a database.
_MISCONFIGURED = (
    "readonly database",
    "unable to open database file",
    "file is not a database",
    "authorization denied",
)


def sqlite_error(what: str, exc: BaseException) -> StoreUnavailable:
    """``exc`` as StoreUnavailable, or StoreMisconfigured when retrying cannot help."""
    text = str(exc)
    kind = StoreMisconfigured if any(m in text for m in _MISCONFIGURED) else StoreUnavailable
    return kind(f"{what}: {text}")


class SQLiteConnection:
    """What every SQLite transaction stands on (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float,
        allow_network_fs: bool,
        autocheckpoint: bool = True,
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.allow_network_fs = allow_network_fs
        # False: commits never checkpoint the WAL themselves (a checkpoint writes
        # and syncs the database file); the owner calls checkpoint() when
        # checkpoint_due says so, off the thread that must not block.
        self.autocheckpoint = autocheckpoint
        self.commits = 0
        self._checkpointed_at = 0
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._waits = True
        self.fs_type: str | None = None

    # -- connection --------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # After fork the parent's connection is abandoned, never closed or used:
        # SQLite connections must not cross fork.
        self._conn = None
        directory = self.path.parent
        try:
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            kind = StoreMisconfigured if isinstance(exc, PermissionError) else StoreUnavailable
            raise kind(f"cannot create {directory}: {exc.strerror}") from None
        if sqlite3.sqlite_version_info < (3, 35):
            raise StoreUnavailable(
                f"SQLite {sqlite3.sqlite_version} is too old; leasehold needs 3.35 or newer"
            )
        self.fs_type = filesystem_type(directory)
        if self.fs_type in NETWORK_FILESYSTEMS and not self.allow_network_fs:
            raise InvalidArgument(
                f"{self.path} is on a network file system ({self.fs_type}); SQLite locking "
                "is unreliable there. Use a local path, a Redis or PostgreSQL store, or "
                "add ?allow_network_fs=1 to accept the risk."
            )
        # Switching a brand-new file to WAL needs an exclusive lock and does not wait
        # on the busy handler, so processes opening the store at the same instant
        # retry the set-up (with jitter) until the busy timeout.
        give_up = time.monotonic() + _deadline.remaining(self.busy_timeout)
        attempt = 0
        while True:
            try:
                conn = self._open()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise sqlite_error(f"cannot open SQLite store {self.path}", exc) from None
                if time.monotonic() >= give_up:
                    raise sqlite_error(f"cannot open SQLite store {self.path}", exc) from None
                time.sleep(SETUP_RETRY.delay(attempt))
                attempt += 1
            except sqlite3.Error as exc:
                raise sqlite_error(f"cannot open SQLite store {self.path}", exc) from None
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        # No busy handler (timeout 0): ``_retrying`` waits for locks instead.
        conn = sqlite3.connect(
            str(self.path),
            timeout=0,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if not self.autocheckpoint:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            self._init_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        schema = resources.files("leasehold._shared").joinpath("sqlite/schema.sql").read_text()
        with self._immediate(conn):
            code = "\n".join(
                line for line in schema.splitlines() if not line.lstrip().startswith("--")
            )
            for statement in code.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(lh_waiter)")}
            for column, kind in WAITER_COLUMNS:
                if column not in columns:  # a store created by an earlier version
                    conn.execute(f"ALTER TABLE lh_waiter ADD COLUMN {column} {kind}")
            current = boot_id()
            row = conn.execute("SELECT value FROM lh_meta WHERE key = 'boot'").fetchone()
            if row is None or row[0] != current:
                # Expiries were written on another boot's clock: every lease from
                # before this boot is over, and the fence jumps past anything a lost
                # (unsynced) commit may have handed out.
                conn.execute("DELETE FROM lh_holder")
                conn.execute("DELETE FROM lh_waiter")
                conn.execute("DELETE FROM lh_record WHERE expires IS NOT NULL")
                if row is not None:
                    conn.execute("UPDATE lh_seq SET value = value + ?", (REBOOT_FENCE_GAP,))
                conn.execute(
                    "INSERT INTO lh_meta (key, value) VALUES ('boot', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (current,),
                )

    def attempt_now(
        self, guard: threading.Lock, operation: Callable[[], T]
    ) -> tuple[bool, T | None]:
        """``(True, operation())`` if it could run at once on the calling thread:
        the connection is open in this process, ``guard`` (which serialises every
        use of it) is free, and no other connection holds the database lock.
        Otherwise ``(False, None)`` without waiting and without having changed
        anything: the caller runs it where waiting is allowed."""
        if self._conn is None or self._pid != os.getpid():
            return False, None  # opening it may wait (set-up retries)
        if not guard.acquire(blocking=False):
            return False, None
        try:
            self._waits = False
            try:
                return True, operation()
            except WouldWait:
                return False, None
            finally:
                self._waits = True
        finally:
            guard.release()

    @property
    def checkpoint_due(self) -> bool:
        return not self.autocheckpoint and self.commits - self._checkpointed_at >= CHECKPOINT_EVERY

    def checkpoint(self) -> None:
        """Copy what it can of the WAL into the database file, waiting for nobody
        (PASSIVE), for stores made with ``autocheckpoint=False``."""
        self._checkpointed_at = self.commits
        with contextlib.suppress(sqlite3.Error):
            self.connection().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """``attempt()``, tried again while the database is locked, up to the busy
        timeout (see BUSY_RETRY). Costs one try/except when it is not locked.
        Inside ``attempt_now`` a locked database raises WouldWait instead."""
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            if not self._waits:
                raise WouldWait from None
        # Within a store operation, never past its deadline (a process stopped
        # while holding the write lock stalls SQLite like a silent server).
        give_up = time.monotonic() + _deadline.remaining(self.busy_timeout)
        tries = 0
        while True:
            time.sleep(min(BUSY_RETRY.delay(tries), max(0.0, give_up - time.monotonic())))
            tries += 1
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() >= give_up:
                    raise

    def read(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """The rows of one read outside a transaction, retried while the database
        is locked (rare in WAL mode: recovery, the last connection closing). Raises
        sqlite3 errors; callers turn them into StoreUnavailable."""
        conn = self.connection()
        return self._retrying(lambda: conn.execute(sql, parameters).fetchall())

    @contextlib.contextmanager
    def _immediate(self, conn: sqlite3.Connection) -> Iterator[None]:
        self._retrying(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self.commits += 1

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        try:
            with self._immediate(conn):
                yield conn
        except sqlite3.Error as exc:
            raise sqlite_error(f"SQLite store {self.path}", exc) from None

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None
