"""Name groups: lease names as metric labels without unbounded cardinality.

Lease names usually carry ids (``meeting:8f3a9c1e...``, ``job:42``). As metric
labels they would make one time series per id, which is what breaks Prometheus and
bills per series in hosted backends. Exporters therefore never label by name but by
*name group*: the default rule replaces every UUID, every run of 8 or more hex
characters that contains a digit, and every run of digits with ``*``::

    >>> name_group("meeting:8f3a9c1e77d2")
    'meeting:*'
    >>> name_group("job:42")
    'job:*'
    >>> name_group("tenant:17:report:2026-05-01")
    'tenant:*:report:*-*-*'
    >>> name_group("nightly-import")
    'nightly-import'

A group never contains a digit, so the number of groups is bounded by the shapes of
your names, not by your data. Names that carry ids of another shape (user names,
slugs) need a rule of your own: pass ``name_group=`` to
``leasehold.otel.instrument()`` or ``leasehold.prometheus.instrument()``, a function
from name to group (it must be quick and must not do I/O; a function that raises
or returns a non-string falls back to the default rule, logged once).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import lru_cache

logger = logging.getLogger("leasehold.naming")

NameGrouper = Callable[[str], str]

PLACEHOLDER = "*"

# Checked first, so a UUID becomes one ``*`` rather than five.
_UUID = re.compile(
    r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
    r"(?![0-9A-Fa-f])"
)
# Whole hex runs only: "deadline" is a word, "5f2c0a9e" an id. A run without a
# digit (an English word made of a-f) is kept.
_HEX = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{8,}(?![0-9A-Fa-f])")
_DIGITS = re.compile(r"[0-9]+")


def _hex_id(match: re.Match[str]) -> str:
    text = match.group(0)
    return PLACEHOLDER if any(c.isdigit() for c in text) else text


@lru_cache(maxsize=8192)
def name_group(name: str) -> str:
    """The default group of ``name``: UUIDs, long hex ids (8+ hex characters with
    a digit) and runs of digits replaced by ``*``. Idempotent; the result contains
    no ASCII digit."""
    grouped = _UUID.sub(PLACEHOLDER, name)
    grouped = _HEX.sub(_hex_id, grouped)
    return _DIGITS.sub(PLACEHOLDER, grouped)


def resolve(grouper: NameGrouper | None) -> NameGrouper:
    """The grouping function an exporter uses: the default rule, or ``grouper``
    guarded so that a broken user function never breaks an exporter."""
    if grouper is None:
        return name_group
    checked: object = grouper  # typed callers cannot pass anything else; others can
    if not callable(checked):
        from leasehold._errors import InvalidArgument

        raise InvalidArgument("name_group must be a function from a lease name to a group")
    user: Callable[[str], object] = grouper  # may return anything at run time
    complained: set[str] = set()  # what was logged already: once each

    def guarded(name: str) -> str:
        group: object
        try:
            group = user(name)
        except Exception:
            group = None
            if "raised" not in complained:
                complained.add("raised")
                logger.exception("name_group function %r raised; using the default rule", user)
        if isinstance(group, str):
            return group
        if group is not None and "type" not in complained:
            complained.add("type")
            logger.error(
                "name_group function %r returned %s, not a string; using the default rule",
                user,
                type(group).__name__,
            )
        return name_group(name)

    return guarded


__all__ = ["PLACEHOLDER", "NameGrouper", "name_group", "resolve"]
