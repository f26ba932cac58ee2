"""The reference's "Best Practices / Error Handling", with a fake ``operation`` and logger.

``async with TimeoutManager(5.0) as tm`` gives the block 5 s and ``tm.run(operation())`` the
operation its own 5 s; the fake operation takes 10 s, so mtaio's ``TimeoutError`` comes out
and is logged. ``TimeoutError`` here is ``mtaio.exceptions.TimeoutError``, a subclass of the
builtin one, so ``except TimeoutError`` catches it with or without the import.
"""

from __future__ import annotations

import asyncio
import logging

from mtaio.exceptions import ResourceLimitError, TimeoutError
from mtaio.resources import TimeoutManager

logger = logging.getLogger("examples.error_handling")

OPERATION_SECONDS = 10.0  # longer than the 5 s allowed


async def operation() -> None:
    await asyncio.sleep(OPERATION_SECONDS)


# --- the reference example, as written (type annotations added) --------------------------


async def handle_resource_errors() -> None:
    try:
        async with TimeoutManager(5.0) as tm:
            await tm.run(operation())
    except TimeoutError:
        logger.error("Operation timed out")
    except ResourceLimitError as e:
        logger.error(f"Resource limit exceeded: {e}")


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await handle_resource_errors()  # logs "Operation timed out"
    print(f"handled after {loop.time() - start:.1f}s")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(main())
