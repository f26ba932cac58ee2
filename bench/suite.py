"""Types shared by the pytest-benchmark suites (``conftest.py`` and the ``test_*`` modules)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["BenchLoop", "Benchmark"]

T = TypeVar("T")

BenchLoop = tuple[str, asyncio.AbstractEventLoop]
"""The ``bench_loop`` fixture: the loop's name (``asyncio`` / ``uvloop``) and the loop."""


class Benchmark(Protocol):
    """The part of pytest-benchmark's ``benchmark`` fixture used here (it ships no types)."""

    group: str | None
    extra_info: dict[str, Any]

    def pedantic(
        self, target: Callable[[], T], *, rounds: int = ..., warmup_rounds: int = ...
    ) -> T: ...
