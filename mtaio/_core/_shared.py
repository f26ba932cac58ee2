"""Pure-Python helpers shared by both implementations: argument checks and decorators.

Nothing here is on a hot path: these run at construction, in setters and at decoration time.
Every check raises at the call that supplied the bad value and names the argument and value.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, ParamSpec, TypeVar

__all__ = [
    "acquire_before_running",
    "bounded_int",
    "check_coroutine_function",
    "hold_while_running",
    "non_negative",
    "optional_non_negative",
    "positive",
    "positive_int",
]

P = ParamSpec("P")
T = TypeVar("T")


def _real(name: str, value: object) -> float:
    # bool is an int subclass; a bool where a number is wanted is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range: a value error, not a crash
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None


def positive(name: str, value: object) -> float:
    """A finite number > 0."""
    number = _real(name, value)
    if not (0.0 < number < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def non_negative(name: str, value: object) -> float:
    """A finite number >= 0."""
    number = _real(name, value)
    if not (0.0 <= number < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def optional_non_negative(name: str, value: object) -> float | None:
    """``None``, or a finite number >= 0."""
    return None if value is None else non_negative(name, value)


def positive_int(name: str, value: object) -> int:
    """An ``int`` >= 1 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def bounded_int(name: str, value: object, minimum: int) -> int:
    """An ``int`` from ``minimum`` to ``sys.maxsize`` (not a bool, not a float).

    The upper bound lets compiled code keep counts in a C ``Py_ssize_t``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > sys.maxsize:
        raise ValueError(f"{name} must be an int <= {sys.maxsize}, got {value!r}")
    return int(value)


def check_coroutine_function(func: object) -> None:
    """Decorators only wrap ``async def`` functions: anything else fails at decoration."""
    if not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"the decorator needs an async function (async def), got {func!r}; "
            "a sync function, generator or async generator cannot be limited"
        )


def acquire_before_running(
    acquire: Callable[[float], Awaitable[None]],
    tokens: float,
    func: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Wrap ``func`` so that every call first awaits ``acquire(tokens)``."""
    check_coroutine_function(func)

    @functools.wraps(func)
    async def limited(*args: P.args, **kwargs: P.kwargs) -> T:
        await acquire(tokens)
        return await func(*args, **kwargs)

    return limited


def hold_while_running(
    limiter: AbstractAsyncContextManager[Any],
    func: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Wrap ``func`` so that every call runs inside ``async with limiter``."""
    check_coroutine_function(func)

    @functools.wraps(func)
    async def limited(*args: P.args, **kwargs: P.kwargs) -> T:
        async with limiter:
            return await func(*args, **kwargs)

    return limited
