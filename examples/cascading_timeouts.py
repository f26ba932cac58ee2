"""The reference's "Cascading Timeouts", corrected so that it runs.

The idea: try an operation with a short timeout, and when it runs out, try it again with a
longer one, and so on; the last timeout's ``TimeoutError`` is raised.

Corrections to the reference, and why:

1. The reference wraps ``yield`` in a loop inside an ``@asynccontextmanager``. A context
   manager's generator must yield exactly once, because the ``async with`` body runs
   exactly once: after the first timeout the generator catches the ``TimeoutError``, loops
   and yields again, and ``contextlib`` raises ``RuntimeError("generator didn't stop after
   athrow()")``. (Had the body succeeded, the ``break`` would have been fine; only the
   fallback path is broken, so the bug hides until the first timeout.) Retrying means
   running the operation again, so the corrected method takes a function that starts the
   operation and calls it once per timeout.
2. The last attempt is recognised by its position, not by ``timeout == timeouts[-1]``: with
   ``[1.0, 1.0]`` the reference would give up after the first attempt.
3. An empty list is a ``ValueError`` (the reference would raise ``RuntimeError("generator
   didn't yield")``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mtaio.resources import TimeoutManager

T = TypeVar("T")


class TimeoutController:
    def __init__(self) -> None:
        self.timeouts = TimeoutManager()

    async def cascading_timeout(
        self, operation: Callable[[], Awaitable[T]], timeouts: list[float]
    ) -> T:
        """Implements cascading timeouts with fallback: one attempt per timeout, in order."""
        if not timeouts:
            raise ValueError("timeouts must not be empty")  # correction 3
        *fallbacks, last = timeouts
        for timeout in fallbacks:  # correction 2
            try:
                async with self.timeouts.timeout(timeout):
                    return await operation()  # correction 1: a new attempt each time
            except TimeoutError:
                continue
        async with self.timeouts.timeout(last):
            return await operation()


# --- driving it ---------------------------------------------------------------------------


class FlakyService:
    """Answers in ``delays[n]`` seconds on the n-th call (the last delay repeats)."""

    def __init__(self, *delays: float) -> None:
        self.delays = list(delays)
        self.calls = 0

    async def fetch(self) -> str:
        delay = self.delays[min(self.calls, len(self.delays) - 1)]
        self.calls += 1
        await asyncio.sleep(delay)
        return f"answer after {delay}s"


async def main() -> None:
    loop = asyncio.get_running_loop()
    controller = TimeoutController()

    # Slow at first (3 s), then quick: the 1 s attempt times out, the 2 s attempt succeeds.
    service = FlakyService(3.0, 0.5)
    start = loop.time()
    answer = await controller.cascading_timeout(service.fetch, [1.0, 2.0, 4.0])
    print(f"{answer!r} on attempt {service.calls}, {loop.time() - start:.1f}s in")

    # Always too slow: every attempt times out and the last TimeoutError comes out.
    service = FlakyService(10.0)
    start = loop.time()
    try:
        await controller.cascading_timeout(service.fetch, [1.0, 2.0])
    except TimeoutError as exc:
        print(f"gave up after {service.calls} attempts, {loop.time() - start:.1f}s: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
