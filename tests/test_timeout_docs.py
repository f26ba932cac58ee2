"""Every runnable example of ``docs/timeout-manager.md`` runs, on both implementations.

A runnable example is a ``python`` code block that defines ``async def main()``; it is
executed with ``mtaio.resources``' twinned classes swapped for the ``impl`` under test, and
``main()`` is awaited on the virtual clock.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Implementation

import mtaio.resources
from mtaio._core import _TWINS

PAGE = Path(__file__).resolve().parent.parent / "docs" / "timeout-manager.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
RUNNABLE = [block for block in BLOCKS if "async def main()" in block]


async def test_the_page_has_runnable_examples() -> None:
    assert len(RUNNABLE) >= 5


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"example{n}" for n in range(len(RUNNABLE))])
async def test_docs_example_runs(
    block: str, impl: Implementation, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    for name in _TWINS:
        monkeypatch.setattr(mtaio.resources, name, getattr(impl, name), raising=False)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(block, str(PAGE), "exec"), namespace)
    await namespace["main"]()
    capsys.readouterr()
