"""A call's arguments by name: what key and name templates are formatted with."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``fn``'s arguments for this call by name, defaults applied and ``**kwargs``
    flattened (``*args`` has no name and is left out). ``TypeError`` when the
    arguments do not fit ``fn``'s signature."""
    signature = inspect.signature(fn)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    fields: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            fields.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            fields[name] = value
    return fields
