"""The reference's "Best Practices / Resource Cleanup" (``AsyncExitStack``), with imports.

``stack.enter_async_context(limiter)`` is ``async with limiter``: it acquires one token and
returns the limiter; its exit does nothing. ``enter_async_context(TimeoutManager(5.0))``
gives the rest of the stack's block a 5 s deadline and returns the manager.

Note that, despite the reference's comment, leaving ``async with`` does not *close* a limiter
or a manager (``async with limiter`` is "take a token", not "own the limiter"). To close them
when the stack unwinds, register their ``close`` too, as ``cleanup_and_close`` below does —
or add them to a ``ResourceGroup``, which closes its members on exit.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from mtaio.resources import RateLimiter, TimeoutManager

# --- the reference example, as written (type annotations added) --------------------------


async def cleanup_resources() -> None:
    async with AsyncExitStack() as stack:
        # Add resources to stack
        rate_limiter = await stack.enter_async_context(RateLimiter(10.0))  # noqa: F841
        timeout = await stack.enter_async_context(TimeoutManager(5.0))  # noqa: F841

        # Resources are automatically cleaned up


# --- the same, closing what it created ------------------------------------------------------


async def cleanup_and_close() -> tuple[RateLimiter, TimeoutManager, float]:
    async with AsyncExitStack() as stack:
        rate_limiter = await stack.enter_async_context(RateLimiter(10.0))  # takes a token
        stack.callback(rate_limiter.close)  # closed when the stack unwinds
        timeout = await stack.enter_async_context(TimeoutManager(5.0))  # a 5 s deadline
        stack.callback(timeout.close)
        available = rate_limiter.available  # 9: one token went to the stack's entry
    return rate_limiter, timeout, available


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    await cleanup_resources()
    rate_limiter, timeout, available = await cleanup_and_close()
    print(f"inside the stack {available} tokens were left; now {rate_limiter!r}, {timeout!r}")


if __name__ == "__main__":
    asyncio.run(main())
