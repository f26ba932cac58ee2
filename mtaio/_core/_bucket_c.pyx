"""The token bucket behind ``RateLimiter`` (compiled twin).

Mirrors ``_bucket_py.py`` name for name; read that file for the algorithm and the invariants.
What differs is only how the fast paths return and read the clock:

- ``acquire()`` with nobody queued and the tokens in the bucket takes them and returns
  ``COMPLETED`` (no coroutine is created);
- ``__aenter__`` on that path returns a done future whose result is the limiter (one per
  limiter per loop, made when it binds), whose C ``am_send`` hands the result over without
  raising ``StopIteration``; ``__aexit__`` returns a done future whose result is ``None``
  (also made when it binds; measured ~5 ns cheaper to await than ``COMPLETED``);
- on a stock asyncio loop (``loop.time`` provably ``time.monotonic``) the clock is read
  through the C API that ``time.monotonic`` itself uses; any other loop's ``time()`` (uvloop,
  a virtual clock) is called;
- on Python 3.11 the running loop is recognised from its record in the thread's state,
  sparing ``_get_running_loop()``'s ``getpid()`` system call (see ``_on_bound_loop``).

Anything that may wait runs in a Cython ``async def``.

Threads: like every asyncio object, a limiter is used from its loop's thread; the bucket is
plain C doubles, exact under that rule. On a free-threaded build other use must still not
crash the interpreter, so every entry point runs inside the object's critical section (a
no-op on builds with the GIL).
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongAndOverflow
from cpython.time cimport monotonic
from libc.math cimport INFINITY, fabs

import asyncio
import time
from asyncio import events
from collections import deque

from mtaio._core._completed cimport COMPLETED

from mtaio._core._shared import (
    acquire_before_running,
    non_negative,
    optional_non_negative,
    positive,
)
from mtaio.exceptions import ResourceError, ResourceLimitError

__all__ = ["RateLimiter"]

# See _bucket_py.py for what each constant is for.
cdef double CATCH_UP = 0.002
cdef double MIN_REARM = 0.001
cdef double EPSILON = 1e-9
cdef double CLOCK_ROUNDING = 1e-15

# Waiter states.
cdef enum:
    QUEUED = 0
    GRANTED = 1
    GONE = 2

cdef extern from *:
    """
    /* Python < 3.12 keeps the running loop in a holder object in the thread's state dict
       (see _on_bound_loop); later versions make _get_running_loop() cheap. */
    #if PY_VERSION_HEX < 0x030C0000 && !defined(PYPY_VERSION) && !defined(Py_GIL_DISABLED)
    #define MTAIO_LOOP_HOLDER 1
    #else
    #define MTAIO_LOOP_HOLDER 0
    #endif

    /* The version tag of this thread's state dict, or 0 if it has none; never raises.
       CPython 3.11 gives every dict a tag that is unique across all dicts and changes on
       every insertion, replacement or deletion (PEP 509). */
    static unsigned long long mtaio_state_tag(void) {
    #if MTAIO_LOOP_HOLDER
        PyObject *state = PyThreadState_GetDict();
        return state == NULL ? 0 : ((PyDictObject *)state)->ma_version_tag;
    #else
        return 0;
    #endif
    }
    """
    bint _LOOP_HOLDER "MTAIO_LOOP_HOLDER"
    unsigned long long _state_tag "mtaio_state_tag" () noexcept

cdef object _get_running_loop = events._get_running_loop
cdef object _get_running_loop_or_fail = events.get_running_loop
cdef object _stock_time = asyncio.BaseEventLoop.time
cdef object _monotonic = time.monotonic


@cython.final
cdef class _Waiter:
    """One queued request: the future its task awaits and the tokens it asks for."""

    cdef object future
    cdef double tokens
    cdef int state

    def __cinit__(self, future, double tokens):
        self.future = future
        self.tokens = tokens
        self.state = QUEUED


cdef inline double _amount(object tokens) except? -1.0:
    """``tokens`` as a double: a finite number >= 0 (checked inline for int and float)."""
    cdef double amount
    cdef long whole
    cdef int overflow = 0
    if type(tokens) is float:
        amount = PyFloat_AS_DOUBLE(tokens)
        if 0.0 <= amount < INFINITY:
            return amount
    elif type(tokens) is int:
        whole = PyLong_AsLongAndOverflow(tokens, &overflow)
        if not overflow and whole >= 0:
            return <double>whole
    return non_negative("tokens", tokens)  # the other cases, with their errors


cdef inline double _slack(double now) noexcept:
    """How much earlier than "due" a clock reading may be and still count as due."""
    return EPSILON + fabs(now) * CLOCK_ROUNDING


cdef bint _is_stock_clock(loop) except -1:
    """True when ``loop.time()`` is provably ``time.monotonic()``: not overridden or patched."""
    return type(loop).time is _stock_time and "time" not in getattr(loop, "__dict__", ())


cdef class RateLimiter:
    """Token bucket: ``rate`` tokens per second, up to ``burst`` at once, strictly FIFO.

    ``await limiter.acquire(tokens)`` waits for the tokens; it fails at once with
    ``ResourceLimitError`` if they exceed ``burst`` or the wait would exceed ``timeout`` /
    ``max_wait``. See ``docs/rate-limiter.md`` for the exact semantics.

    Invariants: as in ``_bucket_py.RateLimiter``.
    """

    cdef double _rate
    cdef double _burst
    cdef bint _burst_auto
    cdef double _capacity
    cdef double _level
    cdef double _stamp
    cdef object _max_wait
    cdef object _waiters
    cdef Py_ssize_t _count
    cdef double _queued
    cdef object _timer
    cdef double _timer_when
    cdef bint _closed
    cdef object _loop
    cdef object _clock
    cdef bint _stock_clock
    cdef object _done  # what __aexit__ returns
    cdef object _entered
    cdef unsigned long long _state  # see _on_bound_loop()
    cdef object __weakref__

    def __init__(self, rate, burst=None, *, max_wait=None):
        cdef double checked_rate = positive("rate", rate)
        cdef double checked_burst = (
            max(1.0, checked_rate) if burst is None else positive("burst", burst)
        )
        self._max_wait = optional_non_negative("max_wait", max_wait)
        self._rate = checked_rate
        self._burst_auto = burst is None
        self._burst = checked_burst
        self._capacity = max(self._burst, self._rate * CATCH_UP)
        self._level = self._capacity
        self._stamp = -INFINITY
        self._waiters = deque()
        self._count = 0
        self._queued = 0.0
        self._timer = None
        self._timer_when = -INFINITY
        self._closed = False
        self._loop = None
        self._clock = _monotonic
        self._stock_clock = False
        self._done = COMPLETED
        self._entered = None
        self._state = 0

    # -- public API -------------------------------------------------------------------------

    def acquire(self, tokens=1, *, timeout=None):
        """Wait until ``tokens`` can be taken from the bucket, then take them.

        Raises ``ResourceLimitError`` without waiting if ``tokens > burst`` or if the wait
        (which counts the tokens of everyone already queued) would exceed ``timeout``, or
        ``max_wait`` when ``timeout`` is ``None``; ``ResourceError`` after ``close()``.

        Returns an awaitable (not always a coroutine): when nobody waits and the tokens are
        in the bucket, they are taken at once and the result is already complete.
        """
        cdef double amount = _amount(tokens)
        if timeout is not None:
            timeout = non_negative("timeout", timeout)
        with cython.critical_section(self):
            if self._take_now(amount):
                return COMPLETED
        return self._acquire_slow(amount, timeout)

    def try_acquire(self, tokens=1):
        """Take ``tokens`` if they are in the bucket now and nobody is waiting; never waits.

        Raises ``ResourceLimitError`` if ``tokens > burst`` (it could never succeed) and
        ``ResourceError`` after ``close()``.
        """
        cdef double amount = _amount(tokens)
        cdef double now
        with cython.critical_section(self):
            self._check_open()
            if not self._on_bound_loop():
                self._bind_running("try_acquire")
            if amount == 0.0:
                return True
            self._check_burst(amount)
            if self._count:
                return False  # strict FIFO: never overtake a waiting task
            now = self._now()
            self._refill(now)
            if self._fits(amount, now):
                self._level -= amount
                return True
            return False

    def limit(self, func=None, *, tokens=1):
        """Decorate an ``async def`` so that every call first acquires ``tokens``.

        ``@limiter.limit``, ``@limiter.limit(tokens=2)`` or ``limiter.limit(func, tokens=2)``.
        Tokens are not refunded if the function raises.
        """
        amount = non_negative("tokens", tokens)
        if func is None:

            def decorate(func):
                return acquire_before_running(self.acquire, amount, func)

            return decorate
        return acquire_before_running(self.acquire, amount, func)

    def __aenter__(self):
        """``async with limiter``: acquire one token (through ``self.acquire``)."""
        if type(self) is not RateLimiter:
            # A subclass may override acquire(): go through it.
            acquired = self.acquire()
            if acquired is COMPLETED:
                with cython.critical_section(self):
                    return self._entered
            return self._enter_after(acquired)
        with cython.critical_section(self):
            if self._take_now(1.0):
                return self._entered
        return self._enter_after(self._acquire_slow(1.0, None))

    def __aexit__(self, exc_type, exc, tb):
        """Leaving the block gives nothing back: tokens are spent, not held."""
        # A done future of the bound loop (COMPLETED before binding): its C ``am_send`` is
        # a few ns cheaper than COMPLETED's ``__next__``.
        return self._done

    def close(self):
        """Refuse every later request; queued tasks get ``ResourceError``. Idempotent."""
        with cython.critical_section(self):
            if not self._closed:
                self._close()

    @property
    def rate(self):
        """Tokens per second (> 0). Settable; applies from that moment."""
        return self._rate

    @rate.setter
    def rate(self, value):
        cdef double rate = positive("rate", value)
        cdef double now
        with cython.critical_section(self):
            now = self._bound_now()
            self._refill(now)  # the time so far counts at the old rate
            self._rate = rate
            if self._burst_auto:
                self._burst = max(1.0, rate)
            self._reconfigure(now)

    @property
    def burst(self):
        """The bucket's configured capacity. Settable; ``None`` means ``max(1, rate)``,
        kept in step with later ``rate`` changes."""
        return self._burst

    @burst.setter
    def burst(self, value):
        cdef double burst
        cdef double now
        if value is not None:
            burst = positive("burst", value)
        with cython.critical_section(self):
            if value is None:
                burst = max(1.0, self._rate)
            now = self._bound_now()
            self._refill(now)
            self._burst_auto = value is None
            self._burst = burst
            self._reconfigure(now)

    @property
    def max_wait(self):
        """The longest wait ``acquire`` accepts when called without ``timeout``."""
        return self._max_wait

    @property
    def available(self):
        """Tokens in the bucket now: not yet handed to anyone (queued requests included)."""
        with cython.critical_section(self):
            return self._available()

    @property
    def waiting(self):
        """Number of queued requests (tasks waiting for tokens not yet granted)."""
        return self._count

    @property
    def closed(self):
        """True after ``close()``."""
        return self._closed

    def __repr__(self):
        cdef double available
        with cython.critical_section(self):
            available = self._available()
        state = " closed" if self._closed else ""
        return (
            f"<{self._name()} rate={self._rate!r}/s burst={self._burst:g} "
            f"available={available:.6g} waiting={self._count}{state}>"
        )

    @cython.final
    cdef int _close(self) except -1:
        cdef _Waiter waiter
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
        return 0

    # -- waiting ----------------------------------------------------------------------------

    @cython.final
    cdef inline bint _take_now(self, double amount) except -1:
        """The fast path: bound to the running loop, nobody queued, the tokens are there."""
        if self._count or self._closed or amount > self._burst or not self._on_bound_loop():
            return False
        self._refill(self._now())
        if self._level >= amount:
            self._level -= amount
            return True
        return False

    async def _acquire_slow(self, double amount, timeout):
        """Everything but the fast path: binding, errors, queueing and waiting."""
        cdef _Waiter waiter
        loop = _get_running_loop_or_fail()
        with cython.critical_section(self):
            waiter = self._enqueue(loop, amount, timeout)
        if waiter is None:
            return
        try:
            await waiter.future
        except BaseException:
            # Cancelled (or anything else thrown in) while queued, or after the grant.
            with cython.critical_section(self):
                self._abandon(waiter)
            raise
        waiter.state = GONE

    async def _enter_after(self, acquired):
        await acquired
        return self

    @cython.final
    cdef _Waiter _enqueue(self, loop, double amount, timeout):
        """Take the tokens now (returns ``None``), or queue a waiter, or raise."""
        cdef double now, wait
        self._check_open()
        if loop is not self._loop:
            self._bind(loop)
        if amount == 0.0:
            return None
        self._check_burst(amount)
        now = self._now()
        self._refill(now)
        if not self._count and self._fits(amount, now):
            self._level -= amount
            return None
        # FIFO: this request is served after everyone queued, so it needs their tokens too.
        wait = max(0.0, (self._queued + amount - self._level) / self._rate)
        if timeout is None:
            limit, which = self._max_wait, "max_wait"
        else:
            limit, which = timeout, "timeout"
        if limit is not None and wait > <double>limit + _slack(now):
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
            self._arm(now, waiter, False)
        return waiter

    @cython.final
    cdef int _abandon(self, _Waiter waiter) except -1:
        """The task waiting for ``waiter`` leaves ``acquire()`` with an exception."""
        cdef bint was_head
        cdef double now
        if waiter.state == QUEUED:
            # It took nothing; the ones behind move up. Only a new head changes the timer.
            was_head = self._waiters[0] is waiter
            self._forget(waiter)
            if was_head:
                self._service(self._now(), False)
        elif waiter.state == GRANTED:
            # Its grant was processed but acquire() never returned: give the tokens back.
            waiter.state = GONE
            now = self._now()
            self._refill(now)
            self._level = min(self._capacity, self._level + waiter.tokens)
            if self._count:
                self._service(now, False)
        return 0

    @cython.final
    cdef inline void _forget(self, _Waiter waiter) noexcept:
        """Stop accounting a ``QUEUED`` waiter (its record may stay in the deque)."""
        waiter.state = GONE
        self._count -= 1
        self._queued -= waiter.tokens

    @cython.final
    cdef _Waiter _head(self):
        """The first ``QUEUED`` waiter, dropping dead records in front of it."""
        cdef _Waiter waiter
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

    @cython.final
    cdef int _service(self, double now, bint fired) except -1:
        """Refill, grant every head request that fits, in order, then re-arm the timer."""
        cdef bint granted = False
        cdef _Waiter head
        self._refill(now)
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
        self._arm(now, head, fired and not granted)
        return 0

    @cython.final
    cdef int _arm(self, double now, _Waiter head, bint hold_off) except -1:
        """Point the single timer at the moment ``head`` will fit (none if no head)."""
        cdef double when
        if head is None:
            self._cancel_timer()
            self._waiters.clear()
            self._queued = 0.0  # exactly, not the float residue of += and -=
            return 0
        when = now + max(0.0, (head.tokens - self._level) / self._rate)
        if hold_off:
            when = max(when, now + MIN_REARM)
        if self._timer is not None:
            if self._timer_when == when:
                return 0
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_when = when
        return 0

    def _on_timer(self):
        with cython.critical_section(self):
            self._timer = None
            if self._count:
                self._service(self._now(), True)

    @cython.final
    cdef int _cancel_timer(self) except -1:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return 0

    # -- the bucket -------------------------------------------------------------------------

    @cython.final
    cdef inline void _refill(self, double now) noexcept:
        cdef double elapsed = now - self._stamp
        cdef double level
        if elapsed > 0.0:  # a clock that goes backwards adds nothing
            level = self._level + elapsed * self._rate
            self._level = level if level < self._capacity else self._capacity
            self._stamp = now

    @cython.final
    cdef inline bint _fits(self, double amount, double now) noexcept:
        """Are ``amount`` tokens in the bucket (up to clock rounding)? Refill first."""
        return amount - self._level <= self._rate * _slack(now)

    @cython.final
    cdef double _available(self) except? -1.0:
        cdef double now = self._bound_now()
        cdef double level = self._level
        if now > self._stamp:
            level = min(self._capacity, level + (now - self._stamp) * self._rate)
        return max(0.0, level)

    @cython.final
    cdef int _reconfigure(self, double now) except -1:
        """After a rate or burst change: new capacity, fail requests that can never fit,
        reschedule the rest."""
        cdef _Waiter waiter
        self._capacity = max(self._burst, self._rate * CATCH_UP)
        if self._stamp == -INFINITY:
            self._level = self._capacity  # not used yet: it starts full
        else:
            self._level = min(self._level, self._capacity)
        if not self._count:
            return 0
        for waiter in self._waiters:
            if waiter.state == QUEUED and waiter.tokens > self._burst:
                self._forget(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(self._over_burst(waiter.tokens))
        self._service(now, False)
        return 0

    # -- loops and clocks -------------------------------------------------------------------

    @cython.final
    cdef inline double _now(self) except? -1.0:
        if self._stock_clock:
            return monotonic()
        return self._clock()

    @cython.final
    cdef inline bint _on_bound_loop(self) except -1:
        """Is the running loop the one this limiter is bound to?

        On 3.11 ``_get_running_loop()`` costs a ``getpid()`` system call (~150 ns, more than
        the rest of the fast path). The loop that runs is recorded in a "holder" object in the
        thread's state dict, a new holder stored each time a loop starts or stops running.
        While that dict's version tag (unique across dicts, changed by every store, PEP 509)
        is the one seen when the bound loop was last confirmed, it is the same thread's dict,
        unchanged: the bound loop is still the running one. Comparing the tag is cheaper
        than looking the holder up (~20 ns). Anything else is settled by
        ``_get_running_loop()``.
        """
        cdef unsigned long long state
        if _LOOP_HOLDER:
            state = _state_tag()
            if state != 0 and state == self._state:
                return True
        loop = _get_running_loop()
        if loop is None or loop is not self._loop:
            return False
        if _LOOP_HOLDER:
            self._state = _state_tag()
        return True

    @cython.final
    cdef int _bind(self, loop) except -1:
        """Serve ``loop`` from now on; refused while tasks of another loop wait."""
        cdef bint stock, same_clock
        if self._count:
            raise RuntimeError(
                f"{self!r} is in use by another event loop, where {self._count} task(s) "
                "wait on it; a limiter serves one event loop at a time"
            )
        stock = _is_stock_clock(loop)
        same_clock = stock and self._stock_clock
        self._loop = loop
        self._state = 0  # confirmed by the next _on_bound_loop()
        self._stock_clock = stock
        self._clock = _monotonic if stock else loop.time
        if self._stamp != -INFINITY and not same_clock:
            # A different clock: keep the level, count no time across the switch.
            self._stamp = self._now()
        self._done = loop.create_future()
        self._done.set_result(None)
        self._entered = loop.create_future()
        self._entered.set_result(self)
        return 0

    @cython.final
    cdef int _bind_running(self, str what) except -1:
        loop = _get_running_loop()
        if loop is None:
            raise RuntimeError(f"{self._name()}.{what}() needs a running event loop")
        if loop is not self._loop:
            self._bind(loop)
        return 0

    @cython.final
    cdef double _bound_now(self) except? -1.0:
        """The bound loop's clock, or ``-inf`` (no time passes) before first use."""
        if self._loop is None:
            return -INFINITY
        return self._now()

    # -- errors -----------------------------------------------------------------------------

    @cython.final
    cdef str _name(self):
        return type(self).__name__

    @cython.final
    cdef int _check_open(self) except -1:
        if self._closed:
            raise ResourceError(f"{self._name()} is closed")
        return 0

    @cython.final
    cdef _over_burst(self, double amount):
        return ResourceLimitError(
            f"{self._name()}: {amount:g} tokens can never be granted: more than the burst "
            f"of {self._burst:g}",
            retry_after=None,
        )

    @cython.final
    cdef int _check_burst(self, double amount) except -1:
        if amount > self._burst:
            raise self._over_burst(amount)
        return 0
