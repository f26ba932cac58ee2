"""mtaio in one script: a rate limit, a concurrency limit, deadlines and grouped clean-up.

Run it with ``python examples/quickstart.py`` (it takes about a second).
"""

from __future__ import annotations

import asyncio

from mtaio._core import IMPLEMENTATION
from mtaio.exceptions import ResourceError, ResourceLimitError, TimeoutError
from mtaio.resources import ConcurrencyLimiter, RateLimiter, ResourceGroup, TimeoutManager


async def fetch(page: int) -> str:
    """Stands in for real I/O: a request that takes 50 ms."""
    await asyncio.sleep(0.05)
    return f"page {page}"


async def main() -> None:
    loop = asyncio.get_running_loop()
    print(f"mtaio is running its {IMPLEMENTATION} implementation")

    # Everything added to the group is closed when the block exits, last added first.
    async with ResourceGroup() as group:
        rate = await group.add(RateLimiter(50, burst=10))  # 50 calls/s, bursts of 10
        slots = await group.add(ConcurrencyLimiter(5))  # at most 5 calls at once
        deadlines = await group.add(TimeoutManager(2.0))  # 2 s per call unless told otherwise

        # Client side: callers wait for their turn, in FIFO order.
        @rate.limit
        @slots.limit
        async def polite_fetch(page: int) -> str:
            return await deadlines.run(fetch(page))

        start = loop.time()
        pages = await asyncio.gather(*(polite_fetch(page) for page in range(40)))
        print(f"fetched {len(pages)} pages in {loop.time() - start:.2f}s: 10 at once, then 50/s")

        # A deadline for a whole block: the block is cancelled and TimeoutError comes out.
        try:
            async with deadlines.timeout(0.1):
                await fetch(1)  # fits in the deadline
                await asyncio.sleep(10)  # does not
        except TimeoutError as exc:
            print(f"the block ran out of time after {exc.timeout}s")

        # Server side: max_wait=0 rejects over the limit instead of waiting.
        gate = await group.add(RateLimiter(100, burst=2, max_wait=0))
        for request in range(3):
            try:
                await gate.acquire()
                print(f"request {request}: accepted")
            except ResourceLimitError as exc:
                wait = exc.retry_after or 0.0  # None only when waiting could never help
                print(f"request {request}: rejected, retry after {wait * 1000:.0f} ms")

    # The group closed its members: using them now is an error.
    try:
        await rate.acquire()
    except ResourceError as exc:
        print(f"after the group: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
