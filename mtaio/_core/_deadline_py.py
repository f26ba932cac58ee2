"""Deadlines: :class:`TimeoutManager` and its :class:`Timeout` scopes (pure-Python twin).

This is the reference implementation; ``_deadline_c.pyx`` mirrors it name for name.

How a deadline is enforced
--------------------------
Every entered scope with a deadline is a record in the :class:`_Deadlines` of its event
loop: one heap and *one* timer per loop, shared by every manager on it. The timer is armed
for the earliest deadline (or a ``call_soon`` when that deadline has already passed) and,
when it fires, expires every scope that is due and re-arms for the next. A scope that exits
first kills its record in O(1) (lazy deletion: its ``_seq`` no longer matches); dead records
are dropped when the last live one goes and compacted before they can outnumber the live
ones, so a million short blocks leave nothing behind. Entering a block arms no timer unless
its deadline is the new earliest, and exiting one cancels none (``asyncio.timeout`` pays
for both on every block). When the last record goes, one ``call_soon`` sweep cancels the
timer if no deadline is left by the next loop iteration: a loop of short blocks pays for the
timer once per loop iteration, not per block, and once every block is over nothing of ours
is left on the loop.

How our expiry is told apart from every other cancellation
----------------------------------------------------------
asyncio has a single cancellation channel: expiry is ``task.cancel()`` and arrives as a
``CancelledError`` like any other. The task's cancel *count* (``Task.cancelling()``) is
what tells them apart, as in ``asyncio.timeout``:

- on entry a scope notes the count (``_cancelling``); on expiry it marks itself
  ``EXPIRING`` and calls ``task.cancel()`` (count + 1);
- on exit an expired scope calls ``task.uncancel()``, which restores the count for
  enclosing ``TaskGroup``\\ s and timeouts. If the count is then back to what it noted, the
  only cancellation in flight was its own: a ``CancelledError`` becomes our
  ``TimeoutError`` (chained ``from`` it). Otherwise someone else also cancelled the task —
  an outer deadline, a ``TaskGroup``, ``task.cancel()``, even in the same loop iteration —
  and the ``CancelledError`` propagates untouched.
- Nested scopes of one task that expire together each add one to the count: the inner
  ones see the outer's cancellation and let it through, the outermost expired one raises.
- A cancellation *pending* at entry (requested, not yet delivered) is counted as arriving
  inside the block (see ``cancel_base``); ``asyncio.timeout(0)`` swallows it (gh-134471).
- A scope entered while the task handles an earlier cancellation (in ``finally`` or
  ``except CancelledError``) notes a count of 1, so its own expiry still raises
  ``TimeoutError`` (gh-102780).
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import math
import types
import weakref
from asyncio import events
from collections.abc import Awaitable, Callable, Coroutine
from threading import get_ident
from types import TracebackType
from typing import Any, Final, Self, TypeVar, final

from mtaio._core._deadline_shared import (
    awaited,
    cancel_base,
    check_seconds,
    close_unstarted,
    insert_timeout_error,
    not_awaitable,
    run_scoped,
    timeout_error,
)
from mtaio.exceptions import ResourceError

__all__ = ["Timeout", "TimeoutManager"]

T = TypeVar("T")

# Scope states, with the names asyncio.Timeout gives them (its RuntimeErrors quote them).
_CREATED: Final = 0
_ENTERED: Final = 1
_EXPIRING: Final = 2  # our deadline cancelled the task; the block has not exited yet
_EXPIRED: Final = 3
_EXITED: Final = 4
_STATE_NAMES: Final = ("created", "active", "expiring", "expired", "finished")

# Dead heap records beyond twice the live ones plus this many trigger a compaction.
_COMPACT_SLACK: Final = 64

# Where a loop keeps its deadlines: an attribute of the loop (asyncio's and uvloop's loops
# take attributes), else this table; the two twins never share one.
_ATTRIBUTE: Final = "_mtaio_deadlines_py"
_elsewhere: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)

# The task running in a loop, without asking which loop runs (on 3.11 ``get_running_loop()``
# makes a getpid() system call, and ``current_task()`` is Python code calling it). From 3.12
# ``current_task`` is C; before, the table it reads is used directly.
_task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = (
    asyncio.current_task
    if isinstance(asyncio.current_task, types.BuiltinFunctionType)
    else asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]
)


class _Deadlines:
    """The deadlines of every entered scope on one event loop, behind a single timer.

    Invariants:

    - ``_heap`` is a heap of ``(when, seq, scope)`` records. A record is live iff
      ``scope._seq == seq``; every entered scope with a deadline has exactly one live record.
      ``_live`` counts the live records.
    - When ``_live`` drops to 0 the heap is emptied; otherwise dead records are compacted
      away before they exceed ``_live + _COMPACT_SLACK``.
    - While a record is live, the timer (``_timer``, armed for loop time ``_timer_when``) or
      the pending ``call_soon`` (``_soon``) will run no later than its deadline.
    - When ``_live`` drops to 0 with the timer armed, a sweep is pending (``_sweep``); it
      cancels the timer if ``_live`` is still 0 when it runs.
    - The loop is never stored here (only passed in), so on a loop that cannot carry the
      attribute (``_elsewhere`` holds us weakly keyed) nothing here keeps it alive once
      every block is over and the sweep has run.
    """

    __slots__ = ("_heap", "_last_seq", "_live", "_soon", "_sweep", "_timer", "_timer_when")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timeout]] = []
        self._last_seq = 0
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._soon: asyncio.Handle | None = None
        self._sweep: asyncio.Handle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, scope: Timeout, when: float) -> None:
        """Give ``scope`` (entered, with no live record) a record due at ``when``."""
        seq = self._last_seq = self._last_seq + 1
        scope._seq = seq
        heapq.heappush(self._heap, (when, seq, scope))
        self._live += 1
        if when < self._timer_when:
            self._arm(loop, when)

    def discard(self, loop: asyncio.AbstractEventLoop, scope: Timeout) -> None:
        """Kill ``scope``'s record, if it has one (O(1), amortised)."""
        if scope._seq:
            scope._seq = 0
            self._live -= 1
            if not self._live:
                self._heap.clear()
                if self._timer is not None and self._sweep is None:
                    self._sweep = loop.call_soon(self._on_sweep)
            elif len(self._heap) > 2 * self._live + _COMPACT_SLACK:
                self._heap = [record for record in self._heap if record[2]._seq == record[1]]
                heapq.heapify(self._heap)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if when <= loop.time():
            # Already due: call_soon, not call_at, so that the expiry runs before the task's
            # next step and a zero timeout hits the first suspension (CPython gh-95051).
            if self._soon is None:
                self._soon = loop.call_soon(self._on_soon)
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)
        self._timer_when = when

    def _on_timer(self) -> None:
        # The loop says `_timer_when` has come: trust it even if `loop.time()` reads a hair
        # earlier (uvloop's millisecond timers), so no wake-up is wasted.
        due = self._timer_when
        self._timer = None
        self._timer_when = math.inf
        self._expire_due(due)

    def _on_soon(self) -> None:
        self._soon = None
        self._expire_due(-math.inf)

    def _on_sweep(self) -> None:
        # No deadline was left at the end of an iteration: if that is still so, the timer
        # has nothing to do, and the loop should not hold it.
        self._sweep = None
        if not self._live and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_when = math.inf

    def _expire_due(self, due: float) -> None:
        loop = events.get_running_loop()
        due = max(due, loop.time())
        heap = self._heap
        expired = []
        while heap:
            when, seq, scope = heap[0]
            if scope._seq == seq:
                if when > due:
                    break
                scope._seq = 0
                self._live -= 1
                expired.append(scope)
            heapq.heappop(heap)
        if heap and heap[0][0] < self._timer_when:
            self._arm(loop, heap[0][0])
        # Cancel last, with the heap consistent: task.cancel() runs no user code, but a
        # Future subclass it cancels might.
        for scope in expired:
            scope._expire()


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    try:
        deadlines: _Deadlines = getattr(loop, _ATTRIBUTE)
    except AttributeError:
        pass
    else:
        return deadlines
    try:
        deadlines = _Deadlines()
        setattr(loop, _ATTRIBUTE, deadlines)
    except (AttributeError, TypeError):
        found = _elsewhere.get(loop)
        if found is None:
            found = _elsewhere[loop] = _Deadlines()
        deadlines = found
    return deadlines


def _scope(
    manager: TimeoutManager | None,
    when: float | None,
    relative: float | None,
    timeout: float | None,
    loop: asyncio.AbstractEventLoop | None,
) -> Timeout:
    """A created scope (``Timeout.__init__`` is the public, asyncio-compatible one)."""
    scope = Timeout.__new__(Timeout)
    scope._manager = manager
    scope._when = when
    scope._relative = relative
    scope._timeout = timeout
    scope._loop = loop
    scope._thread = get_ident() if loop is not None else 0
    scope._state = _CREATED
    scope._task = None
    scope._cancelling = 0
    scope._deadlines = None
    scope._seq = 0
    scope._outer = None
    return scope


@final
class Timeout:
    """One deadline scope: ``async with scope:`` cancels the block when its deadline passes.

    What ``tm.timeout()`` and ``tm.timeout_at()`` return, and what ``as`` binds. It behaves
    like Python 3.13's ``asyncio.Timeout`` (``when()``, ``reschedule()``, ``expired()``, the
    same ``RuntimeError``\\ s), raises mtaio's :class:`~mtaio.exceptions.TimeoutError` and
    adds ``remaining``. ``Timeout(when)`` builds a scope with no manager, like
    ``asyncio.Timeout(when)``. A scope is entered once.

    Invariants:

    - ``_state`` only moves forward: created -> active -> (expiring -> expired | finished).
    - ``_when`` is the deadline in loop time, ``None`` for none, or ``None`` with
      ``_relative`` set while the deadline is "``_relative`` seconds from entry" (a scope
      made outside a running loop).
    - While active with a deadline, the scope has one live record in ``_deadlines``
      (``_seq != 0``); it has none in any other state.
    - ``_timeout`` is the relative timeout asked for (reported by ``TimeoutError.timeout``),
      ``None`` for an absolute deadline or after ``reschedule()``.
    - ``_cancelling`` is the task's cancel count on entry, not counting a pending
      cancellation (see the module docstring).
    """

    __slots__ = (
        "_cancelling",
        "_deadlines",
        "_loop",
        "_manager",
        "_outer",
        "_relative",
        "_seq",
        "_state",
        "_task",
        "_thread",
        "_timeout",
        "_when",
    )

    _manager: TimeoutManager | None
    _when: float | None
    _relative: float | None
    _timeout: float | None
    _loop: asyncio.AbstractEventLoop | None
    _thread: int  # the thread that made the scope inside ``_loop`` (0: made outside a loop)
    _state: int
    _task: asyncio.Task[Any] | None
    _cancelling: int
    _deadlines: _Deadlines | None
    _seq: int
    _outer: Timeout | None  # the enclosing block of the same manager in the same task

    def __init__(self, when: float | None) -> None:
        """A scope expiring at loop time ``when`` (``None``: never), as ``asyncio.Timeout``."""
        when = check_seconds("when", when)
        self._manager = None
        self._when = when
        self._relative = None
        self._timeout = None
        self._loop = None
        self._thread = 0
        self._state = _CREATED
        self._task = None
        self._cancelling = 0
        self._deadlines = None
        self._seq = 0
        self._outer = None

    # -- asyncio.Timeout's interface ---------------------------------------------------

    def when(self) -> float | None:
        """The deadline in loop time, or ``None`` (no deadline, or not fixed before entry)."""
        return self._when

    def reschedule(self, when: float | None) -> None:
        """Move the deadline to loop time ``when`` (``None``: no deadline) while active."""
        state = self._state
        if state != _ENTERED:
            if state == _CREATED:
                raise RuntimeError("Timeout has not been entered")
            raise RuntimeError(f"Cannot change state of {_STATE_NAMES[state]} Timeout")
        when = check_seconds("when", when)
        loop = self._loop
        assert loop is not None
        self._when = when
        self._timeout = None  # an absolute deadline now
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = _deadlines_of(loop)
        deadlines.discard(loop, self)
        if when is not None:
            deadlines.add(loop, self, when)

    def expired(self) -> bool:
        """Whether the deadline expired while the block ran (it may not have exited yet)."""
        return self._state == _EXPIRING or self._state == _EXPIRED

    @property
    def remaining(self) -> float | None:
        """Seconds until the deadline, clamped at 0; ``None`` without one.

        Before entry, a ``tm.timeout(seconds)`` made outside a running loop reports its full
        ``seconds`` (the deadline is fixed on entry).
        """
        when = self._when
        if when is None:
            return self._relative
        loop = self._loop if self._loop is not None else events.get_running_loop()
        return max(0.0, when - loop.time())

    def __repr__(self) -> str:
        info = ""
        if self._state == _ENTERED:
            when = round(self._when, 3) if self._when is not None else None
            info = f" when={when}"
        return f"<Timeout [{_STATE_NAMES[self._state]}]{info}>"

    async def __aenter__(self) -> Self:
        # A scope made inside a running loop is entered in that loop: if this is the thread
        # that made it and the loop has a current task, that loop is running here (one loop
        # per thread) and the task is us. Saves asking which loop runs.
        loop = self._loop
        task = _task_of(loop) if loop is not None and self._thread == get_ident() else None
        if loop is None or task is None:
            loop = events.get_running_loop()
            task = _task_of(loop)
        self._enter(loop, task)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc_type, exc)

    # -- the machinery -----------------------------------------------------------------

    def _enter(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None) -> None:
        if self._state != _CREATED:
            raise RuntimeError("Timeout has already been entered")
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        manager = self._manager
        if manager is not None:
            manager._attach(loop)
        if self._relative is not None:
            self._when = loop.time() + self._relative
            self._relative = None
        self._loop = loop
        self._task = task
        self._cancelling = cancel_base(task) if task.cancelling() else 0
        self._state = _ENTERED
        if self._when is not None:
            deadlines = self._deadlines = _deadlines_of(loop)
            deadlines.add(loop, self, self._when)

    def _expire(self) -> None:
        """Called by ``_Deadlines`` when the deadline passed (the scope is active)."""
        self._state = _EXPIRING
        assert self._task is not None
        self._task.cancel()

    def _leave(self) -> bool:
        """Exit bookkeeping. True when this scope's expiry is the one cancellation in flight.

        An expired scope uncancels the task, so its cancel count is what it was on entry
        plus whatever others requested meanwhile.
        """
        state = self._state
        if state == _ENTERED:
            self._state = _EXITED
        elif state == _EXPIRING:
            self._state = _EXPIRED
        else:
            raise RuntimeError(f"Cannot exit {_STATE_NAMES[state]} Timeout")
        if self._seq:
            assert self._deadlines is not None
            assert self._loop is not None
            self._deadlines.discard(self._loop, self)
        if self._manager is not None:
            self._manager._detach()
        if state == _EXPIRING:
            assert self._task is not None
            return self._task.uncancel() <= self._cancelling
        return False

    def _exit(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        if self._leave() and exc_type is not None:
            if issubclass(exc_type, asyncio.CancelledError):
                raise timeout_error(self._timeout, self._when) from exc
            if exc is not None:
                insert_timeout_error(exc, self._timeout, self._when)


class TimeoutManager:
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

    Invariants:

    - The manager keeps no deadline itself: every entry (block, scope, ``run()``) is its
      own :class:`Timeout`, registered with its loop's ``_Deadlines``.
    - ``_active`` counts entries that have not exited; while it is non-zero they all run in
      ``_loop`` (``None`` otherwise).
    - ``_blocks`` maps each task inside ``async with tm:`` to its innermost such block;
      the enclosing ones are chained through ``Timeout._outer``.
    - Once ``_closed``, nothing new is entered; what runs keeps its deadline.
    """

    __slots__ = ("__weakref__", "_active", "_blocks", "_closed", "_default", "_loop")

    def __init__(self, default_timeout: float | None = None) -> None:
        self._default = check_seconds("default_timeout", default_timeout)
        self._closed = False
        self._active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocks: dict[asyncio.Task[Any], Timeout] = {}

    @property
    def default_timeout(self) -> float | None:
        """The deadline of ``async with tm:`` and of ``run()`` without ``timeout``, in seconds."""
        return self._default

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} default_timeout={self._default} active={self._active}{closed}>"
        )

    def close(self) -> None:
        """Refuse new blocks, scopes and ``run()`` calls (``ResourceError``); running ones
        keep their deadlines. Idempotent."""
        self._closed = True

    # -- async with tm -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        loop = events.get_running_loop()
        task = _task_of(loop)
        if task is None:
            raise RuntimeError("TimeoutManager should be used inside a task")
        scope = _scope(self, None, self._default, self._default, None)
        scope._enter(loop, task)
        blocks = self._blocks
        scope._outer = blocks.get(task)
        blocks[task] = scope
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Every open block runs in `_loop` (None if there is none): its current task is us.
        loop = self._loop
        task = _task_of(loop) if loop is not None else None
        blocks = self._blocks
        scope = blocks.get(task) if task is not None else None
        if scope is None:
            raise RuntimeError(
                f"{self!r}: 'async with' exited in a task with no open block of this "
                "manager; a block must exit in the task that entered it"
            )
        assert task is not None
        outer = scope._outer
        if outer is None:
            del blocks[task]
        else:
            blocks[task] = outer
            scope._outer = None
        scope._exit(exc_type, exc)

    # -- scopes ------------------------------------------------------------------------

    def timeout(self, seconds: float | None) -> Timeout:
        """A scope whose deadline is ``seconds`` from now (``None``: no deadline).

        Called inside a running loop the deadline is fixed now, as ``asyncio.timeout``;
        otherwise on entry. ``0`` or less expires at the block's first suspension.
        """
        self._check_open()
        seconds = check_seconds("seconds", seconds)
        if seconds is None:
            return _scope(self, None, None, None, None)
        loop = events._get_running_loop()
        if loop is None:
            return _scope(self, None, seconds, seconds, None)
        return _scope(self, loop.time() + seconds, None, seconds, loop)

    def timeout_at(self, when: float | None) -> Timeout:
        """A scope whose deadline is loop time ``when`` (``None``: no deadline)."""
        self._check_open()
        return _scope(self, check_seconds("when", when), None, None, None)

    # -- run() -------------------------------------------------------------------------

    def run(
        self, awaitable: Awaitable[T], *, timeout: float | None = None
    ) -> Coroutine[Any, Any, T]:
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
            seconds = self._default if timeout is None else check_seconds("timeout", timeout)
            if type(awaitable) is not types.CoroutineType and not inspect.isawaitable(awaitable):
                raise not_awaitable(awaitable)
        except BaseException:
            close_unstarted(awaitable)
            raise
        if seconds is None:
            return awaited(awaitable)
        return run_scoped(self, awaitable, seconds)

    def _open_run(self, awaitable: Awaitable[Any], seconds: float) -> Timeout:
        """``run()``'s first step, in the task that awaits it: enter its own deadline.

        A deadline already passed raises ``TimeoutError`` before a coroutine or other
        awaitable starts (it is closed: no "never awaited" warning); a Task or Future is
        already running, so it is awaited and cancelled at the first suspension instead.
        """
        loop = events.get_running_loop()
        task = _task_of(loop)
        if task is None or (seconds <= 0 and not asyncio.isfuture(awaitable)):
            close_unstarted(awaitable)
            if task is None:
                raise RuntimeError("TimeoutManager.run() should be used inside a task")
            raise timeout_error(seconds, None)
        scope = _scope(self, None, seconds, seconds, None)
        try:
            scope._enter(loop, task)
        except BaseException:
            close_unstarted(awaitable)
            raise
        return scope

    # -- bookkeeping shared with the scopes --------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ResourceError(f"{self!r} is closed")

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """One more entry running under this manager, in ``loop``."""
        if self._closed:
            raise ResourceError(f"{self!r} is closed")
        if self._active and loop is not self._loop:
            raise RuntimeError(
                f"{self!r} is used from event loop {loop!r} while blocks run under it in "
                f"{self._loop!r}; a TimeoutManager is used from one event loop at a time"
            )
        self._loop = loop
        self._active += 1

    def _detach(self) -> None:
        self._active -= 1
        if not self._active:
            self._loop = None
