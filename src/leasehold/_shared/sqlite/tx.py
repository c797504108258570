"""The SQLite store's transactions: plain blocking functions over one connection.

Both the async store (on a worker thread) and the generated sync store call these.
Each function is one ``BEGIN IMMEDIATE`` transaction, so the write lock is taken
up front and two processes can never interleave inside an operation.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from leasehold._core.records import (
    AcquireRequest,
    AcquireResult,
    Busy,
    Granted,
    HandedOver,
    HolderInfo,
    Record,
    RenewItem,
    WaiterInfo,
    WaitResult,
)
from leasehold._shared.sqlite.connection import SQLiteConnection, sqlite_error

# What a release (or break) tells the store to send, after commit: a waiter's
# wake-up address and the (fence, token) of the place handed to it (None: only
# woken, a waiter queued by an older leasehold).
Wakes = list[tuple[str, tuple[int, str] | None]]


class SQLiteTables(SQLiteConnection):
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
            wakes: Wakes = []
            # Nobody queued for the name (the common case) is one read: then the
            # token is no waiter either, and there is nothing to hand over.
            (queued,) = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM lh_waiter WHERE name = ?)", (name,)
            ).fetchone()
            if queued:
                # A waiter giving up leaves the queue (a holder is never queued: every
                # grant unqueues its token).
                conn.execute("DELETE FROM lh_waiter WHERE name = ? AND token = ?", (name, token))
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
            raise sqlite_error(f"SQLite store {self.path}", exc) from None
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
            raise sqlite_error(f"SQLite store {self.path}", exc) from None
        return self._infos(rows, now)

    def leases(self, prefix: str, now: float) -> list[HolderInfo]:
        try:
            rows = self.read(
                self._SELECT + "WHERE substr(name, 1, ?) = ? AND expires > ? ORDER BY name, fence",
                (len(prefix), prefix, now),
            )
        except sqlite3.Error as exc:
            raise sqlite_error(f"SQLite store {self.path}", exc) from None
        return self._infos(rows, now)

    def waiters(self, prefix: str, now: float) -> list[WaiterInfo]:
        try:
            rows = self.read(
                "SELECT name, coalesce(owner, ''), coalesce(host, ''), coalesce(pid, 0), "
                "expires FROM lh_waiter WHERE substr(name, 1, ?) = ? AND expires > ? "
                "ORDER BY name, seq",
                (len(prefix), prefix, now),
            )
        except sqlite3.Error as exc:
            raise sqlite_error(f"SQLite store {self.path}", exc) from None
        infos: list[WaiterInfo] = []
        position = 0
        for index, (name, owner, host, pid, expires) in enumerate(rows):
            position = position + 1 if index and rows[index - 1][0] == name else 0
            infos.append(
                WaiterInfo(
                    name=str(name),
                    owner=str(owner),
                    host=str(host),
                    pid=int(pid),
                    position=position,
                    expires_in=max(0.0, float(expires) - now),
                )
            )
        return infos

    def read_record(self, key: str, now: float) -> Record:
        try:
            rows = self.read(
                "SELECT value, version FROM lh_record "
                "WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (key, now),
            )
        except sqlite3.Error as exc:
            raise sqlite_error(f"SQLite store {self.path}", exc) from None
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
            raise sqlite_error(f"SQLite store {self.path}", exc) from None
