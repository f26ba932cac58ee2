"""The reference's "Best Practices / Performance Optimization" settings, with imports.

- ``RateLimiter(rate=100.0, burst=20)``: up to 20 operations at once after a quiet period,
  and 100 per second under continuous demand.
- ``TimeoutManager(default_timeout=30.0)``: ``async with tm`` blocks and ``tm.run()`` calls
  get 30 s unless told otherwise.
- ``ConcurrencyLimiter(limit=cpu_count() * 2)``: two operations per CPU core at once.
"""

from __future__ import annotations

import asyncio
from os import cpu_count

from mtaio.resources import ConcurrencyLimiter, RateLimiter, TimeoutManager

# --- the reference examples, as written ----------------------------------------------------

# 1. Rate Limiting Strategy
# Balance between protection and performance
rate_limiter = RateLimiter(
    rate=100.0,  # 100 operations per second
    burst=20,  # Allow bursts of 20 operations
)

# 2. Timeout Configuration
# Set appropriate timeouts
timeout_manager = TimeoutManager(
    default_timeout=30.0  # Default 30 seconds
)

# 3. Concurrency Control
# Limit concurrent operations based on system capacity
concurrency_limiter = ConcurrencyLimiter(
    limit=(cpu_count() or 1) * 2  # 2 operations per CPU core
)
# (corrected: os.cpu_count() may return None, so the reference's `cpu_count() * 2` can raise
# TypeError; `(cpu_count() or 1)` counts an unknown machine as one core)

# --- driving it ---------------------------------------------------------------------------


async def main() -> float:
    """120 operations: 20 at once from the full bucket, then 100 more at 100/s (1 s)."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def operation() -> None:
        await rate_limiter.acquire()
        async with timeout_manager, concurrency_limiter:
            await asyncio.sleep(0.001)

    await asyncio.gather(*(operation() for _ in range(120)))
    elapsed = loop.time() - start
    print(f"120 operations in {elapsed:.2f}s")
    print(rate_limiter, timeout_manager, concurrency_limiter, sep="\n")
    return elapsed


if __name__ == "__main__":
    asyncio.run(main())
