"""The reference's "ResourceGroup / Basic Usage", with its imports and a fake operation.

The group closes the rate limiter and the timeout manager when ``async with group`` exits
(last added first); using them afterwards raises ``ResourceError``.
"""

from __future__ import annotations

import asyncio

from mtaio.exceptions import ResourceError
from mtaio.resources import RateLimiter, ResourceGroup, TimeoutManager

operations = 0


async def perform_operation() -> None:
    global operations
    await asyncio.sleep(0.1)
    operations += 1


# --- the reference example, as written (type annotations added) --------------------------


async def manage_resources() -> tuple[ResourceGroup, RateLimiter, TimeoutManager]:
    group = ResourceGroup()

    # Add resources to group
    rate_limiter = await group.add(RateLimiter(10.0))
    timeout = await group.add(TimeoutManager(5.0))

    # Resources are automatically managed
    async with group:  # noqa: SIM117 - as the reference writes it
        async with timeout:
            await rate_limiter.acquire()
            await perform_operation()
    # (not in the reference: hand the members back so that the example can show them)
    return group, rate_limiter, timeout


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    group, rate_limiter, _ = await manage_resources()
    print(f"{operations} operation done; the group is now {group!r}")
    try:
        await rate_limiter.acquire()
    except ResourceError as exc:
        print(f"the rate limiter was closed with the group: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
