"""Pure-Python code of both deadline twins (``_deadline_py`` / ``_deadline_c``).

- Argument checks and error building: they run at creation (the compiled twin checks
  plain numbers inline first), when a deadline expires, or on misuse.
- ``run_scoped`` / ``awaited``: the body of ``TimeoutManager.run()``, a native coroutine on
  purpose. Python 3.12+ runs a native coroutine's frame inline when it is awaited, and takes
  its result without an exception, while a compiled coroutine must return through
  ``StopIteration(value)``; on 3.11 the two cost about the same. The twin-specific, hot
  steps (entering and leaving the deadline) stay in the twins.
"""

from __future__ import annotations

import asyncio
import math
import types
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from mtaio.exceptions import TimeoutError

T = TypeVar("T")

__all__ = [
    "awaited",
    "cancel_base",
    "check_seconds",
    "close_unstarted",
    "insert_timeout_error",
    "not_awaitable",
    "returning",
    "run_scoped",
    "timeout_error",
]


def check_seconds(name: str, value: object) -> float | None:
    """``None`` (no deadline) or a finite number of seconds / loop time, as a float.

    ``bool`` is a ``TypeError``; NaN and the infinities are a ``ValueError``: ``None`` is the
    one way to say "no deadline" (``asyncio.timeout`` accepts ``inf``, mtaio does not, so a
    computed infinity is caught where it is made).
    """
    if value is None:
        return None
    if type(value) is float or type(value) is int:  # the common cases, first
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if -math.inf < number < math.inf:
            return number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(
            f"{name} must be a finite number or None (None means no deadline), got {value!r}"
        )
    return number


def timeout_error(timeout: float | None, when: float | None) -> TimeoutError:
    """The error a scope raises when its own deadline expired."""
    if timeout is not None:
        message = f"deadline exceeded: timed out after {timeout:g} s"
    elif when is not None:
        message = f"deadline exceeded: loop time {when:.6f} passed"
    else:  # rescheduled to None after it expired: cannot happen, kept total
        message = "deadline exceeded"
    return TimeoutError(message, timeout)


def insert_timeout_error(exc: BaseException, timeout: float | None, when: float | None) -> None:
    """Python 3.13's rule for a block that expired but ends with another exception.

    The body turned our cancellation into some other exception (e.g. raised in a
    ``finally``): that exception propagates, and a ``TimeoutError`` is spliced into its
    ``__context__`` chain just above the first ``CancelledError``, so tracebacks say why the
    body was cancelled. The same is done for each direct member of an ``ExceptionGroup``.
    """
    _insert(exc, timeout, when)
    if isinstance(exc, ExceptionGroup):
        for member in exc.exceptions:
            _insert(member, timeout, when)


def _insert(exc: BaseException, timeout: float | None, when: float | None) -> None:
    while exc.__context__ is not None:
        if isinstance(exc.__context__, asyncio.CancelledError):
            error = timeout_error(timeout, when)
            error.__context__ = error.__cause__ = exc.__context__
            exc.__context__ = error
            return
        exc = exc.__context__


def cancel_base(task: Any) -> int:
    """The cancel count a scope entered in ``task`` compares against on exit.

    ``task.cancelling()``, minus one when a cancellation is *pending*: requested but not yet
    delivered (``Task._must_cancel``), e.g. ``task.cancel()`` called by the task itself just
    before the block. That cancellation lands inside the block at its first suspension, so
    the block must count it as coming from outside. ``asyncio.timeout`` counts it as already
    handled and, with a zero timeout, swallows it (CPython gh-134471); we do not.
    """
    count: int = task.cancelling()
    if count and getattr(task, "_must_cancel", False):
        count -= 1
    return count


def close_unstarted(awaitable: object) -> None:
    """Close a coroutine ``run()`` will never await, so Python warns of nothing."""
    if isinstance(awaitable, (types.CoroutineType, types.GeneratorType)):
        awaitable.close()


def not_awaitable(awaitable: object) -> TypeError:
    hint = " (did you forget to call it?)" if callable(awaitable) else ""
    return TypeError(
        "run() needs an awaitable (a coroutine, Task or Future), got "
        f"{type(awaitable).__name__} {awaitable!r}{hint}"
    )


async def returning(value: T) -> T:
    """Awaiting ``returning(x)`` gives ``x``: what compiled ``__aenter__`` returns on 3.12+.

    From Python 3.12 the interpreter runs a native coroutine's frame inline when it is
    awaited and takes its return value without an exception, while any other awaitable must
    finish with ``StopIteration(value)``, which costs several times more. (On 3.11 the
    compiled twin's ``_Return``, with a C ``am_send`` slot, is cheaper still.)
    """
    return value


class _Scope(Protocol):
    """What ``run_scoped`` needs of a twin's ``Timeout``."""

    def _leave(self) -> bool: ...

    def when(self) -> float | None: ...


class _Manager(Protocol):
    """What ``run_scoped`` needs of a twin's ``TimeoutManager``."""

    def _open_run(self, awaitable: Awaitable[Any], seconds: float) -> _Scope: ...


async def run_scoped(manager: _Manager, awaitable: Awaitable[T], seconds: float) -> T:
    """``TimeoutManager.run()`` with a deadline ``seconds`` away, in the calling task.

    ``manager._open_run`` enters the deadline in this task (or raises, closing a coroutine
    it will never start); ``scope._leave()`` exits it and says whether the deadline's own
    cancellation is the one in flight (see ``_deadline_py``).
    """
    scope = manager._open_run(awaitable, seconds)
    try:
        result = await awaitable
    except asyncio.CancelledError as exc:
        if not scope._leave():
            raise  # someone else's cancellation (or an enclosing deadline's): let it through
        if asyncio.isfuture(awaitable) and awaitable.done() and not awaitable.cancelled():
            # The future was done when the deadline passed, in the same loop iteration:
            # its result (or error) wins.
            return awaitable.result()  # type: ignore[no-any-return]
        raise timeout_error(seconds, scope.when()) from exc
    except BaseException as exc:
        if scope._leave():
            insert_timeout_error(exc, seconds, scope.when())
        raise
    scope._leave()
    return result


async def awaited(awaitable: Awaitable[T]) -> T:
    """``TimeoutManager.run()`` without a deadline."""
    return await awaitable
