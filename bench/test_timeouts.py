"""TimeoutManager hot paths beside ``asyncio.timeout``, async-timeout and ``asyncio.wait_for``.

Blocks whose deadline (10 s) never fires: ``async with tm.timeout(10)``, ``async with
TimeoutManager(10)`` (a new manager per block), ``async with tm`` (a shared manager), and
``await tm.run(coro, timeout=10)``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.cases import Case, all_cases

CASES = all_cases()


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.group == "timeout"], ids=lambda case: case.subject
)
def test_timeout_block(run_case: Callable[[Case], None], case: Case) -> None:
    run_case(case)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.group == "run"], ids=lambda case: case.subject
)
def test_run_under_deadline(run_case: Callable[[Case], None], case: Case) -> None:
    run_case(case)
