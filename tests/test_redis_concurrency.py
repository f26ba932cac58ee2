"""RedisConcurrencyLimiter against a real redis-server: SPEC §3 where it applies, leases,
processes that crash, and a server that restarts.

Real time throughout; leases in these tests are short (0.3-0.5 s) so that expiry is quick.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import multiprocessing
import os
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from redis_server import (  # noqa: F401 - fixtures
    RedisServer,
    SilentServer,
    client_fixture,
    concurrency_worker,
    connect,
    holder_worker,
    most_at_once,
    redis_server_fixture,
    run_in_processes,
    within,
)

from mtaio.exceptions import ResourceError, ResourceLimitError

pytest.importorskip("redis", reason="the redis package is not installed (mtaio[redis])")

from redis.exceptions import ConnectionError as RedisConnectionError

from mtaio.resources.redis import RedisConcurrencyLimiter, RedisRateLimiter

if TYPE_CHECKING:
    from redis.asyncio import Redis

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]


def _key() -> str:
    return f"test:{uuid.uuid4().hex}"


async def _until(condition: Any, seconds: float = 2.0) -> None:
    """Wait (a few ms at a time) until ``condition()`` is true: test-side observation only."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.002)


async def _queued(limiter: RedisConcurrencyLimiter, count: int) -> None:
    """Wait until ``count`` waiters queue in Redis."""
    deadline = asyncio.get_running_loop().time() + 2.0
    while await limiter.fetch_waiting() != count:
        assert asyncio.get_running_loop().time() < deadline, "the waiters never queued"
        await asyncio.sleep(0.002)


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"limit": 0}, ValueError, "limit must be an int >= 1, got 0"),
        ({"limit": 1.5}, TypeError, "limit must be an int"),
        ({"limit": True}, TypeError, "limit"),
        ({"lease": 0}, ValueError, "lease"),
        ({"lease": math.inf}, ValueError, "lease"),
        ({"lease": "1"}, TypeError, "lease"),
        ({"max_wait": -1}, ValueError, "max_wait"),
        ({"max_waiting": -1}, ValueError, "max_waiting"),
        ({"max_waiting": 2.0}, TypeError, "max_waiting"),
        ({"command_timeout": -1}, ValueError, "command_timeout"),
        ({"key": ""}, ValueError, "key"),
    ],
)
async def test_bad_construction_arguments_are_refused(
    client: Redis, kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    arguments: dict[str, Any] = {"redis": client, "key": _key(), "limit": 2}
    arguments.update(kwargs)
    with pytest.raises(error, match=words):
        RedisConcurrencyLimiter(**arguments)


async def test_a_single_connection_client_is_refused(redis_server: RedisServer) -> None:
    redis = connect(redis_server.port, single_connection_client=True)
    with pytest.raises(ValueError, match="connection pool"):
        RedisConcurrencyLimiter(redis, _key(), 1)
    await redis.aclose()


async def test_bad_timeout_is_refused_and_takes_nothing(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    with pytest.raises(ValueError, match="timeout"):
        await limiter.acquire(timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        await limiter.acquire(timeout=True)
    assert await limiter.fetch_in_use() == 0
    assert limiter.waiting == 0


# -- permits --------------------------------------------------------------------------------


async def test_acquire_and_release_count_permits_across_instances(client: Redis) -> None:
    key = _key()
    first = RedisConcurrencyLimiter(client, key, 2)
    second = RedisConcurrencyLimiter(client, key, 2)
    await first.acquire()
    await second.acquire()
    assert (first.held, second.held) == (1, 1)
    assert await first.fetch_in_use() == 2
    assert not await first.try_acquire()
    await first.release()
    assert await second.try_acquire()
    assert second.held == 2
    await second.release()
    await second.release()
    assert await first.fetch_in_use() == 0
    await first.aclose()
    await second.aclose()


@pytest.mark.uvloop
async def test_waiters_are_woken_on_every_loop(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    inside = 0
    most = 0

    async def work() -> None:
        nonlocal inside, most
        async with limiter:
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.005)
            inside -= 1

    await asyncio.gather(*(work() for _ in range(4)))
    assert most == 1
    assert await limiter.fetch_in_use() == 0
    await limiter.aclose()


async def test_release_without_a_permit_is_refused_and_changes_nothing(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 2)
    with pytest.raises(ResourceError, match="without a matching acquire"):
        limiter.release()
    await limiter.acquire()
    with pytest.raises(ResourceError):
        await RedisConcurrencyLimiter(client, limiter.key, 2).__aexit__(None, None, None)
    assert limiter.held == 1
    assert await limiter.fetch_in_use() == 1
    limiter.release()  # not awaited: it completes in the background
    await _until(lambda: not limiter._background)
    assert await limiter.fetch_in_use() == 0


async def test_waiters_are_served_in_arrival_order_across_instances(
    client: Redis, redis_server: RedisServer
) -> None:
    key = _key()
    other = connect(redis_server.port)
    limiters = [RedisConcurrencyLimiter(client, key, 1), RedisConcurrencyLimiter(other, key, 1)]
    try:
        await limiters[0].acquire()
        order: list[int] = []

        async def take(n: int) -> None:
            limiter = limiters[n % 2]
            await limiter.acquire()
            order.append(n)
            await asyncio.sleep(0.002)
            await limiter.release()

        tasks = []
        for n in range(6):
            tasks.append(asyncio.create_task(take(n)))
            await _queued(limiters[0], n + 1)
        await limiters[0].release()
        await within(asyncio.gather(*tasks))
        assert order == list(range(6))
    finally:
        for limiter in limiters:
            await limiter.aclose()
        await other.aclose()


async def test_a_newcomer_never_overtakes_a_queued_waiter(client: Redis) -> None:
    key = _key()
    limiter = RedisConcurrencyLimiter(client, key, 1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 1)
    # The release hands the permit to the waiter inside Redis: nothing is free after it.
    await limiter.release()
    assert not await RedisConcurrencyLimiter(client, key, 1).try_acquire()
    await within(waiter)
    await limiter.release()
    await limiter.aclose()


async def test_timeout_fails_after_the_wait_and_holds_nothing(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1, max_wait=0.5)
    await limiter.acquire()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ResourceLimitError, match=r"within 0\.1 s") as info:
        await limiter.acquire(timeout=0.1)
    assert 0.09 < loop.time() - start < 0.5
    assert info.value.retry_after is None
    start = loop.time()
    with pytest.raises(ResourceLimitError, match="free now"):
        await limiter.acquire(timeout=0)
    assert loop.time() - start < 0.25  # not a wait (max_wait would be 0.5 s)
    assert await limiter.fetch_waiting() == 0
    assert (limiter.held, await limiter.fetch_in_use(), limiter.waiting) == (1, 1, 0)
    await limiter.release()
    await limiter.aclose()


async def test_max_waiting_sheds_load_across_instances(client: Redis) -> None:
    key = _key()
    limiter = RedisConcurrencyLimiter(client, key, 1, max_waiting=1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 1)
    other = RedisConcurrencyLimiter(client, key, 1, max_waiting=1)
    with pytest.raises(ResourceLimitError, match="shed"):
        await other.acquire()
    no_queue = RedisConcurrencyLimiter(client, key, 1, max_waiting=0)
    with pytest.raises(ResourceLimitError, match="shed"):
        await no_queue.acquire()
    await limiter.release()
    await within(waiter)
    await limiter.release()
    assert await no_queue.try_acquire()
    await no_queue.release()
    for each in (limiter, other, no_queue):
        await each.aclose()


async def test_raising_capacity_admits_queued_waiters(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
    await _queued(limiter, 2)
    limiter.capacity = 3
    await within(asyncio.gather(*waiters))
    assert (limiter.held, limiter.capacity) == (3, 3)
    with pytest.raises(ValueError, match="capacity"):
        limiter.capacity = 0
    for _ in range(3):
        await limiter.release()
    await limiter.aclose()


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelled_waiter_takes_nothing_and_the_next_one_moves_up(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    await limiter.acquire()
    second = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 1)
    third = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 2)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(second)
    await _queued(limiter, 1)
    await limiter.release()
    await within(third)
    assert limiter.held == 1
    assert await limiter.fetch_in_use() == 1
    await limiter.release()
    await limiter.aclose()


async def test_waiter_woken_then_cancelled_before_it_runs_passes_the_permit_on(
    client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    await limiter.acquire()
    second = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 1)
    third = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 2)
    resolve = limiter._resolve

    def resolve_then_cancel(member: str, outcome: bool | BaseException) -> None:
        resolve(member, outcome)
        second.cancel()  # its future holds the grant; the task has not run yet

    monkeypatch.setattr(limiter, "_resolve", resolve_then_cancel)
    await limiter.release()
    with pytest.raises(asyncio.CancelledError):
        await within(second)
    monkeypatch.undo()
    await asyncio.wait_for(third, 2.0)
    assert limiter.held == 1
    assert await limiter.fetch_in_use() == 1
    await limiter.release()
    await limiter.aclose()


async def test_waiter_cancelled_before_hearing_of_its_grant_passes_the_permit_on(
    client: Redis,
) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1, lease=0.3)
    await limiter.acquire()
    second = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 1)
    third = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 2)
    listener = limiter._listener
    assert listener is not None
    listener.cancel()  # the wake-up for `second` will not be read
    await asyncio.gather(listener, return_exceptions=True)
    await limiter.release()  # Redis grants the permit to `second`
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(second)
    await asyncio.wait_for(third, 2.0)  # the renewal (every 0.1 s) tells it
    assert limiter.held == 1
    assert await limiter.fetch_in_use() == 1
    await limiter.release()
    await limiter.aclose()


async def test_async_with_releases_on_return_exception_and_cancellation(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    async with limiter as entered:
        assert entered is limiter
        assert limiter.held == 1
    assert limiter.held == 0
    with pytest.raises(KeyError):
        async with limiter:
            raise KeyError("boom")
    entered_event = asyncio.Event()

    async def hold() -> None:
        async with limiter:
            entered_event.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(hold())
    await entered_event.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    await limiter._drain()
    assert limiter.held == 0
    assert await limiter.fetch_in_use() == 0
    await limiter.aclose()


async def test_decorator_bare_and_called(client: Redis) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    seen: list[int] = []

    @limiter.limit
    async def bare(x: int) -> int:
        """Doc."""
        seen.append(await limiter.fetch_in_use())
        return x

    @limiter.limit()
    async def called(x: int) -> int:
        seen.append(limiter.held)
        raise ValueError(x)

    assert await bare(3) == 3
    with pytest.raises(ValueError, match="4"):
        await called(4)
    assert seen == [1, 1]
    assert limiter.held == 0
    assert (bare.__name__, bare.__doc__) == ("bare", "Doc.")
    assert inspect.iscoroutinefunction(called)

    def sync() -> None: ...

    with pytest.raises(TypeError, match="async function"):
        limiter.limit(sync)  # type: ignore[arg-type]
    await limiter.aclose()


async def test_close_fails_waiters_and_later_calls_but_holders_can_release(
    client: Redis,
) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 1)
    limiter.close()
    limiter.close()
    with pytest.raises(ResourceError, match="closed while the task waited"):
        await within(waiter)
    with pytest.raises(ResourceError, match="closed"):
        await limiter.acquire()
    with pytest.raises(ResourceError, match="closed"):
        await limiter.try_acquire()
    await limiter.aclose()
    assert await limiter.fetch_waiting() == 0  # the waiter left the queue in Redis
    await limiter.release()
    assert await limiter.fetch_in_use() == 0
    await limiter.aclose()
    assert limiter._renewer is None
    assert repr(limiter) == (
        f"<RedisConcurrencyLimiter key={limiter.key!r} capacity=1 lease=30s held=0 "
        "waiting=0 closed>"
    )


async def test_close_during_the_round_trip_takes_the_waiter_out_of_the_queue(
    client: Redis,
) -> None:
    limiter = RedisConcurrencyLimiter(client, _key(), 1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)  # its request is on the way; the reply is not processed yet
    limiter.close()
    with pytest.raises(ResourceError, match="closed while the task waited"):
        await within(waiter)
    await limiter.aclose()
    assert await limiter.fetch_waiting() == 0
    await limiter.release()
    await limiter.aclose()
    assert (limiter._listener, limiter._renewer) == (None, None)


# -- leases ---------------------------------------------------------------------------------


async def test_a_held_permit_is_renewed_beyond_its_lease(client: Redis) -> None:
    key = _key()
    limiter = RedisConcurrencyLimiter(client, key, 1, lease=0.3)
    await limiter.acquire()
    await asyncio.sleep(0.8)
    assert not await RedisConcurrencyLimiter(client, key, 1, lease=0.3).try_acquire()
    await limiter.release()  # no "lease expired" error
    await limiter.aclose()


async def test_a_lease_that_ran_out_is_reported_at_release(
    client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key()
    stalled = RedisConcurrencyLimiter(client, key, 1, lease=0.3)
    await stalled.acquire()

    async def partitioned() -> None:
        raise ResourceError("Redis unreachable (simulated)")

    monkeypatch.setattr(stalled, "_sync", partitioned)  # its renewals never arrive
    other = RedisConcurrencyLimiter(client, key, 1, lease=0.3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await other.acquire()  # the permit comes back when the stalled lease runs out
    assert 0.2 < loop.time() - start < 0.6
    with pytest.raises(ResourceError, match="lease had expired"):
        await stalled.release()
    await other.release()
    await other.aclose()
    monkeypatch.undo()
    await stalled.aclose()


async def test_async_with_reports_a_lease_lost_while_the_block_ran(
    client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key()
    stalled = RedisConcurrencyLimiter(client, key, 1, lease=0.3)

    async def partitioned() -> None:
        raise ResourceError("Redis unreachable (simulated)")

    monkeypatch.setattr(stalled, "_sync", partitioned)
    with pytest.raises(ResourceError, match="lease had expired"):
        async with stalled:
            await asyncio.sleep(0.4)
    assert stalled.held == 0
    monkeypatch.undo()
    await stalled.aclose()


async def test_a_server_that_never_answers_fails_acquire_in_time() -> None:
    async with SilentServer() as port:
        redis = connect(port, socket_timeout=None)
        limiter = RedisConcurrencyLimiter(redis, _key(), 1, command_timeout=0.2)
        with pytest.raises(ResourceError, match="did not answer"):
            await limiter.acquire()
        assert (limiter.held, limiter.waiting) == (0, 0)
        await limiter.aclose()  # its clean-up (leaving the queue) times out as well
        await redis.aclose()


async def test_a_lost_wake_up_is_delivered_by_the_renewal(client: Redis) -> None:
    key = _key()
    limiter = RedisConcurrencyLimiter(client, key, 1, lease=0.3)
    holder = RedisConcurrencyLimiter(client, key, 1, lease=0.3)
    await holder.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await _queued(limiter, 1)
    listener = limiter._listener
    assert listener is not None
    listener.cancel()  # as if its BLPOP reply had been lost with its connection
    await asyncio.gather(listener, return_exceptions=True)
    await holder.release()
    await asyncio.wait_for(waiter, 1.0)  # within one renewal period (0.1 s)
    assert limiter.held == 1
    await limiter.release()
    await limiter.aclose()
    await holder.aclose()


# -- several processes ----------------------------------------------------------------------


def test_four_processes_never_exceed_the_limit(redis_server: RedisServer) -> None:
    limit = 5
    logs = run_in_processes(4, concurrency_worker, redis_server.port, _key(), limit, 3, 1.0)
    assert all(len(log) > 20 for log in logs)  # every process got permits
    assert most_at_once([interval for log in logs for interval in log]) == limit  # not more


def test_a_killed_holder_loses_its_permit_after_the_lease(redis_server: RedisServer) -> None:
    lease, key = 0.5, _key()
    context = multiprocessing.get_context("spawn")
    holding = context.Event()
    holder = context.Process(target=holder_worker, args=(redis_server.port, key, lease, holding))
    holder.start()
    try:
        assert holding.wait(timeout=60)
        time.sleep(0.2)  # a renewal or two have happened
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        holder.join(timeout=10)
    finally:
        if holder.is_alive():
            holder.kill()

    async def wait_for_the_permit() -> float:
        redis = connect(redis_server.port)
        limiter = RedisConcurrencyLimiter(redis, key, 1, lease=lease)
        assert not await limiter.try_acquire()
        await limiter.acquire()
        granted = time.monotonic()
        await limiter.release()
        await limiter.aclose()
        await redis.aclose()
        return granted - killed

    waited = asyncio.run(wait_for_the_permit())
    # The last renewal came at most lease/3 before the kill: expiry in [2/3 lease, lease].
    assert lease * 2 / 3 - 0.05 < waited < lease + 0.25


async def test_a_restarted_server_gives_resource_errors_then_service_resumes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("restart"))
    server.start()
    redis = connect(server.port)
    try:
        key = _key()
        rate = RedisRateLimiter(redis, key + ":rate", 100)
        limiter = RedisConcurrencyLimiter(redis, key, 1)
        await rate.acquire()
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await _queued(limiter, 1)

        server.stop()
        with pytest.raises(ResourceError) as info:
            await within(waiter)  # its listener's connection broke
        assert isinstance(info.value.__cause__, RedisConnectionError)
        with pytest.raises(ResourceError):
            await rate.acquire()
        with pytest.raises(ResourceError):
            await limiter.try_acquire()
        with pytest.raises(ResourceError):
            await limiter.release()  # the release could not reach Redis
        assert (rate.waiting, limiter.waiting, limiter.held) == (0, 0, 0)

        server.start()  # same port, empty (no persistence)
        await rate.acquire()
        async with limiter:
            assert await limiter.fetch_in_use() == 1
        assert await limiter.fetch_in_use() == 0
        await limiter.aclose()
    finally:
        await redis.aclose()
        server.stop()
