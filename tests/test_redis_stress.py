"""Storms across processes for the Redis-backed limiters (``pytest -m stress``).

Four worker processes hammer one key for a few seconds each while cancelling, timing out and
giving up at random; afterwards nothing may be left held or queued in Redis, and the limits
must have held throughout.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis_server import (  # noqa: F401 - fixtures
    RedisServer,
    concurrency_storm_worker,
    connect,
    most_at_once,
    most_in_window,
    rate_storm_worker,
    redis_server_fixture,
    run_in_processes,
)

pytest.importorskip("redis", reason="the redis package is not installed (mtaio[redis])")

from mtaio.resources.redis import RedisConcurrencyLimiter, RedisRateLimiter

pytestmark = [pytest.mark.redis, pytest.mark.stress, pytest.mark.looptime(False)]


def test_cancellation_storm_keeps_the_shared_rate_and_its_bound(
    redis_server: RedisServer,
) -> None:
    rate, burst, seconds, key = 500.0, 5.0, 4.0, f"stress:{uuid.uuid4().hex}"
    logs = run_in_processes(4, rate_storm_worker, redis_server.port, key, rate, burst, 6, seconds)
    slots = sorted(slot for log in logs for _, slot in log)
    # The completed grants obey the bound on the server's clock, refunds included...
    for window in (0.0, 0.001, 0.01, 0.1, 1.0):
        assert most_in_window(slots, window) <= burst + rate * (window + 1e-6), window
    # ... and never exceed the rate. (Slots of reservations cancelled behind later ones stay
    # unused, so the completed rate is below the configured one during a storm.)
    first = max(min(slot for _, slot in log) for log in logs) + 0.2
    last = min(max(slot for _, slot in log) for log in logs) - 0.2
    achieved = sum(first <= slot < last for slot in slots) / (last - first)
    assert rate * 0.3 < achieved <= rate * 1.01

    async def bucket_level() -> float:
        redis = connect(redis_server.port)
        level = await RedisRateLimiter(redis, key, rate, burst).fetch_available()
        await redis.aclose()
        return level

    assert 0.0 <= asyncio.run(bucket_level()) <= burst


def test_cancellation_storm_never_exceeds_the_limit_and_leaks_nothing(
    redis_server: RedisServer,
) -> None:
    limit, key = 3, f"stress:{uuid.uuid4().hex}"
    results = run_in_processes(4, concurrency_storm_worker, redis_server.port, key, limit, 8, 4.0)
    intervals = [interval for log, _ in results for interval in log]
    assert len(intervals) > 200
    assert sum(refused for _, refused in results) > 0  # the storm did time out and give up
    assert most_at_once(intervals) <= limit

    async def left_over() -> tuple[int, int]:
        redis = connect(redis_server.port)
        limiter = RedisConcurrencyLimiter(redis, key, limit)
        counts = (await limiter.fetch_in_use(), await limiter.fetch_waiting())
        await redis.aclose()
        return counts

    assert asyncio.run(left_over()) == (0, 0)  # every permit and place given back at once
