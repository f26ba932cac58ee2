"""The reference's "ConcurrencyLimiter / Basic Usage", with fake work.

``ConcurrencyLimiter(5)`` lets at most 5 tasks inside at once, whether they enter through the
decorator or ``async with``; the others wait in FIFO order.
"""

from __future__ import annotations

import asyncio

from mtaio.resources import ConcurrencyLimiter

inside = 0  # how many fake operations are running now
most_inside = 0  # the most that ever ran at once


async def _work() -> None:
    global inside, most_inside
    inside += 1
    most_inside = max(most_inside, inside)
    try:
        await asyncio.sleep(0.1)
    finally:
        inside -= 1


async def process_task() -> None:
    await _work()


async def perform_operation() -> None:
    await _work()


# --- the reference example, as written (type annotations added) --------------------------

# Create limiter with maximum 5 concurrent operations
limiter = ConcurrencyLimiter(5)


@limiter.limit
async def concurrent_operation() -> None:
    await process_task()


# Manual usage
async def manual_concurrency() -> None:
    async with limiter:
        await perform_operation()


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(
        *(concurrent_operation() for _ in range(10)),
        *(manual_concurrency() for _ in range(10)),
    )
    # 20 operations of 0.1 s, 5 at a time: 0.4 s.
    print(f"20 operations, at most {most_inside} at once, in {loop.time() - start:.1f}s")


if __name__ == "__main__":
    asyncio.run(main())
