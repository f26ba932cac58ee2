"""The reference's "RateLimiter / Basic Usage", with a fake ``perform_operation``.

``RateLimiter(10.0)`` allows 10 operations per second with bursts of 10 (one second's worth):
the first 10 calls run at once, then one every 100 ms, in the order they asked.
"""

from __future__ import annotations

import asyncio

from mtaio.resources import RateLimiter

calls: list[float] = []  # loop time of each operation, for the test and the printout


async def perform_operation() -> None:
    calls.append(asyncio.get_running_loop().time())
    await asyncio.sleep(0.01)


# --- the reference example, as written (type annotations added) --------------------------

# Create rate limiter
limiter = RateLimiter(10.0)  # 10 operations per second


# Use as decorator
@limiter.limit
async def rate_limited_operation() -> None:
    await perform_operation()


# Use with context manager
async def manual_rate_limit() -> None:
    async with limiter:
        await perform_operation()


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    start = asyncio.get_running_loop().time()
    # 20 calls share the limiter, whichever form they use: 10 at once, then 10/s.
    await asyncio.gather(
        *(rate_limited_operation() for _ in range(10)),
        *(manual_rate_limit() for _ in range(10)),
    )
    print(f"{len(calls)} operations in {calls[-1] - start:.1f}s: {limiter!r}")


if __name__ == "__main__":
    asyncio.run(main())
