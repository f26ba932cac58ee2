"""Memory: a million acquire/release cycles, a hundred thousand deadline blocks, and the cost
of one waiting task.

Growth is what ``tracemalloc`` traces after the cycles less what it traced after a warm-up of
a tenth as many (caches, free lists and lazily made objects settle in the warm-up); a leak of
even one byte per cycle would show as a megabyte. The cycles mix every path: fast acquires,
``async with``, ``try_acquire``, contended ones that queue (one cycle in 256 queues three tasks
and cancels some of them), deadlines that expire and ones that do not. Time is virtual.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mtaio.exceptions import TimeoutError as MtaioTimeoutError

from ._support import Growth, measure_growth

pytestmark = [pytest.mark.stress, pytest.mark.looptime(noop_cycles=0)]

CYCLES = 1_000_000
BLOCKS = 100_000
WORKERS = 4
MB = 1 << 20
WAITERS = 10_000


def report(figures: Any, growth: Growth, cycles: int) -> None:
    figures.add("cycles", cycles, "cycles")
    figures.add("time (tracemalloc on)", growth.seconds, "s")
    figures.add("memory growth", growth.growth / 1024, "KiB")
    figures.add("peak above warm-up", (growth.peak - growth.before) / 1024, "KiB")


async def run_workers(cycles: int, worker: Callable[[int, int], Awaitable[None]]) -> None:
    share = cycles // WORKERS
    await asyncio.gather(*(worker(w, share) for w in range(WORKERS)))


async def test_rate_limiter_memory_is_flat_over_a_million_cycles(impl: Any, figures: Any) -> None:
    # Rounds of 64 calls, each after a sleep that refills the bucket. 63 calls of a round
    # take the fast path in turn (acquire, async with, try_acquire, fractional acquire); one
    # round in 4 ends by emptying the bucket and queueing three tasks, one of them cancelled
    # while queued.
    limiter = impl.RateLimiter(1000, burst=100)
    contended = 0

    async def contend() -> None:
        nonlocal contended
        assert limiter.try_acquire(limiter.available)
        waiters = [asyncio.ensure_future(limiter.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert limiter.waiting == 3
        waiters[0].cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert waiters[2].result() is None
        contended += 1

    async def cycle(n: int) -> None:
        for i in range(n):
            kind = i % 64
            if kind == 0:
                await asyncio.sleep(0.1)
            if kind == 63:
                if i % 256 == 255:
                    await contend()
            elif kind % 4 == 0:
                await limiter.acquire()
            elif kind % 4 == 1:
                async with limiter:
                    pass
            elif kind % 4 == 2:
                assert limiter.try_acquire()
            else:
                await limiter.acquire(0.5)

    growth = await measure_growth(cycle, warmup=CYCLES // 10, cycles=CYCLES)
    report(figures, growth, CYCLES)
    figures.add("contended cycles (3 queued tasks each)", contended, "cycles")
    assert growth.growth < MB
    assert limiter.waiting == 0


async def test_concurrency_limiter_memory_is_flat_over_a_million_cycles(
    impl: Any, figures: Any
) -> None:
    # Cycles on the fast path (async with, acquire/release, try_acquire/release), and one in
    # 256 contended: both permits held, three tasks queue; one is cancelled while queued, one
    # after it was handed a permit (it passes it on), the third gets it.
    limiter = impl.ConcurrencyLimiter(2)
    contended = 0

    async def hold() -> None:
        async with limiter:
            await asyncio.sleep(0)

    async def contend() -> None:
        nonlocal contended
        await limiter.acquire()
        await limiter.acquire()
        waiters = [asyncio.ensure_future(hold()) for _ in range(3)]
        await asyncio.sleep(0)
        assert limiter.waiting == 3
        waiters[0].cancel()
        limiter.release()  # promised to waiters[1]
        waiters[1].cancel()  # which passes it on to waiters[2]
        limiter.release()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert waiters[2].result() is None
        assert (limiter.in_use, limiter.waiting) == (0, 0)
        contended += 1

    async def cycle(n: int) -> None:
        for i in range(n):
            kind = i % 256
            if kind == 255:
                await contend()
            elif kind % 3 == 0:
                async with limiter:
                    pass
            elif kind % 3 == 1:
                await limiter.acquire()
                limiter.release()
            else:
                assert limiter.try_acquire()
                limiter.release()

    growth = await measure_growth(cycle, warmup=CYCLES // 10, cycles=CYCLES)
    report(figures, growth, CYCLES)
    figures.add("contended cycles (3 queued tasks each)", contended, "cycles")
    assert growth.growth < MB
    assert (limiter.in_use, limiter.waiting) == (0, 0)


async def test_timeout_manager_memory_is_flat_over_a_hundred_thousand_blocks(
    impl: Any, figures: Any
) -> None:
    tm = impl.TimeoutManager(10.0)
    loop = asyncio.get_running_loop()
    expired = 0

    async def work() -> int:
        return 1

    async def worker(w: int, n: int) -> None:
        nonlocal expired
        for i in range(n):
            kind = (i + w) % 8
            if kind == 0:
                async with tm.timeout(10):
                    await asyncio.sleep(0)
            elif kind == 1:
                async with tm:
                    pass
            elif kind == 2:
                async with tm.timeout_at(loop.time() + 10) as scope:
                    scope.reschedule(loop.time() + 20)
            elif kind == 3:
                assert await tm.run(work(), timeout=10) == 1
            elif kind == 4:
                try:
                    async with tm.timeout(0):
                        await asyncio.sleep(1)
                except MtaioTimeoutError:
                    expired += 1
            elif kind == 5:
                try:
                    await tm.run(asyncio.sleep(1), timeout=0.001)
                except MtaioTimeoutError:
                    expired += 1
            elif kind == 6:
                async with tm.timeout(5), tm.timeout(10):
                    pass
            else:
                async with tm.timeout(None):
                    pass

    async def cycle(n: int) -> None:
        await run_workers(n, worker)

    growth = await measure_growth(cycle, warmup=BLOCKS // 10, cycles=BLOCKS)
    report(figures, growth, BLOCKS)
    figures.add("expired blocks", expired, "blocks")
    assert growth.growth < MB
    assert expired >= (BLOCKS + BLOCKS // 10) // 4 - 2 * WORKERS


async def traced_per_waiter(
    make: Callable[[], Awaitable[object]], *, settle: Callable[[], None] | None = None
) -> float:
    """Bytes traced per task blocked in ``make()``: task, coroutine, and what it waits on."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(make()) for _ in range(WAITERS)]
        for _ in range(3):
            await asyncio.sleep(0)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert not any(task.done() for task in tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if settle is not None:
        settle()
    return (after - before) / WAITERS


async def test_memory_per_waiting_task(impl: Any, figures: Any) -> None:
    loop = asyncio.get_running_loop()

    async def bare() -> None:
        await loop.create_future()

    baseline = await traced_per_waiter(bare)

    rate = impl.RateLimiter(1.0, burst=1)
    await rate.acquire()  # empty the bucket: everyone after this waits

    async def on_rate() -> None:
        await rate.acquire()

    per_rate = await traced_per_waiter(on_rate)
    assert rate.waiting == 0

    concurrency = impl.ConcurrencyLimiter(1)
    await concurrency.acquire()

    async def on_concurrency() -> None:
        await concurrency.acquire()

    per_concurrency = await traced_per_waiter(on_concurrency)
    assert (concurrency.waiting, concurrency.in_use) == (0, 1)
    concurrency.release()

    tm = impl.TimeoutManager(3600.0)

    async def in_deadline() -> None:
        async with tm:
            await loop.create_future()

    per_deadline = await traced_per_waiter(in_deadline)

    semaphore = asyncio.Semaphore(0)

    async def on_semaphore() -> None:
        await semaphore.acquire()

    per_semaphore = await traced_per_waiter(on_semaphore)

    figures.add("bare task awaiting a future", baseline, "B/task")
    figures.add("waiting on RateLimiter", per_rate, "B/task")
    figures.add("waiting on ConcurrencyLimiter", per_concurrency, "B/task")
    figures.add("waiting inside async with tm", per_deadline, "B/task")
    figures.add("(asyncio.Semaphore, for scale)", per_semaphore, "B/task")
    # What a limiter adds to a waiting task is its queue entry: a few hundred bytes.
    for extra in (per_rate - baseline, per_concurrency - baseline, per_deadline - baseline):
        assert extra < 1024
