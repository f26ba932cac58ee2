"""What is measured: each hot path of mtaio, both implementations, beside peers doing the same work.

A :class:`Case` is one subject doing one kind of operation. ``case.prepare()`` is called inside
the running event loop (once per loop: objects bind to the loop they first run on) and returns
``timed(n)``: a coroutine function that performs ``n`` operations back to back **in the calling
task** and returns the nanoseconds they took (the thread's CPU time by default, see
:data:`CLOCKS`). Timing ``n`` operations inside one coroutine amortises the cost of entering
the loop; the figure reported is ``ns / n`` per operation.

Every subject of a group goes through the same driver function (``_enter_exit``,
``_acquire``, ``_call``, ...), so the numerator and the denominator of a ratio run identical
surrounding code and differ only in the object under test.

Unavailable subjects (an mtaio class not written yet, the compiled core not built, a peer not
installed) raise :class:`NotAvailable` from ``prepare()``; the harness reports them as
"not available" instead of failing.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from itertools import repeat
from typing import Any, ParamSpec, TypeVar

from mtaio._core import Kind, twin

__all__ = [
    "CLOCKS",
    "CONTENDED_LIMIT",
    "CONTENDED_TASKS",
    "GROUPS",
    "KINDS",
    "Case",
    "NoOp",
    "NotAvailable",
    "Timed",
    "all_cases",
    "mtaio_class",
    "use_clock",
    "wrapped_floor",
]

P = ParamSpec("P")
T = TypeVar("T")

Timed = Callable[[int], Awaitable[int]]
"""``timed(n)``: do ``n`` operations in the calling task, return the nanoseconds taken."""

KINDS: tuple[Kind, ...] = ("cython", "python")

#: A rate so high that tokens are always available: the uncontended fast path.
FAST_RATE = 1e9
#: Limit of the uncontended concurrency limiters (one task holds at most one permit).
FREE_LIMIT = 10
#: The contended scenario: this many tasks through a limit of ``CONTENDED_LIMIT``.
CONTENDED_TASKS = 10_000
CONTENDED_LIMIT = 10
#: The deadline of every timeout case: far away, so it never fires.
DEADLINE = 10

# Group ids, in table order, with the label the report shows.
GROUPS: dict[str, str] = {
    "async-with": "async with (uncontended)",
    "acquire": "acquire (uncontended)",
    "decorator": "decorated call",
    "timeout": "timeout block",
    "run": "awaiting under a deadline",
    "contended": f"contended: {CONTENDED_TASKS:,} tasks, limit {CONTENDED_LIMIT}",
}


#: How a round is timed. ``cpu``: the thread's CPU time, so that time spent descheduled on a
#: shared machine does not count (none of the per-operation cases waits for anything, so on
#: an idle machine the two agree); ``wall``: ``perf_counter``.
CLOCKS: dict[str, Callable[[], int]] = {"cpu": time.thread_time_ns, "wall": time.perf_counter_ns}
_now: Callable[[], int] = time.thread_time_ns


def use_clock(name: str) -> None:
    """Time every case with ``CLOCKS[name]`` from now on."""
    global _now
    _now = CLOCKS[name]


class NotAvailable(Exception):
    """The subject cannot run here (not implemented yet, not built, not installed)."""


@dataclass(frozen=True)
class Case:
    """One subject doing one kind of operation.

    ``group`` and ``subject`` are short ids (``"async-with"``, ``"rate-cython"``); ``label``
    is what the report prints. ``ops`` fixes the operations per round (the contended scenario
    is one fixed workload); ``None`` lets the harness calibrate it to a round duration.
    """

    group: str
    subject: str
    label: str
    prepare: Callable[[], Timed]
    ops: int | None = None

    @property
    def key(self) -> str:
        return f"{self.group}/{self.subject}"


# ----------------------------------------------------------------------------- subjects


def mtaio_class(name: str, kind: Kind) -> Any:
    """Class ``name`` from mtaio's ``kind`` implementation, or :class:`NotAvailable`."""
    try:
        return twin(name, kind)
    except KeyError:
        raise NotAvailable(f"mtaio.{name} is not implemented yet") from None
    except (ImportError, AttributeError) as exc:
        raise NotAvailable(f"mtaio.{name} ({kind}) cannot be imported: {exc}") from None


def _aiolimiter(rate: float) -> AbstractAsyncContextManager[Any]:
    try:
        from aiolimiter import AsyncLimiter
    except ImportError as exc:  # pragma: no cover - the bench extra installs it
        raise NotAvailable(f"aiolimiter is not installed: {exc}") from None
    return AsyncLimiter(rate, 1)


def _anyio_limiter(limit: int) -> Any:
    try:
        import anyio
    except ImportError as exc:  # pragma: no cover - the bench extra installs it
        raise NotAvailable(f"anyio is not installed: {exc}") from None
    return anyio.CapacityLimiter(limit)  # must be created inside the running loop


def _async_timeout() -> Callable[[float | None], AbstractAsyncContextManager[Any]]:
    try:
        import async_timeout
    except ImportError as exc:  # pragma: no cover - the bench extra installs it
        raise NotAvailable(f"async-timeout is not installed: {exc}") from None
    timeout: Callable[[float | None], AbstractAsyncContextManager[Any]] = async_timeout.timeout
    return timeout


class NoOp:
    """The floor: an ``async with`` whose ``async def`` dunders do nothing.

    This is the least any context manager written in Python costs; a compiled limiter can
    beat it because its dunders need not be coroutines.
    """

    async def __aenter__(self) -> None:
        pass

    async def __aexit__(self, *exc_info: object) -> None:
        pass


def _wrap_in(
    cm: AbstractAsyncContextManager[Any], func: Callable[P, Coroutine[Any, Any, T]]
) -> Callable[P, Coroutine[Any, Any, T]]:
    """What a user writes for a limiter without a decorator: ``async with cm`` around the call."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        async with cm:
            return await func(*args, **kwargs)

    return wrapper


def wrapped_floor(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """The wrapped floor: a pass-through ``async def`` wrapper with a no-op ``async with``."""
    return _wrap_in(NoOp(), func)


async def _work() -> None:
    """The decorated / awaited function: does nothing, so only the wrapping is measured."""


# ------------------------------------------------------------------------------ drivers
# One driver per kind of operation; all subjects of a group share it.


async def _enter_exit(cm: AbstractAsyncContextManager[Any], n: int) -> int:
    start = _now()
    for _ in repeat(None, n):
        async with cm:
            pass
    return _now() - start


async def _acquire(limiter: Any, n: int) -> int:
    start = _now()
    for _ in repeat(None, n):
        await limiter.acquire()
    return _now() - start


async def _acquire_release(limiter: Any, n: int) -> int:
    start = _now()
    for _ in repeat(None, n):
        await limiter.acquire()
        limiter.release()
    return _now() - start


async def _call(func: Callable[[], Awaitable[None]], n: int) -> int:
    start = _now()
    for _ in repeat(None, n):
        await func()
    return _now() - start


async def _new_block(
    make: Callable[[float], AbstractAsyncContextManager[Any]],
    n: int,
) -> int:
    """A fresh context manager per block: ``async with make(10):``."""
    start = _now()
    for _ in repeat(None, n):
        async with make(DEADLINE):
            pass
    return _now() - start


async def _run_under(run: Callable[..., Awaitable[None]], n: int) -> int:
    """``await run(coro, timeout=10)``: ``tm.run`` and ``asyncio.wait_for`` take the same shape."""
    start = _now()
    for _ in repeat(None, n):
        await run(_work(), timeout=DEADLINE)
    return _now() - start


async def _await_bare(n: int) -> int:
    start = _now()
    for _ in repeat(None, n):
        await _work()
    return _now() - start


async def _await_in_asyncio_timeout(n: int) -> int:
    start = _now()
    for _ in repeat(None, n):
        async with asyncio.timeout(DEADLINE):
            await _work()
    return _now() - start


async def _contended(cm: AbstractAsyncContextManager[Any], n: int) -> int:
    """``n`` tasks, each ``async with cm: await asyncio.sleep(0)``, until all are done."""

    async def worker() -> None:
        async with cm:
            await asyncio.sleep(0)

    start = _now()
    await asyncio.gather(*[worker() for _ in range(n)])
    return _now() - start


# ------------------------------------------------------------------------------- cases


def _bind(
    driver: Callable[[Any, int], Awaitable[int]], make: Callable[[], Any]
) -> Callable[[], Timed]:
    """``prepare()`` for ``driver`` on the object ``make()`` builds (inside the loop)."""

    def prepare() -> Timed:
        return functools.partial(driver, make())

    return prepare


def _rate(kind: Kind) -> Callable[[], Any]:
    return lambda: mtaio_class("RateLimiter", kind)(FAST_RATE)


def _concurrency(kind: Kind, limit: int = FREE_LIMIT) -> Callable[[], Any]:
    return lambda: mtaio_class("ConcurrencyLimiter", kind)(limit)


def _manager(kind: Kind, default_timeout: float | None = None) -> Callable[[], Any]:
    return lambda: mtaio_class("TimeoutManager", kind)(default_timeout)


def _limit(make: Callable[[], Any]) -> Callable[[], Any]:
    """``limiter.limit(_work)``: the decorator form, applied once."""
    return lambda: make().limit(_work)


def _manager_class(kind: Kind) -> Callable[[], Any]:
    return lambda: mtaio_class("TimeoutManager", kind)


def _tm_timeout(kind: Kind) -> Callable[[], Any]:
    return lambda: _manager(kind)().timeout


def _tm_run(kind: Kind) -> Callable[[], Any]:
    return lambda: _manager(kind)().run


def all_cases() -> list[Case]:
    """Every case, grouped; within a group the first one is the floor or reference."""
    cases: list[Case] = []

    def add(
        group: str,
        subject: str,
        label: str,
        prepare: Callable[[], Timed],
        ops: int | None = None,
    ) -> None:
        cases.append(Case(group, subject, label, prepare, ops))

    # async with, tokens / permits available
    add("async-with", "floor", "floor: no-op async def dunders", _bind(_enter_exit, NoOp))
    for kind in KINDS:
        add(
            "async-with",
            f"rate-{kind}",
            f"mtaio RateLimiter [{kind}]",
            _bind(_enter_exit, _rate(kind)),
        )
    for kind in KINDS:
        add(
            "async-with",
            f"concurrency-{kind}",
            f"mtaio ConcurrencyLimiter [{kind}]",
            _bind(_enter_exit, _concurrency(kind)),
        )
    add(
        "async-with",
        "semaphore",
        "asyncio.Semaphore",
        _bind(_enter_exit, lambda: asyncio.Semaphore(FREE_LIMIT)),
    )
    add(
        "async-with",
        "bounded-semaphore",
        "asyncio.BoundedSemaphore",
        _bind(_enter_exit, lambda: asyncio.BoundedSemaphore(FREE_LIMIT)),
    )
    add(
        "async-with",
        "aiolimiter",
        "aiolimiter AsyncLimiter",
        _bind(_enter_exit, lambda: _aiolimiter(FAST_RATE)),
    )
    add(
        "async-with",
        "anyio",
        "anyio CapacityLimiter",
        _bind(_enter_exit, lambda: _anyio_limiter(FREE_LIMIT)),
    )

    # acquire (+ release where a permit is held), available
    add("acquire", "await-noop", "await of an async def no-op", _bind(_call, lambda: _work))
    for kind in KINDS:
        add(
            "acquire",
            f"rate-{kind}",
            f"mtaio RateLimiter.acquire() [{kind}]",
            _bind(_acquire, _rate(kind)),
        )
    for kind in KINDS:
        add(
            "acquire",
            f"concurrency-{kind}",
            f"mtaio ConcurrencyLimiter acquire+release [{kind}]",
            _bind(_acquire_release, _concurrency(kind)),
        )
    add(
        "acquire",
        "semaphore",
        "asyncio.Semaphore acquire+release",
        _bind(_acquire_release, lambda: asyncio.Semaphore(FREE_LIMIT)),
    )
    add(
        "acquire",
        "bounded-semaphore",
        "asyncio.BoundedSemaphore acquire+release",
        _bind(_acquire_release, lambda: asyncio.BoundedSemaphore(FREE_LIMIT)),
    )
    add(
        "acquire",
        "aiolimiter",
        "aiolimiter AsyncLimiter.acquire()",
        _bind(_acquire, lambda: _aiolimiter(FAST_RATE)),
    )
    add(
        "acquire",
        "anyio",
        "anyio CapacityLimiter acquire+release",
        _bind(_acquire_release, lambda: _anyio_limiter(FREE_LIMIT)),
    )

    # decorated calls of a no-op async function
    add("decorator", "bare", "bare call, no wrapper", _bind(_call, lambda: _work))
    add("decorator", "wrapped-floor", "wrapped floor", _bind(_call, lambda: wrapped_floor(_work)))
    for kind in KINDS:
        add(
            "decorator",
            f"rate-{kind}",
            f"mtaio @RateLimiter.limit [{kind}]",
            _bind(_call, _limit(_rate(kind))),
        )
    for kind in KINDS:
        add(
            "decorator",
            f"concurrency-{kind}",
            f"mtaio @ConcurrencyLimiter.limit [{kind}]",
            _bind(_call, _limit(_concurrency(kind))),
        )
    add(
        "decorator",
        "semaphore",
        "asyncio.Semaphore in a wrapper",
        _bind(_call, lambda: _wrap_in(asyncio.Semaphore(FREE_LIMIT), _work)),
    )
    add(
        "decorator",
        "aiolimiter",
        "aiolimiter in a wrapper",
        _bind(_call, lambda: _wrap_in(_aiolimiter(FAST_RATE), _work)),
    )

    # deadline blocks that do not expire
    add(
        "timeout",
        "asyncio-timeout",
        "asyncio.timeout(10)",
        _bind(_new_block, lambda: asyncio.timeout),
    )
    add(
        "timeout",
        "async-timeout",
        "async_timeout.timeout(10)",
        _bind(_new_block, _async_timeout),
    )
    for kind in KINDS:
        add(
            "timeout",
            f"tm-timeout-{kind}",
            f"mtaio tm.timeout(10) [{kind}]",
            _bind(_new_block, _tm_timeout(kind)),
        )
    for kind in KINDS:
        add(
            "timeout",
            f"tm-new-{kind}",
            f"mtaio TimeoutManager(10) [{kind}]",
            _bind(_new_block, _manager_class(kind)),
        )
    for kind in KINDS:
        add(
            "timeout",
            f"tm-shared-{kind}",
            f"mtaio shared tm = TimeoutManager(10) [{kind}]",
            _bind(_enter_exit, _manager(kind, DEADLINE)),
        )

    # awaiting a coroutine under a deadline
    add("run", "bare", "await coro, no deadline", lambda: _await_bare)
    add(
        "run", "wait-for", "asyncio.wait_for(coro, 10)", _bind(_run_under, lambda: asyncio.wait_for)
    )
    add(
        "run",
        "asyncio-timeout",
        "asyncio.timeout(10) around await coro",
        lambda: _await_in_asyncio_timeout,
    )
    for kind in KINDS:
        add(
            "run",
            f"tm-run-{kind}",
            f"mtaio tm.run(coro, timeout=10) [{kind}]",
            _bind(_run_under, _tm_run(kind)),
        )

    # contended throughput: CONTENDED_TASKS tasks through CONTENDED_LIMIT permits
    tasks = CONTENDED_TASKS
    add("contended", "floor", "no limit (no-op async with)", _bind(_contended, NoOp), tasks)
    for kind in KINDS:
        add(
            "contended",
            f"concurrency-{kind}",
            f"mtaio ConcurrencyLimiter [{kind}]",
            _bind(_contended, _concurrency(kind, CONTENDED_LIMIT)),
            tasks,
        )
    add(
        "contended",
        "semaphore",
        "asyncio.Semaphore",
        _bind(_contended, lambda: asyncio.Semaphore(CONTENDED_LIMIT)),
        tasks,
    )
    add(
        "contended",
        "bounded-semaphore",
        "asyncio.BoundedSemaphore",
        _bind(_contended, lambda: asyncio.BoundedSemaphore(CONTENDED_LIMIT)),
        tasks,
    )
    add(
        "contended",
        "anyio",
        "anyio CapacityLimiter",
        _bind(_contended, lambda: _anyio_limiter(CONTENDED_LIMIT)),
        tasks,
    )
    return cases
