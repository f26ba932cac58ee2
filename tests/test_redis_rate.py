"""RedisRateLimiter against a real redis-server: SPEC §2 where it applies, across processes.

Real time throughout (the bucket runs on the Redis server's clock): intervals are tens of
milliseconds and the assertions leave room for a loaded machine.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from redis_server import (  # noqa: F401 - fixtures
    RedisServer,
    SilentServer,
    client_fixture,
    connect,
    most_in_window,
    rate_worker,
    redis_server_fixture,
    run_in_processes,
    within,
)

from mtaio.exceptions import ResourceError, ResourceLimitError

pytest.importorskip("redis", reason="the redis package is not installed (mtaio[redis])")

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from mtaio.resources.redis import RedisRateLimiter

if TYPE_CHECKING:
    from redis.asyncio import Redis

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]


def _key() -> str:
    return f"test:{uuid.uuid4().hex}"


async def _until_waiting(limiter: RedisRateLimiter, count: int) -> None:
    """Wait until ``count`` tasks sleep on their reservations (their replies arrived)."""
    while len(limiter._sleepers) < count:
        await asyncio.sleep(0.001)


async def _settle(limiter: RedisRateLimiter) -> None:
    """Wait for the reservations given back in the background to reach Redis."""
    await limiter._drain()


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"rate": 0}, ValueError, "rate must be a finite number > 0, got 0"),
        ({"rate": -1.0}, ValueError, "rate"),
        ({"rate": math.nan}, ValueError, "rate"),
        ({"rate": math.inf}, ValueError, "rate"),
        ({"rate": True}, TypeError, "rate must be a number"),
        ({"rate": "10"}, TypeError, "rate"),
        ({"burst": 0}, ValueError, "burst"),
        ({"burst": math.nan}, ValueError, "burst"),
        ({"max_wait": -1}, ValueError, "max_wait"),
        ({"max_wait": False}, TypeError, "max_wait"),
        ({"command_timeout": 0}, ValueError, "command_timeout"),
        ({"key": ""}, ValueError, "key"),
        ({"key": b"k"}, TypeError, "key must be a str"),
    ],
)
async def test_bad_construction_arguments_are_refused(
    client: Redis, kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    arguments: dict[str, Any] = {"redis": client, "key": _key(), "rate": 10.0}
    arguments.update(kwargs)
    with pytest.raises(error, match=words):
        RedisRateLimiter(**arguments)


def test_a_client_that_is_not_redis_asyncio_is_refused() -> None:
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        RedisRateLimiter(object(), "k", 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ({"tokens": -1}, ValueError),
        ({"tokens": math.nan}, ValueError),
        ({"tokens": math.inf}, ValueError),
        ({"tokens": True}, TypeError),
        ({"tokens": "1"}, TypeError),
        ({"timeout": -0.5}, ValueError),
        ({"timeout": math.nan}, ValueError),
    ],
)
async def test_bad_acquire_arguments_are_refused_and_take_nothing(
    client: Redis, call: dict[str, Any], error: type[Exception]
) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=2)
    with pytest.raises(error):
        await limiter.acquire(**call)
    assert await limiter.fetch_available() == pytest.approx(2)
    assert limiter.waiting == 0


# -- the bucket -----------------------------------------------------------------------------


async def test_bucket_starts_full_then_paces_at_the_rate(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 4, burst=3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    # The burst is there at once: three grants without waiting (the next token takes 0.25 s).
    assert [await limiter.try_acquire() for _ in range(3)] == [True, True, True]
    await limiter.acquire()
    await limiter.acquire()
    elapsed = loop.time() - start
    assert 0.475 <= elapsed < 1.0  # two more tokens at 4/s


@pytest.mark.uvloop
async def test_waiting_works_on_every_loop(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 50, burst=1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(limiter.acquire() for _ in range(3)))
    assert 0.035 <= loop.time() - start < 0.2  # two waits of 20 ms


async def test_zero_tokens_return_at_once_even_when_empty(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 1, burst=1)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await limiter.acquire(0)
    assert await limiter.try_acquire(0)
    assert loop.time() - start < 0.5  # a token would take a second


async def test_fractional_tokens(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=1)
    for _ in range(4):
        await limiter.acquire(0.25)
    assert not await limiter.try_acquire(0.25)


async def test_more_tokens_than_burst_fail_at_once(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 100, burst=5)
    with pytest.raises(ResourceLimitError, match="never be granted") as info:
        await limiter.acquire(6)
    assert info.value.retry_after is None
    with pytest.raises(ResourceLimitError):
        await limiter.try_acquire(5.5)
    assert await limiter.fetch_available() == pytest.approx(5)


async def test_max_wait_fails_fast_with_retry_after(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 2, burst=1, max_wait=0)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ResourceLimitError, match="max_wait") as info:
        await limiter.acquire()
    assert loop.time() - start < 0.25  # refused without sleeping first (the wait is ~0.5 s)
    assert info.value.retry_after is not None
    assert 0.25 < info.value.retry_after <= 0.5
    # A per-call timeout overrides max_wait.
    await limiter.acquire(timeout=1.0)
    assert loop.time() - start >= 0.25


async def test_timeout_zero_means_only_if_available_now(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 5, burst=1)
    await limiter.acquire(timeout=0)
    with pytest.raises(ResourceLimitError, match="timeout") as info:
        await limiter.acquire(timeout=0)
    assert info.value.retry_after == pytest.approx(0.2, abs=0.03)


async def test_try_acquire_never_waits_and_never_overtakes_a_reservation(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 20, burst=1)
    assert await limiter.try_acquire()
    assert not await limiter.try_acquire()
    waiter = asyncio.create_task(limiter.acquire())  # reserves the next token (~50 ms)
    await asyncio.sleep(0.06)
    # The token that came in meanwhile belongs to the reservation, not to try_acquire.
    assert not await limiter.try_acquire()
    await within(waiter)


async def test_reservations_are_served_in_arrival_order_across_instances(
    client: Redis, redis_server: RedisServer
) -> None:
    key = _key()
    other = connect(redis_server.port)
    try:
        limiters = [RedisRateLimiter(client, key, 100, burst=1), RedisRateLimiter(other, key, 100)]
        limiters[1].burst = 1
        slots: dict[int, float] = {}

        async def take(n: int) -> None:
            slot = await limiters[n % 2]._take(1.0, None, dated=True)
            assert slot is not None
            slots[n] = slot

        tasks = []
        for n in range(6):
            before = await client.get(key)
            tasks.append(asyncio.create_task(take(n)))
            while await client.get(key) == before:  # until its reservation is in Redis
                await asyncio.sleep(0.001)
        await within(asyncio.gather(*tasks))
        # Each reservation queued behind the earlier ones, whichever instance made them:
        # slots follow arrival order, one token (10 ms) apart on the server's clock. Callers
        # return at their slots, so in that order up to the host's wake-up jitter.
        in_arrival_order = [slots[n] for n in range(6)]
        gaps = [later - earlier for earlier, later in itertools.pairwise(in_arrival_order)]
        assert all(gap >= 0.01 - 2e-6 for gap in gaps), gaps
    finally:
        await other.aclose()


async def test_async_with_takes_one_token_and_returns_the_limiter(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=2)
    async with limiter as entered:
        assert entered is limiter
    assert await limiter.fetch_available() == pytest.approx(1, abs=0.05)


async def test_key_expires_when_the_bucket_is_full_again(client: Redis) -> None:
    key = _key()
    limiter = RedisRateLimiter(client, key, 100, burst=10)
    await limiter.acquire(5)  # 50 ms of debt
    ttl = await client.pttl(key)
    assert 0 < ttl <= 50
    await asyncio.sleep(0.08)
    assert not await client.exists(key)
    assert await limiter.fetch_available() == 10


async def test_keys_and_values_reach_redis_as_arguments(client: Redis) -> None:
    key = "it's ]] a key'); redis.call('FLUSHALL') --"
    await client.set("canary", "alive")
    limiter = RedisRateLimiter(client, key, 10)
    await limiter.acquire()
    assert await client.get("canary") == b"alive"
    assert await client.exists(key)
    await client.delete(key, "canary")


async def test_the_server_clock_dates_the_grant(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=1)
    seconds, micros = await client.time()
    slot = await limiter._take(1.0, None, dated=True)
    assert slot is not None
    assert 0 <= slot - (seconds + micros / 1e6) < 0.05


# -- cancellation and close -----------------------------------------------------------------


async def test_cancelled_waiter_gives_its_reservation_back(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=1)
    await limiter.acquire()  # empty: the next token comes in 100 ms
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(limiter.acquire())  # reserves the token due at +100 ms
    await asyncio.sleep(0.02)
    assert limiter.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(waiter)
    assert limiter.waiting == 0
    await _settle(limiter)
    start = loop.time()
    await limiter.acquire()  # takes the token the cancelled task gave back: ~80 ms, not ~180
    assert loop.time() - start < 0.13


async def test_only_the_latest_reservation_can_be_given_back(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 20, burst=1)
    assert await limiter._take(1.0, None, dated=True) is not None  # empty now: 50 ms/token
    first = asyncio.create_task(limiter._take(1.0, None, dated=True))  # slot +50 ms
    await _until_waiting(limiter, 1)
    second = asyncio.create_task(limiter._take(1.0, None, dated=True))  # slot +100 ms
    await _until_waiting(limiter, 2)
    first.cancel()  # `second` holds the later slot: the first one's stays unused
    await _settle(limiter)
    third = await within(limiter._take(1.0, None, dated=True))
    slot = await within(second)
    assert slot is not None
    assert third is not None
    assert third - slot == pytest.approx(0.05, abs=0.002)  # after `second`, not in the gap
    # Given back from the latest backwards, every reservation returns.
    fourth = asyncio.create_task(limiter.acquire())
    await _until_waiting(limiter, 1)
    fifth = asyncio.create_task(limiter.acquire())
    await _until_waiting(limiter, 2)
    fifth.cancel()
    await asyncio.sleep(0)
    fourth.cancel()
    await asyncio.gather(fourth, fifth, return_exceptions=True)
    await _settle(limiter)
    seconds, micros = await client.time()
    after = await within(limiter._take(1.0, None, dated=True))
    assert after is not None
    assert after - third == pytest.approx(0.05, abs=0.002)  # right after `third` again
    assert after >= seconds + micros / 1e6


async def test_cancelling_one_waiter_does_not_delay_the_next(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 20, burst=1)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = asyncio.create_task(limiter.acquire())  # +50 ms
    await asyncio.sleep(0.005)
    second = asyncio.create_task(limiter.acquire())  # +100 ms
    await asyncio.sleep(0.005)
    first.cancel()
    await within(second)
    assert loop.time() - start < 0.14


async def test_close_fails_sleepers_refunds_them_and_refuses_later_calls(
    client: Redis,
) -> None:
    key = _key()
    limiter = RedisRateLimiter(client, key, 10, burst=1)
    await limiter.acquire()
    sleeper = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.02)
    limiter.close()
    limiter.close()  # idempotent
    with pytest.raises(ResourceError, match="closed while the task waited"):
        await within(sleeper)
    with pytest.raises(ResourceError, match="closed"):
        await limiter.acquire()
    with pytest.raises(ResourceError, match="closed"):
        await limiter.try_acquire()
    with pytest.raises(ResourceError, match="closed"):
        await limiter.acquire(0)
    await limiter.aclose()
    assert limiter.closed
    assert "closed" in repr(limiter)
    # The reservation came back: the bucket refills from the first token only (about 0.2
    # of a token after 20 ms; without the refund it would stay empty for 100 ms more).
    other = RedisRateLimiter(client, key, 10, burst=1)
    assert 0.1 < await other.fetch_available() < 0.9


async def test_close_during_the_round_trip_fails_and_refunds_a_reservation(
    client: Redis,
) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)  # its request is on the way; the reply is not processed yet
    limiter.close()
    with pytest.raises(ResourceError, match="closed while the task waited"):
        await within(waiter)
    await limiter.aclose()
    assert 0.0 < await limiter.fetch_available() < 0.9  # refilling from the first token


async def test_used_from_a_second_loop_while_tasks_wait_is_refused(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="one event loop at a time"):
        await asyncio.to_thread(asyncio.run, limiter.acquire())
    await within(waiter)


# -- decorator, properties ------------------------------------------------------------------


async def test_decorator_in_all_three_forms(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10, burst=10)

    @limiter.limit
    async def one(x: int) -> int:
        """One token."""
        return x + 1

    @limiter.limit(tokens=2)
    async def two(x: int) -> int:
        return x * 2

    async def three(x: int) -> str:
        return str(x)

    wrapped = limiter.limit(three, tokens=3)
    assert await one(1) == 2
    assert await two(2) == 4
    assert await wrapped(5) == "5"
    assert await limiter.fetch_available() == pytest.approx(4, abs=0.1)
    assert one.__name__ == "one"
    assert one.__doc__ == "One token."
    assert wrapped.__wrapped__ is three  # type: ignore[attr-defined]
    assert inspect.signature(two) == inspect.signature(two.__wrapped__)  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(one)


async def test_decorator_refuses_sync_functions_and_bad_tokens(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10)

    def sync() -> None: ...

    with pytest.raises(TypeError, match="async function"):
        limiter.limit(sync)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens"):
        limiter.limit(tokens=-1)


async def test_rate_and_burst_are_settable_and_burst_none_follows_rate(client: Redis) -> None:
    limiter = RedisRateLimiter(client, _key(), 10)
    assert (limiter.rate, limiter.burst, limiter.max_wait) == (10.0, 10.0, None)
    limiter.rate = 50
    assert limiter.burst == 50
    limiter.burst = 5
    limiter.rate = 100
    assert limiter.burst == 5
    limiter.burst = None
    assert limiter.burst == 100
    with pytest.raises(ValueError, match="rate"):
        limiter.rate = 0
    with pytest.raises(TypeError, match="burst"):
        limiter.burst = True
    assert (limiter.rate, limiter.burst) == (100.0, 100.0)
    limiter.rate = 0.5
    assert limiter.burst == 1.0  # never less than one token
    assert repr(limiter) == f"<RedisRateLimiter key={limiter.key!r} rate=0.5/s burst=1 waiting=0>"


# -- failures -------------------------------------------------------------------------------


async def test_a_key_of_another_type_is_a_resource_error_with_the_cause(client: Redis) -> None:
    key = _key()
    await client.hset(key, "field", "value")
    limiter = RedisRateLimiter(client, key, 10)
    with pytest.raises(ResourceError) as info:
        await limiter.acquire()
    assert isinstance(info.value.__cause__, ResponseError)
    await client.set(key, "not a bucket")
    with pytest.raises(ResourceError, match="does not hold a rate limiter"):
        await limiter.acquire()
    await client.delete(key)


async def test_unreachable_redis_is_a_resource_error(redis_server: RedisServer) -> None:
    dead = RedisServer(redis_server.directory)  # a fresh free port, nothing listening
    redis = connect(dead.port)
    limiter = RedisRateLimiter(redis, _key(), 10)
    with pytest.raises(ResourceError, match="Redis call failed") as info:
        await limiter.acquire()
    assert isinstance(info.value.__cause__, RedisConnectionError)
    assert limiter.waiting == 0
    await redis.aclose()


async def test_a_server_that_never_answers_times_out_instead_of_hanging() -> None:
    async with SilentServer() as port:
        redis = connect(port, socket_timeout=None, socket_connect_timeout=None)
        limiter = RedisRateLimiter(redis, _key(), 10, command_timeout=0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        calls = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert 0.19 < loop.time() - start < 1.0
        for result in results:
            assert isinstance(result, ResourceError)
            assert "did not answer within 0.2 s" in str(result)
            assert isinstance(result.__cause__, TimeoutError)
        assert all(task.cancelling() == 0 for task in calls)  # no cancellation left over
        assert limiter.waiting == 0
        await redis.aclose()


async def test_a_cancellation_during_a_redis_call_stays_a_cancellation() -> None:
    async with SilentServer() as port:
        redis = connect(port, socket_timeout=None, socket_connect_timeout=None)
        limiter = RedisRateLimiter(redis, _key(), 10, command_timeout=0.2)
        call = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(call)
        # Cancelled from outside in the same instant the call times out: still cancelled.
        call = asyncio.create_task(limiter.acquire())
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await within(call)
        assert limiter.waiting == 0
        await redis.aclose()


# -- several processes ----------------------------------------------------------------------


def test_four_processes_share_one_rate(redis_server: RedisServer) -> None:
    rate, burst, seconds = 1000.0, 10.0, 1.5
    logs = run_in_processes(4, rate_worker, redis_server.port, _key(), rate, burst, 4, seconds)
    grants = [grant for log in logs for grant in log]
    returned = sorted(at for at, _ in grants)
    slots = sorted(slot for _, slot in grants)
    assert all(len(log) > 100 for log in logs)  # every process got its share

    # The rate: grants per second in the middle of the run, when all four compete, on the
    # server's clock (slots) and on the processes' (returns).
    begin = max(min(at for at, _ in log) for log in logs) + 0.1
    end = min(max(at for at, _ in log) for log in logs) - 0.1
    assert end - begin > 0.8
    achieved = sum(begin <= at < end for at in returned) / (end - begin)
    assert achieved == pytest.approx(rate, rel=0.02)
    first = max(min(slot for _, slot in log) for log in logs) + 0.1
    last = min(max(slot for _, slot in log) for log in logs) - 0.1
    assert sum(first <= slot < last for slot in slots) / (last - first) == pytest.approx(
        rate, rel=0.01
    )

    # The bound on the server's clock, where the slots are reserved: exact (1 us rounding).
    for window in (0.0, 0.001, 0.01, 0.1, 0.5):
        assert most_in_window(slots, window) <= burst + rate * (window + 1e-6), window
    # On the processes' clock a caller returns at or after its slot, never before. A return
    # inside a window whose slot came before it is the first return of its task there (the
    # task's next slot is reserved after that return), so at most one per task is added.
    tasks = 4 * 4
    for window in (0.001, 0.01, 0.1, 0.5):
        assert most_in_window(returned, window) <= burst + rate * window + tasks, window
