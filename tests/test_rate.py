"""RateLimiter (SPEC §2), on both implementations, on the virtual clock.

Times are exact: looptime's clock only moves when the loop would sleep, to the next timer, in
steps of 1 µs. ``at(t)`` compares a loop time with the expected one to that resolution.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from conftest import Implementation

from mtaio.exceptions import ResourceError, ResourceLimitError
from mtaio.resources import RateLimiter

# Looptime's clock resolution (1 µs) plus the float noise of adding it up.
RESOLUTION = 2e-6


def now() -> float:
    return asyncio.get_running_loop().time()


def at(expected: float) -> Any:
    return pytest.approx(expected, abs=RESOLUTION)


async def acquire_at(limiter: Any, tokens: float = 1, **kwargs: Any) -> float:
    """Acquire, and return the loop time at which ``acquire`` returned."""
    await limiter.acquire(tokens, **kwargs)
    return now()


def start(coro: Coroutine[Any, Any, float]) -> asyncio.Task[float]:
    return asyncio.get_running_loop().create_task(coro)


def in_thread(func: Callable[[], object]) -> None:
    """Run ``func`` in a thread with no event loop (blocking this one), re-raising its error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            func()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def settle() -> None:
    """Let every ready task run, without moving the clock."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- construction and arguments ------------------------------------------------------------


async def test_burst_defaults_to_one_second_and_at_least_one_token(impl: Implementation) -> None:
    assert impl.RateLimiter(10).burst == 10
    assert impl.RateLimiter(0.5).burst == 1
    assert impl.RateLimiter(2.5, burst=4).burst == 4
    assert impl.RateLimiter(2.5).rate == 2.5


async def test_construction_needs_no_loop_and_reads_no_clock(impl: Implementation) -> None:
    def outside_any_loop() -> None:
        limiter = impl.RateLimiter(10, burst=3)
        assert limiter.available == 3
        assert limiter.waiting == 0
        assert repr(limiter) == "<RateLimiter rate=10.0/s burst=3 available=3 waiting=0>"

    in_thread(outside_any_loop)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"rate": 0}, ValueError, "rate must be a finite number > 0, got 0"),
        ({"rate": -1.0}, ValueError, "rate"),
        ({"rate": math.nan}, ValueError, "got nan"),
        ({"rate": math.inf}, ValueError, "got inf"),
        ({"rate": True}, TypeError, "rate must be a number, got bool True"),
        ({"rate": "10"}, TypeError, "rate"),
        ({"rate": 1, "burst": 0}, ValueError, "burst"),
        ({"rate": 1, "burst": math.nan}, ValueError, "burst"),
        ({"rate": 1, "burst": False}, TypeError, "burst"),
        ({"rate": 1, "max_wait": -0.5}, ValueError, "max_wait"),
        ({"rate": 1, "max_wait": math.inf}, ValueError, "max_wait"),
    ],
)
async def test_bad_constructor_arguments_are_refused(
    impl: Implementation, kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        impl.RateLimiter(**kwargs)


@pytest.mark.parametrize(
    ("tokens", "error"),
    [(-1, ValueError), (math.nan, ValueError), (math.inf, ValueError), (True, TypeError)],
)
async def test_bad_token_amounts_are_refused_and_change_nothing(
    impl: Implementation, tokens: Any, error: type[Exception]
) -> None:
    limiter = impl.RateLimiter(10, burst=5)
    await limiter.acquire(2)
    with pytest.raises(error, match="tokens"):
        await limiter.acquire(tokens)
    with pytest.raises(error, match="tokens"):
        limiter.try_acquire(tokens)
    with pytest.raises(error, match="tokens"):
        limiter.limit(tokens=tokens)
    assert limiter.available == 3


@pytest.mark.parametrize(("timeout", "error"), [(-1, ValueError), (True, TypeError)])
async def test_bad_timeout_is_refused(impl: Implementation, timeout: Any, error: type) -> None:
    limiter = impl.RateLimiter(10)
    with pytest.raises(error, match="timeout"):
        await limiter.acquire(timeout=timeout)
    assert limiter.available == 10


# -- the bucket ------------------------------------------------------------------------------


async def test_bucket_starts_full_then_refills_at_the_rate(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10, burst=5)
    times = [await acquire_at(limiter) for _ in range(8)]
    assert times == [at(0)] * 5 + [at(0.1), at(0.2), at(0.3)]


async def test_slow_rate_grants_one_token_every_two_seconds(impl: Implementation) -> None:
    limiter = impl.RateLimiter(0.5)
    times = [await acquire_at(limiter) for _ in range(3)]
    assert times == [at(0), at(2), at(4)]


async def test_fractional_tokens(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    times = [await acquire_at(limiter, 0.25) for _ in range(6)]
    assert times == [at(0)] * 4 + [at(0.25), at(0.5)]


async def test_zero_tokens_return_at_once_even_with_waiters(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    waiter = start(acquire_at(limiter))
    await settle()
    assert limiter.waiting == 1
    assert await acquire_at(limiter, 0) == at(0)
    assert limiter.try_acquire(0) is True
    assert await waiter == at(1)


async def test_available_is_the_level_now(impl: Implementation) -> None:
    limiter = impl.RateLimiter(4, burst=2)
    await limiter.acquire(2)
    assert limiter.available == 0
    await asyncio.sleep(0.125)
    assert limiter.available == pytest.approx(0.5)
    await asyncio.sleep(10)
    assert limiter.available == 2  # never above the capacity


async def test_idle_time_refills_only_up_to_capacity(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10, burst=3)
    await limiter.acquire(3)
    await asyncio.sleep(100)
    times = [await acquire_at(limiter) for _ in range(4)]
    assert times == [at(100)] * 3 + [at(100.1)]


async def test_clock_going_backwards_counts_as_no_time(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [10.0]
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "time", lambda: clock[0])  # an overridden loop.time is honoured
    limiter = impl.RateLimiter(10, burst=2)
    assert limiter.try_acquire(2)
    clock[0] = 5.0  # backwards: nothing refills, and the level does not go negative
    assert not limiter.try_acquire(0.1)
    assert limiter.available == 0
    clock[0] = 10.05  # only the time after the latest reading counts
    assert limiter.available == pytest.approx(0.5)
    assert not limiter.try_acquire(0.6)
    assert limiter.try_acquire(0.5)


# -- effective capacity and the bound ------------------------------------------------------


async def test_effective_capacity_is_two_milliseconds_of_tokens(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1000, burst=1)
    assert limiter.burst == 1
    assert limiter.available == 2  # max(burst, rate * 2 ms)
    times = [await acquire_at(limiter) for _ in range(3)]
    assert times == [at(0), at(0), at(0.001)]
    with pytest.raises(ResourceLimitError) as caught:
        await limiter.acquire(1.5)  # still more than the configured burst
    assert caught.value.retry_after is None


async def test_late_wake_ups_catch_up_at_100k_tokens_per_second(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timers here fire up to 1 ms late, as real ones do; one task acquires in a loop.
    loop = asyncio.get_running_loop()
    call_at = loop.call_at

    def late_call_at(when: float, callback: Callable[..., object], *args: Any) -> Any:
        return call_at(math.floor(when * 1000 + 1) / 1000, callback, *args)

    monkeypatch.setattr(loop, "call_at", late_call_at)
    rate = 100_000.0
    limiter = impl.RateLimiter(rate, burst=1)
    granted = 0
    while now() < 0.1:
        await limiter.acquire()
        granted += 1
    capacity = rate * 0.002
    achieved = (granted - capacity) / now()
    assert achieved == pytest.approx(rate, rel=0.01)


@pytest.mark.parametrize(("rate", "duration"), [(1000.0, 1.0), (50_000.0, 0.1)])
async def test_rate_is_achieved_with_timers_rounded_up_to_the_millisecond(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch, rate: float, duration: float
) -> None:
    # asyncio's selector sleeps whole milliseconds, rounded up, plus some latency: a burst
    # of 1 at 1,000/s leaves a single millisecond of slack in the 2 ms bucket.
    loop = asyncio.get_running_loop()
    call_at = loop.call_at

    def epoll_call_at(when: float, callback: Callable[..., object], *args: Any) -> Any:
        delay = math.ceil(max(0.0, when - loop.time()) * 1000 - 1e-9) / 1000
        return call_at(loop.time() + delay + 0.0002, callback, *args)

    monkeypatch.setattr(loop, "call_at", epoll_call_at)
    limiter = impl.RateLimiter(rate, burst=1)
    granted = 0
    while now() < duration:
        await limiter.acquire()
        granted += 1
    # Tokens still in the bucket at the end were delivered, just not taken yet.
    achieved = (granted + limiter.available - max(1.0, rate * 0.002)) / now()
    assert achieved == pytest.approx(rate, rel=0.01)


async def test_bound_holds_right_after_an_idle_period(impl: Implementation) -> None:
    rate, burst = 100.0, 5.0
    limiter = impl.RateLimiter(rate, burst=burst)
    await asyncio.sleep(3)
    times = [await acquire_at(limiter) for _ in range(50)]
    for i, first in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - first) + 1e-6


# -- waiting, fairness and failing fast --------------------------------------------------------


async def test_waiters_are_served_in_arrival_order_whatever_their_size(
    impl: Implementation,
) -> None:
    limiter = impl.RateLimiter(1, burst=4)
    await limiter.acquire(4)
    big = start(acquire_at(limiter, 3))
    await settle()
    small = start(acquire_at(limiter, 0.5))
    await settle()
    assert limiter.waiting == 2
    assert await small == at(3.5)  # it did not overtake the big request
    assert await big == at(3)


async def test_a_small_request_waits_behind_a_big_one_even_if_it_fits(
    impl: Implementation,
) -> None:
    limiter = impl.RateLimiter(1, burst=4)
    await limiter.acquire(4)
    await asyncio.sleep(1)
    big = start(acquire_at(limiter, 3))  # due at 3
    await settle()
    assert await acquire_at(limiter, 0.5) == at(3.5)  # 1 token is there, but not for it
    assert await big == at(3)


async def test_try_acquire_never_overtakes_a_waiter(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=4)
    await limiter.acquire(4)
    await asyncio.sleep(1)
    waiter = start(acquire_at(limiter, 3))
    await settle()
    assert limiter.available == pytest.approx(1)
    assert limiter.try_acquire(0.5) is False  # the tokens are there, but someone waits
    assert await waiter == at(3)
    assert limiter.try_acquire(1) is False
    await asyncio.sleep(1)
    assert limiter.try_acquire(1) is True


async def test_every_waiter_due_at_a_wake_up_is_granted(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10, burst=10)
    await limiter.acquire(10)
    waiters = [start(acquire_at(limiter, 0.1)) for _ in range(10)]
    assert await asyncio.gather(*waiters) == [at(0.01 * (i + 1)) for i in range(10)]


async def test_more_tokens_than_burst_fail_at_once(impl: Implementation) -> None:
    limiter = impl.RateLimiter(100, burst=20)
    with pytest.raises(ResourceLimitError, match="burst") as caught:
        await limiter.acquire(21)
    assert caught.value.retry_after is None
    with pytest.raises(ResourceLimitError):
        limiter.try_acquire(21)
    assert now() == 0
    assert limiter.available == 20


async def test_wait_longer_than_timeout_fails_at_once_with_retry_after(
    impl: Implementation,
) -> None:
    limiter = impl.RateLimiter(10, burst=1)
    await limiter.acquire()
    queued = start(acquire_at(limiter))  # due at 0.1
    await settle()
    with pytest.raises(ResourceLimitError, match="timeout") as caught:
        await limiter.acquire(timeout=0.15)  # it would be served at 0.2: behind the queue
    assert caught.value.retry_after == pytest.approx(0.2)
    assert now() == 0  # it did not sleep first
    assert limiter.waiting == 1
    assert await acquire_at(limiter, timeout=0.2) == at(0.2)  # a wait equal to it is fine
    assert await queued == at(0.1)


async def test_timeout_zero_means_only_if_available_now(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10, burst=2)
    await limiter.acquire(1.5, timeout=0)
    with pytest.raises(ResourceLimitError) as caught:
        await limiter.acquire(1, timeout=0)
    assert caught.value.retry_after == pytest.approx(0.05)
    assert limiter.available == pytest.approx(0.5)


async def test_max_wait_zero_rejects_over_the_limit(impl: Implementation) -> None:
    # The server-side limiter: bursts of 20, 100/s, refuse instead of queueing.
    limiter = impl.RateLimiter(100, burst=20, max_wait=0)
    assert limiter.max_wait == 0
    for _ in range(20):
        await limiter.acquire()
    with pytest.raises(ResourceLimitError, match="max_wait") as caught:
        await limiter.acquire()
    assert caught.value.retry_after == pytest.approx(0.01)
    await asyncio.sleep(0.01)
    await limiter.acquire()
    assert limiter.waiting == 0


async def test_timeout_replaces_max_wait_for_one_call(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1, max_wait=0.5)
    await limiter.acquire()
    with pytest.raises(ResourceLimitError):
        await limiter.acquire()
    assert await acquire_at(limiter, timeout=2) == at(1)


async def test_waiting_counts_queued_requests(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    waiters = [start(acquire_at(limiter)) for _ in range(3)]
    await settle()
    assert limiter.waiting == 3
    assert repr(limiter) == "<RateLimiter rate=1.0/s burst=1 available=0 waiting=3>"
    await waiters[0]
    assert limiter.waiting == 2
    await asyncio.gather(*waiters)
    assert limiter.waiting == 0


# -- one timer ---------------------------------------------------------------------------------


class TimerLog:
    """Wraps ``loop.call_at`` to count the limiter's timers: armed, live and fired."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        monkeypatch: pytest.MonkeyPatch,
        delay: Callable[[float, float], float] | None = None,
    ) -> None:
        self.loop = loop
        self.armed = 0
        self.fired = 0
        self.live: set[asyncio.TimerHandle] = set()
        self.max_live = 0
        self._call_at = loop.call_at
        self._delay = delay
        monkeypatch.setattr(loop, "call_at", self.call_at)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any:
        if getattr(callback, "__name__", "") != "_on_timer":
            return self._call_at(when, callback, *args)
        if self._delay is not None:
            when = self._delay(self.loop.time(), when)
        self.armed += 1
        handle: asyncio.TimerHandle

        def fire() -> None:
            self.fired += 1
            self.live.discard(handle)
            callback(*args)

        handle = self._call_at(when, fire)
        self.live = {h for h in self.live if not h.cancelled()}
        self.live.add(handle)
        self.max_live = max(self.max_live, len(self.live))
        return handle


async def test_one_timer_serves_all_waiters(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = TimerLog(asyncio.get_running_loop(), monkeypatch)
    limiter = impl.RateLimiter(100, burst=1)
    await limiter.acquire()
    waiters = [start(acquire_at(limiter)) for _ in range(50)]
    times = await asyncio.gather(*waiters)
    assert times == [at(0.01 * (i + 1)) for i in range(50)]
    assert log.max_live == 1
    assert log.fired == 50


async def test_no_spinning_when_the_clock_ticks_once_per_millisecond(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvloop's behaviour: loop.time() moves in whole milliseconds and a timer's delay is
    # rounded to the nearest millisecond, so a wait of 0.4 ms fires at once, at the same
    # clock reading. The limiter must then re-arm a millisecond ahead, not spin.
    loop = asyncio.get_running_loop()
    virtual = loop.time
    monkeypatch.setattr(loop, "time", lambda: math.floor(virtual() * 1000 + 1e-6) / 1000)
    log = TimerLog(
        loop, monkeypatch, delay=lambda now, when: now + round((when - now) * 1000) / 1000
    )
    rate = 2500.0  # 0.4 ms per token
    limiter = impl.RateLimiter(rate, burst=1)
    granted = 0
    while loop.time() < 0.1:
        await limiter.acquire()
        granted += 1
    assert log.fired <= 2 * 100 + 2  # at most two wake-ups per millisecond
    capacity = rate * 0.002
    assert (granted - capacity) / loop.time() == pytest.approx(rate, rel=0.01)


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelled_head_takes_nothing_and_the_next_moves_up(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    first = start(acquire_at(limiter))  # due at 1
    second = start(acquire_at(limiter))  # due at 2
    await asyncio.sleep(0.5)
    first.cancel()
    await settle()
    assert first.cancelled()
    assert limiter.waiting == 1
    assert await second == at(1)  # the timer was re-armed for the new head


async def test_cancelled_middle_waiter_lets_those_behind_move_up(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    a, b, c = (start(acquire_at(limiter)) for _ in range(3))
    await settle()
    b.cancel()
    assert await a == at(1)
    assert await c == at(2)
    assert b.cancelled()
    # A newcomer's wait no longer counts the cancelled request either.
    with pytest.raises(ResourceLimitError) as caught:
        await limiter.acquire(timeout=0)
    assert caught.value.retry_after == pytest.approx(1)


async def test_cancelling_a_big_head_lets_a_small_waiter_in_at_once(
    impl: Implementation,
) -> None:
    limiter = impl.RateLimiter(1, burst=5)
    await limiter.acquire(5)
    big = start(acquire_at(limiter, 5))  # due at 5
    small = start(acquire_at(limiter, 1))  # behind it
    await asyncio.sleep(2)
    big.cancel()
    assert await small == at(2)
    assert limiter.available == pytest.approx(1)


async def test_cancelled_before_its_grant_was_processed_takes_nothing(
    impl: Implementation,
) -> None:
    limiter = impl.RateLimiter(10, burst=1)
    await limiter.acquire()
    waiter = start(acquire_at(limiter))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0.05)
    assert limiter.available == pytest.approx(1)
    assert limiter.waiting == 0


async def test_cancelled_after_its_grant_gives_the_tokens_back(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The grant sets the waiter's future; the task is cancelled before it runs again.
    loop = asyncio.get_running_loop()
    limiter = impl.RateLimiter(1, burst=2)
    await limiter.acquire(2)
    victim: list[asyncio.Task[float]] = []
    create_future = loop.create_future

    def future_that_cancels_its_task_when_set() -> asyncio.Future[Any]:
        future = create_future()
        future.add_done_callback(lambda _: victim[0].cancel())  # runs before the task does
        return future

    monkeypatch.setattr(loop, "create_future", future_that_cancels_its_task_when_set)
    victim.append(start(acquire_at(limiter, 2)))  # granted at 2
    await settle()
    monkeypatch.undo()
    behind = start(acquire_at(limiter, 2))  # needs the same 2 tokens
    await asyncio.sleep(1.5)
    assert limiter.waiting == 2
    with pytest.raises(asyncio.CancelledError):
        await victim[0]
    assert now() == at(2)
    assert await behind == at(2)  # the refund let it in at once
    assert limiter.available == 0


async def test_cancelling_every_waiter_leaves_a_clean_limiter(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    waiters = [start(acquire_at(limiter)) for _ in range(5)]
    await settle()
    for waiter in reversed(waiters):
        waiter.cancel()
    await settle()
    assert limiter.waiting == 0
    assert limiter.try_acquire(0.5) is False
    await asyncio.sleep(0.5)
    assert limiter.try_acquire(0.5) is True  # none of the cancelled took anything


# -- runtime changes ---------------------------------------------------------------------------


async def test_raising_the_rate_reschedules_waiters(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    waiter = start(acquire_at(limiter))  # due at 1
    await asyncio.sleep(0.5)
    limiter.rate = 10  # 0.5 token so far; the other 0.5 at 10/s
    assert limiter.burst == 1
    assert await waiter == at(0.55)


async def test_lowering_the_rate_delays_waiters_without_rechecking_timeout(
    impl: Implementation,
) -> None:
    limiter = impl.RateLimiter(2, burst=1)
    await limiter.acquire()
    waiter = start(acquire_at(limiter, timeout=0.5))  # due at 0.5
    await asyncio.sleep(0.25)
    limiter.rate = 0.5  # 0.5 token so far; the other 0.5 takes a second now
    assert await waiter == at(1.25)


async def test_default_burst_follows_the_rate_until_set(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10)
    limiter.rate = 20
    assert limiter.burst == 20
    limiter.rate = 0.25
    assert limiter.burst == 1
    limiter.burst = 5
    limiter.rate = 30
    assert limiter.burst == 5
    limiter.burst = None
    assert limiter.burst == 30
    limiter.rate = 40
    assert limiter.burst == 40


async def test_smaller_burst_fails_queued_requests_that_can_never_fit(
    impl: Implementation,
) -> None:
    limiter = impl.RateLimiter(1, burst=5)
    await limiter.acquire(5)
    big = start(acquire_at(limiter, 4))
    small = start(acquire_at(limiter, 1))
    await asyncio.sleep(1)
    limiter.burst = 2
    with pytest.raises(ResourceLimitError, match="burst") as caught:
        await big
    assert caught.value.retry_after is None
    assert limiter.waiting == 0
    assert await small == at(1)  # it moved up: the 1 token refilled so far is enough


async def test_smaller_burst_clips_the_level(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=5)
    await limiter.acquire(1)
    limiter.burst = 2
    assert limiter.available == 2
    limiter.burst = 3
    assert limiter.available == 2  # a larger bucket is not filled by the change
    await asyncio.sleep(1)
    assert limiter.available == 3


async def test_bad_runtime_values_are_refused_and_change_nothing(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10, burst=4)
    for bad, error in ((0, ValueError), (math.nan, ValueError), (True, TypeError)):
        with pytest.raises(error, match="rate"):
            limiter.rate = bad
        with pytest.raises(error, match="burst"):
            limiter.burst = bad
    assert (limiter.rate, limiter.burst, limiter.available) == (10, 4, 4)


# -- close -------------------------------------------------------------------------------------


async def test_close_fails_waiters_and_later_callers(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    waiters = [start(acquire_at(limiter)) for _ in range(2)]
    await settle()
    limiter.close()
    for waiter in waiters:
        with pytest.raises(ResourceError, match="closed"):
            await waiter
    assert limiter.waiting == 0
    assert limiter.closed
    await asyncio.sleep(10)
    with pytest.raises(ResourceError, match="closed"):
        await limiter.acquire()
    with pytest.raises(ResourceError, match="closed"):
        limiter.try_acquire()
    with pytest.raises(ResourceError, match="closed"):
        async with limiter:
            pass
    limiter.close()  # idempotent
    assert repr(limiter).endswith("waiting=0 closed>")


# -- async with and the decorator --------------------------------------------------------------


async def test_async_with_takes_one_token_and_binds_the_limiter(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10, burst=2)
    async with limiter as entered:
        assert entered is limiter
        assert limiter.available == 1
    assert limiter.available == 1  # leaving gives nothing back
    with pytest.raises(KeyError):
        async with limiter:
            raise KeyError("body")
    async with limiter:  # waits for the next token
        assert now() == at(0.1)


async def test_decorator_forms_take_their_tokens_before_each_call(impl: Implementation) -> None:
    limiter: RateLimiter = impl.RateLimiter(10, burst=10)  # typed: the decorators keep types

    @limiter.limit
    async def one(x: int) -> int:
        return x + 1

    @limiter.limit(tokens=2)
    async def two(x: int) -> int:
        return x * 2

    async def three(x: int, *, y: int = 0) -> int:
        """Three tokens."""
        return x + y

    three_limited = limiter.limit(three, tokens=3)
    assert await one(1) == 2
    assert limiter.available == 9
    assert await two(4) == 8
    assert limiter.available == 7
    assert await three_limited(1, y=2) == 3
    assert limiter.available == 4
    assert await three_limited(0) == 0
    assert limiter.available == 1
    assert await three_limited(0) == 0
    assert now() == at(0.2)


async def test_decorator_keeps_the_function_identity(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10)

    async def fetch(url: str, *, retries: int = 3) -> str:
        """Fetch a URL."""
        return url

    for limited in (limiter.limit(fetch), limiter.limit(tokens=2)(fetch)):
        assert limited.__name__ == "fetch"
        assert limited.__doc__ == "Fetch a URL."
        assert limited.__wrapped__ is fetch
        assert inspect.signature(limited) == inspect.signature(fetch)
        assert inspect.iscoroutinefunction(limited)


async def test_decorator_refuses_functions_that_are_not_async(impl: Implementation) -> None:
    limiter = impl.RateLimiter(10)

    def sync() -> None:
        pass

    async def agen() -> Any:
        yield 1

    for func in (sync, agen):
        with pytest.raises(TypeError, match="async"):
            limiter.limit(func)
        with pytest.raises(TypeError, match="async"):
            limiter.limit(tokens=2)(func)


async def test_decorator_does_not_refund_when_the_function_raises(impl: Implementation) -> None:
    limiter: RateLimiter = impl.RateLimiter(10, burst=3)

    @limiter.limit(tokens=2)
    async def fails() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fails()
    assert limiter.available == 1


# -- subclassing -------------------------------------------------------------------------------


async def test_the_reference_adaptive_rate_limiter_runs_once_corrected(
    impl: Implementation,
) -> None:
    # The reference's example, with the one correction SPEC §2 names: super().__init__().
    class AdaptiveRateLimiter(impl.RateLimiter):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__(10.0)
            self.rates: dict[str, float] = {}
            self._current_load = 0.0

        async def acquire(self, resource_id: str) -> None:
            rate = self.rates.get(resource_id, 1.0)
            if self._current_load > 0.8:  # 80% load
                rate *= 0.5  # Reduce rate
            await super().acquire(tokens=1 / rate)

        def adjust_rate(self, resource_id: str, load: float) -> None:
            self._current_load = load
            if load > 0.9:  # High load
                self.rates[resource_id] *= 0.8
            elif load < 0.5:  # Low load
                self.rates[resource_id] *= 1.2

    limiter = AdaptiveRateLimiter()
    limiter.rates["api"] = 2.0
    await limiter.acquire("api")  # 1 / 2.0 tokens
    assert limiter.available == pytest.approx(9.5)
    limiter.adjust_rate("api", 0.95)  # rate 1.6, halved under load: 1.25 tokens
    await limiter.acquire("api")
    assert limiter.available == pytest.approx(8.25)
    await limiter.acquire("other")  # default rate 1.0, halved: 2 tokens
    assert limiter.available == pytest.approx(6.25)
    assert "AdaptiveRateLimiter" in repr(limiter)


async def test_async_with_goes_through_an_overridden_acquire(impl: Implementation) -> None:
    calls: list[float] = []

    class Counting(impl.RateLimiter):  # type: ignore[name-defined,misc]
        def acquire(self, tokens: float = 1, **kwargs: Any) -> Any:
            calls.append(tokens)
            return super().acquire(tokens, **kwargs)

    limiter = Counting(10, burst=1)
    async with limiter as entered:
        assert entered is limiter
    async with limiter:
        assert now() == at(0.1)
    assert calls == [1, 1]


# -- loops -------------------------------------------------------------------------------------


async def test_acquire_called_outside_a_loop_works_once_awaited_in_one(
    impl: Implementation,
) -> None:
    def outside_any_loop() -> None:
        limiter = impl.RateLimiter(10, burst=1)
        pending = limiter.acquire()  # no loop is running: nothing happens yet

        async def main() -> None:
            await pending
            assert not limiter.try_acquire()

        asyncio.run(main())

    in_thread(outside_any_loop)


async def test_try_acquire_needs_a_running_loop(impl: Implementation) -> None:
    def outside_any_loop() -> None:
        limiter = impl.RateLimiter(10)
        with pytest.raises(RuntimeError, match="running event loop"):
            limiter.try_acquire()

    in_thread(outside_any_loop)


async def test_successive_loops_may_use_the_same_limiter(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1000, burst=5)

    async def use() -> None:
        for _ in range(10):
            await limiter.acquire()

    await use()
    in_thread(lambda: asyncio.run(use()))
    in_thread(lambda: asyncio.run(use()))
    await use()
    assert limiter.waiting == 0


async def test_second_loop_is_refused_while_tasks_wait(impl: Implementation) -> None:
    limiter = impl.RateLimiter(1, burst=1)
    await limiter.acquire()
    waiter = start(acquire_at(limiter))
    await settle()
    errors: list[BaseException] = []

    def other_thread() -> None:
        async def misuse() -> None:
            for attempt in (limiter.acquire, limiter.try_acquire):
                try:
                    await asyncio.sleep(0)
                    result = attempt()
                    if inspect.isawaitable(result):
                        await result
                except RuntimeError as exc:
                    errors.append(exc)

        asyncio.run(misuse())

    in_thread(other_thread)
    assert len(errors) == 2
    assert all("another event loop" in str(error) for error in errors)
    assert await waiter == at(1)  # the first loop is unharmed
    assert limiter.waiting == 0
