"""The reference's "TimeoutManager / Basic Usage", with fake operations.

``async with TimeoutManager(5.0) as tm`` gives the block a 5 s deadline; ``tm.run(aw)`` gives
one awaitable its own deadline: ``default_timeout`` (5 s) or the ``timeout=`` it is given.
"""

from __future__ import annotations

import asyncio

from mtaio.resources import TimeoutManager

# How long the fake operations take (seconds); the test changes them to make them time out.
LONG_RUNNING_SECONDS = 1.0
ANOTHER_SECONDS = 0.5


async def long_running_operation() -> str:
    await asyncio.sleep(LONG_RUNNING_SECONDS)
    return "long"


async def another_operation() -> str:
    await asyncio.sleep(ANOTHER_SECONDS)
    return "another"


# --- the reference example, as written (type annotations added) --------------------------


async def operation_with_timeout() -> tuple[str, str]:
    # Set timeout for a block of operations
    async with TimeoutManager(5.0) as tm:  # 5 seconds timeout
        result = await tm.run(long_running_operation())

        # Different timeout for specific operation
        result2 = await tm.run(
            another_operation(),
            timeout=2.0,  # 2 seconds timeout
        )
    # (not in the reference: return the results so that the example can show them)
    return result, result2


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    results = await operation_with_timeout()
    print(f"{results} in {loop.time() - start:.1f}s")


if __name__ == "__main__":
    asyncio.run(main())
