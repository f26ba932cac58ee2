"""Bad input, fuzzed: every constructor, setter and method argument of every public class.

Each argument gets values of every kind (hypothesis draws them, and a fixed list of the
classic troublemakers runs first): wrong types, bools, ``None``, NaN, both infinities,
negatives, both zeros, tiny and huge numbers (``5e-324``, ``1e308``, ``2**64``, ``10**400``).
A model of SPEC's rules says what each value must give:

- a value SPEC allows is accepted, and the object then works with it;
- anything else raises ``TypeError`` (wrong type, ``bool`` where a number is wanted) or
  ``ValueError`` (NaN, infinities, negatives or zero where they mean nothing), with a
  message naming the argument and showing the value; and the object is left exactly as it
  was (its observable state compared before and after) and still works: a successful
  operation follows every refusal.

An ``int`` too large for a C ``Py_ssize_t`` may be refused with a ``ValueError`` (compiled
counters) or accepted. Each example runs on a fresh virtual-clock loop, so the state
compared does not move with real time.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import looptime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtaio.exceptions import ResourceError, ResourceLimitError
from mtaio.exceptions import TimeoutError as MtaioTimeoutError
from mtaio.resources import ResourceGroup

pytestmark = pytest.mark.stress

ACCEPT = "accepted"
Allowed = frozenset[object]  # ACCEPT, TypeError, ValueError

SPECIALS: list[object] = [
    True,
    False,
    None,
    "1",
    b"1",
    1 + 0j,
    [1],
    object(),
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    0,
    0.0,
    -0.0,
    -1,
    -1e-9,
    5e-324,
    0.25,
    1,
    2.5,
    1e308,
    -1e308,
    sys.maxsize,
    sys.maxsize + 1,
    2**64,
    -(2**64),
    2**1000,
]

# Ints no float can hold: a number too large, so a ValueError like any infinity (they get a
# test of their own below, so that the fuzz above reports everything else independently).
BEYOND_FLOATS: list[object] = [10**400, -(10**400), 2**1024]

VALUES = st.one_of(
    st.sampled_from(SPECIALS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=-(2**1000), max_value=2**1000),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.complex_numbers(max_magnitude=10, allow_nan=False),
    st.lists(st.integers(), max_size=2),
)


# -- SPEC's rules, as a model -----------------------------------------------------------


def as_real(value: object) -> float | None:
    """The number a value stands for, ``None`` for a wrong type (a bool is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond any float: infinite for our purposes
        return math.inf if value > 0 else -math.inf


def positive(value: object) -> Allowed:
    number = as_real(value)
    if number is None:
        return frozenset({TypeError})
    return frozenset({ACCEPT if 0 < number < math.inf else ValueError})


def non_negative(value: object) -> Allowed:
    number = as_real(value)
    if number is None:
        return frozenset({TypeError})
    return frozenset({ACCEPT if 0 <= number < math.inf else ValueError})


def deadline(value: object) -> Allowed:
    """Seconds or loop time: any finite number (zero and negatives expire at once)."""
    if value is None:
        return frozenset({ACCEPT})
    number = as_real(value)
    if number is None:
        return frozenset({TypeError})
    return frozenset({ACCEPT if math.isfinite(number) else ValueError})


def optional(rule: Callable[[object], Allowed]) -> Callable[[object], Allowed]:
    return lambda value: frozenset({ACCEPT}) if value is None else rule(value)


def integer(minimum: int) -> Callable[[object], Allowed]:
    def rule(value: object) -> Allowed:
        if isinstance(value, bool) or not isinstance(value, int):
            return frozenset({TypeError})
        if value < minimum:
            return frozenset({ValueError})
        if value > sys.maxsize:
            return frozenset({ACCEPT, ValueError})
        return frozenset({ACCEPT})

    return rule


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


def check_outcome(
    allowed: Allowed, error: BaseException | None, argument: str, value: object
) -> bool:
    """Check what a call gave against the rule; True when the value was accepted."""
    if error is None:
        assert ACCEPT in allowed, f"{argument}={show(value)} was accepted, expected {allowed}"
        return True
    assert type(error) in allowed, (
        f"{argument}={show(value)} raised {show(error)}, expected {set(allowed)}"
    )
    message = str(error)
    assert argument in message, f"{argument}={show(value)}: {message!r} does not name it"
    assert repr(value) in message or str(value) in message, (
        f"{argument}={show(value)}: {message!r} does not show the value"
    )
    return False


async def outcome(call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` (awaiting what it returns, if anything); the exception it raised, or
    None. A limit's refusal or an expired deadline propagates: the target handles those."""
    try:
        result = call()
        if inspect.isawaitable(result):
            await result
    except (ResourceLimitError, MtaioTimeoutError):
        raise
    except Exception as error:
        return error
    return None


# -- the objects, their state and a successful operation ------------------------------------


def rate_state(limiter: Any) -> tuple[object, ...]:
    return limiter.rate, limiter.burst, limiter.available, limiter.waiting, repr(limiter)


async def rate_works(limiter: Any) -> None:
    """Tokens there are granted at once, and the bucket refills."""
    loop = asyncio.get_running_loop()
    tokens = min(1.0, limiter.burst)
    assert limiter.available >= tokens
    now = loop.time()
    await limiter.acquire(tokens)
    assert loop.time() == now
    assert limiter.try_acquire(0)


async def used_rate_limiter(impl: Any) -> Any:
    limiter = impl.RateLimiter(40, burst=8, max_wait=5)
    await limiter.acquire(3)  # bound to this loop; 5 tokens left
    return limiter


def concurrency_state(limiter: Any) -> tuple[object, ...]:
    return (
        limiter.capacity,
        limiter.in_use,
        limiter.available,
        limiter.waiting,
        limiter.locked(),
        repr(limiter),
    )


async def concurrency_works(limiter: Any) -> None:
    held = limiter.in_use
    if not limiter.available:
        limiter.release()
        held -= 1
    await limiter.acquire()
    assert limiter.in_use == held + 1
    limiter.release()
    assert limiter.in_use == held


async def used_concurrency_limiter(impl: Any) -> Any:
    limiter = impl.ConcurrencyLimiter(3)
    await limiter.acquire()
    return limiter


async def deadlines_work(tm: Any) -> None:
    loop = asyncio.get_running_loop()
    async with tm:  # whatever its default, a block that never suspends cannot expire
        pass
    async with tm.timeout(5):
        await asyncio.sleep(1)
    start = loop.time()
    with pytest.raises(MtaioTimeoutError):
        async with tm.timeout(0.5):
            await asyncio.sleep(1)
    assert loop.time() == pytest.approx(start + 0.5)
    assert await tm.run(asyncio.sleep(0, "done"), timeout=1) == "done"


# -- the targets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    argument: str
    rule: Callable[[object], Allowed]
    check: Callable[[Any, Target, object], Coroutine[Any, Any, None]]

    def __str__(self) -> str:
        return self.name


TARGETS: list[Target] = []


def target(
    name: str, argument: str, rule: Callable[[object], Allowed]
) -> Callable[[Callable[[Any, Target, object], Coroutine[Any, Any, None]]], None]:
    def register(check: Callable[[Any, Target, object], Coroutine[Any, Any, None]]) -> None:
        TARGETS.append(Target(name, argument, rule, check))

    return register


@target("RateLimiter(rate)", "rate", positive)
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.RateLimiter(value))
    if check_outcome(t.rule(value), error, t.argument, value):
        await rate_works(impl.RateLimiter(value))


@target("RateLimiter(burst)", "burst", optional(positive))
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.RateLimiter(10, burst=value))
    if check_outcome(t.rule(value), error, t.argument, value):
        await rate_works(impl.RateLimiter(10, burst=value))


@target("RateLimiter(max_wait)", "max_wait", optional(non_negative))
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.RateLimiter(10, max_wait=value))
    if check_outcome(t.rule(value), error, t.argument, value):
        await rate_works(impl.RateLimiter(10, max_wait=value))


@target("RateLimiter.rate = ...", "rate", positive)
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = await used_rate_limiter(impl)
    before = rate_state(limiter)
    error = await outcome(lambda: setattr(limiter, "rate", value))
    if check_outcome(t.rule(value), error, t.argument, value):
        assert limiter.rate == float(value)  # type: ignore[arg-type]
    else:
        assert rate_state(limiter) == before
    await rate_works(limiter)


@target("RateLimiter.burst = ...", "burst", positive)
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = await used_rate_limiter(impl)
    before = rate_state(limiter)
    error = await outcome(lambda: setattr(limiter, "burst", value))
    if value is None:
        # SPEC: burst=None means max(1, rate); setting it back is allowed or a TypeError.
        assert error is None or isinstance(error, TypeError)
    elif check_outcome(t.rule(value), error, t.argument, value):
        assert limiter.burst == float(value)  # type: ignore[arg-type]
    if error is not None:
        assert rate_state(limiter) == before
    await rate_works(limiter)


@target("RateLimiter.acquire(tokens)", "tokens", non_negative)
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = await used_rate_limiter(impl)
    before = rate_state(limiter)
    try:
        error = await outcome(lambda: limiter.acquire(value))
    except ResourceLimitError:
        # A valid amount that can never fit (> burst) or would wait longer than max_wait.
        assert ACCEPT in t.rule(value)
        error = None
        assert rate_state(limiter) == before
    check_outcome(t.rule(value), error, t.argument, value)
    if error is not None:
        assert rate_state(limiter) == before
    await asyncio.sleep(1)
    await rate_works(limiter)


@target("RateLimiter.acquire(timeout)", "timeout", optional(non_negative))
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = await used_rate_limiter(impl)
    before = rate_state(limiter)
    refused: ResourceLimitError | None = None
    try:
        error = await outcome(lambda: limiter.acquire(6, timeout=value))  # 1 token short
    except ResourceLimitError as exc:
        error, refused = None, exc
    if refused is not None:  # a valid timeout shorter than the wait: fails fast
        assert refused.retry_after == pytest.approx(1 / 40)
        assert rate_state(limiter) == before
    check_outcome(t.rule(value), error, t.argument, value)
    if error is not None:
        assert rate_state(limiter) == before
    await asyncio.sleep(1)
    await rate_works(limiter)


@target("RateLimiter.try_acquire(tokens)", "tokens", non_negative)
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = await used_rate_limiter(impl)
    before = rate_state(limiter)
    try:
        error = await outcome(lambda: limiter.try_acquire(value))
    except ResourceLimitError:  # a valid amount above the burst: can never succeed
        assert ACCEPT in t.rule(value)
        assert as_real(value) > limiter.burst
        error = None
    check_outcome(t.rule(value), error, t.argument, value)
    if error is not None:
        assert rate_state(limiter) == before
    await asyncio.sleep(1)
    await rate_works(limiter)


@target("RateLimiter.limit(tokens=...)", "tokens", non_negative)
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = await used_rate_limiter(impl)
    before = rate_state(limiter)

    async def work() -> str:
        return "ran"

    # The decorator refuses a bad amount where it is given: at decoration time.
    error = await outcome(lambda: limiter.limit(work, tokens=value))
    check_outcome(t.rule(value), error, t.argument, value)
    error = await outcome(lambda: limiter.limit(tokens=value))
    check_outcome(t.rule(value), error, t.argument, value)
    assert rate_state(limiter) == before
    assert await limiter.limit(work, tokens=1)() == "ran"


@target("ConcurrencyLimiter(limit)", "limit", integer(1))
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.ConcurrencyLimiter(value))
    if check_outcome(t.rule(value), error, t.argument, value):
        limiter = impl.ConcurrencyLimiter(value)
        assert (limiter.capacity, limiter.available) == (value, value)
        await concurrency_works(limiter)


@target("ConcurrencyLimiter(max_wait)", "max_wait", optional(non_negative))
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.ConcurrencyLimiter(2, max_wait=value))
    if check_outcome(t.rule(value), error, t.argument, value):
        await concurrency_works(impl.ConcurrencyLimiter(2, max_wait=value))


@target("ConcurrencyLimiter(max_waiting)", "max_waiting", optional(integer(0)))
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.ConcurrencyLimiter(2, max_waiting=value))
    if check_outcome(t.rule(value), error, t.argument, value):
        await concurrency_works(impl.ConcurrencyLimiter(2, max_waiting=value))


@target("ConcurrencyLimiter.capacity = ...", "capacity", integer(1))
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = await used_concurrency_limiter(impl)
    before = concurrency_state(limiter)
    error = await outcome(lambda: setattr(limiter, "capacity", value))
    if check_outcome(t.rule(value), error, t.argument, value):
        assert limiter.capacity == value
    else:
        assert concurrency_state(limiter) == before
    await concurrency_works(limiter)


@target("ConcurrencyLimiter.acquire(timeout)", "timeout", optional(non_negative))
async def _(impl: Any, t: Target, value: object) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    await limiter.acquire()  # held: a waiter would have to wait
    before = concurrency_state(limiter)
    loop = asyncio.get_running_loop()

    async def attempt() -> None:
        await limiter.acquire(timeout=value)

    task = asyncio.ensure_future(attempt())
    await asyncio.sleep(0)
    if not task.done():  # a valid timeout > 0 or None: it waits for the permit
        assert ACCEPT in t.rule(value)
        limiter.release()
        await task
        assert limiter.in_use == 1
    else:
        try:
            error = await outcome(lambda: task)
        except ResourceLimitError:  # timeout=0: only if free now
            error = None
            assert as_real(value) == 0
        check_outcome(t.rule(value), error, t.argument, value)
        assert concurrency_state(limiter) == before
    assert loop.time() == 0
    await concurrency_works(limiter)


@target("TimeoutManager(default_timeout)", "default_timeout", deadline)
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.TimeoutManager(value))
    if check_outcome(t.rule(value), error, t.argument, value):
        tm = impl.TimeoutManager(value)
        assert tm.default_timeout == (None if value is None else float(value))  # type: ignore[arg-type]
        await deadlines_work(tm)


@target("TimeoutManager.timeout(seconds)", "seconds", deadline)
async def _(impl: Any, t: Target, value: object) -> None:
    tm = impl.TimeoutManager(3)
    before = repr(tm)
    error = await outcome(lambda: tm.timeout(value))
    if check_outcome(t.rule(value), error, t.argument, value):
        seconds = as_real(value)
        try:
            async with tm.timeout(value):
                await asyncio.sleep(0)
        except MtaioTimeoutError:
            assert seconds is not None
            assert seconds < 0.001  # (0 or less: must expire)
        else:
            assert seconds is None or seconds > 0
    assert repr(tm) == before
    await deadlines_work(tm)


@target("TimeoutManager.timeout_at(when)", "when", deadline)
async def _(impl: Any, t: Target, value: object) -> None:
    tm = impl.TimeoutManager(3)
    before = repr(tm)
    error = await outcome(lambda: tm.timeout_at(value))
    if check_outcome(t.rule(value), error, t.argument, value):
        scope = tm.timeout_at(value)
        assert scope.when() == (None if value is None else float(value))  # type: ignore[arg-type]
    assert repr(tm) == before
    await deadlines_work(tm)


@target("TimeoutManager.run(timeout)", "timeout", deadline)
async def _(impl: Any, t: Target, value: object) -> None:
    tm = impl.TimeoutManager(3)
    before = repr(tm)
    work = asyncio.sleep(0, "done")
    try:
        error = await outcome(lambda: tm.run(work, timeout=value))
    except MtaioTimeoutError:  # a valid timeout <= 0: raises without starting the work
        assert as_real(value) <= 0  # type: ignore[operator]
        error = None
    check_outcome(t.rule(value), error, t.argument, value)
    # Refused or not, the coroutine was run or closed: no "never awaited" warning.
    assert inspect.getcoroutinestate(work) == inspect.CORO_CLOSED
    assert repr(tm) == before
    await deadlines_work(tm)


def refused(value: object) -> Allowed:
    return frozenset({TypeError})


@target("TimeoutManager.run(awaitable)", "awaitable", refused)
async def _(impl: Any, t: Target, value: object) -> None:
    tm = impl.TimeoutManager(3)
    before = repr(tm)
    error = await outcome(lambda: tm.run(value, timeout=1))
    check_outcome(t.rule(value), error, t.argument, value)
    assert repr(tm) == before
    await deadlines_work(tm)


@target("Timeout.reschedule(when)", "when", deadline)
async def _(impl: Any, t: Target, value: object) -> None:
    tm = impl.TimeoutManager(3)
    loop = asyncio.get_running_loop()
    async with tm.timeout(10) as scope:
        before = (scope.when(), scope.expired(), repr(scope))
        error = await outcome(lambda: scope.reschedule(value))
        if not check_outcome(t.rule(value), error, t.argument, value):
            assert (scope.when(), scope.expired(), repr(scope)) == before
        scope.reschedule(loop.time() + 20)
        await asyncio.sleep(1)
    start = loop.time()

    async def moved_up() -> None:
        async with tm.timeout(10) as scope:
            scope.reschedule(start + 1)
            await asyncio.sleep(5)

    with pytest.raises(MtaioTimeoutError):
        await moved_up()
    assert loop.time() == pytest.approx(start + 1)


@target("Timeout(when)", "when", deadline)
async def _(impl: Any, t: Target, value: object) -> None:
    error = await outcome(lambda: impl.Timeout(value))
    if check_outcome(t.rule(value), error, t.argument, value):
        assert impl.Timeout(value).when() == (None if value is None else float(value))  # type: ignore[arg-type]


@target("TimeoutManager.run(<callable or generator>)", "awaitable", refused)
async def _(impl: Any, t: Target, value: object) -> None:
    # Things that look like work but are not awaitable: the function itself (not called),
    # a generator. Refused, and a generator given is closed.
    async def work() -> None:
        pass

    def steps() -> Any:
        yield value

    tm = impl.TimeoutManager(3)
    for thing in (work, steps()):
        error = await outcome(lambda: tm.run(thing, timeout=1))  # noqa: B023 - called at once
        check_outcome(t.rule(thing), error, t.argument, thing)
        if inspect.isgenerator(thing):
            assert inspect.getgeneratorstate(thing) == inspect.GEN_CLOSED
    await deadlines_work(tm)


# -- the test -------------------------------------------------------------------------------


def run_example(impl: Any, t: Target, value: object) -> None:
    """One value against one target, on a fresh virtual-clock loop."""
    with asyncio.Runner(loop_factory=looptime.new_event_loop) as runner:
        runner.run(t.check(impl, t, value))


@pytest.mark.parametrize("t", TARGETS, ids=str)
def test_bad_input_is_refused_clearly_and_changes_nothing(impl: Any, t: Target) -> None:
    for value in SPECIALS:
        run_example(impl, t, value)

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(value=VALUES)
    def fuzz(value: object) -> None:
        run_example(impl, t, value)

    fuzz()


@pytest.mark.parametrize("t", TARGETS, ids=str)
def test_int_beyond_any_float_is_refused_clearly(impl: Any, t: Target) -> None:
    for value in BEYOND_FLOATS:
        run_example(impl, t, value)


def test_resource_group_takes_any_object_and_refuses_strangers() -> None:
    # ResourceGroup has no numeric arguments: add() takes any object (hashable or not,
    # closable or not), remove() of a non-member is a ResourceError that changes nothing.
    @settings(max_examples=100, deadline=None, database=None)
    @given(members=st.lists(VALUES, max_size=6), stranger=VALUES)
    def fuzz(members: list[object], stranger: object) -> None:
        async def check() -> None:
            group = ResourceGroup()
            async with group:
                for member in members:
                    assert await group.add(member) is member
                unique = list({id(m): m for m in members}.values())
                assert len(group) == len(unique)
                if not any(m is stranger for m in members):
                    with pytest.raises(ResourceError):
                        await group.remove(stranger)
                    assert list(group) == unique
            assert len(group) == 0

        with asyncio.Runner(loop_factory=looptime.new_event_loop) as runner:
            runner.run(check())

    fuzz()
