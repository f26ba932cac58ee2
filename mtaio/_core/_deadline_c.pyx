"""Deadlines: :class:`TimeoutManager` and its :class:`Timeout` scopes (compiled twin).

Mirrors ``_deadline_py.py`` (the reference: read it for the algorithm and the cancellation
rules). What differs is only how the hot paths run:

- deadlines are C doubles: ``INFINITY`` stands for "no deadline" (callers can never pass
  an infinity: it is a ``ValueError``), and a relative deadline waiting for entry has the
  flag ``_pending`` instead of ``_when is None``;
- on a stock asyncio loop (``loop.time`` provably ``time.monotonic``, decided once per
  loop) the clock is read through the C API ``time.monotonic`` itself uses; uvloop's and
  any overridden or patched ``time()`` (looptime) are called;
- ``__aenter__`` must return an awaitable that gives the scope (or manager) back. On 3.11
  that is a ``_Return``, whose C ``am_send`` hands the value over without raising
  ``StopIteration`` (~45 ns; a Cython coroutine costs ~130 ns). From 3.12 the interpreter
  no longer calls ``am_send`` and every non-generator awaitable must raise
  ``StopIteration(value)`` (~1 us measured on 3.13), so it is a native Python coroutine
  (``_deadline_shared.returning``), which 3.12+ runs inline without an exception (~0.3 us).
  ``__aexit__`` returns ``COMPLETED`` (no value, no exception) unless it raises;
- the heap stores ``_Record`` objects compared as C doubles, sifted here, instead of
  tuples handed to ``heapq``;
- the manager keeps one task's ``async with tm:`` blocks in a slot, and needs a dict only
  while several tasks are inside at once.

Threads: like every asyncio object, a manager and its scopes are used from their loop's
thread; a loop's ``_Deadlines`` is only touched from that loop. On a free-threaded build
other use must still not crash: the manager's replaced fields (``_loop``, ``_active``) are
changed inside its critical section (a no-op on builds with the GIL), list and dict
operations are atomic, and list indexing is bounds-checked.
"""

cimport cython
from cpython.long cimport PyLong_AsDouble
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_INCREF, PyObject
from cpython.time cimport monotonic
from libc.math cimport INFINITY, isfinite

import asyncio
import inspect
import types
import weakref
from asyncio import events

from mtaio._core._completed cimport COMPLETED

from mtaio._core._deadline_shared import (
    awaited,
    cancel_base,
    check_seconds,
    close_unstarted,
    insert_timeout_error,
    not_awaitable,
    returning,
    run_scoped,
    timeout_error,
)
from mtaio.exceptions import ResourceError

__all__ = ["Timeout", "TimeoutManager"]

cdef extern from *:
    """
    /* Give a type whose tp_as_async exists an am_send slot (Python >= 3.10 reads it in
       PyIter_Send, which the SEND opcode of 3.11 uses; 3.12+ call tp_iternext instead). */
    static int mtaio_install_send(PyTypeObject *type, sendfunc send) {
        if (type->tp_as_async != NULL) {
            type->tp_as_async->am_send = send;
        }
        return 0;
    }
    """
    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    ctypedef PySendResult (*sendfunc)(PyObject *, PyObject *, PyObject **) noexcept
    ctypedef struct PyTypeObject
    int mtaio_install_send(PyTypeObject *type, sendfunc send) except -1
    int PY_VERSION_HEX

# Scope states, with the names asyncio.Timeout gives them (its RuntimeErrors quote them).
cdef enum:
    _CREATED = 0
    _ENTERED = 1
    _EXPIRING = 2  # our deadline cancelled the task; the block has not exited yet
    _EXPIRED = 3
    _EXITED = 4
cdef tuple _STATE_NAMES = ("created", "active", "expiring", "expired", "finished")

# Dead heap records beyond twice the live ones plus this many trigger a compaction.
cdef Py_ssize_t _COMPACT_SLACK = 64

# Where a loop keeps its deadlines: an attribute of the loop, else this table.
cdef str _ATTRIBUTE = "_mtaio_deadlines_c"
cdef object _elsewhere = weakref.WeakKeyDictionary()

cdef class Timeout
cdef class TimeoutManager

cdef object _get_running_loop = events._get_running_loop
cdef object _get_running_loop_or_fail = events.get_running_loop
# The task running in a loop, without asking which loop runs (on 3.11 ``get_running_loop()``
# makes a getpid() system call, and ``current_task()`` is Python code calling it). From 3.12
# ``current_task`` is C; before, the table it reads is used directly.
cdef object _task_of = (
    asyncio.current_task
    if isinstance(asyncio.current_task, types.BuiltinFunctionType)
    else asyncio.tasks._current_tasks.get
)
cdef object _isfuture = asyncio.isfuture
cdef object _isawaitable = inspect.isawaitable
cdef object _CancelledError = asyncio.CancelledError
cdef object _stock_time = asyncio.BaseEventLoop.time
cdef object _CoroutineType = types.CoroutineType


cdef bint _is_stock_clock(loop) except -1:
    """True when ``loop.time()`` is provably ``time.monotonic()``: not overridden or patched."""
    return type(loop).time is _stock_time and "time" not in getattr(loop, "__dict__", ())


cdef inline object _seconds(str name, object value):
    """``check_seconds`` with the common cases (None, a finite float, a small int) inline."""
    if value is None or (type(value) is float and isfinite(<double>value)):
        return value
    if type(value) is int:
        try:
            return PyLong_AsDouble(value)
        except OverflowError:
            pass
    return check_seconds(name, value)


cdef inline double _deadline(object value):
    """A checked deadline as a double, ``INFINITY`` for ``None``."""
    return INFINITY if value is None else <double>value


# -- the awaitable __aenter__ returns ------------------------------------------------------

@cython.final
@cython.freelist(16)
cdef class _Return:
    """Awaiting it returns ``value`` at once, through ``am_send`` where the interpreter uses it."""

    cdef object value

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        value = self.value
        self.value = None
        raise StopIteration(value)

    def send(self, arg):
        return self.__next__()

    def throw(self, typ, val=None, tb=None):
        if val is None:
            raise typ
        raise val

    def close(self):
        self.value = None


cdef PySendResult _return_send(PyObject *self, PyObject *arg, PyObject **result) noexcept:
    cdef _Return awaitable = <_Return>self
    value = awaitable.value
    awaitable.value = None
    Py_INCREF(value)
    result[0] = <PyObject *>value
    return PYGEN_RETURN


mtaio_install_send(<PyTypeObject *>_Return, _return_send)


cdef inline object _returning(object value):
    """An awaitable giving ``value``: the cheapest kind on this Python (module docstring)."""
    cdef _Return awaitable
    if PY_VERSION_HEX >= 0x030C0000:
        return returning(value)
    awaitable = _Return.__new__(_Return)
    awaitable.value = value
    return awaitable


# -- one loop's deadlines ----------------------------------------------------------------

@cython.final
@cython.freelist(32)
cdef class _Record:
    """One heap record: live iff ``scope._seq == seq``."""

    cdef double when
    cdef long long seq
    cdef Timeout scope


@cython.final
cdef class _Deadlines:
    """The deadlines of every entered scope on one event loop, behind a single timer.

    Invariants: as in ``_deadline_py._Deadlines`` (``_heap`` holds ``_Record``\\ s ordered by
    ``when``, then ``seq``). ``_stock_clock`` says the loop's clock may be read through the
    C API (decided once, when the loop gets its ``_Deadlines``).
    """

    cdef bint _stock_clock
    cdef list _heap
    cdef long long _last_seq
    cdef Py_ssize_t _live
    cdef object _timer
    cdef double _timer_when
    cdef object _soon
    cdef object _sweep

    def __cinit__(self, bint stock_clock):
        self._stock_clock = stock_clock
        self._heap = []
        self._last_seq = 0
        self._live = 0
        self._timer = None
        self._timer_when = INFINITY
        self._soon = None
        self._sweep = None

    cdef inline double now(self, loop) except? -1.0:
        if self._stock_clock:
            return monotonic()
        return loop.time()

    cdef int add(self, loop, Timeout scope, double when) except -1:
        cdef _Record record = _Record.__new__(_Record)
        self._last_seq += 1
        record.when = when
        record.seq = self._last_seq
        record.scope = scope
        scope._seq = self._last_seq
        self._push(record)
        self._live += 1
        if when < self._timer_when:
            self._arm(loop, when)
        return 0

    cdef int discard(self, loop, Timeout scope) except -1:
        if scope._seq:
            scope._seq = 0
            self._live -= 1
            if not self._live:
                del self._heap[:]
                if self._timer is not None and self._sweep is None:
                    self._sweep = loop.call_soon(self._on_sweep)
            elif len(self._heap) > 2 * self._live + _COMPACT_SLACK:
                self._compact()
        return 0

    cdef int _arm(self, loop, double when) except -1:
        if when <= self.now(loop):
            # Already due: call_soon, not call_at, so that the expiry runs before the task's
            # next step and a zero timeout hits the first suspension (CPython gh-95051).
            if self._soon is None:
                self._soon = loop.call_soon(self._on_soon)
            return 0
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)
        self._timer_when = when
        return 0

    def _on_timer(self):
        # The loop says `_timer_when` has come: trust it even if `loop.time()` reads a hair
        # earlier (uvloop's millisecond timers), so no wake-up is wasted.
        cdef double due = self._timer_when
        self._timer = None
        self._timer_when = INFINITY
        self._expire_due(due)

    def _on_soon(self):
        self._soon = None
        self._expire_due(-INFINITY)

    def _on_sweep(self):
        # No deadline was left at the end of an iteration: if that is still so, the timer
        # has nothing to do, and the loop should not hold it.
        self._sweep = None
        if not self._live and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_when = INFINITY

    cdef int _expire_due(self, double due) except -1:
        cdef _Record record
        cdef list heap = self._heap
        cdef list expired = []
        cdef Timeout scope
        loop = _get_running_loop_or_fail()
        cdef double now = self.now(loop)
        if now > due:
            due = now
        while heap:
            record = <_Record>heap[0]
            if record.scope._seq == record.seq:
                if record.when > due:
                    break
                record.scope._seq = 0
                self._live -= 1
                expired.append(record.scope)
            self._pop()
        if heap and (<_Record>heap[0]).when < self._timer_when:
            self._arm(loop, (<_Record>heap[0]).when)
        for scope in expired:
            scope._expire()
        return 0

    # A binary min-heap on (when, seq): heapq's algorithm with C comparisons.

    cdef inline bint _before(self, _Record a, _Record b) noexcept:
        return a.when < b.when or (a.when == b.when and a.seq < b.seq)

    cdef int _push(self, _Record record) except -1:
        cdef list heap = self._heap
        cdef Py_ssize_t i = len(heap)
        cdef Py_ssize_t parent
        heap.append(record)
        while i > 0:
            parent = (i - 1) >> 1
            if not self._before(record, <_Record>heap[parent]):
                break
            heap[i] = heap[parent]
            i = parent
        heap[i] = record
        return 0

    cdef int _pop(self) except -1:
        cdef list heap = self._heap
        last = heap.pop()
        if heap:
            heap[0] = last
            self._sift_down(0)
        return 0

    cdef int _sift_down(self, Py_ssize_t i) except -1:
        cdef list heap = self._heap
        cdef Py_ssize_t n = len(heap)
        cdef Py_ssize_t child
        cdef _Record record = <_Record>heap[i]
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and self._before(<_Record>heap[child + 1], <_Record>heap[child]):
                child += 1
            if not self._before(<_Record>heap[child], record):
                break
            heap[i] = heap[child]
            i = child
        heap[i] = record
        return 0

    cdef int _compact(self) except -1:
        cdef _Record record
        cdef Py_ssize_t i
        cdef list live = []
        for item in self._heap:
            record = <_Record>item
            if record.scope._seq == record.seq:
                live.append(record)
        self._heap = live
        for i in range(len(live) // 2 - 1, -1, -1):
            self._sift_down(i)
        return 0


cdef _Deadlines _deadlines_of(loop):
    deadlines = getattr(loop, _ATTRIBUTE, None)
    if deadlines is not None:
        return <_Deadlines>deadlines
    stock = _is_stock_clock(loop)
    try:
        deadlines = _Deadlines(stock)
        setattr(loop, _ATTRIBUTE, deadlines)
    except (AttributeError, TypeError):
        deadlines = _elsewhere.get(loop)
        if deadlines is None:
            deadlines = _elsewhere[loop] = _Deadlines(stock)
    return <_Deadlines>deadlines


cdef Timeout _scope(TimeoutManager manager, double when, bint pending, double relative,
                    object timeout, object loop, _Deadlines deadlines):
    """A created scope (``Timeout.__init__`` is the public, asyncio-compatible one)."""
    cdef Timeout scope = Timeout.__new__(Timeout)
    scope._manager = manager
    scope._when = when
    scope._pending = pending
    scope._relative = relative
    scope._timeout = timeout
    scope._loop = loop
    if loop is not None:
        scope._thread = PyThread_get_thread_ident()
    scope._deadlines = deadlines
    return scope


# -- the scope ---------------------------------------------------------------------------

@cython.final
@cython.freelist(16)
cdef class Timeout:
    """One deadline scope: ``async with scope:`` cancels the block when its deadline passes.

    What ``tm.timeout()`` and ``tm.timeout_at()`` return, and what ``as`` binds. It behaves
    like Python 3.13's ``asyncio.Timeout`` (``when()``, ``reschedule()``, ``expired()``, the
    same ``RuntimeError``\\ s), raises mtaio's :class:`~mtaio.exceptions.TimeoutError` and
    adds ``remaining``. ``Timeout(when)`` builds a scope with no manager, like
    ``asyncio.Timeout(when)``. A scope is entered once.

    Invariants: as in ``_deadline_py.Timeout``, with ``_when == INFINITY`` for no deadline
    and ``_pending`` for "``_relative`` seconds from entry".
    """

    cdef TimeoutManager _manager
    cdef double _when
    cdef bint _pending
    cdef double _relative
    cdef object _timeout
    cdef object _loop
    cdef unsigned long _thread  # the thread that made it inside ``_loop`` (0: outside a loop)
    cdef int _state
    cdef object _task
    cdef Py_ssize_t _cancelling
    cdef _Deadlines _deadlines
    cdef long long _seq
    cdef Timeout _outer  # the enclosing block of the same manager in the same task

    def __cinit__(self):
        self._when = INFINITY
        self._state = _CREATED

    def __init__(self, when):
        """A scope expiring at loop time ``when`` (``None``: never), as ``asyncio.Timeout``."""
        self._when = _deadline(_seconds("when", when))

    # -- asyncio.Timeout's interface ---------------------------------------------------

    def when(self):
        """The deadline in loop time, or ``None`` (no deadline, or not fixed before entry)."""
        return None if self._when == INFINITY else self._when

    def reschedule(self, when):
        """Move the deadline to loop time ``when`` (``None``: no deadline) while active."""
        cdef int state = self._state
        if state != _ENTERED:
            if state == _CREATED:
                raise RuntimeError("Timeout has not been entered")
            raise RuntimeError(f"Cannot change state of {_STATE_NAMES[state]} Timeout")
        cdef double deadline = _deadline(_seconds("when", when))
        self._when = deadline
        self._timeout = None  # an absolute deadline now
        if self._deadlines is None:
            self._deadlines = _deadlines_of(self._loop)
        self._deadlines.discard(self._loop, self)
        if deadline != INFINITY:
            self._deadlines.add(self._loop, self, deadline)

    def expired(self):
        """Whether the deadline expired while the block ran (it may not have exited yet)."""
        return self._state == _EXPIRING or self._state == _EXPIRED

    @property
    def remaining(self):
        """Seconds until the deadline, clamped at 0; ``None`` without one.

        Before entry, a ``tm.timeout(seconds)`` made outside a running loop reports its full
        ``seconds`` (the deadline is fixed on entry).
        """
        if self._pending:
            return self._relative
        if self._when == INFINITY:
            return None
        loop = self._loop if self._loop is not None else _get_running_loop_or_fail()
        cdef _Deadlines deadlines = (
            self._deadlines if self._deadlines is not None else _deadlines_of(loop)
        )
        return max(0.0, self._when - deadlines.now(loop))

    def __repr__(self):
        info = ""
        if self._state == _ENTERED:
            when = round(self._when, 3) if self._when != INFINITY else None
            info = f" when={when}"
        return f"<Timeout [{_STATE_NAMES[self._state]}]{info}>"

    def __aenter__(self):
        # A scope made inside a running loop is entered in that loop: if this is the thread
        # that made it and the loop has a current task, that loop is running here (one loop
        # per thread) and the task is us. Saves asking which loop runs.
        loop = self._loop
        task = (
            _task_of(loop)
            if loop is not None and self._thread == PyThread_get_thread_ident()
            else None
        )
        if task is None:
            loop = _get_running_loop_or_fail()
            task = _task_of(loop)
        self._enter(loop, task)
        return _returning(self)

    def __aexit__(self, exc_type, exc, tb):
        self._exit(exc_type, exc)
        return COMPLETED

    # -- the machinery -----------------------------------------------------------------

    cdef int _enter(self, loop, task) except -1:
        if self._state != _CREATED:
            raise RuntimeError("Timeout has already been entered")
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        if self._manager is not None:
            self._manager._attach(loop)
        if self._deadlines is None or self._loop is not loop:
            self._deadlines = _deadlines_of(loop)
        if self._pending:
            self._when = self._deadlines.now(loop) + self._relative
            self._pending = False
        self._loop = loop
        self._task = task
        self._cancelling = task.cancelling()
        if self._cancelling:
            self._cancelling = cancel_base(task)
        self._state = _ENTERED
        if self._when != INFINITY:
            self._deadlines.add(loop, self, self._when)
        return 0

    cdef int _expire(self) except -1:
        """Called by ``_Deadlines`` when the deadline passed (the scope is active)."""
        self._state = _EXPIRING
        self._task.cancel()
        return 0

    cpdef bint _leave(self) except -1:
        """Exit bookkeeping. True when this scope's expiry is the one cancellation in flight."""
        cdef int state = self._state
        if state == _ENTERED:
            self._state = _EXITED
        elif state == _EXPIRING:
            self._state = _EXPIRED
        else:
            raise RuntimeError(f"Cannot exit {_STATE_NAMES[state]} Timeout")
        if self._seq:
            self._deadlines.discard(self._loop, self)
        if self._manager is not None:
            self._manager._detach()
        if state == _EXPIRING:
            return self._task.uncancel() <= self._cancelling
        return False

    cdef int _exit(self, exc_type, exc) except -1:
        if self._leave() and exc_type is not None:
            if issubclass(exc_type, _CancelledError):
                raise self._error() from exc
            if exc is not None:
                insert_timeout_error(exc, self._timeout, self.when())
        return 0

    cdef object _error(self):
        return timeout_error(self._timeout, self.when())


# -- the manager -------------------------------------------------------------------------

cdef class TimeoutManager:
    """Deadlines for blocks and awaitables, shared by any number of tasks.

    - ``async with tm:`` runs the block with the deadline ``default_timeout`` seconds from
      entry (none when ``default_timeout`` is ``None``); ``as`` binds the manager.
    - ``tm.timeout(seconds)`` / ``tm.timeout_at(when)`` return a :class:`Timeout` scope
      (``asyncio.timeout`` / ``asyncio.timeout_at`` semantics) for ``async with``.
    - ``await tm.run(awaitable, timeout=...)`` awaits in the calling task with its own
      deadline.

    On expiry the block's task is cancelled and :class:`~mtaio.exceptions.TimeoutError`
    comes out of the ``async with`` that owns the deadline; any other cancellation stays a
    ``CancelledError``. See ``docs/timeout-manager.md`` for the exact rules.

    Invariants: as in ``_deadline_py.TimeoutManager`` (``_has_default`` says whether
    ``_default`` holds a deadline).
    """

    cdef bint _has_default
    cdef double _default
    cdef object _default_timeout  # the same, as a Python float or None
    cdef bint _closed
    cdef Py_ssize_t _active
    cdef object _loop
    # The blocks of `async with tm:`: one task's in a slot (the common case needs no dict),
    # the others' in `_blocks`, made when a second task is inside at the same time. A task's
    # blocks in the slot are always newer than its blocks in `_blocks`.
    cdef object _task0
    cdef Timeout _block0
    cdef dict _blocks
    cdef object __weakref__

    def __init__(self, default_timeout=None):
        default_timeout = _seconds("default_timeout", default_timeout)
        self._default_timeout = default_timeout
        self._has_default = default_timeout is not None
        self._default = 0.0 if default_timeout is None else <double>default_timeout
        self._closed = False
        self._active = 0
        self._loop = None

    @property
    def default_timeout(self):
        """The deadline of ``async with tm:`` and of ``run()`` without ``timeout``, in seconds."""
        return self._default_timeout

    @property
    def closed(self):
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self):
        closed = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} default_timeout={self.default_timeout}"
            f" active={self._active}{closed}>"
        )

    def close(self):
        """Refuse new blocks, scopes and ``run()`` calls (``ResourceError``); running ones
        keep their deadlines. Idempotent."""
        self._closed = True

    # -- async with tm -----------------------------------------------------------------

    def __aenter__(self):
        loop = _get_running_loop_or_fail()
        task = _task_of(loop)
        if task is None:
            raise RuntimeError("TimeoutManager should be used inside a task")
        cdef Timeout scope = _scope(
            self, INFINITY, self._has_default, self._default, self._default_timeout, None, None
        )
        scope._enter(loop, task)
        if self._task0 is None or self._task0 is task:
            scope._outer = self._block0
            self._task0 = task
            self._block0 = scope
        else:
            if self._blocks is None:
                self._blocks = {}
            scope._outer = self._blocks.get(task)
            self._blocks[task] = scope
        return _returning(self)

    def __aexit__(self, exc_type, exc, tb):
        # Every open block runs in `_loop` (None if there is none): its current task is us.
        loop = self._loop
        task = _task_of(loop) if loop is not None else None
        cdef Timeout scope
        if task is not None and task is self._task0:
            scope = self._block0
            self._block0 = scope._outer
            if self._block0 is None:
                self._task0 = None
        else:
            found = (
                self._blocks.get(task) if self._blocks is not None and task is not None else None
            )
            if found is None:
                raise RuntimeError(
                    f"{self!r}: 'async with' exited in a task with no open block of this "
                    "manager; a block must exit in the task that entered it"
                )
            scope = <Timeout>found
            if scope._outer is None:
                del self._blocks[task]
            else:
                self._blocks[task] = scope._outer
        scope._outer = None
        scope._exit(exc_type, exc)
        return COMPLETED

    # -- scopes ------------------------------------------------------------------------

    def timeout(self, seconds):
        """A scope whose deadline is ``seconds`` from now (``None``: no deadline).

        Called inside a running loop the deadline is fixed now, as ``asyncio.timeout``;
        otherwise on entry. ``0`` or less expires at the block's first suspension.
        """
        self._check_open()
        seconds = _seconds("seconds", seconds)
        if seconds is None:
            return _scope(self, INFINITY, False, 0.0, None, None, None)
        loop = _get_running_loop()
        if loop is None:
            return _scope(self, INFINITY, True, <double>seconds, seconds, None, None)
        cdef _Deadlines deadlines = _deadlines_of(loop)
        return _scope(
            self, deadlines.now(loop) + <double>seconds, False, 0.0, seconds, loop, deadlines
        )

    def timeout_at(self, when):
        """A scope whose deadline is loop time ``when`` (``None``: no deadline)."""
        self._check_open()
        return _scope(self, _deadline(_seconds("when", when)), False, 0.0, None, None, None)

    # -- run() -------------------------------------------------------------------------

    def run(self, awaitable, *, timeout=None):
        """Await ``awaitable`` in the calling task with the deadline ``timeout`` seconds away.

        ``timeout`` defaults to ``default_timeout``; with neither there is no deadline. On
        expiry the awaitable is cancelled and :class:`~mtaio.exceptions.TimeoutError` is
        raised; a result it produced anyway (it finished in the same loop iteration, or
        suppressed the cancellation) is returned. ``timeout <= 0`` raises ``TimeoutError``
        without starting a coroutine (a Task or Future is cancelled unless already done).
        Bad arguments raise here, at the call, and close a coroutine that would never run.
        """
        try:
            self._check_open()
            seconds = self._default_timeout if timeout is None else _seconds("timeout", timeout)
            if type(awaitable) is not _CoroutineType and not _isawaitable(awaitable):
                raise not_awaitable(awaitable)
        except BaseException:
            close_unstarted(awaitable)
            raise
        if seconds is None:
            return awaited(awaitable)
        return run_scoped(self, awaitable, seconds)

    def _open_run(self, awaitable, double seconds):
        """``run()``'s first step, in the task that awaits it: enter its own deadline.

        A deadline already passed raises ``TimeoutError`` before a coroutine or other
        awaitable starts (it is closed: no "never awaited" warning); a Task or Future is
        already running, so it is awaited and cancelled at the first suspension instead.
        """
        loop = _get_running_loop_or_fail()
        task = _task_of(loop)
        if task is None or (seconds <= 0 and not _isfuture(awaitable)):
            close_unstarted(awaitable)
            if task is None:
                raise RuntimeError("TimeoutManager.run() should be used inside a task")
            raise timeout_error(seconds, None)
        cdef Timeout scope = _scope(self, INFINITY, True, seconds, seconds, None, None)
        try:
            scope._enter(loop, task)
        except BaseException:
            close_unstarted(awaitable)
            raise
        return scope

    # -- bookkeeping shared with the scopes --------------------------------------------

    cdef int _check_open(self) except -1:
        if self._closed:
            raise ResourceError(f"{self!r} is closed")
        return 0

    cdef int _attach(self, loop) except -1:
        """One more entry running under this manager, in ``loop``."""
        cdef bint bound_here
        self._check_open()
        with cython.critical_section(self):
            bound = self._loop
            bound_here = not self._active or loop is bound
            if bound_here:
                self._loop = loop
                self._active += 1
        if bound_here:
            return 0
        raise RuntimeError(
            f"{self!r} is used from event loop {loop!r} while blocks run under it in "
            f"{bound!r}; a TimeoutManager is used from one event loop at a time"
        )

    cdef int _detach(self) except -1:
        with cython.critical_section(self):
            self._active -= 1
            if not self._active:
                self._loop = None
        return 0
