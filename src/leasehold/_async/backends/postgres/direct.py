"""The hot calls (acquire, release) sent through psycopg's libpq layer: text
parameters, text results, a statement prepared once per connection.

psycopg's ``execute`` builds a cursor, converts the query, looks up a dumper per
parameter and a loader per column, and manages its prepared-statement cache on
every call: about 50 µs of client CPU per acquire + release (measured with the
sync client: 300 -> 237 µs durable, 266 -> 222 µs relaxed). These two calls
have fixed signatures and scalar answers, so they need none of it. The waiting
is still psycopg's (``Connection.wait`` on its ``execute`` generator): the same
cancellation, the same errors, the same broken-connection state as
``Connection.execute``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import sha1
from typing import Any, Final

from psycopg import AsyncConnection, errors, pq
from psycopg.generators import execute

# SQL type -> the Python value of one text-format column (None stays None). Each
# a C callable: decoding costs no Python frame.
_DECODERS: Final[dict[str, Callable[[bytes], Any]]] = {
    "boolean": b"t".__eq__,
    "bigint": int,
    "integer": int,
    "double precision": float,
}
_TUPLES_OK: Final = pq.ExecStatus.TUPLES_OK
_UNDEFINED_STATEMENT: Final = "26000"  # prepared statement does not exist
_DUPLICATE_STATEMENT: Final = "42P05"  # prepared statement already exists


@dataclass(frozen=True, slots=True)
class DirectCall:
    """One function of schema.sql called with typed text parameters."""

    name: bytes  # the prepared statement's name on each connection
    text: bytes  # SELECT * FROM "schema".function($1::type, ...)
    decoders: tuple[Callable[[bytes], Any], ...]


def direct_call(
    schema: str, function: str, args: Sequence[str], results: Sequence[str]
) -> DirectCall:
    """``schema`` is a safe identifier (see schema._function_queries); the casts pin
    the one function a call means, whatever else a later schema version adds."""
    placeholders = ", ".join(f"${i}::{sql_type}" for i, sql_type in enumerate(args, 1))
    text = f'SELECT * FROM "{schema}".{function}({placeholders})'
    # Named after its text: a session that already has this name has this very
    # statement (see _prepare).
    digest = sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]
    return DirectCall(
        name=f"leasehold_{function}_{digest}".encode(),
        text=text.encode(),
        decoders=tuple(_DECODERS[sql_type] for sql_type in results),
    )


# The statements prepared on each connection (by name), and its client encoding.
_PREPARED: weakref.WeakKeyDictionary[Any, tuple[str, set[bytes]]] = weakref.WeakKeyDictionary()


def _texts(params: Sequence[Any], encoding: str) -> list[bytes | None]:
    """Each parameter in text format. One loop, no call per value: this runs twice
    per acquire + release."""
    values: list[bytes | None] = []
    for value in params:
        if value is None:
            values.append(None)
        elif isinstance(value, str):
            values.append(value.encode(encoding))
        elif isinstance(value, bool):  # before int: a bool is an int
            values.append(b"t" if value else b"f")
        else:
            values.append(str(value).encode("ascii"))  # int, float (repr round-trips)
    return values


async def run_direct(
    conn: AsyncConnection[Any], call: DirectCall, params: Sequence[Any], *, prepare: bool
) -> list[tuple[Any, ...]]:
    """``call`` with ``params`` on ``conn`` (autocommit, checked out by the caller):
    the answer's rows, decoded. ``prepare``: keep a server-side prepared statement
    (not behind a transaction-mode pooler, which does not keep session state)."""
    state = _PREPARED.get(conn)
    if state is None:
        state = _PREPARED[conn] = (conn.info.encoding, set())
    encoding, prepared = state
    values = _texts(params, encoding)
    pgconn = conn.pgconn
    async with conn.lock:
        if not prepare:
            pgconn.send_query_params(call.text, values)
            results = await conn.wait(execute(pgconn))
        else:
            if call.name not in prepared:
                await _prepare(conn, call, encoding)
                prepared.add(call.name)
            pgconn.send_query_prepared(call.name, values)
            results = await conn.wait(execute(pgconn))
            failed = len(results) != 1 or results[0].status != _TUPLES_OK
            if failed and _sqlstate(results) == _UNDEFINED_STATEMENT:
                # Someone ran DEALLOCATE or DISCARD ALL on this session: nothing ran,
                # so preparing again and repeating is safe. (Once: behind a
                # transaction-mode pooler each statement may meet another server
                # session, and the error then says so; see PostgresConnection.)
                await _prepare(conn, call, encoding)
                pgconn.send_query_prepared(call.name, values)
                results = await conn.wait(execute(pgconn))
    # The one result with rows that every call but a failed one gets; _check
    # raises the error of a failed one.
    result = results[0] if len(results) == 1 else None
    if result is None or result.status != _TUPLES_OK:
        result = _check(results, _TUPLES_OK, encoding)
    decoders = call.decoders
    rows = []
    # Loops, not generator expressions: each of those is a Python frame resumed
    # once per value.
    for row in range(result.ntuples):
        decoded = []
        for column, decode in enumerate(decoders):
            value = result.get_value(row, column)
            decoded.append(None if value is None else decode(value))
        rows.append(tuple(decoded))
    return rows


async def _prepare(conn: AsyncConnection[Any], call: DirectCall, encoding: str) -> None:
    pgconn = conn.pgconn
    pgconn.send_prepare(call.name, call.text)
    results = await conn.wait(execute(pgconn))
    if _sqlstate(results) == _DUPLICATE_STATEMENT:
        return  # the same name, so the same text: prepared already
    _check(results, pq.ExecStatus.COMMAND_OK, encoding)


def _sqlstate(results: Sequence[pq.abc.PGresult]) -> str | None:
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            code = result.error_field(pq.DiagnosticField.SQLSTATE)
            return code.decode("ascii") if code else None
    return None


def _check(
    results: Sequence[pq.abc.PGresult], expected: pq.ExecStatus, encoding: str
) -> pq.abc.PGresult:
    """The one result of a call; its error raised as psycopg raises it."""
    for result in results:
        if result.status != expected:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise errors.error_from_result(result, encoding=encoding)
            raise errors.InterfaceError(f"unexpected result {pq.ExecStatus(result.status).name}")
    if len(results) != 1:
        raise errors.InterfaceError(f"expected one result, got {len(results)}")
    return results[0]
