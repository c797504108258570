"""Once-only execution as data: the record a once-key keeps, and how it is encoded.

The record of ``once:<key>`` is one of

* ``running`` -- a runner holding the lease with ``fence`` is computing the result;
* ``done``    -- the result, serialized, written by the runner with ``fence``;
* ``failed``  -- the function raised; its type and message are kept;
* absent      -- never run, forgotten, or expired (``keep`` elapsed).

Encoding: one line of JSON (the header) and, for ``done``, the serialized result
after the newline. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from leasehold._errors import LeaseholdError, OnceFailed

OnceState = Literal["absent", "running", "done", "failed"]

# Lease names and record keys of once-keys start with this.
PREFIX = "once:"
# A failure's message is kept up to this many characters.
MAX_MESSAGE = 2000


class NoResult(LeaseholdError, LookupError):
    """``once.result()`` found no stored result (nothing ran yet, a run is in
    progress, or the result has expired)."""

    def __init__(self, key: str, state: OnceState) -> None:
        super().__init__(f"no result stored for once-only {key!r} (state: {state})")
        self.key = key
        self.state = state


class Serializer(Protocol):
    """How results are stored: ``dumps(obj) -> bytes`` (str is encoded as UTF-8)
    and ``loads(bytes) -> obj``. The ``json`` and ``pickle`` modules both qualify;
    pickle only for results you would also unpickle from your own store."""

    def dumps(self, obj: Any, /) -> bytes | str: ...

    def loads(self, data: bytes, /) -> Any: ...


class JSONSerializer:
    """The default: compact JSON, NaN and infinities refused (they are not JSON)."""

    def dumps(self, obj: Any, /) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def loads(self, data: bytes, /) -> Any:
        return json.loads(data)

    def __repr__(self) -> str:
        return "JSONSerializer()"


JSON = JSONSerializer()


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded once-record."""

    state: OnceState
    fence: int = 0
    owner: str = ""
    payload: bytes = b""
    error_type: str = ""
    message: str = ""

    def failure(self, key: str) -> OnceFailed:
        return OnceFailed(key, self.error_type, self.message)


ABSENT = Entry("absent")


def _encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def encode_running(fence: int, owner: str) -> bytes:
    return _encode({"state": "running", "fence": fence, "owner": owner})


def encode_done(fence: int, owner: str, payload: bytes) -> bytes:
    return _encode({"state": "done", "fence": fence, "owner": owner}, payload)


def encode_failed(fence: int, owner: str, error_type: str, message: str) -> bytes:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    header = {
        "state": "failed",
        "fence": fence,
        "owner": owner,
        "error_type": error_type,
        "message": message,
    }
    return _encode(header)


def decode(value: bytes | None) -> Entry:
    if value is None:
        return ABSENT
    head, _, payload = value.partition(b"\n")
    try:
        header = json.loads(head)
        state = header["state"]
        if state not in ("running", "done", "failed"):
            raise ValueError(state)
        return Entry(
            state=state,
            fence=int(header.get("fence", 0)),
            owner=str(header.get("owner", "")),
            payload=payload,
            error_type=str(header.get("error_type", "")),
            message=str(header.get("message", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LeaseholdError(
            f"a once-only record is not in leasehold's format ({exc!r}); "
            "another program writes records under the 'once:' prefix"
        ) from None


def error_type(exc: BaseException) -> str:
    """``ValueError`` for builtins, ``package.module.Name`` for everything else."""
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def to_bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"serializer.dumps() must return bytes or str, not {type(data).__name__}")


__all__ = [
    "JSON",
    "PREFIX",
    "Entry",
    "JSONSerializer",
    "NoResult",
    "OnceState",
    "Serializer",
    "decode",
    "encode_done",
    "encode_failed",
    "encode_running",
    "error_type",
    "to_bytes",
]
