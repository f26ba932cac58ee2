"""Run the test suite against the *installed* mtaio, from outside the source tree.

Used by cibuildwheel (``test-command`` in pyproject.toml), by CI and by
``scripts/check_release.sh``; it needs only the standard library and the ``test`` extra::

    python scripts/test_installed.py --mode compiled  # MTAIO_REQUIRE_EXTENSIONS=1
    python scripts/test_installed.py --mode pure      # MTAIO_NO_EXTENSIONS=1
    python scripts/test_installed.py                  # both, compiled first
    python scripts/test_installed.py -- -q -x         # after --: arguments for pytest

Before each pytest run it checks, in a fresh interpreter, what is about to be tested:

- ``mtaio`` is imported from an installed package, not from the source tree next to the tests;
- compiled: every ``mtaio/_core/*.pyx`` shipped in the package has a compiled extension
  module that imports, and ``mtaio._core.IMPLEMENTATION`` is ``cython``; on a free-threaded
  build, importing them leaves the GIL disabled (they declare free-threading support);
- pure: ``IMPLEMENTATION`` is ``python``.

pytest runs from a new temporary directory with ``-p no:cacheprovider``, so ``import mtaio``
cannot resolve to the sources and nothing is written to the tree. The configuration is the
project's (``pyproject.toml`` beside the tests directory). On a free-threaded build the suite
runs with ``PYTHON_GIL=0``, as CI does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

MODES = {
    "compiled": {"MTAIO_REQUIRE_EXTENSIONS": "1"},
    "pure": {"MTAIO_NO_EXTENSIONS": "1"},
}
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

# Runs in a child interpreter: what is installed, and what importing it does.
PROBE = """
import importlib, importlib.machinery, json, sys
from pathlib import Path

def gil():
    return getattr(sys, "_is_gil_enabled", lambda: True)()

import mtaio
import mtaio._core as core
package = Path(mtaio.__file__).resolve().parent
modules = {}
for source in sorted((package / "_core").glob("*.pyx")):
    name = "mtaio._core." + source.stem
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        modules[name] = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        origin = getattr(module, "__file__", None) or ""
        modules[name] = {
            "file": origin,
            "extension": origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)),
            "gil_after_import": gil(),
        }
print(json.dumps({
    "package": str(package),
    "version": mtaio.__version__,
    "implementation": core.IMPLEMENTATION,
    "twins": sorted(getattr(core, "_TWINS", {})),
    "modules": modules,
}))
"""


def _environment(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTAIO_")}
    env.update(MODES[mode])
    env.pop("PYTHONPATH", None)  # nothing may put a source tree on the path
    return env


def _probe(mode: str, cwd: Path) -> dict[str, Any]:
    env = _environment(mode)
    env.pop("PYTHON_GIL", None)  # let an extension that needs the GIL show it
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"test_installed: importing mtaio failed ({mode}):\n{result.stderr}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _check(mode: str, report: dict[str, Any], tests: Path) -> list[str]:
    problems = []
    package = Path(report["package"])
    source = (tests.parent / "mtaio").resolve()
    if package == source:
        problems.append(f"mtaio was imported from the source tree {source}, not installed")
    implementation = report["implementation"]
    modules: dict[str, dict[str, Any]] = report["modules"]
    if mode == "compiled":
        if not modules:
            problems.append(f"no mtaio/_core/*.pyx in {package}: cannot tell what was compiled")
        gil_enabled_by = None
        for name, info in modules.items():
            if "error" in info:
                problems.append(f"{name} does not import: {info['error']}")
            elif not info["extension"]:
                problems.append(f"{name} is not a compiled extension module: {info['file']}")
            elif FREE_THREADED and info["gil_after_import"] and gil_enabled_by is None:
                gil_enabled_by = name
                problems.append(f"importing {name} enabled the GIL on a free-threaded build")
        if implementation != "cython":
            problems.append(f"mtaio._core.IMPLEMENTATION is {implementation!r}, not 'cython'")
    elif implementation != "python":
        problems.append(f"mtaio._core.IMPLEMENTATION is {implementation!r}, not 'python'")
    return problems


def run(mode: str, tests: Path, pytest_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="mtaio-tests-", ignore_cleanup_errors=True) as tmp:
        cwd = Path(tmp)
        report = _probe(mode, cwd)
        compiled = [name for name, info in report["modules"].items() if info.get("extension")]
        print(
            f"test_installed: {mode}: mtaio {report['version']} from {report['package']}, "
            f"IMPLEMENTATION={report['implementation']}, "
            f"compiled modules installed: {', '.join(compiled) or 'none'}",
            flush=True,
        )
        problems = _check(mode, report, tests)
        if problems:
            for problem in problems:
                print(f"test_installed: FAIL: {problem}", file=sys.stderr)
            return 1
        env = _environment(mode)
        if FREE_THREADED:
            env.setdefault("PYTHON_GIL", "0")
        command = [sys.executable, "-m", "pytest", str(tests), "-p", "no:cacheprovider"]
        command += pytest_args
        print(f"test_installed: {mode}: {' '.join(command)}", flush=True)
        return subprocess.run(command, cwd=cwd, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["compiled", "pure", "both"], default="both")
    parser.add_argument(
        "--tests",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "tests",
        help="the tests directory (default: the one beside this script's directory)",
    )
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest, after --")
    args = parser.parse_args(argv)
    tests = args.tests.resolve()
    if not (tests / "conftest.py").is_file():
        parser.error(f"{tests} is not the mtaio tests directory")
    for mode in ["compiled", "pure"] if args.mode == "both" else [args.mode]:
        status = run(mode, tests, args.pytest_args)
        if status != 0:
            print(f"test_installed: {mode}: FAILED (exit status {status})", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
