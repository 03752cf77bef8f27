#!/usr/bin/env bash
# Runs the Python SDK's tests: unit tests, the node protocol conformance kit
# (against weft-node and the Python workers) and the end-to-end tests against
# the real binaries.
#
#   sdk/python/run-tests.sh [pytest args...]
#
# Creates a venv (default sdk/python/.venv; override with WEFT_PY_VENV), installs
# the package with its test extras from the package registry, and runs pytest.
# The binaries come from $WEFT_BIN_DIR, else <repo>/target/debug: build them
# first with `cargo build --bins`. Set WEFT_REQUIRE_BINARIES=1 (CI does) to fail
# instead of skipping when they are missing. Exits non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${WEFT_PY_VENV:-$here/.venv}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
    done
fi
[[ -n "$python" ]] || { echo "run-tests.sh: no python3 found" >&2; exit 1; }

if [[ ! -x "$venv/bin/python" ]]; then
    echo "==> creating venv $venv ($("$python" --version))"
    "$python" -m venv "$venv"
fi
echo "==> installing weft-fabric[test] from $here"
# This package was once distributed as "weft" (an unrelated project's name on
# the public index, with the same import name): drop that install first.
if "$venv/bin/python" -m pip show --quiet weft >/dev/null 2>&1; then
    "$venv/bin/python" -m pip uninstall --quiet --yes weft
fi
# setuptools reuses build/ from an earlier install; a module moved or removed
# since would be installed again beside its new home.
rm -rf "$here/build"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$here[test]"

export WEFT_BIN_DIR="${WEFT_BIN_DIR:-$repo/target/debug}"
if [[ "${WEFT_REQUIRE_BINARIES:-0}" == "1" ]]; then
    for bin in weft-coordinator weft-node weft; do
        [[ -x "$WEFT_BIN_DIR/$bin" ]] || { echo "run-tests.sh: $WEFT_BIN_DIR/$bin missing (cargo build --bins)" >&2; exit 1; }
    done
fi

echo "==> pytest (binaries from $WEFT_BIN_DIR)"
# Run from sdk/python (testpaths = tests) with the `pytest` entry point, so `import weft`
# finds the installed package (with its generated stubs), not the source tree.
cd "$here"
exec "$venv/bin/pytest" -p no:cacheprovider -rs "$@"
