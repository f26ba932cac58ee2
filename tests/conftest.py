"""The test harness every test module uses.

- ``impl``: runs a test once per implementation (ids ``cython`` / ``python``). ``impl.X`` is
  class ``X`` from that implementation. Where the compiled module is missing, the ``cython``
  leg is skipped with the reason shown, except under ``MTAIO_REQUIRE_EXTENSIONS=1``, where it
  fails.
- Virtual time: every test runs with ``--looptime`` (pyproject), so the asyncio loop's clock
  only moves when the loop would otherwise sleep, jumping straight to the next timer.
  ``loop.time()`` starts at 0 in each test. Mark a test ``@pytest.mark.looptime(False)`` for
  real time.
- Loops: async tests run on asyncio. Tests marked ``@pytest.mark.uvloop`` run on uvloop too
  (test id ``uvloop``); looptime cannot drive uvloop's libuv timers, so the uvloop leg runs in
  real time and such tests must be short.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import pytest

from mtaio._core import _TWINS, Kind, twin

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # Windows, PyPy, free-threaded builds
    uvloop = None

REQUIRE_EXTENSIONS = os.environ.get("MTAIO_REQUIRE_EXTENSIONS", "") not in ("", "0")


class Implementation:
    """One implementation's classes, looked up lazily by name: ``impl.RateLimiter``."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind

    def __getattr__(self, name: str) -> Any:
        if name not in _TWINS:
            raise AttributeError(name)
        try:
            cls = twin(name, self.kind)
        except ImportError as exc:
            if self.kind == "cython" and not REQUIRE_EXTENSIONS:
                pytest.skip(f"compiled core not built: {exc}")
            raise
        setattr(self, name, cls)
        return cls

    def __repr__(self) -> str:
        return f"<Implementation {self.kind}>"


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> Implementation:
    """Each test that takes ``impl`` runs against both implementations."""
    kind: Kind = request.param
    return Implementation(kind)


@pytest.fixture(scope="session", autouse=True)
def _current_event_loop() -> Iterator[None]:
    """Give the main thread a current loop that the harness itself closes.

    pytest-asyncio 1.x calls ``asyncio.get_event_loop()`` when it switches the loop policy;
    without a current loop that call creates one nobody closes, and its ResourceWarning then
    fails a later, unrelated test at garbage collection (pytest-asyncio issue #724).
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    # Where uvloop cannot be installed the test still runs, on asyncio alone.
    if item.get_closest_marker("uvloop") is not None and uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories
