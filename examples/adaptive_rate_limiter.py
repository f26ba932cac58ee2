"""The reference's "Adaptive Rate Limiting", corrected so that it runs.

One shared token bucket (``rate`` tokens per second) serves several resources. A call for a
resource whose rate is ``r`` costs ``1 / r`` tokens, so resources with a higher rate get
more calls out of the same bucket; under load every cost doubles.

Corrections to the reference, and why:

1. ``__init__`` now calls ``super().__init__(rate=..., burst=...)``. The reference never
   does, so the limiter has no rate, no bucket and no state, and its first ``acquire``
   fails: an ``AttributeError`` in pure Python; in the compiled class, whose state starts
   zeroed, a ``ResourceLimitError`` (nothing fits in a bucket of 0).
2. ``adjust_rate`` reads a missing rate as the default 1.0, as ``acquire`` does. The
   reference does ``self.rates[resource_id] *= 0.8`` on an empty dict: ``KeyError``.
3. Rates are kept within ``[MIN_RATE, MAX_RATE]``. The reference lets them shrink without
   bound, so the cost ``1 / rate`` would soon exceed the bucket (``burst``) and every call
   would fail with ``ResourceLimitError`` (a request larger than the bucket can never be
   served). With ``MIN_RATE = 0.2`` the highest cost is ``1 / (0.2 * 0.5) = 10`` tokens,
   which is exactly ``burst``.

``acquire(resource_id)`` replaces the base class's ``acquire(tokens)`` as in the reference,
so use this limiter through ``acquire`` only (``async with`` and the decorator call
``acquire`` with the base class's arguments).
"""

from __future__ import annotations

import asyncio
from typing import Dict  # noqa: UP035 - as the reference writes it

from mtaio.resources import RateLimiter

MIN_RATE = 0.2
MAX_RATE = 50.0


class AdaptiveRateLimiter(RateLimiter):
    def __init__(self, rate: float = 1.0, burst: float = 10.0) -> None:
        super().__init__(rate=rate, burst=burst)  # correction 1
        self.rates: Dict[str, float] = {}  # noqa: UP006
        self._current_load = 0.0

    async def acquire(self, resource_id: str) -> None:  # type: ignore[override]
        rate = self.rates.get(resource_id, 1.0)
        if self._current_load > 0.8:  # 80% load
            rate *= 0.5  # Reduce rate
        await super().acquire(tokens=1 / rate)

    def adjust_rate(self, resource_id: str, load: float) -> None:
        self._current_load = load
        rate = self.rates.get(resource_id, 1.0)  # correction 2
        if load > 0.9:  # High load
            rate *= 0.8
        elif load < 0.5:  # Low load
            rate *= 1.2
        self.rates[resource_id] = min(MAX_RATE, max(MIN_RATE, rate))  # correction 3


# --- driving it ---------------------------------------------------------------------------


async def calls_per_second(limiter: AdaptiveRateLimiter, resource_id: str, calls: int) -> float:
    """The rate one client gets for ``resource_id`` under continuous demand."""
    loop = asyncio.get_running_loop()
    limiter.try_acquire(limiter.available)  # empty the bucket: measure the rate, not the burst
    start = loop.time()
    for _ in range(calls):
        await limiter.acquire(resource_id)
    return calls / (loop.time() - start)


async def main() -> dict[str, float]:
    limiter = AdaptiveRateLimiter(rate=10.0, burst=10.0)  # 10 tokens per second
    limiter.rates.update(search=4.0, upload=1.0)  # calls per token
    for _ in range(3):
        limiter.adjust_rate("upload", load=0.95)  # high load: 1.0 -> 0.8 -> 0.64 -> 0.512
    limiter.adjust_rate("search", load=0.3)  # low load: 4.0 -> 4.8

    rates = {
        "search": await calls_per_second(limiter, "search", 20),  # 48 calls/s
        "upload": await calls_per_second(limiter, "upload", 5),  # 5.12 calls/s
    }
    limiter.adjust_rate("search", load=0.85)  # over 80 %: every call costs twice as much
    rates["search under load"] = await calls_per_second(limiter, "search", 20)  # 24 calls/s
    for name, rate in rates.items():
        print(f"{name}: {rate:.2f} calls/s")
    return rates


if __name__ == "__main__":
    asyncio.run(main())
