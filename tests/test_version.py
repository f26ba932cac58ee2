"""Package metadata: a single-sourced version and a light top-level import."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import mtaio


def test_version_is_single_sourced() -> None:
    assert mtaio.__version__ == version("mtaio")


def test_importing_mtaio_loads_no_submodules() -> None:
    code = "import sys, mtaio; print(sorted(m for m in sys.modules if m.startswith('mtaio.')))"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
