"""The implementation selector: MTAIO_NO_EXTENSIONS, MTAIO_REQUIRE_EXTENSIONS, IMPLEMENTATION."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mtaio._core as core


def _implementation(**env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MTAIO_")}
    environment.update(env)
    return subprocess.run(
        # -P: import the installed package, not a source tree in the working directory.
        [sys.executable, "-P", "-c", "import mtaio._core as c; print(c.IMPLEMENTATION)"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _compiled_available() -> bool:
    try:
        for name in core._TWINS:
            core.twin(name, "cython")
    except ImportError:
        return False
    return True


def test_implementation_is_one_of_two() -> None:
    assert core.IMPLEMENTATION in ("cython", "python")


def test_no_extensions_selects_pure_python() -> None:
    result = _implementation(MTAIO_NO_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "python"


@pytest.mark.parametrize("value", ["", "0"])
def test_empty_or_zero_flag_means_unset(value: str) -> None:
    result = _implementation(MTAIO_NO_EXTENSIONS=value)
    expected = "cython" if _compiled_available() else "python"
    assert result.stdout.strip() == expected


def test_default_prefers_compiled_when_built() -> None:
    result = _implementation()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("cython" if _compiled_available() else "python")


def test_require_extensions_fails_loudly_or_gets_cython() -> None:
    result = _implementation(MTAIO_REQUIRE_EXTENSIONS="1")
    if _compiled_available():
        assert result.stdout.strip() == "cython"
    else:
        assert result.returncode != 0
        assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


def test_active_classes_come_from_the_active_implementation() -> None:
    for name in core._TWINS:
        assert getattr(core, name) is core.twin(name, core.IMPLEMENTATION)


def test_twins_share_public_names(impl: object) -> None:
    # Both twins define every public class under the same name.
    for name in core._TWINS:
        cls = getattr(impl, name)
        assert cls.__name__ == name
