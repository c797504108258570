"""Lease names from templates over a call's arguments: ``"meeting:{meeting_id}"``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from leasehold._core import calls, validate
from leasehold._errors import InvalidArgument

Template = str | Callable[..., str]


def arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The call's arguments by name (defaults applied, ``**kwargs`` flattened)."""
    try:
        return calls.arguments(fn, args, kwargs)
    except TypeError:
        return dict(kwargs)  # the call itself will fail with Python's own message


def render(
    template: Template,
    fn: Callable[..., Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    what: str,
) -> str:
    """``template.format(**arguments)``, or ``template(*args, **kwargs)`` when it is
    callable; validated as a lease name."""
    if callable(template):
        name = template(*args, **kwargs)
    elif fn is None:
        name = template
    else:
        fields = arguments(fn, args, kwargs)
        try:
            name = template.format(*args, **fields)
        except (KeyError, IndexError, AttributeError) as exc:
            raise InvalidArgument(
                f"{what} {template!r} of {getattr(fn, '__qualname__', fn)!r} refers to {exc} "
                f"but its arguments are {sorted(fields)}"
            ) from None
    return validate.name(name, what=what)
