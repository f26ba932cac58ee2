"""TimeoutManager and its Timeout scopes (SPEC §4): the API, one rule at a time.

Time is virtual (looptime): ``await asyncio.sleep(5)`` returns at once with ``loop.time()``
moved by exactly 5, and ``loop.time()`` starts at 0, so expiries are asserted to the exact
loop time. Races, interplay with asyncio's own tools, storms and random schedules are in
``test_timeout_races.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import Any

import pytest
from conftest import Implementation

from mtaio.exceptions import ResourceError
from mtaio.exceptions import TimeoutError as MtaioTimeoutError

# -- helpers -------------------------------------------------------------------------------


def now() -> float:
    return asyncio.get_running_loop().time()


def remaining(scope: Any) -> float | None:
    value: float | None = scope.remaining
    return value


async def sleep_in(block: Any, seconds: float) -> None:
    """``async with block: await asyncio.sleep(seconds)``."""
    async with block:
        await asyncio.sleep(seconds)


def cancelling() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


class Work:
    """A coroutine's life, observable: started, finished, saw a cancellation."""

    def __init__(self) -> None:
        self.started = False
        self.finished = False
        self.cancelled = False

    async def sleep(self, seconds: float, result: str = "done") -> str:
        self.started = True
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished = True
        return result


class Later:
    """An awaitable that is not a coroutine, Task or Future (a custom ``__await__``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __await__(self) -> Generator[Any, None, str]:
        yield from asyncio.sleep(self.seconds).__await__()
        return "later"


def timeouts_alive(impl: Implementation) -> int:
    """How many scope objects exist: what a pile-up of heap records would keep alive."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is impl.Timeout)


def live_timers() -> list[asyncio.TimerHandle]:
    loop = asyncio.get_running_loop()
    return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
async def test_non_finite_default_timeout_is_a_value_error_naming_it(
    impl: Implementation, value: object
) -> None:
    with pytest.raises(ValueError, match="default_timeout must be a finite number or None"):
        impl.TimeoutManager(value)


@pytest.mark.parametrize("value", [True, "1", b"1", [1], 1j])
async def test_non_number_default_timeout_is_a_type_error(
    impl: Implementation, value: object
) -> None:
    with pytest.raises(TypeError, match="default_timeout must be a number or None, got"):
        impl.TimeoutManager(value)


@pytest.mark.parametrize("value", [None, 0, -1, 2, 2.5, -0.5])
async def test_finite_numbers_and_none_are_accepted_as_default_timeout(
    impl: Implementation, value: float | None
) -> None:
    tm = impl.TimeoutManager(value)
    assert tm.default_timeout == value
    assert tm.default_timeout is None or type(tm.default_timeout) is float


async def test_bad_seconds_and_when_raise_at_the_call(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    with pytest.raises(ValueError, match=r"seconds must be a finite number or None .* nan"):
        tm.timeout(math.nan)
    with pytest.raises(ValueError, match=r"when must be a finite number or None .* inf"):
        tm.timeout_at(math.inf)
    with pytest.raises(TypeError, match="seconds must be a number or None, got bool True"):
        tm.timeout(True)
    with pytest.raises(ValueError, match="when must be a finite number"):
        impl.Timeout(-math.inf)
    assert repr(tm) == "<TimeoutManager default_timeout=None active=0>"


async def test_bad_run_arguments_raise_at_the_call_and_close_the_coroutine(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()
    work = Work()
    coro = work.sleep(1)
    with pytest.raises(ValueError, match=r"timeout must be a finite number or None .* got nan"):
        tm.run(coro, timeout=math.nan)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # no "never awaited"
    assert not work.started
    with pytest.raises(TypeError, match=r"run\(\) needs an awaitable .* got int 5"):
        tm.run(5)
    with pytest.raises(TypeError, match="did you forget to call it"):
        tm.run(work.sleep)


async def test_a_bad_reschedule_leaves_the_deadline_untouched(impl: Implementation) -> None:
    async with impl.TimeoutManager().timeout(5) as scope:
        with pytest.raises(ValueError, match="when must be a finite number or None"):
            scope.reschedule(math.nan)
        with pytest.raises(TypeError):
            scope.reschedule("soon")
        assert scope.when() == 5
    assert not scope.expired()


# -- async with tm -------------------------------------------------------------------------


async def test_block_deadline_raises_our_timeout_error_at_the_block(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(2)
    work = Work()

    async def block() -> None:
        async with tm as entered:
            assert entered is tm
            await work.sleep(10)

    with pytest.raises(MtaioTimeoutError) as info:
        await block()
    assert now() == 2
    assert work.cancelled
    error = info.value
    assert isinstance(error, TimeoutError)  # the builtin
    assert isinstance(error, asyncio.TimeoutError)
    assert error.timeout == 2
    assert str(error) == "deadline exceeded: timed out after 2 s"
    assert isinstance(error.__cause__, asyncio.CancelledError)
    assert error.__context__ is error.__cause__
    assert cancelling() == 0  # our cancellation is undone


async def test_block_that_ends_in_time_is_untouched(impl: Implementation) -> None:
    tm = impl.TimeoutManager(5)
    async with tm:
        await asyncio.sleep(4.5)
    await asyncio.sleep(0)
    assert live_timers() == []
    await asyncio.sleep(10)  # nothing fires later
    assert now() == 14.5
    assert cancelling() == 0


async def test_block_deadline_counts_from_entry(impl: Implementation) -> None:
    tm = impl.TimeoutManager(3)
    await asyncio.sleep(10)
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(tm, 5)
    assert now() == 13


async def test_no_default_timeout_means_no_deadline(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    async with tm:
        await asyncio.sleep(10**6)
    assert live_timers() == []


async def test_zero_or_negative_default_expires_at_the_first_suspension(
    impl: Implementation,
) -> None:
    for default in (0, -5):
        tm = impl.TimeoutManager(default)
        async with tm:
            pass  # no suspension: nothing happens
        reached: list[bool] = []

        async def block() -> None:
            async with tm:  # noqa: B023 - awaited at once
                await asyncio.sleep(0)
                reached.append(True)  # noqa: B023

        with pytest.raises(MtaioTimeoutError):
            await block()
        assert not reached
    assert now() == 0


async def test_an_error_from_the_block_passes_through(impl: Implementation) -> None:
    tm = impl.TimeoutManager(5)

    async def block() -> None:
        async with tm:
            raise KeyError("x")

    with pytest.raises(KeyError):
        await block()
    assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=0>"


async def test_manager_reentered_in_one_task_gives_each_entry_its_own_deadline(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(5)

    async def nested() -> None:
        async with tm:
            await asyncio.sleep(3)
            try:
                async with tm:  # deadline 8, but the outer one (5) comes first
                    assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=2>"
                    await asyncio.sleep(10)
            except asyncio.CancelledError:
                assert now() == 5  # the inner block lets the outer deadline through
                raise

    with pytest.raises(MtaioTimeoutError) as outer:
        await nested()
    assert outer.value.timeout == 5
    assert now() == 5
    assert cancelling() == 0

    async with tm:  # deadline 10
        await asyncio.sleep(2)
        async with tm:  # deadline 12
            assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=2>"
            await asyncio.sleep(2)
        await asyncio.sleep(0.5)
    assert now() == 9.5
    assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=0>"


async def test_exiting_a_block_in_another_task_is_a_runtime_error(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(5)

    async def exit_elsewhere() -> None:
        await tm.__aexit__(None, None, None)

    await tm.__aenter__()
    with pytest.raises(RuntimeError, match="no open block of this manager"):
        await asyncio.create_task(exit_elsewhere())
    await tm.__aexit__(None, None, None)
    assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=0>"


async def test_scope_in_an_async_generator_closed_by_another_task_exits_cleanly(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()

    async def stream() -> AsyncGenerator[int]:
        async with tm.timeout(5):
            yield 1
            yield 2

    items = stream()
    assert await anext(items) == 1
    await asyncio.create_task(items.aclose())  # as the loop's async-generator finalizer does
    await asyncio.sleep(10)  # the abandoned deadline must not cancel this task later
    assert cancelling() == 0
    assert repr(tm) == "<TimeoutManager default_timeout=None active=0>"


async def test_manager_outside_a_task_is_a_runtime_error(impl: Implementation) -> None:
    tm = impl.TimeoutManager(5)
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()

    def enter_from_a_callback() -> None:
        try:
            step(tm.__aenter__())
        except BaseException as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    loop.call_soon(enter_from_a_callback)
    error = await outcome
    assert isinstance(error, RuntimeError)
    assert str(error) == "TimeoutManager should be used inside a task"


def step(awaitable: Awaitable[Any]) -> Any:
    """Drive an awaitable one step outside any task (it must not suspend)."""
    try:
        awaitable.__await__().send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("it suspended")


# -- scopes: asyncio.Timeout's interface ---------------------------------------------------


async def test_scope_deadline_is_fixed_when_made_inside_a_loop(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    scope = tm.timeout(2)
    assert scope.when() == 2
    assert repr(scope) == "<Timeout [created]>"
    await asyncio.sleep(1)

    async def block() -> None:
        async with scope as entered:
            assert entered is scope
            assert repr(scope) == "<Timeout [active] when=2.0>"
            assert scope.remaining == 1
            await asyncio.sleep(5)

    with pytest.raises(MtaioTimeoutError) as info:
        await block()
    assert now() == 2
    assert info.value.timeout == 2
    assert scope.expired()
    assert scope.remaining == 0
    assert repr(scope) == "<Timeout [expired]>"


async def test_scope_made_outside_a_loop_counts_from_entry(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    scope = await asyncio.to_thread(tm.timeout, 2)  # no running loop in that thread
    assert scope.when() is None
    assert scope.remaining == 2
    await asyncio.sleep(1)
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(scope, 5)
    assert scope.when() == 3
    assert now() == 3


async def test_timeout_at_is_absolute_and_reports_no_relative_timeout(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(1)
    scope = tm.timeout_at(7.5)
    assert scope.when() == 7.5
    with pytest.raises(MtaioTimeoutError) as info:
        await sleep_in(scope, 10)
    assert now() == 7.5
    assert info.value.timeout is None
    assert str(info.value) == "deadline exceeded: loop time 7.500000 passed"


async def test_timeout_none_means_no_deadline(impl: Implementation) -> None:
    tm = impl.TimeoutManager(1)
    for scope in (tm.timeout(None), tm.timeout_at(None), impl.Timeout(None)):
        async with scope:
            assert scope.when() is None
            assert scope.remaining is None
            await asyncio.sleep(100)
        assert not scope.expired()
        assert repr(scope) == "<Timeout [finished]>"


async def test_timeout_class_is_a_drop_in_for_asyncio_timeout_class(
    impl: Implementation,
) -> None:
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(impl.Timeout(now() + 1), 2)
    assert now() == 1


async def test_zero_or_negative_scope_expires_at_the_first_suspension(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()
    for seconds in (0, -1):
        async with tm.timeout(seconds) as scope:
            pass
        assert not scope.expired()
        scope = tm.timeout(seconds)
        with pytest.raises(MtaioTimeoutError):
            await sleep_in(scope, 0)
        assert scope.expired()
    async with tm.timeout_at(-100):
        pass
    assert now() == 0
    assert cancelling() == 0


async def test_reschedule_moves_the_deadline_both_ways(impl: Implementation) -> None:
    tm = impl.TimeoutManager()

    async def moved() -> None:
        async with tm.timeout(2) as scope:
            scope.reschedule(5)  # later
            await asyncio.sleep(3)
            scope.reschedule(4)  # earlier
            await asyncio.sleep(10)

    with pytest.raises(MtaioTimeoutError) as info:
        await moved()
    assert now() == 4
    assert info.value.timeout is None  # absolute after a reschedule

    async with tm.timeout(1) as scope:
        scope.reschedule(None)
        assert remaining(scope) is None
        await asyncio.sleep(5)
        scope.reschedule(now() + 1)
        assert remaining(scope) == 1
    assert not scope.expired()

    async def in_the_past() -> None:
        async with impl.Timeout(None) as scope:
            scope.reschedule(now() - 1)  # in the past: at the next suspension
            await asyncio.sleep(0)

    with pytest.raises(MtaioTimeoutError):
        await in_the_past()
    assert now() == 9


async def test_scope_runtime_errors_match_asyncio_3_13(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    scope = tm.timeout(5)
    with pytest.raises(RuntimeError, match=r"^Timeout has not been entered$"):
        scope.reschedule(1)
    async with scope:
        with pytest.raises(RuntimeError, match=r"^Timeout has already been entered$"):
            await sleep_in(scope, 0)
    with pytest.raises(RuntimeError, match=r"^Cannot change state of finished Timeout$"):
        scope.reschedule(1)

    expired = tm.timeout(1)

    async def expiring() -> None:
        async with expired:
            try:
                await asyncio.sleep(2)
            except asyncio.CancelledError:
                assert expired.expired()
                assert repr(expired) == "<Timeout [expiring]>"
                with pytest.raises(RuntimeError, match=r"^Cannot change state of expiring"):
                    expired.reschedule(10)
                raise

    with pytest.raises(MtaioTimeoutError):
        await expiring()
    with pytest.raises(RuntimeError, match=r"^Cannot change state of expired Timeout$"):
        expired.reschedule(10)


async def test_scope_outside_a_task_is_a_runtime_error(impl: Implementation) -> None:
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()
    scope = impl.TimeoutManager().timeout(5)

    def enter_from_a_callback() -> None:
        try:
            step(scope.__aenter__())
        except BaseException as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    loop.call_soon(enter_from_a_callback)
    error = await outcome
    assert isinstance(error, RuntimeError)
    assert str(error) == "Timeout should be used inside a task"


async def test_scope_made_in_one_task_works_in_another(impl: Implementation) -> None:
    scope = impl.TimeoutManager().timeout(1)

    async def body() -> None:
        async with scope:
            await asyncio.sleep(2)

    with pytest.raises(MtaioTimeoutError):
        await asyncio.create_task(body())
    assert cancelling() == 0


# -- cancellation rules --------------------------------------------------------------------


async def test_outside_cancellation_stays_cancelled_error(impl: Implementation) -> None:
    tm = impl.TimeoutManager(5)

    async def body() -> None:
        async with tm:
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelling() == 1
    await asyncio.sleep(10)
    assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=0>"


async def test_pending_cancellation_is_not_swallowed_by_a_zero_timeout(
    impl: Implementation,
) -> None:
    """CPython gh-134471: asyncio.timeout(0) turns an earlier ``task.cancel()`` into a
    TimeoutError and the task runs on. The cancellation must come out."""
    tm = impl.TimeoutManager(0)
    blocks: list[Callable[[], Any]] = [lambda: tm.timeout(0), lambda: tm.timeout(0.5), lambda: tm]
    for block in blocks:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with block():
                await asyncio.sleep(1)
        assert task.uncancel() == 0


async def test_expiry_inside_a_cancelled_tasks_clean_up_is_a_timeout(
    impl: Implementation,
) -> None:
    """CPython gh-102780: a block entered while handling a cancellation still times out."""
    tm = impl.TimeoutManager()
    cleaned_up: list[str] = []

    async def body() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            try:
                async with tm.timeout(1):
                    await asyncio.sleep(5)  # a clean-up that hangs
            except MtaioTimeoutError:
                cleaned_up.append("except")
            raise
        finally:
            try:
                async with tm.timeout(2):
                    await asyncio.sleep(5)
            except MtaioTimeoutError:
                cleaned_up.append("finally")

    task = asyncio.create_task(body())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned_up == ["except", "finally"]
    assert now() == 4
    assert task.cancelling() == 1  # the outer cancellation is still counted


async def test_outer_cancellation_then_expiry_in_the_blocks_clean_up_stays_cancelled(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()

    async def body() -> None:
        async with tm.timeout(3):
            try:
                await asyncio.sleep(10)
            finally:
                await asyncio.sleep(5)  # our deadline passes in here

    task = asyncio.create_task(body())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert now() == 3
    assert task.cancelling() == 1


async def test_block_that_suppresses_our_cancellation_exits_normally(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()
    async with tm.timeout(1) as scope:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        await asyncio.sleep(1)  # no second cancellation
    assert scope.expired()
    assert now() == 2
    assert cancelling() == 0


async def test_another_exception_replacing_our_cancellation_gets_a_timeout_context(
    impl: Implementation,
) -> None:
    """Python 3.13's rule: the TimeoutError is spliced in above the CancelledError."""
    tm = impl.TimeoutManager()

    async def raises_in_finally() -> None:
        async with tm.timeout(1):
            try:
                await asyncio.sleep(5)
            finally:
                raise KeyError("from finally")

    with pytest.raises(KeyError) as info:
        await raises_in_finally()
    context = info.value.__context__
    assert isinstance(context, MtaioTimeoutError)
    assert context.timeout == 1
    assert isinstance(context.__cause__, asyncio.CancelledError)
    assert context.__context__ is context.__cause__
    assert cancelling() == 0

    async def raises_a_group() -> None:
        async with tm.timeout(1):
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                errors = []
                for name in "ab":
                    try:
                        raise OSError(name)  # raised while handling the cancellation
                    except OSError as exc:
                        errors.append(exc)
                raise ExceptionGroup("clean-up failed", errors) from None

    with pytest.raises(ExceptionGroup) as group:
        await raises_a_group()
    for exc in (group.value, *group.value.exceptions):
        assert isinstance(exc.__context__, MtaioTimeoutError), exc


async def test_inner_deadline_raises_at_the_inner_block(impl: Implementation) -> None:
    tm = impl.TimeoutManager(10)
    async with tm:
        with pytest.raises(MtaioTimeoutError) as inner:
            async with tm.timeout(1):
                await asyncio.sleep(5)
        assert inner.value.timeout == 1
        await asyncio.sleep(5)  # the outer block goes on
    assert now() == 6


async def test_outer_deadline_inside_an_inner_block_raises_at_the_outer_block(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(2)
    passed_through: list[str] = []

    async def nested() -> None:
        async with tm:
            try:
                await sleep_in(tm.timeout(10), 5)
            except asyncio.CancelledError:
                passed_through.append("cancelled")
                raise

    with pytest.raises(MtaioTimeoutError) as outer:
        await nested()
    assert passed_through == ["cancelled"]
    assert outer.value.timeout == 2
    assert now() == 2
    assert cancelling() == 0


async def test_nested_deadlines_expiring_together_raise_at_the_outermost(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()
    passed_through: list[str] = []

    async def nested() -> None:
        async with tm.timeout(3):
            try:
                async with tm.timeout_at(3), tm.timeout_at(3):
                    await asyncio.sleep(5)
            except asyncio.CancelledError:
                passed_through.append("cancelled")
                raise

    with pytest.raises(MtaioTimeoutError) as outer:
        await nested()
    assert passed_through == ["cancelled"]
    assert outer.value.timeout == 3
    assert now() == 3
    assert cancelling() == 0


# -- run() ---------------------------------------------------------------------------------


async def test_run_returns_the_result_awaited_in_the_calling_task(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(5)
    caller = asyncio.current_task()
    tasks_before = len(asyncio.all_tasks())

    async def work() -> str:
        assert asyncio.current_task() is caller  # no extra task
        assert len(asyncio.all_tasks()) == tasks_before
        await asyncio.sleep(1)
        return "result"

    assert await tm.run(work()) == "result"
    assert await tm.run(work(), timeout=2) == "result"
    assert await tm.run(Later(1)) == "later"
    assert now() == 3
    assert live_timers() == [] or len(live_timers()) == 1


async def test_run_expiry_cancels_the_work_and_raises_timeout_error(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(5)
    work = Work()
    with pytest.raises(MtaioTimeoutError) as info:
        await tm.run(work.sleep(10), timeout=2)
    assert now() == 2
    assert work.cancelled
    assert info.value.timeout == 2
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert cancelling() == 0

    with pytest.raises(MtaioTimeoutError) as info:
        await tm.run(Work().sleep(10))  # default_timeout
    assert info.value.timeout == 5
    assert now() == 7


async def test_run_without_any_timeout_has_no_deadline(impl: Implementation) -> None:
    assert await impl.TimeoutManager().run(Work().sleep(1000)) == "done"


@pytest.mark.parametrize("timeout", [0, -1, 0.0])
async def test_run_with_zero_timeout_raises_without_starting_a_coroutine(
    impl: Implementation, timeout: float
) -> None:
    tm = impl.TimeoutManager(5)
    work = Work()
    coro = work.sleep(1)
    with pytest.raises(MtaioTimeoutError) as info:
        await tm.run(coro, timeout=timeout)
    assert info.value.timeout == timeout
    assert not work.started
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    with pytest.raises(MtaioTimeoutError):
        await impl.TimeoutManager(0).run(Later(1))  # the default, also 0
    assert now() == 0


async def test_run_with_zero_timeout_on_a_task_or_future(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    done.set_result("already")
    assert await tm.run(done, timeout=0) == "already"

    pending: asyncio.Future[str] = loop.create_future()
    with pytest.raises(MtaioTimeoutError):
        await tm.run(pending, timeout=0)
    assert pending.cancelled()

    task = asyncio.create_task(Work().sleep(5))
    with pytest.raises(MtaioTimeoutError):
        await tm.run(task, timeout=-1)
    assert task.cancelled()

    async def stubborn() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return "kept going"
        return "slept"

    assert await tm.run(asyncio.create_task(stubborn()), timeout=0) == "kept going"
    assert now() == 0
    assert cancelling() == 0


async def test_run_cancels_a_future_or_task_on_expiry(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    with pytest.raises(MtaioTimeoutError):
        await tm.run(future, timeout=1)
    assert future.cancelled()

    work = Work()
    task = asyncio.create_task(work.sleep(10))
    with pytest.raises(MtaioTimeoutError):
        await tm.run(task, timeout=2)
    assert task.cancelled()
    assert work.cancelled
    assert now() == 3


async def test_run_returns_the_result_of_work_that_suppresses_the_cancellation(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()

    async def stubborn() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.sleep(1)
            return "finished anyway"
        return "slept"

    assert await tm.run(stubborn(), timeout=1) == "finished anyway"
    assert now() == 2
    assert cancelling() == 0


async def test_run_error_replacing_our_cancellation_gets_a_timeout_context(
    impl: Implementation,
) -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            raise OSError("clean-up failed") from None

    with pytest.raises(OSError, match="clean-up failed") as info:
        await impl.TimeoutManager().run(fails_on_cancel(), timeout=1)
    assert isinstance(info.value.__context__, MtaioTimeoutError)
    assert cancelling() == 0


async def test_run_inside_a_block_whose_deadline_comes_first(impl: Implementation) -> None:
    tm = impl.TimeoutManager(2)
    work = Work()

    async def block() -> None:
        async with tm:
            await tm.run(work.sleep(10), timeout=5)

    with pytest.raises(MtaioTimeoutError) as info:
        await block()
    assert info.value.timeout == 2  # raised by the block, not by run()
    assert work.cancelled
    assert now() == 2

    async with tm:  # run's own, earlier deadline raises at run()
        with pytest.raises(MtaioTimeoutError) as info:
            await tm.run(Work().sleep(10), timeout=1)
        assert info.value.timeout == 1
    assert now() == 3


async def test_run_outside_a_task_is_a_runtime_error(impl: Implementation) -> None:
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()
    tm = impl.TimeoutManager(1)
    coro = Work().sleep(0)

    def run_from_a_callback() -> None:
        try:
            step(tm.run(coro))
        except BaseException as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    loop.call_soon(run_from_a_callback)
    error = await outcome
    assert isinstance(error, RuntimeError)
    assert "inside a task" in str(error)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


# -- close() -------------------------------------------------------------------------------


async def test_closed_manager_refuses_new_blocks_but_running_ones_keep_deadlines(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(3)
    made_before = tm.timeout(10)
    outcomes: list[str] = []

    async def running() -> None:
        try:
            async with tm:
                await asyncio.sleep(10)
        except MtaioTimeoutError:
            outcomes.append(f"timed out at {now():g}")

    task = asyncio.create_task(running())
    await asyncio.sleep(1)
    tm.close()
    tm.close()  # idempotent
    assert tm.closed
    assert repr(tm) == "<TimeoutManager default_timeout=3.0 active=1 closed>"
    with pytest.raises(ResourceError, match="is closed"):
        async with tm:
            pass
    with pytest.raises(ResourceError):
        tm.timeout(1)
    with pytest.raises(ResourceError):
        tm.timeout_at(1)
    with pytest.raises(ResourceError):
        async with made_before:
            pass
    coro = Work().sleep(1)
    with pytest.raises(ResourceError):
        tm.run(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    await task
    assert outcomes == ["timed out at 3"]


async def test_run_called_before_close_and_awaited_after_is_refused(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(3)
    work = Work()
    pending = tm.run(work.sleep(1))
    tm.close()
    with pytest.raises(ResourceError):
        await pending
    assert not work.started


# -- shared managers -----------------------------------------------------------------------


async def test_shared_manager_gives_each_task_its_own_deadline(impl: Implementation) -> None:
    tm = impl.TimeoutManager(5)
    results: dict[int, str] = {}

    async def worker(i: int) -> None:
        await asyncio.sleep(i)  # enters at i: deadline i + 5
        try:
            async with tm:
                await asyncio.sleep(5.5 - i)  # finishes at 5.5
            results[i] = f"done at {now():g}"
        except MtaioTimeoutError:
            results[i] = f"timed out at {now():g}"

    await asyncio.gather(*(worker(i) for i in range(4)))
    assert results == {
        0: "timed out at 5",
        1: "done at 5.5",
        2: "done at 5.5",
        3: "done at 5.5",
    }


async def test_interleaved_tasks_nesting_blocks_each_exit_their_own(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(5)
    log: list[str] = []

    async def a() -> None:  # enters first, nests, leaves at 2
        async with tm:
            await asyncio.sleep(1)
            async with tm:
                await asyncio.sleep(1)
        log.append(f"a done at {now():g}")

    async def b() -> None:  # enters at 0.5 while a is inside; nests at 2.5, after a left
        await asyncio.sleep(0.5)
        try:
            async with tm:  # deadline 5.5
                await asyncio.sleep(2)
                try:
                    async with tm:  # deadline 7.5
                        await asyncio.sleep(10)
                except asyncio.CancelledError:
                    log.append(f"b inner passed the cancellation on at {now():g}")
                    raise
        except MtaioTimeoutError as exc:
            log.append(f"b outer timed out at {now():g} after {exc.timeout:g} s")

    async def c() -> None:  # enters at 3 while b's inner block is open
        await asyncio.sleep(3)
        async with tm:
            assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=3>"
            await asyncio.sleep(1)
        log.append(f"c done at {now():g}")

    await asyncio.gather(a(), b(), c())
    assert log == [
        "a done at 2",
        "c done at 4",
        "b inner passed the cancellation on at 5.5",
        "b outer timed out at 5.5 after 5 s",
    ]
    assert repr(tm) == "<TimeoutManager default_timeout=5.0 active=0>"


@pytest.mark.looptime(False)
async def test_manager_in_use_in_one_loop_refuses_another(impl: Implementation) -> None:
    tm = impl.TimeoutManager(60)

    async def elsewhere() -> str:
        try:
            async with tm:
                pass
        except RuntimeError as exc:
            return str(exc)
        return "entered"

    async with tm:
        message = await asyncio.to_thread(asyncio.run, elsewhere())
    assert "is used from event loop" in message
    assert "one event loop at a time" in message
    # Once no block runs, another loop may use it.
    assert await asyncio.to_thread(asyncio.run, elsewhere()) == "entered"


async def test_subclass_of_the_manager_works(impl: Implementation) -> None:
    class Named(impl.TimeoutManager):  # type: ignore[misc,name-defined]
        def __init__(self, name: str) -> None:
            super().__init__(default_timeout=1)
            self.name = name

    tm = Named("db")
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(tm, 2)
    async with tm as entered:
        assert entered is tm
    assert tm.name == "db"
    assert repr(tm).startswith("<Named default_timeout=1.0")


# -- nothing left behind -------------------------------------------------------------------


async def test_short_blocks_leave_no_timers_or_records_behind(impl: Implementation) -> None:
    loop = asyncio.get_running_loop()
    tm = impl.TimeoutManager(10)
    alive_before = timeouts_alive(impl)
    for _ in range(3000):
        async with tm:
            pass
        async with tm.timeout(5):
            await asyncio.sleep(0)
        await tm.run(asyncio.sleep(0), timeout=20)
    # While blocks keep coming, one timer serves them all (asyncio's heap holds it and at
    # most the cancelled one it replaced)...
    assert len(live_timers()) <= 1
    assert len(loop._scheduled) <= 2  # type: ignore[attr-defined]
    assert timeouts_alive(impl) <= alive_before
    # ...and by the next loop iteration without a block, nothing of ours is armed.
    await asyncio.sleep(0)
    assert live_timers() == []
    assert now() == 0


async def test_short_blocks_beside_long_ones_keep_the_heap_bounded(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()
    expiries: list[float] = []
    alive_before = timeouts_alive(impl)

    async def long_block(deadline: float) -> None:
        try:
            async with tm.timeout_at(deadline):
                await asyncio.sleep(100)
        except MtaioTimeoutError:
            expiries.append(now())

    longs = [asyncio.create_task(long_block(50 + i)) for i in range(20)]
    await asyncio.sleep(0)
    for i in range(5000):
        async with tm.timeout(30 + i % 7):  # earlier than every long one, then exits
            if i % 3 == 0:
                await asyncio.sleep(0)
    # Dead records are compacted away, not piled up (20 live, < 2 * 20 + 64 dead).
    assert timeouts_alive(impl) <= alive_before + 20 + 2 * 20 + 64 + 1
    await asyncio.gather(*longs)
    assert expiries == [50 + i for i in range(20)]  # each exactly on time, in order
    assert live_timers() == []
    assert timeouts_alive(impl) <= alive_before
