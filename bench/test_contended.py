"""Contended throughput: 10,000 tasks doing ``async with lim: await asyncio.sleep(0)``.

Through a limit of 10: mtaio's ConcurrencyLimiter (both implementations), ``asyncio.Semaphore``,
``asyncio.BoundedSemaphore`` and anyio's ``CapacityLimiter``, beside the same tasks with no
limit. ``ns_per_op_median`` in ``extra_info`` is per task.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.cases import Case, all_cases


@pytest.mark.parametrize(
    "case", [c for c in all_cases() if c.group == "contended"], ids=lambda case: case.subject
)
def test_contended(run_case: Callable[[Case], None], case: Case) -> None:
    run_case(case)
