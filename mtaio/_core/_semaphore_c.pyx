"""Permit accounting and hand-off for :class:`ConcurrencyLimiter` (compiled twin).

Mirrors ``_semaphore_py.py`` (the reference: read it for the races this design closes).
What differs is only how the fast paths return:

- ``acquire()`` with a free permit returns ``COMPLETED`` (no coroutine is created);
- ``__aenter__`` with a free permit returns a done future whose result is the limiter (one
  per limiter, made in the first loop that enters it), whose C ``am_send`` hands the result
  over without raising ``StopIteration``;
- ``__aexit__`` releases and returns ``COMPLETED``.

Anything that may wait runs in a Cython ``async def``.

Threads: like every asyncio object, a limiter is meant to be used from one thread (its
loop's) at a time; the counts are plain C integers, exact under that rule. On a
free-threaded build other use must still not crash the interpreter, so the object fields
that are replaced after construction (``_loop``, ``_entered``) are only read or written
inside the object's critical section (a no-op on builds with the GIL). ``_waiters`` is never
replaced, only mutated (a deque is thread-safe by itself).
"""

cimport cython

from asyncio import events

from collections import deque

from mtaio._core._completed cimport COMPLETED

from mtaio._core._shared import bounded_int, hold_while_running, non_negative
from mtaio.exceptions import ResourceError, ResourceLimitError

__all__ = ["ConcurrencyLimiter"]

# The result a waiter's future completes with: how its wait ended.
_GRANTED = True  # a permit was assigned to it (counted in ``in_use``)
_TIMED_OUT = False  # its deadline passed first; it holds nothing
_CLOSED = None  # the limiter was closed; it holds nothing

# Dead futures (cancelled or timed out) stay in the queue until a grant skips them. When they
# outnumber the live ones by this much, the queue is compacted (amortised O(1) per waiter).
cdef Py_ssize_t _COMPACT_SLACK = 64

cdef object _get_running_loop = events._get_running_loop
cdef object _get_running_loop_or_fail = events.get_running_loop


def _expire(waiter):
    """The deadline timer of one waiter: fail it unless a permit (or close) came first."""
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


cdef object _wrong_loop(limiter, loop, bound):
    return RuntimeError(
        f"{limiter!r} is used from event loop {loop!r} while tasks wait on it in "
        f"{bound!r}; a limiter is used from one event loop at a time"
    )


cdef class ConcurrencyLimiter:
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

    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _in_use
    cdef Py_ssize_t _waiting
    cdef Py_ssize_t _max_waiting  # -1: no limit
    cdef object _max_wait
    cdef bint _closed
    cdef object _waiters
    cdef object _loop
    cdef object _entered  # a done future whose result is self (the `__aenter__` fast path)
    cdef object __weakref__

    def __init__(self, limit, *, max_wait=None, max_waiting=None):
        self._capacity = bounded_int("limit", limit, 1)
        self._max_wait = None if max_wait is None else non_negative("max_wait", max_wait)
        self._max_waiting = (
            -1 if max_waiting is None else bounded_int("max_waiting", max_waiting, 0)
        )
        self._in_use = 0
        self._waiting = 0
        self._closed = False
        self._waiters = deque()
        # The loop the waiters live in; bound lazily by the first task that has to wait.
        self._loop = None
        self._entered = None

    # -- state --------------------------------------------------------------------------

    @property
    def capacity(self):
        """The maximum number of permits granted at once (settable at runtime)."""
        return self._capacity

    @capacity.setter
    def capacity(self, value):
        # Raising it wakes as many waiters as there is new room. Lowering it takes no permit
        # back: holders finish, and no one is admitted until ``in_use < capacity``.
        cdef Py_ssize_t checked = bounded_int("capacity", value, 1)
        self._check_loop()
        self._capacity = checked
        self._wake()

    @property
    def in_use(self):
        """Granted permits, including those promised to woken tasks that have not run yet."""
        return self._in_use

    @property
    def available(self):
        """Permits that could be granted now: ``max(0, capacity - in_use)``."""
        return max(0, self._capacity - self._in_use)

    @property
    def waiting(self):
        """Tasks inside ``acquire()`` that have not returned yet (queued or just woken)."""
        return self._waiting

    def locked(self):
        """``True`` when ``acquire()`` cannot return at once (no permit is free)."""
        return self._in_use >= self._capacity

    def __repr__(self):
        closed = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} capacity={self._capacity} in_use={self._in_use}"
            f" available={self.available} waiting={self._waiting}{closed}>"
        )

    # -- acquiring ----------------------------------------------------------------------

    def acquire(self, *, timeout=None):
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
        # Fast path: a free permit and no one inside acquire() (see the `_py` twin).
        if self._in_use < self._capacity and self._waiting == 0 and not self._closed:
            self._in_use += 1
            return COMPLETED
        return self._acquire_slow(timeout, None)

    async def _acquire_slow(self, timeout, result):
        # The slow path of acquire() (returns None) and of __aenter__ (returns self); the
        # `_py` twin's `_acquire` with the fast path taken out (it returns COMPLETED above).
        # Everything happens when the coroutine runs, not when acquire() is called: a
        # coroutine that is never awaited must not leave a queued future behind.
        loop = _get_running_loop_or_fail()
        if loop is not self._bound_loop():
            self._bind_loop(loop)
        if self._closed:
            raise ResourceError(f"{self!r} is closed")
        if self._in_use < self._capacity:
            # Free, and (invariant) nobody queued: only promised tasks are inside acquire().
            self._in_use += 1
            return result
        if self._max_waiting >= 0 and self._waiting >= self._max_waiting:
            raise ResourceLimitError(
                f"no permit free and {self._waiting} tasks already wait "
                f"(max_waiting={self._max_waiting}): request shed",
                retry_after=None,
            )
        if timeout is None:
            timeout = self._max_wait
        waiter = loop.create_future()
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

    def _abandon(self, waiter):
        """The task that owns ``waiter`` leaves ``acquire()`` without returning normally."""
        if waiter.cancel() or waiter.cancelled():
            # It was still queued: the dead future stays until a grant skips it.
            self._compact()
        elif waiter.result() is _GRANTED:
            # Woken, then cancelled before it ran: the promised permit goes on.
            self._in_use -= 1
            self._wake()
        # _TIMED_OUT / _CLOSED: it holds nothing.

    def try_acquire(self):
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

    def __aenter__(self):
        cdef object entered
        # A subclass may override acquire(): only the exact class takes the inlined paths.
        if type(self) is not ConcurrencyLimiter:
            return self._enter_subclass()
        with cython.critical_section(self):
            entered = self._entered  # set when the limiter binds to a loop
            if (
                entered is not None
                and self._in_use < self._capacity
                and self._waiting == 0
                and not self._closed
            ):
                self._in_use += 1
                return entered
        return self._acquire_slow(None, self)

    async def _enter_subclass(self):
        await self.acquire()
        return self

    def __aexit__(self, exc_type, exc, tb):
        if type(self) is ConcurrencyLimiter:
            self._release()
        else:
            self.release()
        return COMPLETED

    # -- releasing ----------------------------------------------------------------------

    def release(self):
        """Give one permit back; the head waiter, if any, gets it at once.

        Permits are counted, not owned: any task may release one. Raises
        :class:`ResourceError` (and changes nothing) when no permit is in use. Works after
        :meth:`close`, so holders exit cleanly.
        """
        self._release()

    def close(self):
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

    def limit(self, func=None, /):
        """Decorator: every call of the ``async`` function runs inside ``async with self``.

        Use it bare (``@limiter.limit``) or called (``@limiter.limit()``).
        """
        if func is None:
            return self._decorate
        return hold_while_running(self, func)

    def _decorate(self, func, /):
        return hold_while_running(self, func)

    # -- internals ----------------------------------------------------------------------

    cdef int _release(self) except -1:
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
        return 0

    cdef int _wake(self) except -1:
        """Assign free permits to the oldest live waiters (the permit is counted at once)."""
        waiters = self._waiters
        while self._in_use < self._capacity and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # done: cancelled or timed out, skip it
                self._in_use += 1
                waiter.set_result(_GRANTED)
        return 0

    cdef int _compact(self) except -1:
        # Live futures <= `_waiting`; when dead ones clearly dominate, drop them in one pass.
        waiters = self._waiters
        if len(waiters) > 2 * self._waiting + _COMPACT_SLACK:
            live = [waiter for waiter in waiters if not waiter.done()]
            waiters.clear()
            waiters.extend(live)
        return 0

    cdef object _bound_loop(self):
        with cython.critical_section(self):
            return self._loop

    cdef int _bind_loop(self, loop) except -1:
        """Bind to the running ``loop``, unless tasks wait in another one."""
        cdef bint rebound = False
        # The done future `__aenter__` returns on its fast path: one per loop.
        entered = loop.create_future()
        entered.set_result(self)
        with cython.critical_section(self):
            bound = self._loop
            if not self._waiting:
                self._loop = loop
                self._entered = entered
                rebound = True
        if not rebound:
            raise _wrong_loop(self, loop, bound)
        self._waiters.clear()  # only dead futures of the old loop can be left
        return 0

    cdef int _check_loop(self) except -1:
        """Refuse to touch the waiters of one loop from another loop."""
        if self._waiting:
            loop = _get_running_loop()
            with cython.critical_section(self):
                bound = self._loop
            if loop is not None and loop is not bound:
                raise _wrong_loop(self, loop, bound)
        return 0
