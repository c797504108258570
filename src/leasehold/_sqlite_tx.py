"""The SQLite store's transactions: plain blocking functions over one connection.

Both the async store (on a worker thread) and the generated sync store call these.
Each function is one ``BEGIN IMMEDIATE`` transaction, so the write lock is taken
up front and two processes can never interleave inside an operation.
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
from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Granted,
    HandedOver,
    HolderInfo,
    Record,
    RenewItem,
    WaitResult,
)
from leasehold._errors import InvalidArgument, StoreUnavailable

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

# What a release (or break) tells the store to send, after commit: a waiter's
# wake-up address and the (fence, token) of the place handed to it (None: only
# woken, a waiter queued by an older leasehold).
Wakes = list[tuple[str, tuple[int, str] | None]]

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


class SQLiteTables:
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
            raise StoreUnavailable(f"cannot create {directory}: {exc.strerror}") from None
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
                    raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from None
                if time.monotonic() >= give_up:
                    raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from None
                time.sleep(SETUP_RETRY.delay(attempt))
                attempt += 1
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from None
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
        schema = resources.files("leasehold._scripts").joinpath("sqlite/schema.sql").read_text()
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
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from None

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None

    # -- operations --------------------------------------------------------------

    @staticmethod
    def _purge(conn: sqlite3.Connection, name: str, now: float) -> None:
        conn.execute("DELETE FROM lh_holder WHERE name = ? AND expires <= ?", (name, now))
        conn.execute("DELETE FROM lh_waiter WHERE name = ? AND expires <= ?", (name, now))

    # One read gathers everything an acquire decides on, so the common cases cost
    # BEGIN, this, one or two writes and COMMIT. Expired rows are deleted only when
    # the counts show there are some.
    _SURVEY = (
        "SELECT "
        "(SELECT fence FROM lh_holder WHERE name = :n AND token = :t AND expires > :now), "
        "(SELECT COUNT(*) FROM lh_holder WHERE name = :n AND expires > :now), "
        "(SELECT COUNT(*) FROM lh_holder WHERE name = :n), "
        "(SELECT seq FROM lh_waiter WHERE name = :n AND token = :t AND expires > :now), "
        "(SELECT COUNT(*) FROM lh_waiter WHERE name = :n AND expires > :now), "
        "(SELECT COUNT(*) FROM lh_waiter WHERE name = :n)"
    )

    def acquire(
        self, request: AcquireRequest, now: float, wake: str | None = None
    ) -> AcquireResult:
        """``wake``: the caller's wake-up address, recorded if it is queued."""
        name, token = request.name, request.token
        with self.transaction() as conn:
            mine, held, held_rows, my_seq, waiting, waiting_rows = conn.execute(
                self._SURVEY, {"n": name, "t": token, "now": now}
            ).fetchone()
            if mine is not None:
                conn.execute(
                    "UPDATE lh_holder SET expires = ? WHERE name = ? AND token = ?",
                    (now + request.ttl, name, token),
                )
                return Granted(int(mine))
            if held_rows != held or waiting_rows != waiting:
                self._purge(conn, name, now)
            if my_seq is None:
                ahead = int(waiting)
            else:
                (ahead,) = conn.execute(
                    "SELECT COUNT(*) FROM lh_waiter WHERE name = ? AND seq < ?", (name, my_seq)
                ).fetchone()
            if request.limit - int(held) > ahead:
                holder = request.holder
                fence = self._grant(
                    conn,
                    (name, token, holder.owner, holder.host, holder.pid, request.limit, now),
                    expires=now + request.ttl,
                    queued=my_seq is not None,
                )
                return Granted(fence)
            position: int | None = None
            if request.queue_ttl is not None:
                # The row keeps the latest request: what a release hands over.
                holder = request.holder
                values = {
                    "n": name,
                    "t": token,
                    "wake": wake,
                    "expires": now + request.queue_ttl,
                    "ttl": request.ttl,
                    "lim": request.limit,
                    "owner": holder.owner,
                    "host": holder.host,
                    "pid": holder.pid,
                }
                if my_seq is None:
                    conn.execute(
                        "INSERT INTO lh_waiter (name, token, seq, expires, wake, ttl, lim, "
                        "owner, host, pid) VALUES (:n, :t, "
                        "(SELECT COALESCE(MAX(seq), 0) + 1 FROM lh_waiter WHERE name = :n), "
                        ":expires, :wake, :ttl, :lim, :owner, :host, :pid) "
                        "ON CONFLICT (name, token) DO UPDATE SET seq = excluded.seq, "
                        "expires = excluded.expires, wake = COALESCE(excluded.wake, wake), "
                        "ttl = excluded.ttl, lim = excluded.lim, owner = excluded.owner, "
                        "host = excluded.host, pid = excluded.pid",
                        values,
                    )
                else:
                    conn.execute(
                        "UPDATE lh_waiter SET expires = :expires, wake = COALESCE(:wake, wake), "
                        "ttl = :ttl, lim = :lim, owner = :owner, host = :host, pid = :pid "
                        "WHERE name = :n AND token = :t",
                        values,
                    )
                position = int(ahead)
            (soonest,) = conn.execute(
                "SELECT MIN(expires) FROM lh_holder WHERE name = ? AND expires > ?", (name, now)
            ).fetchone()
        retry_after = None if soonest is None else max(0.0, float(soonest) - now)
        return Busy(retry_after=retry_after, position=position)

    def renew(self, items: Sequence[RenewItem], now: float) -> list[bool]:
        answers = []
        with self.transaction() as conn:
            for item in items:
                cursor = conn.execute(
                    "UPDATE lh_holder SET expires = ? WHERE name = ? AND token = ? AND expires > ?",
                    (now + item.ttl, item.name, item.token, now),
                )
                answers.append(cursor.rowcount == 1)
        return answers

    @staticmethod
    def _next_value(conn: sqlite3.Connection) -> int:
        """The next fence (or record version): one sequence for the whole file."""
        (value,) = conn.execute(
            "UPDATE lh_seq SET value = value + 1 WHERE id = 1 RETURNING value"
        ).fetchone()
        return int(value)

    @classmethod
    def _grant(
        cls,
        conn: sqlite3.Connection,
        row: tuple[str, str, str, str, int, int, float],
        *,
        expires: float,
        queued: bool,
    ) -> int:
        """Make a token a holder with a new fence; ``row`` is (name, token, owner,
        host, pid, limit, acquired). A queued token leaves the queue."""
        name, token, owner, host, pid, limit, acquired = row
        fence = cls._next_value(conn)
        conn.execute(
            "INSERT INTO lh_holder (name, token, owner, host, pid, fence, lim, "
            "acquired, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, token, owner, host, pid, fence, limit, acquired, expires),
        )
        if queued:
            conn.execute("DELETE FROM lh_waiter WHERE name = ? AND token = ?", (name, token))
        return fence

    @staticmethod
    def _wakeable(conn: sqlite3.Connection, name: str, limit: int) -> list[str]:
        """Wake-up addresses of the queued waiters that free places now let in."""
        (held,) = conn.execute("SELECT COUNT(*) FROM lh_holder WHERE name = ?", (name,)).fetchone()
        free = limit - int(held)
        if free <= 0:
            return []
        rows = conn.execute(
            "SELECT wake FROM lh_waiter WHERE name = ? ORDER BY seq LIMIT ?", (name, free)
        ).fetchall()
        return [str(row[0]) for row in rows if row[0] is not None]

    # The head of a name's queue, a few rows at a time (a lock hands over one).
    _HEADS = (
        "SELECT token, expires, wake, ttl, lim, owner, host, pid FROM lh_waiter "
        "WHERE name = ? ORDER BY seq LIMIT 4"
    )

    @classmethod
    def _hand_over(cls, conn: sqlite3.Connection, name: str, now: float, limit: int) -> Wakes:
        """Make the first queued waiters holders while their own limit leaves a place
        (expired rows already purged): a new fence from lh_seq, the holder of the
        waiter's latest request, expiry min(queue expiry, now + its ttl). A waiter
        queued by an older leasehold (no request stored) is only woken, as before,
        with ``limit`` (the departing holder's) as the number of places."""
        (held,) = conn.execute("SELECT COUNT(*) FROM lh_holder WHERE name = ?", (name,)).fetchone()
        held = int(held)
        wakes: Wakes = []
        while True:
            heads = conn.execute(cls._HEADS, (name,)).fetchall()
            for token, expires, wake, ttl, lim, owner, host, pid in heads:
                if ttl is None or lim is None or owner is None or host is None or pid is None:
                    wakes.extend((address, None) for address in cls._wakeable(conn, name, limit))
                    return wakes
                if held >= int(lim):
                    return wakes
                fence = cls._grant(
                    conn,
                    (name, token, owner, host, pid, lim, now),
                    expires=min(expires, now + ttl),
                    queued=True,
                )
                held += 1
                if wake is not None:
                    wakes.append((str(wake), (int(fence), str(token))))
            if len(heads) < 4:
                return wakes

    def release(self, name: str, token: str, now: float) -> tuple[bool, Wakes]:
        with self.transaction() as conn:
            row = conn.execute(
                "DELETE FROM lh_holder WHERE name = ? AND token = ? RETURNING lim, expires",
                (name, token),
            ).fetchone()
            held = row is not None and float(row[1]) > now
            conn.execute("DELETE FROM lh_waiter WHERE name = ? AND token = ?", (name, token))
            wakes: Wakes = []
            (queued,) = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM lh_waiter WHERE name = ?)", (name,)
            ).fetchone()
            if queued:
                # The departing holder or waiter may have been what kept the next
                # out: hand the free places over in this same transaction.
                self._purge(conn, name, now)
                wakes = self._hand_over(conn, name, now, int(row[0]) if row is not None else 1)
        return held, wakes

    def break_lease(self, name: str, now: float) -> tuple[int, Wakes]:
        with self.transaction() as conn:
            self._purge(conn, name, now)
            rows = conn.execute("DELETE FROM lh_holder WHERE name = ? RETURNING lim", (name,))
            limits = [int(row[0]) for row in rows.fetchall()]
            wakes = self._hand_over(conn, name, now, max(limits, default=1))
        return len(limits), wakes

    _MINE = "SELECT fence FROM lh_holder WHERE name = ? AND token = ? AND expires > ?"

    def arm(self, name: str, token: str, address: str, limit: int, now: float) -> WaitResult:
        """Record a waiter's wake-up address in its queue row. ``HandedOver`` if a
        release already made the token a holder (it needs no address then), True if
        the waiter could be granted right now or is no longer queued, else False."""
        with self.transaction() as conn:
            self._purge(conn, name, now)
            row = conn.execute(
                "UPDATE lh_waiter SET wake = ? WHERE name = ? AND token = ? RETURNING seq",
                (address, name, token),
            ).fetchone()
            if row is None:
                mine = conn.execute(self._MINE, (name, token, now)).fetchone()
                # No longer queued: handed over, or let the caller look again.
                return True if mine is None else HandedOver(int(mine[0]))
            (held,) = conn.execute(
                "SELECT COUNT(*) FROM lh_holder WHERE name = ?", (name,)
            ).fetchone()
            (ahead,) = conn.execute(
                "SELECT COUNT(*) FROM lh_waiter WHERE name = ? AND seq < ?", (name, row[0])
            ).fetchone()
        return limit - int(held) > int(ahead)

    # A waiter's look without a write: its fence if handed over, whether it is still
    # queued, and whether it could be granted now (places free, none ahead of it).
    _LOOK = (
        "SELECT "
        "(SELECT fence FROM lh_holder WHERE name = :n AND token = :t AND expires > :now), "
        "(SELECT seq FROM lh_waiter WHERE name = :n AND token = :t AND expires > :now), "
        "(SELECT COUNT(*) FROM lh_holder WHERE name = :n AND expires > :now), "
        "(SELECT COUNT(*) FROM lh_waiter WHERE name = :n AND expires > :now AND seq < "
        "(SELECT seq FROM lh_waiter WHERE name = :n AND token = :t))"
    )

    def look(self, name: str, token: str, limit: int, now: float) -> WaitResult:
        """What a waiter whose wake-up may have been lost would learn by asking
        again, read-only: ``HandedOver`` if a release made it a holder, True if it
        is no longer queued or could be granted now, else False."""
        try:
            ((fence, seq, held, ahead),) = self.read(
                self._LOOK, {"n": name, "t": token, "now": now}
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from None
        if fence is not None:
            return HandedOver(int(fence))
        if seq is None:
            return True
        return limit - int(held) > int(ahead)

    _SELECT = "SELECT name, owner, host, pid, fence, lim, acquired, expires FROM lh_holder "

    @staticmethod
    def _infos(rows: list[tuple[object, ...]], now: float) -> list[HolderInfo]:
        return [
            HolderInfo(
                name=str(name),
                owner=str(owner),
                host=str(host),
                pid=int(pid),  # type: ignore[call-overload]
                fence=int(fence),  # type: ignore[call-overload]
                limit=int(lim),  # type: ignore[call-overload]
                held_for=max(0.0, now - float(acquired)),  # type: ignore[arg-type]
                expires_in=max(0.0, float(expires) - now),  # type: ignore[arg-type]
            )
            for name, owner, host, pid, fence, lim, acquired, expires in rows
        ]

    def holders(self, name: str, now: float) -> list[HolderInfo]:
        try:
            rows = self.read(
                self._SELECT + "WHERE name = ? AND expires > ? ORDER BY fence", (name, now)
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from None
        return self._infos(rows, now)

    def leases(self, prefix: str, now: float) -> list[HolderInfo]:
        try:
            rows = self.read(
                self._SELECT + "WHERE substr(name, 1, ?) = ? AND expires > ? ORDER BY name, fence",
                (len(prefix), prefix, now),
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from None
        return self._infos(rows, now)

    def read_record(self, key: str, now: float) -> Record:
        try:
            rows = self.read(
                "SELECT value, version FROM lh_record "
                "WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (key, now),
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from None
        row = rows[0] if rows else None
        if row is None:
            return Record(key=key, value=None, version=0, now=now)
        return Record(key=key, value=bytes(row[0]), version=int(row[1]), now=now)

    def write_record(
        self, key: str, expected: int, value: bytes | None, ttl: float | None, now: float
    ) -> int | None:
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM lh_record WHERE key = ? AND expires IS NOT NULL AND expires <= ?",
                (key, now),
            )
            row = conn.execute("SELECT version FROM lh_record WHERE key = ?", (key,)).fetchone()
            if (0 if row is None else int(row[0])) != expected:
                return None
            version = self._next_value(conn)
            if value is None:
                conn.execute("DELETE FROM lh_record WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO lh_record (key, value, version, expires) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                    "version = excluded.version, expires = excluded.expires",
                    (key, value, version, None if ttl is None else now + ttl),
                )
        return int(version)

    def ping(self) -> None:
        try:
            self.read("SELECT 1")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from None
