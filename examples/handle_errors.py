"""The reference's "Error Handling Examples", with its imports and a logger.

As written, the function never fails: a fresh ``RateLimiter(10.0)`` has 10 tokens, and
``async with`` takes one and ``acquire()`` another. The test suite
(``tests/test_examples.py``) also runs it with limiters that make each ``except`` branch
fire:

- a limiter that rejects instead of waiting (``max_wait=0``) and has one token: the
  ``acquire()`` after ``async with`` raises ``ResourceLimitError``, so the warning is
  logged and the function sleeps 1 s;
- a closed limiter: ``async with`` raises ``ResourceError``.

The ``except TimeoutError`` branch cannot fire here: nothing in the ``try`` has a deadline.
"""

from __future__ import annotations

import asyncio
import logging

from mtaio.exceptions import ResourceError, ResourceLimitError, TimeoutError
from mtaio.resources import RateLimiter

logger = logging.getLogger("examples.handle_errors")

# --- the reference example, as written (type annotations added) --------------------------


async def handle_errors() -> None:
    try:
        async with RateLimiter(10.0) as limiter:
            await limiter.acquire()

    except ResourceLimitError:
        # Handle rate limit exceeded
        logger.warning("Rate limit exceeded")
        await asyncio.sleep(1)

    except TimeoutError:
        # Handle timeout
        logger.error("Operation timed out")

    except ResourceError as e:
        # Handle general resource errors
        logger.error(f"Resource error: {e}")


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    await handle_errors()  # as written: no error, nothing logged
    print("handle_errors() ran without an error")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(main())
