"""The optional compiled core. Everything else about the package is in pyproject.toml.

- Compiles every ``mtaio/_core/*.pyx`` with Cython.
- ``MTAIO_NO_EXTENSIONS=1`` (or a non-CPython interpreter): compile nothing, build a pure
  ``py3-none-any`` wheel.
- A compile failure falls back to pure Python with one warning, unless
  ``MTAIO_REQUIRE_EXTENSIONS=1`` (set for wheel builds), which makes it a build error.
- ``MTAIO_CYTHON_TRACE=1`` compiles with line tracing, for coverage of the ``.pyx`` files.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


NO_EXTENSIONS = _flag("MTAIO_NO_EXTENSIONS") or platform.python_implementation() != "CPython"
REQUIRE_EXTENSIONS = _flag("MTAIO_REQUIRE_EXTENSIONS")
LINE_TRACE = _flag("MTAIO_CYTHON_TRACE")

COMPILER_DIRECTIVES = {
    "language_level": "3",
    "embedsignature": True,
    "freethreading_compatible": True,
    "linetrace": LINE_TRACE,
}


def _warn(message: str) -> None:
    print(f"WARNING: mtaio: {message}", file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """``build_ext`` that degrades to pure Python instead of failing the install.

    Failures are collected and reported in one warning at the end. A partly compiled core is
    harmless: ``mtaio._core`` only switches to the compiled implementation when every
    compiled module imports.
    """

    def run(self) -> None:
        self._failures: list[str] = []
        try:
            super().run()
        except Exception as exc:  # no compiler at all, broken toolchain, ...
            if REQUIRE_EXTENSIONS:
                raise
            self._failures.append(f"the compiled core ({type(exc).__name__}: {exc})")
        if self._failures:
            _warn(
                f"could not compile {'; '.join(self._failures)}. Installing the pure-Python "
                "implementation, which is slower (set MTAIO_REQUIRE_EXTENSIONS=1 to make this "
                "an error)"
            )

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if REQUIRE_EXTENSIONS:
                raise
            self._failures.append(f"{ext.name} ({type(exc).__name__}: {exc})")


def _extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        if REQUIRE_EXTENSIONS:
            sys.exit("mtaio: MTAIO_REQUIRE_EXTENSIONS=1 but extensions are disabled here")
        return []
    sources = sorted((HERE / "mtaio" / "_core").glob("*.pyx"))
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if LINE_TRACE else []
    extensions = [
        Extension(
            f"mtaio._core.{path.stem}",
            [str(path.relative_to(HERE))],
            define_macros=macros,
        )
        for path in sources
    ]
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE_EXTENSIONS:
            raise
        _warn("Cython is not installed; installing the pure-Python implementation")
        return []
    try:
        return list(
            cythonize(
                extensions,
                compiler_directives=COMPILER_DIRECTIVES,
                build_dir="build/cython",  # generated .c stays out of the package
                quiet=True,
            )
        )
    except Exception as exc:
        if REQUIRE_EXTENSIONS:
            raise
        _warn(f"Cython failed ({exc}); installing the pure-Python implementation")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
