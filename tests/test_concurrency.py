"""ConcurrencyLimiter (SPEC §3), on both implementations, on the virtual clock.

One section per SPEC bullet. The step-by-step cancellation races, the state machine and the
storms are in ``test_concurrency_races.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import sys
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import Implementation

from mtaio.exceptions import ResourceError, ResourceLimitError
from mtaio.resources import ConcurrencyLimiter

# Looptime's clock resolution (1 µs) plus float noise.
RESOLUTION = 2e-6


def now() -> float:
    return asyncio.get_running_loop().time()


def at(expected: float) -> Any:
    return pytest.approx(expected, abs=RESOLUTION)


async def steps(count: int = 3) -> None:
    """Let the other tasks run ``count`` loop iterations (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(coro)


def start_acquire(limiter: Any, **kwargs: Any) -> asyncio.Task[None]:
    """A task that calls ``limiter.acquire(**kwargs)`` when it first runs.

    (The compiled ``acquire()`` takes a free permit when *called*, so ``create_task(
    limiter.acquire())`` would take it in the calling task.)
    """

    async def acquire() -> None:
        await limiter.acquire(**kwargs)

    return start(acquire())


async def hold(limiter: Any, until: asyncio.Future[None], log: list[str], name: str) -> None:
    """Acquire, log the name, keep the permit until ``until`` is done, release."""
    async with limiter:
        log.append(name)
        await until


def accounted(limiter: Any) -> None:
    """The counters agree with each other (SPEC §3: in_use + available == capacity)."""
    if limiter.in_use <= limiter.capacity:
        assert limiter.in_use + limiter.available == limiter.capacity
    else:
        assert limiter.available == 0
    assert limiter.locked() == (limiter.available == 0)


# -- construction and bad input -------------------------------------------------------------


def test_limit_is_the_capacity(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(3)
    assert limiter.capacity == 3
    assert (limiter.in_use, limiter.available, limiter.waiting) == (0, 3, 0)
    assert not limiter.locked()


def test_limit_may_be_given_by_keyword(impl: Implementation) -> None:
    assert impl.ConcurrencyLimiter(limit=2).capacity == 2


@pytest.mark.parametrize("limit", [1.0, 2.5, "3", None, True, False])
def test_limit_of_a_wrong_type_is_a_type_error(impl: Implementation, limit: object) -> None:
    with pytest.raises(TypeError, match=r"limit must be an int, got"):
        impl.ConcurrencyLimiter(limit)


@pytest.mark.parametrize("limit", [0, -1, sys.maxsize + 1])
def test_limit_out_of_range_is_a_value_error(impl: Implementation, limit: int) -> None:
    with pytest.raises(ValueError, match=rf"limit must be an int .*, got {limit}"):
        impl.ConcurrencyLimiter(limit)


@pytest.mark.parametrize(
    ("max_wait", "error"),
    [(-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     ("1", TypeError), (True, TypeError)],
)  # fmt: skip
def test_bad_max_wait_is_refused(
    impl: Implementation, max_wait: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="max_wait"):
        impl.ConcurrencyLimiter(1, max_wait=max_wait)


@pytest.mark.parametrize(
    ("max_waiting", "error"),
    [(-1, ValueError), (1.0, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_bad_max_waiting_is_refused(
    impl: Implementation, max_waiting: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="max_waiting"):
        impl.ConcurrencyLimiter(1, max_waiting=max_waiting)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(-0.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     ("1", TypeError), (False, TypeError)],
)  # fmt: skip
async def test_bad_timeout_is_refused_and_changes_nothing(
    impl: Implementation, timeout: object, error: type[Exception]
) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    with pytest.raises(error, match=r"timeout must be"):
        await limiter.acquire(timeout=timeout)
    assert (limiter.in_use, limiter.waiting) == (0, 0)
    await limiter.acquire()
    with pytest.raises(error, match=r"timeout must be"):  # also when it would have to wait
        await limiter.acquire(timeout=timeout)
    assert (limiter.in_use, limiter.waiting) == (1, 0)


def test_created_outside_a_loop(impl: Implementation) -> None:
    """Objects may be created at import time and used in a loop started later."""
    limiter = impl.ConcurrencyLimiter(1)

    async def use() -> None:
        async with limiter:
            assert limiter.in_use == 1
            waiter = asyncio.get_running_loop().create_task(limiter.acquire())
            await asyncio.sleep(0)
        await waiter
        limiter.release()

    for _ in range(2):  # a new loop, nobody waiting: the limiter moves to it
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(use())
        finally:
            loop.close()
    assert limiter.in_use == 0


def test_is_weak_referenceable(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    ref = weakref.ref(limiter)
    assert ref() is limiter


def test_repr_shows_the_state(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(3)
    assert repr(limiter) == "<ConcurrencyLimiter capacity=3 in_use=0 available=3 waiting=0>"
    assert limiter.try_acquire()
    assert repr(limiter) == "<ConcurrencyLimiter capacity=3 in_use=1 available=2 waiting=0>"
    limiter.close()
    assert repr(limiter).endswith("waiting=0 closed>")


# -- acquire waits, FIFO ----------------------------------------------------------------------


async def test_async_with_holds_a_permit_and_binds_the_limiter(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    async with limiter as bound:
        assert bound is limiter
        assert (limiter.in_use, limiter.available) == (1, 1)
        async with limiter:
            assert limiter.locked()
    assert (limiter.in_use, limiter.available) == (0, 2)


async def test_acquire_and_release_count_permits(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    assert await limiter.acquire() is None
    await limiter.acquire()
    assert limiter.locked()
    limiter.release()
    assert (limiter.in_use, limiter.available) == (1, 1)
    limiter.release()
    assert limiter.in_use == 0


async def test_acquire_waits_until_a_permit_is_released(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    waiter = start_acquire(limiter)
    await steps()
    assert not waiter.done()
    assert limiter.waiting == 1
    asyncio.get_running_loop().call_later(5, limiter.release)
    await waiter
    assert now() == at(5)
    assert (limiter.in_use, limiter.waiting) == (1, 0)


async def test_waiters_are_served_first_come_first_served(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    log: list[str] = []
    gates = {name: asyncio.get_running_loop().create_future() for name in "abcdefg"}
    tasks = []
    for name, gate in gates.items():
        tasks.append(start(hold(limiter, gate, log, name)))
        await asyncio.sleep(0)  # each one enters acquire() in this order
    assert log == ["a", "b"]
    for name in "dbacfeg":  # holders leave in a scrambled order
        gates[name].set_result(None)
        await steps()
    assert log == list("abcdefg")
    await asyncio.gather(*tasks)
    assert limiter.in_use == 0


async def test_a_newcomer_does_not_overtake_a_queued_task(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    log: list[str] = []
    gate_a = asyncio.get_running_loop().create_future()
    gate_b = asyncio.get_running_loop().create_future()
    a = start(hold(limiter, gate_a, log, "a"))
    await steps()
    b = start(hold(limiter, gate_b, log, "b"))
    await steps()
    gate_a.set_result(None)  # a's exit hands the permit to b ...
    await asyncio.sleep(0)  # ... a has released, b has not run yet
    assert limiter.in_use == 1
    assert not limiter.try_acquire()  # the promised permit is b's
    c = start(hold(limiter, asyncio.get_running_loop().create_future(), log, "c"))
    await steps()
    assert log == ["a", "b"]
    assert limiter.waiting == 1  # c queues behind
    gate_b.set_result(None)
    await steps()
    assert log == ["a", "b", "c"]
    c.cancel()
    await asyncio.gather(a, b, c, return_exceptions=True)
    assert limiter.in_use == 0


async def test_try_acquire_returns_false_while_anyone_waits(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    waiter = start_acquire(limiter)
    await steps()
    limiter.release()  # promised to the waiter
    assert not limiter.try_acquire()
    assert limiter.available == 0
    await waiter
    limiter.release()
    assert limiter.try_acquire()


# -- timeout / max_wait / max_waiting ---------------------------------------------------------


async def test_timeout_raises_resource_limit_error_holding_nothing(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    with pytest.raises(ResourceLimitError, match=r"within 2\.5 s") as info:
        await limiter.acquire(timeout=2.5)
    assert now() == at(2.5)
    assert info.value.retry_after is None
    assert (limiter.in_use, limiter.waiting) == (1, 0)
    limiter.release()
    assert limiter.in_use == 0


async def test_timeout_that_is_not_reached_does_not_fire(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    asyncio.get_running_loop().call_later(1, limiter.release)
    await limiter.acquire(timeout=3)
    assert now() == at(1)
    await asyncio.sleep(5)  # the cancelled deadline timer does nothing later
    assert (limiter.in_use, limiter.waiting) == (1, 0)


async def test_max_wait_is_the_default_timeout(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1, max_wait=4)
    await limiter.acquire()
    with pytest.raises(ResourceLimitError):
        await limiter.acquire()
    assert now() == at(4)
    with pytest.raises(ResourceLimitError):
        await limiter.acquire(timeout=1)  # the per-call timeout wins, shorter ...
    assert now() == at(5)
    asyncio.get_running_loop().call_later(6, limiter.release)
    await limiter.acquire(timeout=10)  # ... or longer
    assert now() == at(11)


async def test_timeout_zero_takes_only_a_free_permit(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire(timeout=0)
    assert limiter.in_use == 1
    with pytest.raises(ResourceLimitError, match="timeout=0"):
        await limiter.acquire(timeout=0)
    assert now() == 0
    assert (limiter.in_use, limiter.waiting) == (1, 0)


async def test_max_wait_zero_never_queues(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1, max_wait=0)
    async with limiter:
        with pytest.raises(ResourceLimitError):
            async with limiter:
                pass
        assert limiter.in_use == 1
    assert limiter.in_use == 0


async def test_max_waiting_sheds_load_at_once(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1, max_waiting=2)
    await limiter.acquire()
    first = start_acquire(limiter)
    second = start_acquire(limiter)
    await steps()
    assert limiter.waiting == 2
    with pytest.raises(ResourceLimitError, match="max_waiting=2") as info:
        await limiter.acquire()
    assert info.value.retry_after is None
    assert now() == 0
    assert limiter.waiting == 2
    first.cancel()
    await steps()
    third = start_acquire(limiter)  # room in the queue again
    await steps()
    assert limiter.waiting == 2
    for _ in range(3):
        limiter.release()
        await steps()
    assert second.done()
    assert third.done()
    assert limiter.in_use == 0


async def test_max_waiting_zero_means_no_queue(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(2, max_waiting=0)
    await limiter.acquire()
    await limiter.acquire()  # free permits are still granted
    with pytest.raises(ResourceLimitError):
        await limiter.acquire()
    with pytest.raises(ResourceLimitError):
        await limiter.acquire(timeout=10)
    assert (limiter.in_use, limiter.waiting, now()) == (2, 0, 0)


async def test_acquire_under_asyncio_timeout_holds_nothing(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1):
            await limiter.acquire()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.ensure_future(limiter.acquire()), 1)
    assert (limiter.in_use, limiter.waiting) == (1, 0)
    limiter.release()
    assert limiter.try_acquire()


# -- hand-off at wake-up ----------------------------------------------------------------------


async def test_a_promised_permit_is_counted_and_not_available(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    waiter = start_acquire(limiter)
    await steps()
    limiter.release()  # the permit is now the waiter's, though it has not run
    assert (limiter.in_use, limiter.available, limiter.waiting) == (1, 0, 1)
    assert limiter.locked()
    accounted(limiter)
    await waiter
    assert (limiter.in_use, limiter.available, limiter.waiting) == (1, 0, 0)


async def test_woken_task_cancelled_before_it_runs_passes_the_permit_on(
    impl: Implementation,
) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    first = start_acquire(limiter)
    second = start_acquire(limiter)
    await steps()
    limiter.release()  # promised to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    await steps()
    assert first.cancelled()
    assert second.done()
    assert second.exception() is None
    assert (limiter.in_use, limiter.waiting) == (1, 0)


async def test_woken_task_cancelled_with_no_one_behind_returns_the_permit(
    impl: Implementation,
) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    waiter = start_acquire(limiter)
    await steps()
    limiter.release()
    waiter.cancel()
    await steps()
    assert waiter.cancelled()
    assert (limiter.in_use, limiter.available, limiter.waiting) == (0, 1, 0)


async def test_cancelled_waiter_is_skipped_and_the_queue_moves_up(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    tasks = [start_acquire(limiter) for _ in range(3)]
    await steps()
    tasks[0].cancel()
    tasks[1].cancel()
    await steps()
    assert limiter.waiting == 1
    limiter.release()
    await steps()
    assert tasks[2].done()
    assert tasks[2].exception() is None
    assert limiter.in_use == 1


async def test_many_cancelled_waiters_do_not_accumulate(impl: Implementation) -> None:
    """Dead queue entries are dropped, also while no permit is ever released."""
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    queued: list[weakref.ref[asyncio.Future[Any]]] = []
    for _ in range(20):
        tasks = [start_acquire(limiter) for _ in range(100)]
        await steps(1)
        # The future each task waits on is the limiter's queue entry.
        queued += [weakref.ref(task._fut_waiter) for task in tasks]  # type: ignore[attr-defined]
        for task in tasks:
            task.cancel()
        await steps(1)
    del tasks, task
    assert limiter.waiting == 0
    assert sum(ref() is not None for ref in queued) < 100  # 2,000 were queued
    survivor = start_acquire(limiter)
    await steps()
    limiter.release()  # the grant skips and drops what is left
    await survivor
    assert limiter.in_use == 1
    assert all(ref() is None for ref in queued)


async def test_many_timed_out_waiters_do_not_accumulate(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1, max_wait=0.5)
    await limiter.acquire()
    queued: list[weakref.ref[asyncio.Future[Any]]] = []
    for _ in range(20):
        tasks = [start_acquire(limiter) for _ in range(100)]
        await steps(1)
        queued += [weakref.ref(task._fut_waiter) for task in tasks]  # type: ignore[attr-defined]
        await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(task.exception(), ResourceLimitError) for task in tasks)
    assert limiter.waiting == 0
    # The last batch is still referenced here (by its tasks' exceptions); the 1,900 before
    # it are gone unless the limiter's queue keeps them.
    assert sum(ref() is not None for ref in queued[:-100]) < 100
    assert now() == at(20 * 0.5)


# -- release ----------------------------------------------------------------------------------


async def test_release_without_permits_in_use_is_an_error_and_changes_nothing(
    impl: Implementation,
) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    before = repr(limiter)
    with pytest.raises(ResourceError, match="no permit is in use") as info:
        limiter.release()
    assert not isinstance(info.value, ResourceLimitError)
    assert repr(limiter) == before
    async with limiter:
        pass
    with pytest.raises(ResourceError):
        limiter.release()
    assert repr(limiter) == before


async def test_any_task_may_release_a_permit(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)

    async def take() -> None:
        await limiter.acquire()

    await start(take())
    assert limiter.in_use == 1
    waiter = start_acquire(limiter)
    await steps()
    start(asyncio.sleep(0)).add_done_callback(lambda _: limiter.release())
    await waiter
    assert limiter.in_use == 1


async def test_in_use_plus_available_is_capacity(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(3)
    for _ in range(3):
        accounted(limiter)
        await limiter.acquire()
    accounted(limiter)
    waiter = start_acquire(limiter)
    await steps()
    limiter.release()
    accounted(limiter)
    await waiter
    accounted(limiter)


# -- capacity changes -------------------------------------------------------------------------


async def test_raising_capacity_wakes_as_many_waiters_as_there_is_new_room(
    impl: Implementation,
) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    tasks = [start_acquire(limiter) for _ in range(5)]
    await steps()
    limiter.capacity = 3
    assert (limiter.in_use, limiter.waiting) == (3, 5)  # two promised, three queued
    await steps()
    assert [task.done() for task in tasks] == [True, True, False, False, False]
    assert (limiter.in_use, limiter.waiting, limiter.available) == (3, 3, 0)
    limiter.capacity = 10
    await steps()
    assert all(task.done() for task in tasks)
    assert (limiter.in_use, limiter.available) == (6, 4)


async def test_lowering_capacity_admits_nobody_until_in_use_is_below_it(
    impl: Implementation,
) -> None:
    limiter = impl.ConcurrencyLimiter(3)
    for _ in range(3):
        await limiter.acquire()
    waiter = start_acquire(limiter)
    await steps()
    limiter.capacity = 1
    assert (limiter.capacity, limiter.in_use, limiter.available) == (1, 3, 0)
    accounted(limiter)
    limiter.release()
    limiter.release()
    await steps()
    assert not waiter.done()
    assert not limiter.try_acquire()
    assert limiter.in_use == 1
    limiter.release()
    await steps()
    assert waiter.done()
    assert (limiter.in_use, limiter.available) == (1, 0)


@pytest.mark.parametrize("capacity", [0, -2, sys.maxsize + 1, 1.5, "2", True])
async def test_bad_capacity_is_refused_and_changes_nothing(
    impl: Implementation, capacity: object
) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    with pytest.raises((TypeError, ValueError), match="capacity must be an int"):
        limiter.capacity = capacity
    assert limiter.capacity == 2


# -- every exit path releases -----------------------------------------------------------------


async def test_async_with_releases_on_exception(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    with pytest.raises(KeyError):
        async with limiter:
            raise KeyError("boom")
    assert limiter.in_use == 0


async def test_async_with_releases_on_cancellation(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    entered = asyncio.Event()

    async def body() -> None:
        async with limiter:
            entered.set()
            await asyncio.sleep(100)

    task = start(body())
    await entered.wait()
    waiter = start_acquire(limiter)
    await steps()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await waiter  # the permit went on to the waiter
    assert now() == 0
    assert limiter.in_use == 1


async def test_decorator_bare_and_called_limit_concurrency(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    active = peak = 0

    async def work(seconds: float) -> float:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(seconds)
        active -= 1
        return seconds

    bare = limiter.limit(work)
    called = limiter.limit()(work)
    results = await asyncio.gather(*(f(1.0) for f in (bare, called) * 3))
    assert results == [1.0] * 6
    assert peak == 2
    assert now() == at(3)
    assert limiter.in_use == 0


async def test_decorator_releases_on_exception_and_cancellation(impl: Implementation) -> None:
    limiter: ConcurrencyLimiter = impl.ConcurrencyLimiter(1)

    @limiter.limit
    async def fail() -> None:
        raise ValueError("inside")

    @limiter.limit()
    async def forever() -> None:
        await asyncio.sleep(100)

    with pytest.raises(ValueError, match="inside"):
        await fail()
    assert limiter.in_use == 0
    task = start(forever())
    await steps()
    assert limiter.in_use == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert limiter.in_use == 0


def test_decorator_keeps_the_function_identity(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)

    async def fetch(url: str, *, retries: int = 3) -> str:
        """Fetch a URL."""
        return url

    for wrapped in (limiter.limit(fetch), limiter.limit()(fetch)):
        assert wrapped.__name__ == "fetch"
        assert wrapped.__doc__ == "Fetch a URL."
        assert wrapped.__wrapped__ is fetch
        assert inspect.signature(wrapped) == inspect.signature(fetch)
        assert inspect.iscoroutinefunction(wrapped)


def test_decorator_rejects_non_async_functions(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)

    def sync() -> None:
        pass

    async def agen() -> Any:
        yield 1

    for func in (sync, agen):
        with pytest.raises(TypeError, match="async function"):
            limiter.limit(func)
        with pytest.raises(TypeError, match="async function"):
            limiter.limit()(func)


def test_decorator_keeps_parameter_and_return_types() -> None:
    """Checked by mypy (the public class is typed as the pure-Python twin)."""
    limiter = ConcurrencyLimiter(1)

    @limiter.limit
    async def add(a: int, b: int) -> int:
        return a + b

    @limiter.limit()
    async def name(x: str) -> str:
        return x

    if TYPE_CHECKING:
        # warn_unused_ignores: these ignores would be errors if the types were lost.
        _ = add("a", 1)  # type: ignore[arg-type]
        _ = name(1)  # type: ignore[arg-type]
        total: Coroutine[Any, Any, int] = add(1, 2)
        text: Coroutine[Any, Any, str] = name("x")
        del total, text
    assert add.__name__ == "add"


# -- close ------------------------------------------------------------------------------------


async def test_close_fails_waiters_and_later_callers(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    waiters = [start_acquire(limiter, timeout=5) for _ in range(2)]
    await steps()
    limiter.close()
    for waiter in waiters:
        with pytest.raises(ResourceError, match="closed") as info:
            await waiter
        assert not isinstance(info.value, ResourceLimitError)
    assert limiter.waiting == 0
    with pytest.raises(ResourceError, match="closed"):
        await limiter.acquire()
    with pytest.raises(ResourceError, match="closed"):
        limiter.try_acquire()
    with pytest.raises(ResourceError, match="closed"):
        async with limiter:
            pass
    assert limiter.in_use == 1
    limiter.release()  # holders still exit cleanly
    assert limiter.in_use == 0
    await asyncio.sleep(10)  # the deadline timers were cancelled


async def test_close_lets_holders_exit_and_is_idempotent(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    async with limiter:
        limiter.close()
        limiter.close()
        assert limiter.in_use == 1
    assert limiter.in_use == 0
    with pytest.raises(ResourceError):
        await limiter.acquire()


async def test_close_after_the_grant_leaves_the_woken_task_its_permit(
    impl: Implementation,
) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    woken = start_acquire(limiter)
    queued = start_acquire(limiter)
    await steps()
    limiter.release()  # promised to `woken`
    limiter.close()
    await asyncio.gather(woken, queued, return_exceptions=True)
    assert woken.exception() is None
    assert isinstance(queued.exception(), ResourceError)
    assert limiter.in_use == 1
    limiter.release()


# -- loops ------------------------------------------------------------------------------------


def test_use_from_a_second_loop_while_tasks_wait_is_a_runtime_error(
    impl: Implementation,
) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:

        async def hold_and_queue() -> asyncio.Task[None]:
            await limiter.acquire()
            waiter = asyncio.get_running_loop().create_task(limiter.acquire())
            await asyncio.sleep(0)
            return waiter

        waiter = first.run_until_complete(hold_and_queue())
        assert limiter.waiting == 1

        async def misuse_acquire() -> None:
            await limiter.acquire()

        async def misuse_sync(call: str) -> None:
            if call == "release":
                limiter.release()
            elif call == "try_acquire":
                limiter.try_acquire()
            elif call == "capacity":
                limiter.capacity = 5
            else:
                limiter.close()

        with pytest.raises(RuntimeError, match="event loop"):
            second.run_until_complete(misuse_acquire())
        for call in ("release", "try_acquire", "capacity", "close"):
            with pytest.raises(RuntimeError, match="one event loop at a time"):
                second.run_until_complete(misuse_sync(call))
        assert (limiter.in_use, limiter.waiting, limiter.capacity) == (1, 1, 1)

        async def finish() -> None:  # the first loop is unharmed
            limiter.release()
            await waiter
            limiter.release()

        first.run_until_complete(finish())
        assert (limiter.in_use, limiter.waiting) == (0, 0)

        async def reuse() -> None:  # nobody waits any more: the second loop may take over
            async with limiter:
                task = asyncio.get_running_loop().create_task(limiter.acquire())
                await asyncio.sleep(0)
            await task
            limiter.release()

        second.run_until_complete(reuse())
        assert limiter.in_use == 0
    finally:
        first.close()
        second.close()


# -- subclassing ------------------------------------------------------------------------------


async def test_a_subclass_may_override_acquire(impl: Implementation) -> None:
    class Counting(impl.ConcurrencyLimiter):  # type: ignore[misc,name-defined]
        def __init__(self, limit: int) -> None:
            super().__init__(limit)
            self.calls: list[float | None] = []

        async def acquire(self, *, timeout: float | None = None) -> None:
            self.calls.append(timeout)
            await super().acquire(timeout=timeout)

        def release(self) -> None:
            self.calls.append(-1)
            super().release()

    limiter = Counting(1)
    async with limiter as bound:
        assert bound is limiter
    async with limiter:
        pass
    await limiter.acquire(timeout=2)
    with pytest.raises(ResourceLimitError):
        await limiter.acquire(timeout=1)
    assert limiter.calls == [None, -1, None, -1, 2, 1]
    assert "Counting capacity=1 in_use=1" in repr(limiter)


# -- real time (also on uvloop) ---------------------------------------------------------------


@pytest.mark.uvloop
@pytest.mark.looptime(False)
async def test_real_time_timeout(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()
    started = now()
    with pytest.raises(ResourceLimitError):
        await limiter.acquire(timeout=0.02)
    elapsed = now() - started
    assert 0.015 <= elapsed < 0.5
    assert (limiter.in_use, limiter.waiting) == (1, 0)


@pytest.mark.uvloop
@pytest.mark.looptime(False)
async def test_real_time_hand_off(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    log: list[int] = []

    async def worker(n: int) -> None:
        async with limiter:
            log.append(n)
            await asyncio.sleep(0.005)
            assert limiter.in_use <= 2

    await asyncio.gather(*(worker(n) for n in range(8)))
    assert log == list(range(8))
    assert (limiter.in_use, limiter.waiting) == (0, 0)
    waiter = start_acquire(limiter, timeout=1)
    await limiter.acquire()
    await limiter.acquire(timeout=1)
    asyncio.get_running_loop().call_later(0.01, limiter.release)
    await waiter
    assert limiter.in_use == 2


# -- the user guide's examples ----------------------------------------------------------------

GUIDE = Path(__file__).parent.parent / "docs" / "concurrency-limiter.md"


def guide_examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "asyncio.run(main())" in block]


@pytest.mark.parametrize("number", range(len(guide_examples())))
async def test_user_guide_example_runs(number: int) -> None:
    source = guide_examples()[number].replace("asyncio.run(main())", "")
    namespace: dict[str, Any] = {"__name__": f"guide_example_{number}"}
    exec(compile(source, f"{GUIDE.name}[{number}]", "exec"), namespace)
    await namespace["main"]()
