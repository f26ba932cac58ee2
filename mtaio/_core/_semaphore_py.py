"""Permit accounting and hand-off for :class:`ConcurrencyLimiter` (pure-Python twin).

This is the reference implementation: ``_semaphore_c.pyx`` mirrors it name for name.

The races this design closes (CPython's ``asyncio.Semaphore`` hit each of them, see
gh-90155 and the history of ``_wake_up_next``):

- A permit is *assigned* when a waiter is woken, not when the woken task runs: ``release()``
  pops the head waiter and sets its future's result while ``in_use`` keeps counting the
  permit. A newcomer arriving before the woken task runs finds no free permit and queues
  behind, so nobody overtakes.
- A woken task that is cancelled before it runs sees its future done with ``_GRANTED`` and
  passes the permit on (to the next waiter, or back to the pool): nothing leaks.
- A waiter cancelled while queued has a cancelled future; grants skip done futures, so its
  cancellation and a concurrent ``release()`` can never grant the same permit twice.
- The wait deadline is a timer that completes the future with ``_TIMED_OUT`` (no extra
  task). The future completes once: whichever of the timer and a grant comes first wins,
  so the task ends either holding the permit or raising, never both, never neither.
"""

from __future__ import annotations

import asyncio
from asyncio import events
from collections import deque
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Final, ParamSpec, Protocol, Self, TypeVar, overload

from mtaio._core._shared import bounded_int, hold_while_running, non_negative
from mtaio.exceptions import ResourceError, ResourceLimitError

__all__ = ["ConcurrencyLimiter"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# The result a waiter's future completes with: how its wait ended.
_GRANTED: Final = True  # a permit was assigned to it (counted in ``in_use``)
_TIMED_OUT: Final = False  # its deadline passed first; it holds nothing
_CLOSED: Final = None  # the limiter was closed; it holds nothing

# Dead futures (cancelled or timed out) stay in the queue until a grant skips them. When they
# outnumber the live ones by this much, the queue is compacted (amortised O(1) per waiter).
_COMPACT_SLACK: Final = 64


class _LimitDecorator(Protocol):
    """What ``limiter.limit()`` returns: a decorator that keeps the function's types."""

    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...


def _expire(waiter: asyncio.Future[bool | None]) -> None:
    """The deadline timer of one waiter: fail it unless a permit (or close) came first."""
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


def _wrong_loop(
    limiter: ConcurrencyLimiter,
    loop: asyncio.AbstractEventLoop,
    bound: asyncio.AbstractEventLoop | None,
) -> RuntimeError:
    return RuntimeError(
        f"{limiter!r} is used from event loop {loop!r} while tasks wait on it in "
        f"{bound!r}; a limiter is used from one event loop at a time"
    )


class ConcurrencyLimiter:
    """At most ``capacity`` permits granted at once; waiters are served first come, first served.

    ``async with limiter:`` (or the ``@limiter.limit`` decorator) holds one permit for the
    block. ``acquire()`` waits for a permit in FIFO order; ``release()`` gives one back.

    Invariants:

    - ``_in_use`` counts granted permits: those held by tasks and those *promised* to a woken
      waiter that has not run yet. ``available == max(0, capacity - in_use)``.
    - ``_waiters`` holds the futures of queued tasks, oldest first. A done future in it is
      dead (its task was cancelled or timed out) and is skipped, never granted.
    - If a live (not done) future is queued, ``_in_use >= _capacity``. So a free permit means
      nobody is queued, and the fast path needs no look at the queue.
    - ``_waiting`` counts tasks inside ``acquire()`` that have not returned: the queued and
      the promised.
    """

    __slots__ = (
        "__weakref__",
        "_capacity",
        "_closed",
        "_in_use",
        "_loop",
        "_max_wait",
        "_max_waiting",
        "_waiters",
        "_waiting",
    )

    def __init__(
        self,
        limit: int,
        *,
        max_wait: float | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self._capacity = bounded_int("limit", limit, 1)
        self._max_wait = None if max_wait is None else non_negative("max_wait", max_wait)
        self._max_waiting = (
            None if max_waiting is None else bounded_int("max_waiting", max_waiting, 0)
        )
        self._in_use = 0
        self._waiting = 0
        self._closed = False
        self._waiters: deque[asyncio.Future[bool | None]] = deque()
        # The loop the waiters live in; bound lazily by the first task that has to wait.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- state --------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The maximum number of permits granted at once (settable at runtime)."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        # Raising it wakes as many waiters as there is new room. Lowering it takes no permit
        # back: holders finish, and no one is admitted until ``in_use < capacity``.
        value = bounded_int("capacity", value, 1)
        self._check_loop()
        self._capacity = value
        self._wake()

    @property
    def in_use(self) -> int:
        """Granted permits, including those promised to woken tasks that have not run yet."""
        return self._in_use

    @property
    def available(self) -> int:
        """Permits that could be granted now: ``max(0, capacity - in_use)``."""
        return max(0, self._capacity - self._in_use)

    @property
    def waiting(self) -> int:
        """Tasks inside ``acquire()`` that have not returned yet (queued or just woken)."""
        return self._waiting

    def locked(self) -> bool:
        """``True`` when ``acquire()`` cannot return at once (no permit is free)."""
        return self._in_use >= self._capacity

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} capacity={self._capacity} in_use={self._in_use}"
            f" available={self.available} waiting={self._waiting}{closed}>"
        )

    # -- acquiring ----------------------------------------------------------------------

    def acquire(self, *, timeout: float | None = None) -> Coroutine[Any, Any, None]:
        """Wait for a permit, first come, first served: ``await limiter.acquire()``.

        ``timeout`` (seconds; default: the limiter's ``max_wait``) bounds the wait: when it
        passes, :class:`ResourceLimitError` is raised and nothing is held. ``timeout=0``
        takes a permit only if one is free now. With ``max_waiting`` set, a call that finds
        no free permit while ``waiting >= max_waiting`` fails at once with
        ``ResourceLimitError`` (load shedding). After :meth:`close`, raises
        :class:`ResourceError`.
        """
        if timeout is not None:
            timeout = non_negative("timeout", timeout)
        return self._acquire(timeout, None)

    async def _acquire(self, timeout: float | None, result: R) -> R:
        """The body of ``acquire()`` (returns None) and of ``async with`` (returns self).

        Sharing it keeps ``async with`` to one coroutine: ``__aenter__`` returns this one
        instead of being a coroutine that awaits another.
        """
        # Fast path: a free permit and no one inside acquire(). By the invariant a free
        # permit already means no one is queued; `_waiting == 0` also leaves the loop check
        # to the slow path (no one can be waiting in another loop).
        if self._in_use < self._capacity and not self._waiting and not self._closed:
            self._in_use += 1
            return result
        loop = events.get_running_loop()
        if loop is not self._loop:
            self._bind_loop(loop)
        if self._closed:
            raise ResourceError(f"{self!r} is closed")
        if self._in_use < self._capacity:
            # Free, and (invariant) nobody queued: only promised tasks are inside acquire().
            self._in_use += 1
            return result
        if self._max_waiting is not None and self._waiting >= self._max_waiting:
            raise ResourceLimitError(
                f"no permit free and {self._waiting} tasks already wait "
                f"(max_waiting={self._max_waiting}): request shed",
                retry_after=None,
            )
        if timeout is None:
            timeout = self._max_wait
        waiter: asyncio.Future[bool | None] = loop.create_future()
        if timeout is None:
            expiry = None
        elif timeout:
            expiry = loop.call_later(timeout, _expire, waiter)
        else:  # timeout=0: only if free now, and it is not
            raise ResourceLimitError(
                f"no permit free now (timeout=0, capacity={self._capacity})", retry_after=None
            )
        self._waiters.append(waiter)
        self._waiting += 1
        try:
            outcome = await waiter
        except BaseException:
            # Cancelled (or something else thrown in) while queued or after the grant.
            self._abandon(waiter)
            raise
        finally:
            self._waiting -= 1
            if expiry is not None:
                expiry.cancel()
        if outcome is _GRANTED:
            return result
        if outcome is _TIMED_OUT:
            self._compact()  # its future is dead now, like a cancelled waiter's
            raise ResourceLimitError(
                f"no permit became free within {timeout} s (capacity={self._capacity})",
                retry_after=None,
            )
        raise ResourceError(f"{self!r} was closed while the task waited for a permit")

    def _abandon(self, waiter: asyncio.Future[bool | None]) -> None:
        """The task that owns ``waiter`` leaves ``acquire()`` without returning normally."""
        if waiter.cancel() or waiter.cancelled():
            # It was still queued: the dead future stays until a grant skips it.
            self._compact()
        elif waiter.result() is _GRANTED:
            # Woken, then cancelled before it ran: the promised permit goes on.
            self._in_use -= 1
            self._wake()
        # _TIMED_OUT / _CLOSED: it holds nothing.

    def try_acquire(self) -> bool:
        """Take a permit if one is free now and no one is queued; never waits.

        Returns ``False`` otherwise. After :meth:`close`, raises :class:`ResourceError`.
        """
        if self._closed:
            raise ResourceError(f"{self!r} is closed")
        self._check_loop()
        if self._in_use < self._capacity:  # (invariant) free means nobody queued
            self._in_use += 1
            return True
        return False

    def __aenter__(self) -> Coroutine[Any, Any, Self]:
        # A subclass may override acquire(): only the exact class takes the shortcut.
        if type(self) is ConcurrencyLimiter:
            return self._acquire(None, self)
        return self._enter_subclass()

    async def _enter_subclass(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- releasing ----------------------------------------------------------------------

    def release(self) -> None:
        """Give one permit back; the head waiter, if any, gets it at once.

        Permits are counted, not owned: any task may release one. Raises
        :class:`ResourceError` (and changes nothing) when no permit is in use. Works after
        :meth:`close`, so holders exit cleanly.
        """
        # Every hand-off runs this: the loop check and `_wake` are inlined.
        if self._waiting and events._get_running_loop() is not self._loop:
            self._check_loop()
        if self._in_use == 0:
            raise ResourceError(
                f"release() without a matching acquire(): no permit is in use ({self!r})"
            )
        self._in_use -= 1
        if self._in_use < self._capacity:  # (not so while a lowered capacity is pending)
            waiters = self._waiters
            while waiters:  # one permit: grant it to the oldest live waiter
                waiter = waiters.popleft()
                if not waiter.done():  # done: cancelled or timed out, skip it
                    self._in_use += 1
                    waiter.set_result(_GRANTED)
                    break

    def close(self) -> None:
        """Refuse new requests: queued waiters and later ``acquire`` / ``try_acquire`` get
        :class:`ResourceError`. Holders keep their permits and may ``release()``. Idempotent.
        """
        if self._closed:
            return
        self._check_loop()
        self._closed = True
        waiters = list(self._waiters)
        self._waiters.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(_CLOSED)

    # -- decorator ----------------------------------------------------------------------

    @overload
    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def limit(self, func: None = None, /) -> _LimitDecorator: ...

    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]] | None = None, /
    ) -> Callable[P, Coroutine[Any, Any, T]] | _LimitDecorator:
        """Decorator: every call of the ``async`` function runs inside ``async with self``.

        Use it bare (``@limiter.limit``) or called (``@limiter.limit()``).
        """
        if func is None:
            return self._decorate
        return hold_while_running(self, func)

    def _decorate(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        return hold_while_running(self, func)

    # -- internals ----------------------------------------------------------------------

    def _wake(self) -> None:
        """Assign free permits to the oldest live waiters (the permit is counted at once)."""
        waiters = self._waiters
        while self._in_use < self._capacity and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # done: cancelled or timed out, skip it
                self._in_use += 1
                waiter.set_result(_GRANTED)

    def _compact(self) -> None:
        # Live futures <= `_waiting`; when dead ones clearly dominate, drop them in one pass.
        waiters = self._waiters
        if len(waiters) > 2 * self._waiting + _COMPACT_SLACK:
            live = [waiter for waiter in waiters if not waiter.done()]
            waiters.clear()
            waiters.extend(live)

    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the running ``loop``, unless tasks wait in another one."""
        if self._waiting:
            raise _wrong_loop(self, loop, self._loop)
        self._loop = loop
        self._waiters.clear()  # only dead futures of the old loop can be left

    def _check_loop(self) -> None:
        """Refuse to touch the waiters of one loop from another loop."""
        if self._waiting:
            loop = events._get_running_loop()
            if loop is not None and loop is not self._loop:
                raise _wrong_loop(self, loop, self._loop)
