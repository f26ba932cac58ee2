"""Chooses the compiled or the pure-Python implementation of the hot paths.

Every hot path exists twice: ``_<name>_c.pyx`` (Cython) and ``_<name>_py.py`` (the typed
reference implementation, the one to read to learn the algorithm). This module is the only
place in the package that knows there are two; everything else imports the classes from here.

- ``MTAIO_NO_EXTENSIONS=1`` in the environment at import time selects pure Python.
- Interpreters other than CPython always get pure Python.
- If a compiled module cannot be imported, pure Python is used, unless
  ``MTAIO_REQUIRE_EXTENSIONS=1``, which turns that into an ``ImportError``.

``IMPLEMENTATION`` says which one is active: ``"cython"`` or ``"python"``. The whole package
switches at once; the two are never mixed.
"""

from __future__ import annotations

import importlib
import os
import platform
from typing import TYPE_CHECKING, Any, Final, Literal

__all__ = ["IMPLEMENTATION", "Kind", "twin"]

Kind = Literal["cython", "python"]

# Public class name -> the stem of the twin modules that define it.
_TWINS: Final[dict[str, str]] = {
    "ConcurrencyLimiter": "_semaphore",
    "RateLimiter": "_bucket",
    "Timeout": "_deadline",
    "TimeoutManager": "_deadline",
}


def _flag(name: str) -> bool:
    """An environment switch: set to anything but empty or ``0``."""
    return os.environ.get(name, "") not in ("", "0")


def twin(name: str, kind: Kind) -> Any:
    """Return the class ``name`` from the ``kind`` implementation (raises ``ImportError``)."""
    suffix = "c" if kind == "cython" else "py"
    module = importlib.import_module(f"{__name__}.{_TWINS[name]}_{suffix}")
    return getattr(module, name)


def _choose() -> Kind:
    if _flag("MTAIO_NO_EXTENSIONS") or platform.python_implementation() != "CPython":
        return "python"
    try:
        for name in _TWINS:
            twin(name, "cython")
    except ImportError:
        if _flag("MTAIO_REQUIRE_EXTENSIONS"):
            raise
        return "python"
    return "cython"


IMPLEMENTATION: Final[Kind] = _choose()

if TYPE_CHECKING:
    from ._bucket_py import RateLimiter as RateLimiter
    from ._deadline_py import Timeout as Timeout
    from ._deadline_py import TimeoutManager as TimeoutManager
    from ._semaphore_py import ConcurrencyLimiter as ConcurrencyLimiter
else:
    globals().update({name: twin(name, IMPLEMENTATION) for name in _TWINS})
