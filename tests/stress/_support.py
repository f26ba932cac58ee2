"""Helpers shared by the stress tests: loop introspection and phase detection."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "Growth",
    "is_uvloop",
    "is_virtual",
    "live_timers",
    "loop_name",
    "measure_growth",
    "woken_not_run",
]


def is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def is_virtual(loop: asyncio.AbstractEventLoop) -> bool:
    """Is the loop's clock looptime's virtual one (it only moves when the loop idles)?"""
    return bool(getattr(loop, "looptime_on", False))


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    if is_uvloop(loop):
        return "uvloop"
    return "asyncio" if is_virtual(loop) else "asyncio-real"


def woken_not_run(task: asyncio.Task[Any]) -> bool:
    """The future the task waits on is done, but the task has not run since: it was woken.

    This is the window in which a limiter has already granted a waiter (its future holds the
    grant) and the task has not yet returned from ``acquire()``: a cancellation that lands
    here must pass the permit or the tokens on.
    """
    waiter = task._fut_waiter  # type: ignore[attr-defined]
    return waiter is not None and waiter.done() and not task.done()


def live_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    """The timer handles still armed on an asyncio loop (cancelled ones are ignored)."""
    scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
    return [handle for handle in scheduled if not handle.cancelled()]


class Growth:
    """What :func:`measure_growth` found: traced bytes before and after, and the peak."""

    def __init__(self, before: int, after: int, peak: int, seconds: float) -> None:
        self.before = before
        self.after = after
        self.peak = peak
        self.seconds = seconds

    @property
    def growth(self) -> int:
        return self.after - self.before


async def measure_growth(
    run: Callable[[int], Awaitable[None]], *, warmup: int, cycles: int
) -> Growth:
    """Traced memory growth over ``cycles`` runs, measured after ``warmup`` runs.

    The warm-up lets caches, free lists and lazily created objects settle, so what is left
    is what grows with the number of cycles: a leak.
    """
    gc.collect()
    tracemalloc.start()
    try:
        await run(warmup)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        start = time.perf_counter()
        await run(cycles)
        seconds = time.perf_counter() - start
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Growth(before, after, peak, seconds)
