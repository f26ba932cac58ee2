"""RateLimiter and ConcurrencyLimiter hot paths, uncontended, beside floors and peers.

``async with``, ``acquire()`` (plus ``release()`` where a permit is held) and a decorated
call, each for both mtaio implementations, the floors, ``asyncio.Semaphore`` /
``BoundedSemaphore``, aiolimiter and anyio's ``CapacityLimiter``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.cases import Case, all_cases

CASES = all_cases()


def _group(group: str) -> list[Case]:
    return [case for case in CASES if case.group == group]


@pytest.mark.parametrize("case", _group("async-with"), ids=lambda case: case.subject)
def test_async_with(run_case: Callable[[Case], None], case: Case) -> None:
    run_case(case)


@pytest.mark.parametrize("case", _group("acquire"), ids=lambda case: case.subject)
def test_acquire(run_case: Callable[[Case], None], case: Case) -> None:
    run_case(case)


@pytest.mark.parametrize("case", _group("decorator"), ids=lambda case: case.subject)
def test_decorated_call(run_case: Callable[[Case], None], case: Case) -> None:
    run_case(case)
