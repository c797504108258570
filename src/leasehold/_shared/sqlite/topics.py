"""The SQLite store's announcement subscribers: who to send a datagram to per topic.

A subscription binds a wake-up socket (``leasehold._wake``) and records its address
under its topic in ``lh_subscriber``; ``announce`` sends one datagram to every
address of the topic. Rows are removed when the subscription closes, and by an
announcer that finds nobody bound to an address any more (a subscriber that
crashed, or one from before a reboot), so no row outlives its owner for long.

Blocking functions over the store's one connection, like ``leasehold._shared.sqlite.tx``; the table
is created by the first subscriber (an announcer that finds no table has nobody
to wake).
"""

from __future__ import annotations

import sqlite3

from leasehold._shared.sqlite.connection import sqlite_error
from leasehold._shared.sqlite.tx import SQLiteTables

_CREATE = (
    "CREATE TABLE IF NOT EXISTS lh_subscriber ("
    "topic TEXT NOT NULL, address TEXT NOT NULL, PRIMARY KEY (topic, address)"
    ") WITHOUT ROWID"
)


def register(tables: SQLiteTables, topic: str, address: str) -> None:
    with tables.transaction() as conn:
        conn.execute(_CREATE)
        conn.execute(
            "INSERT OR IGNORE INTO lh_subscriber (topic, address) VALUES (?, ?)", (topic, address)
        )


def unregister(tables: SQLiteTables, pairs: list[tuple[str, str]]) -> None:
    """Forget (topic, address) pairs: closed subscriptions, unreachable addresses."""
    with tables.transaction() as conn:
        conn.execute(_CREATE)
        conn.executemany("DELETE FROM lh_subscriber WHERE topic = ? AND address = ?", pairs)


def subscribers(tables: SQLiteTables, topic: str) -> list[str]:
    """The wake-up addresses subscribed to ``topic``."""
    try:
        # Retried while the database is locked, like every other read.
        rows = tables.read("SELECT address FROM lh_subscriber WHERE topic = ?", (topic,))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []  # nobody ever subscribed to anything in this file
        raise sqlite_error(f"SQLite store {tables.path}", exc) from None
    except sqlite3.Error as exc:
        raise sqlite_error(f"SQLite store {tables.path}", exc) from None
    return [str(row[0]) for row in rows]
