"""RateLimiter smoke tests in real time, on asyncio and uvloop (SPEC §2's rate promise).

Short runs with tolerances for a loaded machine: they cannot prove the 1 % promise (the
virtual-clock tests do), but they catch a limiter that loses the credit of late wake-ups
(timers fire about once a millisecond: it would reach a fraction of the rate) or that spins
while it waits.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import Implementation

pytestmark = [pytest.mark.uvloop, pytest.mark.looptime(False)]

RATE = 50_000.0
RUN = 0.2  # seconds
TICK = 0.001  # uvloop's clock moves in whole milliseconds


class Grants:
    """The loop time of every grant and the bucket's level just after it."""

    def __init__(self, limiter: Any) -> None:
        self.limiter = limiter
        self.loop = asyncio.get_running_loop()
        self.begin = self.loop.time()
        self.times: list[float] = []
        self.levels: list[float] = []

    def running(self) -> bool:
        return self.loop.time() - self.begin < RUN

    def record(self) -> None:
        self.times.append(self.loop.time())
        self.levels.append(self.limiter.available)

    def check(self, rate: float, burst: float) -> None:
        """Granted within a few percent of what SPEC's bucket allows, and never more.

        On a loaded machine the process may not run for several milliseconds; the tokens
        that overflow the bucket meanwhile are lost by design. Between two grants the bucket
        rises from the level after the first; whatever exceeds the effective capacity
        ``max(burst, rate * 2 ms)`` was lost. A limiter that loses the credit of late
        wake-ups (timers fire about once a millisecond) loses tokens without such a gap.
        """
        capacity = max(burst, rate * 0.002)
        granted = len(self.times)
        elapsed = self.times[-1] - self.begin
        lost = 0.0
        for k in range(granted - 1):
            gap = self.times[k + 1] - self.times[k] + TICK
            lost += max(0.0, self.levels[k] + rate * gap - capacity)
        allowed = capacity + rate * elapsed
        assert granted <= allowed + rate * TICK + 1  # the bound
        assert granted >= 0.97 * (allowed - lost), (
            f"{granted} granted; the bucket allowed {allowed:.0f}, of which {lost:.0f} "
            "overflowed while the process did not run"
        )


async def test_one_task_gets_50k_tokens_per_second_with_burst_1(impl: Implementation) -> None:
    limiter = impl.RateLimiter(RATE, burst=1)
    grants = Grants(limiter)
    while grants.running():
        await limiter.acquire()
        grants.record()
    grants.check(RATE, 1)


async def test_many_tasks_share_50k_tokens_per_second(impl: Implementation) -> None:
    limiter = impl.RateLimiter(RATE, burst=1)
    grants = Grants(limiter)

    async def consumer() -> None:
        while grants.running():
            async with limiter:
                grants.record()

    await asyncio.gather(*(consumer() for _ in range(100)))
    grants.check(RATE, 1)


@contextmanager
def no_gc() -> Iterator[None]:
    """A garbage collection of earlier tests' objects must not count as the limiter's CPU."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_waiting_burns_no_cpu(impl: Implementation) -> None:
    limiter = impl.RateLimiter(20, burst=1)
    with no_gc():
        await limiter.acquire()
        cpu, wall = time.process_time(), time.monotonic()
        await limiter.acquire()  # a 50 ms wait
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert wall >= 0.045
    assert cpu < 0.5 * wall


async def test_sub_millisecond_waits_do_not_spin(impl: Implementation) -> None:
    # 0.4 ms per token: on uvloop, whose clock ticks once per millisecond and which rounds a
    # timer's delay to the nearest millisecond, a naive limiter would spin here.
    class CountsWakeUps(impl.RateLimiter):  # type: ignore[name-defined,misc]
        wake_ups = 0

        def _on_timer(self) -> None:  # the limiter's one timer callback
            self.wake_ups += 1
            super()._on_timer()

    rate = 2500.0
    limiter = CountsWakeUps(rate, burst=1)
    with no_gc():
        grants = Grants(limiter)
        cpu = time.process_time()
        while grants.running():
            await limiter.acquire()
            grants.record()
        cpu = time.process_time() - cpu
    assert limiter.wake_ups <= 2 * RUN / TICK + 5  # at most two per millisecond
    assert cpu < 0.25 * RUN
    grants.check(rate, 1)
