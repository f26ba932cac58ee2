"""The token bucket behind ``RateLimiter``: the pure-Python reference implementation.

This is the file to read to learn the algorithm; ``_bucket_c.pyx`` mirrors it name for name.

The bucket is a *level* (tokens in it at a given clock reading) plus the *stamp* of that
reading. Refilling adds ``elapsed * rate`` and clips at the effective capacity
``max(burst, rate * 2 ms)``. Nothing accumulates rounding error over time: every refill adds
the exact elapsed time since the previous one, so the long-run rate is exact, and the level
never exceeds the capacity, so over any interval of length ``t`` at most ``capacity + rate *
t`` tokens leave the bucket (SPEC §2's bound), also right after an idle period.

Waiting requests form a FIFO queue served by **one** timer per limiter. Every wake-up refills
from the clock and grants every head request that fits, in order, then arms the timer for the
moment the new head will fit. Timers fire about once a millisecond; a late wake-up finds the
tokens it missed still in the bucket (the 2 ms of capacity are there for that) and grants
them all, so the configured rate is achieved however coarse the timers are. A wake-up that
finds the loop's clock has not moved far enough (uvloop's clock ticks once per millisecond)
re-arms at least 1 ms ahead instead of spinning.
"""

from __future__ import annotations

import asyncio
import math
import time
from asyncio.events import _get_running_loop
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from threading import get_ident
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Self, TypeVar, overload

from mtaio._core._shared import (
    acquire_before_running,
    non_negative,
    optional_non_negative,
    positive,
)
from mtaio.exceptions import ResourceError, ResourceLimitError

__all__ = ["RateLimiter"]

P = ParamSpec("P")
T = TypeVar("T")

#: Timers fire about once a millisecond; the bucket holds at least this many seconds of
#: tokens so that a late wake-up can still grant everything that fell due meanwhile.
CATCH_UP: Final = 0.002
#: A wake-up that granted nothing re-arms at least this far ahead: the loop's clock could
#: not see an earlier time (uvloop ticks once per ms), so an earlier timer would only spin.
MIN_REARM: Final = 0.001
#: Two clock readings this close are the same instant: asyncio fires a timer when
#: ``when < time() + 1e-9``, and float rounding must not turn "due" into "1 ms late".
EPSILON: Final = 1e-9
#: ... plus a few units in the last place of the clock value itself (large uptimes).
CLOCK_ROUNDING: Final = 1e-15

# Waiter states.
QUEUED: Final = 0  # in the queue, counted in _count and _queued
GRANTED: Final = 1  # its tokens left the bucket; acquire() has not returned yet
GONE: Final = 2  # cancelled, failed, refunded, or returned: no longer accounted anywhere


class _Waiter:
    """One queued request: the future its task awaits and the tokens it asks for."""

    __slots__ = ("future", "state", "tokens")

    def __init__(self, future: asyncio.Future[None], tokens: float) -> None:
        self.future = future
        self.tokens = tokens
        self.state = QUEUED


def _amount(tokens: object) -> float:
    """``tokens`` as a float: a finite number >= 0 (checked inline for int and float)."""
    if type(tokens) is float or type(tokens) is int:
        try:
            amount = float(tokens)
        except OverflowError:  # an int beyond any float
            pass
        else:
            if 0.0 <= amount < math.inf:
                return amount
    return non_negative("tokens", tokens)  # the other cases, with their errors


def _slack(now: float) -> float:
    """How much earlier than "due" a clock reading may be and still count as due."""
    return EPSILON + abs(now) * CLOCK_ROUNDING


def _is_stock_clock(loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``loop.time()`` is provably ``time.monotonic()``: not overridden or patched."""
    return type(loop).time is asyncio.BaseEventLoop.time and "time" not in getattr(
        loop, "__dict__", ()
    )


class RateLimiter:
    """Token bucket: ``rate`` tokens per second, up to ``burst`` at once, strictly FIFO.

    ``await limiter.acquire(tokens)`` waits for the tokens; it fails at once with
    ``ResourceLimitError`` if they exceed ``burst`` or the wait would exceed ``timeout`` /
    ``max_wait``. See ``docs/rate-limiter.md`` for the exact semantics.

    Invariants (between calls, on the loop's thread):

    - ``_level`` is the number of tokens in the bucket at clock reading ``_stamp``; it is at
      most the effective capacity ``max(burst, rate * CATCH_UP)`` and at least ``-rate *
      _slack()`` (a grant may run a few nanoseconds of tokens ahead of the clock).
    - ``_stamp`` only moves forward while bound to one loop (a clock reading that goes
      backwards counts as no time); it is ``-inf`` until first use, so the bucket starts full.
    - ``_waiters`` holds the queued requests in arrival order; records that are no longer
      ``QUEUED`` are dropped lazily when they reach the front, and the front record is always
      ``QUEUED`` after a public call returns. ``_count`` is the number of ``QUEUED`` records
      and ``_queued`` the sum of their tokens; both are 0 when the queue is empty.
    - ``_timer`` is the single wake-up of this limiter: set exactly when ``_count > 0``, for
      the moment the head request will fit (or a millisecond later, see ``MIN_REARM``).
    - ``_loop`` is the loop the limiter is bound to (lazily, at first use); it only changes
      while nobody waits. ``_clock`` reads that loop's clock.
    """

    __slots__ = (
        "__weakref__",
        "_burst",
        "_burst_auto",
        "_capacity",
        "_clock",
        "_closed",
        "_count",
        "_done",
        "_entered",
        "_level",
        "_loop",
        "_max_wait",
        "_queued",
        "_rate",
        "_stamp",
        "_stock_clock",
        "_threaded_loop",
        "_timer",
        "_timer_when",
        "_waiters",
    )

    def __init__(
        self, rate: float, burst: float | None = None, *, max_wait: float | None = None
    ) -> None:
        self._rate = positive("rate", rate)
        self._burst_auto = burst is None
        self._burst = max(1.0, self._rate) if burst is None else positive("burst", burst)
        self._max_wait = optional_non_negative("max_wait", max_wait)
        self._capacity = max(self._burst, self._rate * CATCH_UP)
        self._level = self._capacity
        self._stamp = -math.inf
        self._waiters: deque[_Waiter] = deque()
        self._count = 0
        self._queued = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.nan
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The bound loop if it records the thread running it (``_thread_id``), else None.
        self._threaded_loop: Any = None
        self._clock: Callable[[], float] = time.monotonic
        self._stock_clock = False
        self._done: asyncio.Future[None] | None = None
        self._entered: asyncio.Future[Any] | None = None  # its result is self

    # -- public API -------------------------------------------------------------------------

    def acquire(self, tokens: float = 1, *, timeout: float | None = None) -> Awaitable[None]:
        """Wait until ``tokens`` can be taken from the bucket, then take them.

        Raises ``ResourceLimitError`` without waiting if ``tokens > burst`` or if the wait
        (which counts the tokens of everyone already queued) would exceed ``timeout``, or
        ``max_wait`` when ``timeout`` is ``None``; ``ResourceError`` after ``close()``.

        Returns an awaitable (not always a coroutine): when nobody waits and the tokens are
        in the bucket, they are taken at once and the result is already complete.
        """
        amount = _amount(tokens)
        if timeout is not None:
            timeout = non_negative("timeout", timeout)
        if self._take_now(amount):
            return self._done  # type: ignore[return-value]  # set by _bind
        return self._acquire_slow(amount, timeout)

    def try_acquire(self, tokens: float = 1) -> bool:
        """Take ``tokens`` if they are in the bucket now and nobody is waiting; never waits.

        Raises ``ResourceLimitError`` if ``tokens > burst`` (it could never succeed) and
        ``ResourceError`` after ``close()``.
        """
        amount = _amount(tokens)
        self._check_open()
        self._bind_running("try_acquire")
        if amount == 0.0:
            return True
        self._check_burst(amount)
        if self._count:
            return False  # strict FIFO: never overtake a waiting task
        now = self._clock()
        self._refill(now)
        if self._fits(amount, now):
            self._level -= amount
            return True
        return False

    @overload
    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]], *, tokens: float = 1
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def limit(
        self, func: None = None, *, tokens: float = 1
    ) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]: ...

    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]] | None = None, *, tokens: float = 1
    ) -> (
        Callable[P, Coroutine[Any, Any, T]]
        | Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]
    ):
        """Decorate an ``async def`` so that every call first acquires ``tokens``.

        ``@limiter.limit``, ``@limiter.limit(tokens=2)`` or ``limiter.limit(func, tokens=2)``.
        Tokens are not refunded if the function raises.
        """
        amount = non_negative("tokens", tokens)
        if func is None:

            def decorate(
                func: Callable[P, Coroutine[Any, Any, T]],
            ) -> Callable[P, Coroutine[Any, Any, T]]:
                return acquire_before_running(self.acquire, amount, func)

            return decorate
        return acquire_before_running(self.acquire, amount, func)

    def _enter(self) -> Awaitable[Self]:
        """``async with limiter``: acquire one token (through ``self.acquire``)."""
        if type(self) is not RateLimiter:
            # A subclass may override acquire(): go through it.
            acquired = self.acquire()
            if acquired is self._done:
                return self._entered  # type: ignore[return-value]  # set by _bind
            return self._enter_after(acquired)
        # _take_now(1.0), inlined with locals: this is the hottest path (a method call and
        # the repeated attribute loads cost more than the arithmetic).
        threaded = self._threaded_loop
        if (
            not self._count
            and not self._closed
            and self._burst >= 1.0
            and (
                (threaded is not None and threaded._thread_id == get_ident())
                or (self._loop is not None and _get_running_loop() is self._loop)
            )
        ):
            now = self._clock()
            level = self._level
            stamp = self._stamp
            if now > stamp:
                level += (now - stamp) * self._rate
                capacity = self._capacity
                if level > capacity:
                    level = capacity
                self._stamp = now
            if level >= 1.0:
                self._level = level - 1.0
                return self._entered  # type: ignore[return-value]  # set by _bind
            self._level = level
        return self._enter_after(self._acquire_slow(1.0, None))

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        """Leaving the block gives nothing back: tokens are spent, not held."""
        done = self._done
        return done if done is not None else _nothing()

    if TYPE_CHECKING:
        # The async context manager protocol is typed with coroutines; at run time the methods
        # return cheaper awaitables (a done future, ``_done``), which ``async with`` accepts.
        async def __aenter__(self) -> Self: ...

        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None: ...

    else:
        __aenter__ = _enter
        __aexit__ = _exit

    def close(self) -> None:
        """Refuse every later request; queued tasks get ``ResourceError``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        for waiter in self._waiters:
            if waiter.state == QUEUED:
                waiter.state = GONE
                if not waiter.future.done():
                    waiter.future.set_exception(ResourceError(f"{self._name()} is closed"))
        self._waiters.clear()
        self._count = 0
        self._queued = 0.0

    @property
    def rate(self) -> float:
        """Tokens per second (> 0). Settable; applies from that moment."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        rate = positive("rate", value)
        now = self._bound_now()
        self._refill(now)  # the time so far counts at the old rate
        self._rate = rate
        if self._burst_auto:
            self._burst = max(1.0, rate)
        self._reconfigure(now)

    @property
    def burst(self) -> float:
        """The bucket's configured capacity. Settable; ``None`` means ``max(1, rate)``,
        kept in step with later ``rate`` changes."""
        return self._burst

    @burst.setter
    def burst(self, value: float | None) -> None:
        burst = max(1.0, self._rate) if value is None else positive("burst", value)
        now = self._bound_now()
        self._refill(now)
        self._burst_auto = value is None
        self._burst = burst
        self._reconfigure(now)

    @property
    def max_wait(self) -> float | None:
        """The longest wait ``acquire`` accepts when called without ``timeout``."""
        return self._max_wait

    @property
    def available(self) -> float:
        """Tokens in the bucket now: not yet handed to anyone (queued requests included)."""
        now = self._bound_now()
        level = self._level
        if now > self._stamp:
            level = min(self._capacity, level + (now - self._stamp) * self._rate)
        return max(0.0, level)

    @property
    def waiting(self) -> int:
        """Number of queued requests (tasks waiting for tokens not yet granted)."""
        return self._count

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<{self._name()} rate={self._rate!r}/s burst={self._burst:g} "
            f"available={self.available:.6g} waiting={self._count}{state}>"
        )

    # -- waiting ----------------------------------------------------------------------------

    def _take_now(self, amount: float) -> bool:
        """The fast path: bound to the running loop, nobody queued, the tokens are there."""
        if self._loop is None or self._count or self._closed or amount > self._burst:
            return False
        # Is the bound loop the running one? asyncio's own loops record the thread that runs
        # them, which is far cheaper to check than _get_running_loop() (on 3.11 that costs a
        # getpid() system call, more than all the rest of this path).
        threaded = self._threaded_loop
        if (threaded is None or threaded._thread_id != get_ident()) and (
            _get_running_loop() is not self._loop
        ):
            return False
        # _refill(), inlined: this is the hot path.
        now = self._clock()
        if now > self._stamp:
            level = self._level + (now - self._stamp) * self._rate
            self._level = level if level < self._capacity else self._capacity
            self._stamp = now
        if self._level >= amount:
            self._level -= amount
            return True
        return False

    async def _acquire_slow(self, amount: float, timeout: float | None) -> None:
        """Everything but the fast path: binding, errors, queueing and waiting."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        if amount == 0.0:
            return
        self._check_burst(amount)
        now = self._clock()
        self._refill(now)
        if not self._count and self._fits(amount, now):
            self._level -= amount
            return
        # FIFO: this request is served after everyone queued, so it needs their tokens too.
        # Each request is <= burst <= capacity, so the bucket never clips while they are
        # served back to back and the wait is exact (timers may add up to ~1 ms).
        wait = max(0.0, (self._queued + amount - self._level) / self._rate)
        limit, which = (self._max_wait, "max_wait") if timeout is None else (timeout, "timeout")
        if limit is not None and wait > limit + _slack(now):
            raise ResourceLimitError(
                f"{self._name()}: {amount:g} tokens need a wait of {wait:.6g} s, "
                f"more than the {which} of {limit:g} s",
                retry_after=wait,
            )
        waiter = _Waiter(loop.create_future(), amount)
        self._waiters.append(waiter)
        self._count += 1
        self._queued += amount
        if self._count == 1:
            self._arm(now, waiter, hold_off=False)
        try:
            await waiter.future
        except BaseException:
            # Cancelled (or anything else thrown in) while queued, or after the grant.
            self._abandon(waiter)
            raise
        waiter.state = GONE

    async def _enter_after(self, acquired: Awaitable[None]) -> Self:
        await acquired
        return self

    def _abandon(self, waiter: _Waiter) -> None:
        """The task waiting for ``waiter`` leaves ``acquire()`` with an exception."""
        if waiter.state == QUEUED:
            # It took nothing; the ones behind move up. Only a new head changes the timer.
            was_head = self._waiters[0] is waiter
            self._forget(waiter)
            if was_head:
                self._service(self._clock(), fired=False)
        elif waiter.state == GRANTED:
            # Its grant was processed but acquire() never returned: give the tokens back.
            waiter.state = GONE
            now = self._clock()
            self._refill(now)
            self._level = min(self._capacity, self._level + waiter.tokens)
            if self._count:
                self._service(now, fired=False)

    def _forget(self, waiter: _Waiter) -> None:
        """Stop accounting a ``QUEUED`` waiter (its record may stay in the deque)."""
        waiter.state = GONE
        self._count -= 1
        self._queued -= waiter.tokens

    def _head(self) -> _Waiter | None:
        """The first ``QUEUED`` waiter, dropping dead records in front of it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters[0]
            if waiter.state == QUEUED:
                if not waiter.future.done():
                    return waiter
                # Cancelled, but its task has not run its handler yet: it takes nothing.
                self._forget(waiter)
            waiters.popleft()
        return None

    def _service(self, now: float, *, fired: bool) -> None:
        """Refill, grant every head request that fits, in order, then re-arm the timer."""
        self._refill(now)
        granted = False
        head = self._head()
        while head is not None and self._fits(head.tokens, now):
            self._level -= head.tokens
            self._waiters.popleft()
            self._forget(head)
            head.state = GRANTED
            head.future.set_result(None)
            granted = True
            head = self._head()
        # A timer that fired and found nothing due saw a clock that had not advanced enough.
        self._arm(now, head, hold_off=fired and not granted)

    def _arm(self, now: float, head: _Waiter | None, *, hold_off: bool) -> None:
        """Point the single timer at the moment ``head`` will fit (none if no head)."""
        if head is None:
            self._cancel_timer()
            self._waiters.clear()
            self._queued = 0.0  # exactly, not the float residue of += and -=
            return
        when = now + max(0.0, (head.tokens - self._level) / self._rate)
        if hold_off:
            when = max(when, now + MIN_REARM)
        if self._timer is not None:
            if self._timer_when == when:
                return
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_when = when

    def _on_timer(self) -> None:
        self._timer = None
        if self._count:
            self._service(self._clock(), fired=True)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the bucket -------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0.0:  # a clock that goes backwards adds nothing
            level = self._level + elapsed * self._rate
            self._level = level if level < self._capacity else self._capacity
            self._stamp = now

    def _fits(self, amount: float, now: float) -> bool:
        """Are ``amount`` tokens in the bucket (up to clock rounding)? Refill first."""
        return amount - self._level <= self._rate * _slack(now)

    def _reconfigure(self, now: float) -> None:
        """After a rate or burst change: new capacity, fail requests that can never fit,
        reschedule the rest."""
        self._capacity = max(self._burst, self._rate * CATCH_UP)
        if self._stamp == -math.inf:
            self._level = self._capacity  # not used yet: it starts full
        else:
            self._level = min(self._level, self._capacity)
        if not self._count:
            return
        for waiter in self._waiters:
            if waiter.state == QUEUED and waiter.tokens > self._burst:
                self._forget(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(self._over_burst(waiter.tokens))
        self._service(now, fired=False)

    # -- loops and clocks -------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``loop`` from now on; refused while tasks of another loop wait."""
        if self._count:
            raise RuntimeError(
                f"{self!r} is in use by another event loop, where {self._count} task(s) "
                "wait on it; a limiter serves one event loop at a time"
            )
        stock = _is_stock_clock(loop)
        same_clock = stock and self._stock_clock
        self._loop = loop
        self._threaded_loop = loop if isinstance(loop, asyncio.BaseEventLoop) else None
        self._stock_clock = stock
        self._clock = time.monotonic if stock else loop.time
        if self._stamp != -math.inf and not same_clock:
            # A different clock: keep the level, count no time across the switch.
            self._stamp = self._clock()
        self._done = loop.create_future()
        self._done.set_result(None)
        self._entered = loop.create_future()
        self._entered.set_result(self)

    def _bind_running(self, what: str) -> None:
        loop = _get_running_loop()
        if loop is None:
            raise RuntimeError(f"{self._name()}.{what}() needs a running event loop")
        if loop is not self._loop:
            self._bind(loop)

    def _bound_now(self) -> float:
        """The bound loop's clock, or ``-inf`` (no time passes) before first use."""
        return -math.inf if self._loop is None else self._clock()

    # -- errors -----------------------------------------------------------------------------

    def _name(self) -> str:
        return type(self).__name__

    def _check_open(self) -> None:
        if self._closed:
            raise ResourceError(f"{self._name()} is closed")

    def _over_burst(self, amount: float) -> ResourceLimitError:
        return ResourceLimitError(
            f"{self._name()}: {amount:g} tokens can never be granted: more than the burst "
            f"of {self._burst:g}",
            retry_after=None,
        )

    def _check_burst(self, amount: float) -> None:
        if amount > self._burst:
            raise self._over_burst(amount)


async def _nothing() -> None:
    pass
