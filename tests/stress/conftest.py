"""Figures the stress tests measure, printed at the end of the run.

A test takes the ``figures`` fixture and records what it measured
(``figures.add("storm time", 3.2, "s")``). The table is printed in the terminal summary, so
``.ci/run``'s log carries the numbers that ``docs/reliability.md`` quotes. With
``MTAIO_STRESS_FIGURES=path.json`` in the environment they are also written there as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass

import pytest

from ._support import loop_name


@dataclass(frozen=True)
class Figure:
    test: str
    implementation: str
    loop: str
    what: str
    value: float
    unit: str


_FIGURES: list[Figure] = []


class Figures:
    """Records figures for one test; the implementation and loop come from its id."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        callspec = getattr(request.node, "callspec", None)
        params = callspec.params if callspec is not None else {}
        impl = params.get("impl")
        self._implementation = str(getattr(impl, "kind", impl or "-"))
        self._test = request.node.originalname

    def add(self, what: str, value: float, unit: str) -> None:
        """Record one figure; the loop is the running one (``-`` outside a loop)."""
        try:
            loop = loop_name(asyncio.get_running_loop())
        except RuntimeError:
            loop = "-"
        _FIGURES.append(Figure(self._test, self._implementation, loop, what, value, unit))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("mtaio stress figures")
    for f in _FIGURES:
        value = f"{f.value:,.3f}".rstrip("0").rstrip(".") if f.value % 1 else f"{f.value:,.0f}"
        terminalreporter.write_line(
            f"{f.test:<48} {f.implementation:<7} {f.loop:<8} {f.what:<34} {value:>14} {f.unit}"
        )
    path = os.environ.get("MTAIO_STRESS_FIGURES")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump([asdict(f) for f in _FIGURES], out, indent=1)
