"""Argument rules, checked before any I/O so that bad input fails fast and clearly."""

from __future__ import annotations

import math
import unicodedata

from leasehold._errors import InvalidArgument

MAX_NAME_LENGTH = 512
MAX_TTL = 7 * 24 * 3600.0  # a week: longer "leases" are configuration, not leases
MIN_TTL = 0.01
MAX_LIMIT = 1_000_000


def name(value: object, *, what: str = "name", longest: int = MAX_NAME_LENGTH) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > longest:
        raise InvalidArgument(
            f"{what} is {len(value)} characters long; at most {longest} are allowed"
        )
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in "\u2028\u2029":
            raise InvalidArgument(
                f"{what} {value!r} contains the control character {ch!r}; "
                "use printable characters only"
            )
    return value


# A topic (store announcements) is a name with room for a kind prefix such as
# "election:": at most this many characters, printable, never empty.
MAX_TOPIC_LENGTH = MAX_NAME_LENGTH + 64


def topic(value: object) -> str:
    """An announcement topic: the rules of a name, a little longer. Stores pass it
    only as data (a parameter, a message body), never inside code or a channel name."""
    return name(value, what="topic", longest=MAX_TOPIC_LENGTH)


def prefix(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"prefix must be a str, got {type(value).__name__}")
    if value == "":
        return value
    return name(value, what="prefix")


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a number of seconds, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise InvalidArgument(f"{what} must be a finite number of seconds, got {value!r}")
    return number


def ttl(value: object, *, what: str = "ttl") -> float:
    number = _number(value, what)
    if not MIN_TTL <= number <= MAX_TTL:
        raise InvalidArgument(
            f"{what} must be between {MIN_TTL:g} and {MAX_TTL:g} seconds, got {value!r}"
        )
    return number


def timeout(value: object, *, what: str = "timeout") -> float | None:
    """None means wait forever; 0 means one attempt."""
    if value is None:
        return None
    number = _number(value, what)
    if number < 0:
        raise InvalidArgument(f"{what} must be >= 0 seconds or None, got {value!r}")
    return number


def margin(value: object, ttl_value: float) -> float:
    number = _number(value, "margin")
    if not 0 <= number < ttl_value:
        raise InvalidArgument(
            f"margin must be >= 0 and smaller than the ttl ({ttl_value:g} s), got {value!r}"
        )
    return number


def limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"limit must be an int, got {type(value).__name__}")
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}, got {value}")
    return value


def fence(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"fence must be an int, got {type(value).__name__}")
    if value < 0:
        raise InvalidArgument(f"fence must be >= 0, got {value}")
    return value
