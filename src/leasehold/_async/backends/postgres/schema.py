"""The schema (leasehold/_shared/postgres/schema.sql): its version, its body and the
queries that call its functions. Installing and migrating it is PostgresConnection._install.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from leasehold._async.backends.postgres.direct import DirectCall, direct_call

# What schema_version() in schema.sql returns. Bump both together whenever the file
# changes; a store that finds an older version re-runs the (idempotent) file.
SCHEMA_VERSION = 8

# The functions of schema.sql the store calls, and how many arguments each takes.
_FUNCTIONS = {
    "acquire": 10,
    "renew": 3,
    "release": 2,
    "holders_of": 1,
    "leases": 1,
    "break_lease": 1,
    "read_record": 1,
    "write_record": 4,
}


# The hot calls, sent through direct.py instead of psycopg's execute: their
# argument and answer types, as in schema.sql (acquire's OUT parameters; release
# RETURNS boolean). A changed signature in schema.sql must change here too.
_DIRECT_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "acquire": (
        ("text", "text", "text", "text", "integer", "double precision", "integer",
         "double precision", "text", "text"),
        ("boolean", "bigint", "double precision", "integer"),
    ),
    "release": (("text", "text"), ("boolean",)),
}  # fmt: skip


def _schema_sql() -> str:
    """The body of schema.sql: everything between its markers (the file's first
    statements pick the schema; the store does that itself for ``?schema=``)."""
    text = resources.files("leasehold._shared").joinpath("postgres/schema.sql").read_text()
    start = text.index("-- leasehold:body")
    end = text.index("-- leasehold:end")
    return text[text.index("\n", start) + 1 : end]


# The functions with a twin for ?durability=relaxed (schema version 6), which a
# relaxed store calls instead: same arguments, same answers, commits without
# waiting for the WAL flush.
_RELAXED_TWINS = frozenset({"acquire", "renew", "release"})


def _called(function: str, *, relaxed: bool) -> str:
    """The function of schema.sql a store calls for ``function``: its relaxed twin
    when the store is relaxed and it has one."""
    return f"{function}_relaxed" if relaxed and function in _RELAXED_TWINS else function


def _function_queries(schema: str, *, relaxed: bool = False) -> dict[str, bytes]:
    """``SELECT * FROM "schema".function(%s, ...)`` for every function, built once per
    store: the per-call path only looks one up. ``schema`` matched ``_SCHEMA_RE``
    (letters, digits, underscores), so double quotes make it a safe identifier."""
    queries = {}
    for function, arity in _FUNCTIONS.items():
        called = _called(function, relaxed=relaxed)
        args = ", ".join(["%s"] * arity)
        queries[function] = f'SELECT * FROM "{schema}".{called}({args})'.encode()
    return queries


def _direct_calls(schema: str, *, relaxed: bool = False) -> dict[str, DirectCall]:
    """The DirectCall of each hot function (``_DIRECT_SIGNATURES``), built once per
    store; ``schema`` is safe to quote, as in _function_queries."""
    calls = {}
    for function, (args, results) in _DIRECT_SIGNATURES.items():
        calls[function] = direct_call(schema, _called(function, relaxed=relaxed), args, results)
    return calls


@lru_cache(maxsize=16)
def _waiters_query(schema: str) -> bytes:
    """The live waiters of names starting with a prefix, by name and arrival, with
    their 0-based place: a plain read of the waiters table, no function of
    schema.sql, so stores whose schema is managed as a migration need no new version
    for it. Columns NULL in rows queued by schema version 3 read as "" and 0.
    ``schema`` is safe to quote, as in _function_queries."""
    return (
        "SELECT w.name, coalesce(w.owner, ''), coalesce(w.host, ''), coalesce(w.pid, 0), "
        "row_number() OVER (PARTITION BY w.name ORDER BY w.seq) - 1, "
        "extract(epoch FROM w.expires_at - c.now)::double precision "
        "FROM (SELECT clock_timestamp() AS now) c "
        f'JOIN "{schema}".waiters w ON w.name >= %s AND starts_with(w.name, %s) '
        "AND w.expires_at > c.now ORDER BY w.name, w.seq"
    ).encode()
