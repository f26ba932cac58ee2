"""Misuse: use after ``close()``, a second event loop, ``KeyboardInterrupt``/``SystemExit``
inside a limited block, re-entrant use within one task, and the decorators on everything
that is not an ``async def`` function.

Each test checks the misuse is refused clearly (or, where SPEC allows the use, that it
works) and that the object and the loop are left in a clean, usable state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest

from mtaio.exceptions import ResourceError, ResourceLimitError
from mtaio.exceptions import TimeoutError as MtaioTimeoutError
from mtaio.resources import ConcurrencyLimiter, RateLimiter, ResourceGroup

try:
    import uvloop
except ImportError:  # pragma: no cover - Windows, PyPy, free-threaded builds
    uvloop = None  # type: ignore[assignment]

pytestmark = pytest.mark.stress

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on ``loop``, let it finish, close the loop."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()


def make_limiter(impl: Any, kind: str) -> Any:
    """A limiter that makes every caller after the first one wait (100 grants per second)."""
    if kind == "rate":
        return impl.RateLimiter(100, burst=1)
    return impl.ConcurrencyLimiter(1)


def let_one_in(limiter: Any) -> None:
    """Wake the next waiter: a concurrency permit is released; tokens come with time."""
    if hasattr(limiter, "release"):
        limiter.release()


def state(limiter: Any) -> tuple[object, ...]:
    """What a limiter shows that does not move with the clock."""
    if hasattr(limiter, "in_use"):
        return limiter.in_use, limiter.available, limiter.waiting, limiter.locked()
    return limiter.rate, limiter.burst, limiter.waiting


async def start_waiters(limiter: Any, n: int) -> list[asyncio.Task[int]]:
    """Take the first grant, then queue ``n`` tasks behind it; return them still waiting."""
    await limiter.acquire()

    async def waiter(i: int) -> int:
        await limiter.acquire()
        return i

    tasks = [asyncio.ensure_future(waiter(i)) for i in range(n)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert limiter.waiting == n
    return tasks


async def drain(limiter: Any, tasks: list[asyncio.Task[int]]) -> list[int]:
    """Let every waiter through in turn; return the order they got in."""
    order = []
    for task in tasks:
        let_one_in(limiter)
        order.append(await task)
    let_one_in(limiter)
    return order


# -- use after close() ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rate", "concurrency"])
async def test_closed_limiter_fails_waiters_and_later_callers(impl: Any, kind: str) -> None:
    limiter = make_limiter(impl, kind)
    waiters = await start_waiters(limiter, 5)

    async def work() -> None:
        pass

    limited = limiter.limit(work)

    limiter.close()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ResourceError) for r in results), results
    assert limiter.waiting == 0
    with pytest.raises(ResourceError):
        await limiter.acquire()
    with pytest.raises(ResourceError):
        limiter.try_acquire()
    with pytest.raises(ResourceError):
        async with limiter:
            pass
    with pytest.raises(ResourceError):
        await limited()
    limiter.close()  # idempotent
    assert limiter.waiting == 0
    if kind == "concurrency":
        # Holders still leave cleanly; nothing else can be released.
        assert limiter.in_use == 1
        limiter.release()
        assert limiter.in_use == 0
        with pytest.raises(ResourceError):
            limiter.release()


async def test_closed_concurrency_limiter_lets_holders_exit(impl: Any) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def holder() -> str:
        async with limiter:
            inside.set()
            await leave.wait()
        return "left"

    task = asyncio.ensure_future(holder())
    await inside.wait()
    limiter.close()
    leave.set()
    assert await task == "left"
    assert (limiter.in_use, limiter.waiting, limiter.available) == (0, 0, 2)


async def test_closed_timeout_manager_refuses_new_blocks_and_keeps_running_ones(
    impl: Any,
) -> None:
    tm = impl.TimeoutManager(1.0)
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def running_block() -> None:
        async with tm:
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(running_block())
    await entered.wait()
    tm.close()
    with pytest.raises(ResourceError):
        async with tm:
            pass
    with pytest.raises(ResourceError):
        tm.timeout(1)
    with pytest.raises(ResourceError):
        tm.timeout_at(loop.time() + 1)
    work = asyncio.sleep(0)
    with pytest.raises(ResourceError):
        await tm.run(work, timeout=1)
    # The refused coroutine was closed, not left to warn that it was never awaited.
    assert inspect.getcoroutinestate(work) == inspect.CORO_CLOSED
    tm.close()  # idempotent
    # The block that was running keeps its deadline.
    with pytest.raises(MtaioTimeoutError):
        await task
    assert loop.time() == pytest.approx(1.0)


async def test_closed_group_closes_members_and_refuses_reuse(impl: Any) -> None:
    group = ResourceGroup()
    rate = impl.RateLimiter(1, burst=1)
    concurrency = impl.ConcurrencyLimiter(1)
    tm = impl.TimeoutManager(5)
    async with group:
        for member in (rate, concurrency, tm):
            await group.add(member)
        rate_waiters = await start_waiters(rate, 3)
        concurrency_waiters = await start_waiters(concurrency, 3)
    results = await asyncio.gather(*rate_waiters, *concurrency_waiters, return_exceptions=True)
    assert all(isinstance(r, ResourceError) for r in results), results
    assert len(group) == 0
    with pytest.raises(ResourceError):
        await group.add(impl.RateLimiter(1))
    with pytest.raises(ResourceError):
        async with group:
            pass
    with pytest.raises(ResourceError):
        await rate.acquire()
    with pytest.raises(ResourceError):
        await concurrency.acquire()
    with pytest.raises(ResourceError):
        async with tm:
            pass
    with pytest.raises(ResourceError):
        await group.remove(rate)  # not a member (any more)


# -- a second event loop ----------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("kind", ["rate", "concurrency"])
def test_second_loop_is_refused_while_tasks_wait_and_first_loop_is_unharmed(
    impl: Any, kind: str, loop_kind: str
) -> None:
    limiter = make_limiter(impl, kind)
    first, second = new_loop(loop_kind), new_loop(loop_kind)
    try:
        waiters = first.run_until_complete(start_waiters(limiter, 5))
        before = state(limiter)

        async def acquire() -> None:
            await limiter.acquire()

        async def enter() -> None:
            async with limiter:
                pass

        async def try_acquire() -> None:
            limiter.try_acquire()

        # Two loops run alternately: while `first` is stopped its tasks still wait.
        for misuse in (acquire, enter, try_acquire):
            with pytest.raises(RuntimeError, match="loop"):
                second.run_until_complete(misuse())
        assert state(limiter) == before
        assert limiter.waiting == 5
        # The first loop is unharmed: every waiter gets through, in order.
        assert first.run_until_complete(drain(limiter, waiters)) == list(range(5))
        assert limiter.waiting == 0
        # Nobody waits any more: the limiter may move to the other loop.
        second.run_until_complete(acquire())
        if kind == "concurrency":
            assert limiter.in_use == 1
    finally:
        close_loop(first)
        close_loop(second)


@pytest.mark.parametrize("kind", ["rate", "concurrency"])
def test_second_loop_in_another_thread_is_refused(impl: Any, kind: str) -> None:
    # One token a second: the waiters are still waiting when the other thread tries.
    limiter = impl.RateLimiter(1, burst=1) if kind == "rate" else impl.ConcurrencyLimiter(1)

    def other_thread() -> BaseException | None:
        async def use() -> None:
            await limiter.acquire()

        try:
            asyncio.run(use())
        except BaseException as exc:  # handed back to the first loop
            return exc
        return None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiters = await start_waiters(limiter, 3)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            error = await loop.run_in_executor(pool, other_thread)
        assert isinstance(error, RuntimeError), error
        assert "loop" in str(error)
        assert limiter.waiting == 3
        if kind == "rate":
            limiter.rate = 1000  # the waiters are rescheduled at the new rate
        assert await drain(limiter, waiters) == [0, 1, 2]
        assert limiter.waiting == 0

    asyncio.run(main())


# -- KeyboardInterrupt / SystemExit inside a limited block --------------------------------


Gate = asyncio.Future[None]
Body = Callable[[], Awaitable[None]]
# Each makes a limited block that waits for its gate, then raises the interrupt.
BLOCKS: dict[str, Callable[[Any, type[BaseException], Gate], Body]] = {}


def block(name: str) -> Callable[[Any], Any]:
    def register(make: Any) -> Any:
        BLOCKS[name] = make
        return make

    return register


@block("RateLimiter async with")
def _rate_with(limiter: Any, exc: type[BaseException], gate: Gate) -> Body:
    async def body() -> None:
        async with limiter:
            await gate
            raise exc

    return body


@block("RateLimiter decorator")
def _rate_decorated(limiter: Any, exc: type[BaseException], gate: Gate) -> Body:
    async def body() -> None:
        await gate
        raise exc

    return cast(Body, limiter.limit(tokens=1)(body))


@block("ConcurrencyLimiter async with")
def _concurrency_with(limiter: Any, exc: type[BaseException], gate: Gate) -> Body:
    async def body() -> None:
        async with limiter:
            await gate
            raise exc

    return body


@block("ConcurrencyLimiter decorator")
def _concurrency_decorated(limiter: Any, exc: type[BaseException], gate: Gate) -> Body:
    async def body() -> None:
        await gate
        raise exc

    return cast(Body, limiter.limit(body))


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_interrupt_inside_a_limited_block_propagates_and_releases(
    impl: Any, name: str, exc: type[BaseException], loop_kind: str
) -> None:
    rate = name.startswith("Rate")
    limiter = impl.RateLimiter(20, burst=1) if rate else impl.ConcurrencyLimiter(1)
    loop = new_loop(loop_kind)
    try:
        gate: Gate = loop.create_future()
        body = BLOCKS[name](limiter, exc, gate)

        async def queue_behind() -> tuple[asyncio.Future[None], asyncio.Task[str]]:
            async def waiter() -> str:
                async with limiter:
                    return "got in"

            main = asyncio.ensure_future(body())
            await asyncio.sleep(0)  # main is inside the block, at its gate
            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0)  # and the waiter queues behind it
            assert limiter.waiting == 1
            return main, task

        main, waiter = loop.run_until_complete(queue_behind())
        gate.set_result(None)
        # The interrupt leaves the block, the task and the loop unchanged.
        with pytest.raises(exc):
            loop.run_until_complete(main)
        assert isinstance(main.exception(), exc)
        if not rate:
            assert limiter.in_use <= 1  # released; maybe promised to the waiter already
        # The loop runs on: the waiter gets in, and nothing is left held or queued.
        assert loop.run_until_complete(waiter) == "got in"
        assert limiter.waiting == 0
        if not rate:
            assert limiter.in_use == 0
            assert limiter.available == 1
    finally:
        close_loop(loop)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("form", ["timeout", "default", "run"])
async def test_interrupt_inside_a_deadline_block_propagates_unchanged(
    impl: Any, exc: type[BaseException], form: str
) -> None:
    tm = impl.TimeoutManager(5)
    task = asyncio.current_task()
    assert task is not None

    async def interrupted() -> None:
        await asyncio.sleep(0)
        raise exc("inside")

    async def limited() -> None:
        if form == "timeout":
            async with tm.timeout(5):
                await interrupted()
        elif form == "default":
            async with tm:
                await interrupted()
        else:
            await tm.run(interrupted(), timeout=5)

    with pytest.raises(exc, match="inside"):
        await limited()
    assert task.cancelling() == 0

    # The manager is still usable and its deadlines still work.
    async def expires() -> None:
        async with tm.timeout(1):
            await asyncio.sleep(2)

    with pytest.raises(MtaioTimeoutError):
        await expires()
    assert task.cancelling() == 0


# -- re-entrant use within one task ---------------------------------------------------------


async def test_nested_concurrency_permits_in_one_task_are_counted(impl: Any) -> None:
    limiter = impl.ConcurrencyLimiter(2)
    async with limiter:
        async with limiter:
            assert (limiter.in_use, limiter.locked()) == (2, True)
        assert limiter.in_use == 1
    assert (limiter.in_use, limiter.available, limiter.waiting) == (0, 2, 0)


async def test_nested_acquire_beyond_capacity_times_out_instead_of_deadlocking(
    impl: Any,
) -> None:
    # Permits are counted, not owned (as asyncio.Semaphore): a task holding the only permit
    # that asks for another waits for itself. A timeout turns that into a clean error.
    limiter = impl.ConcurrencyLimiter(1)
    loop = asyncio.get_running_loop()
    async with limiter:
        with pytest.raises(ResourceLimitError):
            await limiter.acquire(timeout=0.5)
        assert loop.time() == pytest.approx(0.5)
        assert (limiter.in_use, limiter.waiting) == (1, 0)
        with pytest.raises(ResourceLimitError):
            await limiter.acquire(timeout=0)
    assert (limiter.in_use, limiter.waiting) == (0, 0)


async def test_nested_rate_limited_blocks_each_take_their_tokens(impl: Any) -> None:
    loop = asyncio.get_running_loop()
    limiter = impl.RateLimiter(10, burst=1)
    async with limiter, limiter, limiter:  # the inner ones wait for the next tokens
        pass
    assert loop.time() == pytest.approx(0.2)
    assert limiter.waiting == 0


@pytest.mark.parametrize("kind", ["rate", "concurrency"])
async def test_recursive_decorated_function_takes_one_grant_per_call(impl: Any, kind: str) -> None:
    loop = asyncio.get_running_loop()
    limiter = impl.RateLimiter(10, burst=5) if kind == "rate" else impl.ConcurrencyLimiter(5)

    async def depth(n: int) -> int:
        return 0 if n == 0 else 1 + await limited(n - 1)

    limited: Callable[[int], Awaitable[int]] = limiter.limit(depth)
    assert await limited(4) == 4  # five calls
    if kind == "rate":
        assert limiter.available == pytest.approx(0)
        assert loop.time() == 0
    else:
        assert limiter.in_use == 0


async def test_timeout_manager_nested_in_one_task_keeps_each_deadline(impl: Any) -> None:
    loop = asyncio.get_running_loop()
    tm = impl.TimeoutManager(10)
    task = asyncio.current_task()
    assert task is not None
    inner_raised = False

    async def inner_expires() -> None:
        async with tm.timeout(1), tm:  # t=1, raising here; and its own 10 s: t=11
            await asyncio.sleep(5)

    async def outer_block() -> None:
        nonlocal inner_raised
        async with tm:  # expires at t=10
            with pytest.raises(MtaioTimeoutError):
                await inner_expires()
            assert loop.time() == pytest.approx(1)
            async with tm:  # t=11
                await asyncio.sleep(8)
            assert task.cancelling() == 0
            try:
                async with tm:  # t=19: not this one...
                    await asyncio.sleep(5)  # ...but the outer one expires in here
            except MtaioTimeoutError:
                inner_raised = True
            await asyncio.sleep(0)
            pytest.fail("the outer deadline expired and the outer block went on")

    with pytest.raises(MtaioTimeoutError):
        await outer_block()
    assert not inner_raised, "the outer deadline was raised at the inner block"
    assert loop.time() == pytest.approx(10)
    assert task.cancelling() == 0


async def test_timeout_scope_entered_twice_is_refused(impl: Any) -> None:
    tm = impl.TimeoutManager()
    scope = tm.timeout(5)
    async with scope:
        pass
    with pytest.raises(RuntimeError, match="Timeout has already been entered"):
        async with scope:
            pass
    nested = tm.timeout(5)
    async with nested:
        with pytest.raises(RuntimeError, match="Timeout has already been entered"):
            async with nested:
                pass


# -- decorators on what is not an async function ----------------------------------------------


def sync_function() -> None:
    pass


def generator_function() -> Iterator[int]:
    yield 1


async def async_generator_function() -> AsyncIterator[int]:
    yield 1


class CallableClass:
    def __call__(self) -> None:
        pass


NOT_ASYNC: dict[str, Any] = {
    "sync function": sync_function,
    "generator function": generator_function,
    "async generator function": async_generator_function,
    "lambda": lambda: None,
    "class": CallableClass,
    "callable object": CallableClass(),
    "builtin": len,
    "partial of a sync function": functools.partial(sync_function),
    "int": 42,
    "string": "not a function",
}


def decorator_forms(impl: Any) -> dict[str, Callable[[Any], Any]]:
    rate = impl.RateLimiter(10)
    concurrency = impl.ConcurrencyLimiter(2)
    return {
        "RateLimiter.limit(f)": rate.limit,
        "RateLimiter.limit(tokens=2)(f)": rate.limit(tokens=2),
        "RateLimiter.limit(f, tokens=2)": lambda f: rate.limit(f, tokens=2),
        "ConcurrencyLimiter.limit(f)": concurrency.limit,
        "ConcurrencyLimiter.limit()(f)": concurrency.limit(),
    }


@pytest.mark.parametrize("what", list(NOT_ASYNC))
def test_decorators_refuse_what_is_not_an_async_function(impl: Any, what: str) -> None:
    func = NOT_ASYNC[what]
    for form, decorate in decorator_forms(impl).items():
        with pytest.raises(TypeError) as caught:
            decorate(func)
        assert repr(func) in str(caught.value), (form, str(caught.value))


def test_decorators_refuse_a_coroutine_object(impl: Any) -> None:
    async def coroutine_function() -> None:
        pass

    for form, decorate in decorator_forms(impl).items():
        coro = coroutine_function()
        try:
            with pytest.raises(TypeError):
                decorate(coro)
        finally:
            coro.close()
        assert form  # every form refused it


async def test_decorators_work_on_methods_and_keep_their_identity(impl: Any) -> None:
    rate: RateLimiter = impl.RateLimiter(10, burst=10)
    concurrency: ConcurrencyLimiter = impl.ConcurrencyLimiter(1)

    class Service:
        def __init__(self) -> None:
            self.calls: list[str] = []

        @rate.limit
        async def fetch(self, key: str, *, retries: int = 0) -> str:
            """Fetch one key."""
            self.calls.append(key)
            return key.upper()

        @rate.limit(tokens=2)
        async def heavy(self) -> int:
            return 2

        @concurrency.limit
        async def exclusive(self) -> int:
            assert concurrency.in_use == 1
            return 1

        @classmethod
        @concurrency.limit()
        async def build(cls) -> str:
            return cls.__name__

        @staticmethod
        @rate.limit
        async def helper(x: int) -> int:
            return x + 1

    service = Service()
    assert await service.fetch("a", retries=1) == "A"
    assert await service.heavy() == 2
    assert await service.exclusive() == 1
    assert await Service.build() == "Service"
    assert await service.helper(1) == 2
    assert service.calls == ["a"]
    assert rate.available == pytest.approx(10 - 1 - 2 - 1)
    assert concurrency.in_use == 0
    fetch = Service.fetch
    assert fetch.__name__ == "fetch"
    assert fetch.__qualname__.endswith("Service.fetch")
    assert fetch.__doc__ == "Fetch one key."
    assert inspect.iscoroutinefunction(fetch)
    assert list(inspect.signature(fetch).parameters) == ["self", "key", "retries"]
    assert inspect.iscoroutinefunction(fetch.__wrapped__)  # type: ignore[attr-defined]
