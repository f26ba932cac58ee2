"""The reference's "Integration Examples / Task Processing", with a fake ``process_task``.

``process_tasks`` holds one permit of ``ConcurrencyLimiter(10)`` for a whole batch, so at
most 10 batches run at once; the tasks inside a batch run one after another.

Correction to the reference: it calls ``self.process_task(task)`` but never defines
``process_task``, so the first batch would fail with ``AttributeError``; the method is added
below (a fake that takes ``task`` seconds).
"""

from __future__ import annotations

import asyncio

from mtaio.resources import ConcurrencyLimiter

# --- the reference example, as written (type annotations and process_task added) ----------


class TaskProcessor:
    def __init__(self) -> None:
        self.limiter = ConcurrencyLimiter(10)  # 10 concurrent tasks
        self.running = 0  # batches inside the limiter now (for the demonstration)
        self.most_running = 0

    async def process_tasks(self, tasks: list[float]) -> list[str]:
        async with self.limiter:
            results = []
            for task in tasks:
                result = await self.process_task(task)
                results.append(result)
            return results

    async def process_task(self, task: float) -> str:  # correction: missing in the reference
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(task)
            return f"done in {task}s"
        finally:
            self.running -= 1


# --- driving it ---------------------------------------------------------------------------


async def main() -> None:
    loop = asyncio.get_running_loop()
    processor = TaskProcessor()
    batches = [[0.1, 0.1, 0.1] for _ in range(30)]
    start = loop.time()
    results = await asyncio.gather(*(processor.process_tasks(batch) for batch in batches))
    # 30 batches of 0.3 s, 10 at a time: 0.9 s.
    print(
        f"{sum(map(len, results))} tasks in {len(results)} batches, "
        f"at most {processor.most_running} at once, in {loop.time() - start:.1f}s"
    )


if __name__ == "__main__":
    asyncio.run(main())
