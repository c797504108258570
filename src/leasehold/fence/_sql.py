"""The fence table's SQL and the check itself, as a plan that any driver can run.

The check is one upsert that both records the caller's fence and takes the row
lock that serializes every fenced transaction for that name:

    INSERT INTO t AS f (name, fence) VALUES (:name, :fence)
    ON CONFLICT (name) DO UPDATE SET fence = excluded.fence
    WHERE excluded.fence >= f.fence

Why this is race-free (PostgreSQL READ COMMITTED; SQLite is simpler, it has one
writer at a time):

- One row affected (returned, on PostgreSQL) means the fence was not lower than
  the highest recorded. The row is now locked by the caller's transaction until
  it commits or rolls back, so a newer holder's check waits for it: the older
  holder's writes commit *before* the newer holder writes anything.
- Zero rows means a higher fence is recorded by a committed transaction. If that
  transaction was still open, the upsert waited for it and then re-evaluated the
  WHERE against the committed row, so a stale holder fails even when its own
  transaction started first.
- An equal fence is accepted by the same statement (``>=``): the holder writes
  many times with one fence, and each time it must take the row lock. A plain
  SELECT to accept an equal fence would take no lock, and a successor could
  then check, write and commit between the holder's check and its writes.
  (PostgreSQL locks the conflicting row even when the WHERE fails, so a rejected
  holder also holds it until it rolls back; SQLite takes its write lock for any
  upsert. Either way the next holder just waits for that rollback.)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from leasehold._core import validate
from leasehold._errors import InvalidArgument, StaleFence

DEFAULT_TABLE = "leasehold_fences"

# Fences are stored as BIGINT / SQLite INTEGER, both signed 64-bit.
MAX_FENCE = (1 << 63) - 1

# Lowercase only: PostgreSQL folds unquoted names to lowercase, so allowing capitals
# would make the table we create (quoted) differ from the one users query by hand.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

Dialect = Literal["sqlite", "postgresql"]

_DIALECT_ALIASES: Mapping[str, Dialect] = {
    "sqlite": "sqlite",
    "sqlite3": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
}


def parse_dialect(value: object) -> Dialect:
    if not isinstance(value, str):
        raise InvalidArgument(f"dialect must be a str, got {type(value).__name__}")
    try:
        return _DIALECT_ALIASES[value.lower()]
    except KeyError:
        raise InvalidArgument(
            f"unsupported SQL dialect {value!r}; supported: 'sqlite', 'postgresql'"
        ) from None


def table_name(value: object) -> tuple[str, ...]:
    """Split ``table`` or ``schema.table`` into validated parts."""
    if not isinstance(value, str):
        raise InvalidArgument(f"table must be a str, got {type(value).__name__}")
    parts = tuple(value.split("."))
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise InvalidArgument(
            f"table {value!r} is not a plain identifier: use 'table' or 'schema.table', "
            "each part lowercase letters, digits and underscores, starting with a letter "
            "or underscore, at most 63 characters"
        )
    return parts


def fence(value: object) -> int:
    checked = validate.fence(value)
    if checked > MAX_FENCE:
        raise InvalidArgument(f"fence must be <= {MAX_FENCE} (a signed 64-bit integer)")
    return checked


def _quoted(parts: tuple[str, ...]) -> str:
    # Quoting is only for reserved words such as "order": the parts are validated
    # identifiers, so nothing a caller passes ever reaches the SQL unchecked.
    return ".".join(f'"{part}"' for part in parts)


def create_table_sql(dialect_name: object, table: object = DEFAULT_TABLE) -> str:
    """The idempotent ``CREATE TABLE IF NOT EXISTS`` for the fence table."""
    kind = parse_dialect(dialect_name)
    qualified = _quoted(table_name(table))
    if kind == "sqlite":
        return (
            f"CREATE TABLE IF NOT EXISTS {qualified} (\n"
            "    name  TEXT    NOT NULL PRIMARY KEY,\n"
            "    fence INTEGER NOT NULL CHECK (fence >= 0)\n"
            ") WITHOUT ROWID"
        )
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified} (\n"
        "    name  TEXT   NOT NULL PRIMARY KEY,\n"
        "    fence BIGINT NOT NULL CHECK (fence >= 0)\n"
        ")"
    )


@dataclass(frozen=True)
class Step:
    """One statement with ``:name`` style parameters."""

    sql: str
    params: Mapping[str, object]
    # Drivers fetch rows only from statements that return them. Fetching is not
    # optional where it is declared: psycopg's pipeline mode knows neither rows nor
    # rowcount of a statement until they are fetched.
    returns_rows: bool = True


@dataclass(frozen=True)
class Statements:
    """Every statement the check may run, for one dialect and table."""

    exists: Step
    create: tuple[Step, ...]
    upsert: str
    # PostgreSQL reports acceptance with RETURNING (a row back, fetched even in
    # pipeline mode); SQLite with the affected row count, which works on SQLite
    # versions older than RETURNING (3.35).
    upsert_returns: bool
    highest: str


@lru_cache(maxsize=64)
def statements(kind: Dialect, table: str) -> Statements:
    parts = table_name(table)
    qualified = _quoted(parts)
    upsert = (
        f"INSERT INTO {qualified} AS f (name, fence) VALUES (:name, :fence) "
        "ON CONFLICT (name) DO UPDATE SET fence = excluded.fence "
        "WHERE excluded.fence >= f.fence"
    )
    highest = f"SELECT fence FROM {qualified} WHERE name = :name"
    create = Step(create_table_sql(kind, table), {}, returns_rows=False)
    if kind == "sqlite":
        schema = f'"{parts[0]}".' if len(parts) == 2 else ""
        exists = Step(
            f"SELECT 1 FROM {schema}sqlite_master WHERE type = 'table' AND name = :table",
            {"table": parts[-1]},
        )
        return Statements(
            exists=exists, create=(create,), upsert=upsert, upsert_returns=False, highest=highest
        )
    # Two sessions running CREATE TABLE IF NOT EXISTS at once can both miss the
    # other's uncommitted table, and one then fails on a catalog unique index; a
    # transaction-scoped advisory lock makes the second wait, then skip.
    lock_key = int.from_bytes(
        hashlib.blake2b(f"leasehold.fence:{table}".encode(), digest_size=8).digest(),
        "big",
        signed=True,
    )
    return Statements(
        exists=Step("SELECT to_regclass(:regclass)", {"regclass": qualified}),
        create=(Step("SELECT pg_advisory_xact_lock(:lock_key)", {"lock_key": lock_key}), create),
        upsert=upsert + " RETURNING fence",
        upsert_returns=True,
        highest=highest,
    )


@dataclass(frozen=True)
class Reply:
    rowcount: int
    rows: list[tuple[object, ...]]


@dataclass(frozen=True)
class Outcome:
    highest: int
    table_was_there: bool


def plan(
    stmts: Statements, name: str, fence_value: int, *, table_known: bool
) -> Generator[Step, Reply, Outcome]:
    """The check as a sequence of statements; drivers send back each reply.

    Written once as a generator so that sqlite3, psycopg and SQLAlchemy, sync and
    async, all run the very same logic.
    """
    table_was_there = table_known
    if not table_known:
        found = yield stmts.exists
        table_was_there = bool(found.rows) and found.rows[0][0] is not None
        if not table_was_there:
            # Not `yield from`: the driver send()s each reply, which a tuple
            # iterator cannot take.
            for step in stmts.create:  # noqa: UP028
                yield step
    params = {"name": name, "fence": fence_value}
    done = yield Step(stmts.upsert, params, returns_rows=stmts.upsert_returns)
    if stmts.upsert_returns:
        if done.rows:
            return Outcome(fence_value, table_was_there)
    elif done.rowcount == 1:
        return Outcome(fence_value, table_was_there)
    elif done.rowcount != 0:
        # -1 is what a DB-API driver reports when it does not know; refusing is the
        # only safe answer, because "accepted" cannot be proven.
        raise InvalidArgument(
            f"the database driver reported rowcount {done.rowcount} for the fence upsert; "
            "leasehold needs a driver that reports affected rows"
        )
    seen = yield Step(stmts.highest, {"name": name})
    raw = seen.rows[0][0] if seen.rows else None
    highest = int(raw) if isinstance(raw, (int, str)) else fence_value
    raise StaleFence(name, fence_value, highest)
