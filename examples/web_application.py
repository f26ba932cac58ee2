"""The reference's "Integration Examples / Web Application", with a fake ``process_request``.

Every request gets its own 5 s deadline from the one shared ``TimeoutManager`` and waits
for a token of the one shared ``RateLimiter`` (100 requests/s, bursts of 100): requests
over the rate queue in arrival order instead of failing. A request that runs out of time
raises ``TimeoutError`` without disturbing the others.

``RejectingAPI`` (not in the reference) is the server-side variant: ``max_wait=0`` turns
"wait for a token" into "reject over the limit", with ``retry_after`` for a ``Retry-After``
header.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from mtaio.exceptions import ResourceLimitError, TimeoutError
from mtaio.resources import RateLimiter, TimeoutManager


@dataclass
class Request:
    id: int
    work: float = 0.05  # seconds of (fake) processing


async def process_request(request: Request) -> str:
    await asyncio.sleep(request.work)
    return f"response {request.id}"


# --- the reference example, as written (type annotations added) --------------------------


class RateLimitedAPI:
    def __init__(self) -> None:
        self.rate_limiter = RateLimiter(100.0)  # 100 requests/second
        self.timeout = TimeoutManager(5.0)  # 5 second timeout

    async def handle_request(self, request: Request) -> str:
        async with self.timeout:
            await self.rate_limiter.acquire()
            return await process_request(request)


# --- the server-side variant ----------------------------------------------------------------


class RejectingAPI:
    """Answers 429 over the limit instead of making clients wait."""

    def __init__(self) -> None:
        self.rate_limiter = RateLimiter(100, burst=20, max_wait=0)
        self.timeout = TimeoutManager(5.0)

    async def handle_request(self, request: Request) -> tuple[int, dict[str, str], str]:
        try:
            await self.rate_limiter.acquire()
        except ResourceLimitError as exc:
            retry_after = math.ceil(exc.retry_after or 1)  # Retry-After is whole seconds
            return 429, {"Retry-After": str(retry_after)}, "Too Many Requests"
        try:
            async with self.timeout:
                return 200, {}, await process_request(request)
        except TimeoutError:
            return 504, {}, "Gateway Timeout"


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    loop = asyncio.get_running_loop()

    api = RateLimitedAPI()
    start = loop.time()
    responses = await asyncio.gather(*(api.handle_request(Request(i)) for i in range(200)))
    # 100 at once (the full bucket), the next 100 at 100/s: the last one starts at 1 s.
    print(f"RateLimitedAPI: {len(responses)} responses in {loop.time() - start:.2f}s")

    rejecting = RejectingAPI()
    statuses = await asyncio.gather(*(rejecting.handle_request(Request(i)) for i in range(50)))
    accepted = sum(status == 200 for status, _, _ in statuses)
    print(f"RejectingAPI: {accepted} accepted, {len(statuses) - accepted} answered 429")


if __name__ == "__main__":
    asyncio.run(main())
