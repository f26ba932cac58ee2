"""Rate accuracy in real time: does a rate limiter deliver its configured rate, and no more?

For each case a fresh limiter is made, its initial burst is taken in one grant (so the steady
state starts at once instead of after draining, at 100,000/s, a 100,000-token bucket one
token at a time), then ``consumers`` tasks acquire one token at a time in a loop for
``duration`` seconds, each grant stamped with ``time.perf_counter()`` when its task resumes.
From the stamps:

- **achieved / configured**: the achieved rate after a warm-up (10 % of the run, at least
  20 ms): the least-squares slope of tokens granted against time, divided by the configured
  rate. SPEC §2 asks for 0.99-1.005 (mtaio's issue 9).
- **worst 10 ms window / bound**: the most tokens stamped in any closed 10 ms window
  (the initial burst included) against SPEC §2's bound ``max(burst, rate * 0.002) + rate *
  0.010``. At most 1.0 means the bound held. Stamps are taken when the task resumes, so loop
  jitter shows here too.
- **CPU per token**: process CPU time over the run (``time.process_time()``, all the
  consumers, the limiter and the loop) divided by the tokens granted; **CPU share**: that CPU
  time over the wall time (about 1.0 means a core was kept busy).
- **descheduled**: the share of the run this thread was runnable but waiting for a CPU
  (Linux ``schedstat``): how much a shared machine got in the way. Timers cannot fire on
  time while it is high, and a small bucket then loses credit by design.

The same is measured for aiolimiter, mapped onto a token bucket: burst ``b`` at ``rate`` is
``AsyncLimiter(b, b / rate)``, the default burst ``AsyncLimiter(rate, 1)``.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import accumulate
from statistics import linear_regression
from typing import Any

from bench.cases import KINDS, NotAvailable, mtaio_class
from mtaio._core import Kind

__all__ = [
    "BURSTS",
    "CONSUMERS",
    "LIMITERS",
    "RATES",
    "WINDOW",
    "AccuracyCase",
    "AccuracyResult",
    "all_accuracy_cases",
    "check_available",
    "measure",
    "spec_bound",
]

RATES: tuple[float, ...] = (1_000, 50_000, 100_000)
BURSTS: tuple[float | None, ...] = (1, None)  # None: the default, one second's worth
CONSUMERS: tuple[int, ...] = (1, 100)
LIMITERS: dict[str, str] = {
    **{f"mtaio-{kind}": f"mtaio RateLimiter [{kind}]" for kind in KINDS},
    "aiolimiter": "aiolimiter AsyncLimiter",
}
WINDOW = 0.010
TIMER_SLACK = 0.002  # SPEC §2: the effective capacity holds at least 2 ms of tokens


@dataclass(frozen=True)
class AccuracyCase:
    limiter: str  # a key of LIMITERS
    rate: float
    burst: float | None
    consumers: int

    @property
    def burst_value(self) -> float:
        """The configured bucket size: ``burst``, or one second's worth (at least 1)."""
        return self.burst if self.burst is not None else max(1.0, self.rate)

    @property
    def key(self) -> str:
        burst = "default" if self.burst is None else f"{self.burst:g}"
        return f"{self.limiter}-{self.rate:g}-burst{burst}-{self.consumers}tasks"


@dataclass(frozen=True)
class AccuracyResult:
    loop: str
    limiter: str
    rate: float
    burst: float  # the configured bucket size (the default resolved)
    consumers: int
    duration: float  # seconds the consumers ran
    granted: int  # tokens granted to the consumers during the run
    achieved_ratio: float  # steady-state achieved rate / configured rate
    worst_window: float  # most tokens in any 10 ms window, initial burst included
    bound: float  # SPEC §2's bound for a 10 ms window
    cpu_us_per_token: float | None  # None: nothing was granted
    cpu_share: float  # process CPU time / wall time during the run
    descheduled_share: float | None  # time runnable but waiting for a CPU / wall time (Linux)

    @property
    def window_ratio(self) -> float:
        return self.worst_window / self.bound


def _runqueue_wait() -> float | None:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux), else ``None``.

    On a shared machine this says how much of a run the limiter could not have been on time.
    """
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def spec_bound(rate: float, burst: float, interval: float) -> float:
    """SPEC §2: at most ``max(burst, rate * 0.002) + rate * t`` tokens in any interval ``t``."""
    return max(burst, rate * TIMER_SLACK) + rate * interval


def all_accuracy_cases() -> list[AccuracyCase]:
    return [
        AccuracyCase(limiter, rate, burst, consumers)
        for limiter in LIMITERS
        for rate in RATES
        for burst in BURSTS
        for consumers in CONSUMERS
    ]


@dataclass(frozen=True)
class _Subject:
    acquire: Callable[[], Awaitable[None]]
    take_burst: Callable[[], Awaitable[None]]  # takes ``burst_value`` tokens in one grant


def check_available(case: AccuracyCase) -> None:
    """Raise :class:`NotAvailable` if ``case``'s limiter cannot run here."""
    if case.limiter.startswith("mtaio-"):
        mtaio_class("RateLimiter", _kind(case))
    elif case.limiter == "aiolimiter":
        try:
            import aiolimiter  # noqa: F401
        except ImportError as exc:  # pragma: no cover - the bench extra installs it
            raise NotAvailable(f"aiolimiter is not installed: {exc}") from None
    else:
        raise ValueError(f"unknown limiter {case.limiter!r}")


def _kind(case: AccuracyCase) -> Kind:
    return "cython" if case.limiter == "mtaio-cython" else "python"


def _subject(case: AccuracyCase) -> _Subject:
    check_available(case)
    burst = case.burst_value
    if case.limiter.startswith("mtaio-"):
        limiter: Any = mtaio_class("RateLimiter", _kind(case))(case.rate, case.burst)
        return _Subject(limiter.acquire, lambda: limiter.acquire(burst))
    from aiolimiter import AsyncLimiter

    leaky = AsyncLimiter(burst, burst / case.rate)
    return _Subject(leaky.acquire, lambda: leaky.acquire(burst))


def _worst_window(stamps: list[float], tokens: list[float], width: float) -> float:
    """The most tokens in any closed window ``[t, t + width]``; stamps are sorted.

    A window holding the most tokens can always be slid right until it starts at a grant,
    so checking the windows that start at each stamp is enough.
    """
    prefix = [0.0, *accumulate(tokens)]
    return max(
        (prefix[bisect_right(stamps, start + width)] - prefix[i] for i, start in enumerate(stamps)),
        default=0.0,
    )


def _steady_ratio(stamps: list[float], start: float, end: float, rate: float) -> float:
    """Least-squares slope of tokens granted against time in the steady part, over ``rate``.

    Grants come in batches (one per timer wake-up, about 1 ms apart), so counting tokens
    between two stamps is off by up to a batch; a fitted slope averages that sawtooth out.
    The first and the last 10 % of the run (at least 20 ms each) are left out: the start is
    the warm-up, and at the end, grants made just before the run stops may be stamped after.
    """
    trim = max(0.02, 0.1 * (end - start))
    steady = [s for s in stamps if start + trim <= s <= end - trim]
    if len(steady) < 2 or steady[-1] <= steady[0]:
        return 0.0
    slope, _ = linear_regression(steady, range(len(steady)))
    return slope / rate


async def measure(case: AccuracyCase, duration: float, loop_name: str) -> AccuracyResult:
    """Run ``case`` in the running loop for ``duration`` seconds of real time."""
    subject = _subject(case)
    clock = time.perf_counter
    burst = case.burst_value
    await subject.take_burst()
    stamps = [clock()]
    tokens = [burst]
    stamp = stamps.append
    acquire = subject.acquire

    async def consume() -> None:
        while True:
            await acquire()
            stamp(clock())

    wait_start = _runqueue_wait()
    cpu_start, start = time.process_time(), clock()
    consumers = [asyncio.ensure_future(consume()) for _ in range(case.consumers)]
    await asyncio.sleep(duration)
    end, cpu_end = clock(), time.process_time()
    wait_end = _runqueue_wait()
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)

    in_run = [s for s in stamps[1:] if s <= end]
    tokens.extend(1.0 for _ in in_run)
    granted = len(in_run)
    cpu = cpu_end - cpu_start
    return AccuracyResult(
        loop=loop_name,
        limiter=case.limiter,
        rate=case.rate,
        burst=burst,
        consumers=case.consumers,
        duration=end - start,
        granted=granted,
        achieved_ratio=_steady_ratio(in_run, start, end, case.rate),
        worst_window=_worst_window([stamps[0], *in_run], tokens, WINDOW),
        bound=spec_bound(case.rate, burst, WINDOW),
        cpu_us_per_token=cpu / granted * 1e6 if granted else None,
        cpu_share=cpu / (end - start),
        descheduled_share=(
            None
            if wait_start is None or wait_end is None
            else (wait_end - wait_start) / (end - start)
        ),
    )
