#!/usr/bin/env bash
# Installs torchtrain, editable, into a virtual environment ($TORCHTRAIN_VENV, default .venv) with the
# exact versions pinned in constraints.txt; again whenever pyproject.toml or constraints.txt change.
# Usage: scripts/setup.sh [--deps-only] [test]
#   test         adds the test dependencies
#   --deps-only  installs the dependencies without torchtrain; it needs only pyproject.toml and
#                constraints.txt (the Dockerfile's layer that source changes do not invalidate)
#
# Where python3 already has PyTorch (a PyTorch image, see Dockerfile) the environment sees the
# system's packages and keeps that CUDA build of torch and its Triton: their pins are not applied.
# TORCHTRAIN_FRESH_VENV=1 makes the environment from nothing but constraints.txt regardless (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TORCHTRAIN_VENV:-.venv}"
deps_only=""
if [ "${1:-}" = "--deps-only" ]; then
    deps_only=1
    shift
fi
extra="${1:-}"
stamp="$venv/.installed${deps_only:+-deps}${extra:+-$extra}"
wanted="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    if [ -z "${TORCHTRAIN_FRESH_VENV:-}" ] && python3 -c "import torch" 2>/dev/null; then
        python3 -m venv --system-site-packages "$venv"
    else
        python3 -m venv "$venv"
    fi
fi
constraints=constraints.txt
if grep -q "include-system-site-packages = true" "$venv/pyvenv.cfg"; then
    constraints="$venv/constraints-without-torch.txt"
    grep -v -E "^(torch|triton)==" constraints.txt > "$constraints"
fi
pip=("$venv/bin/pip" install --quiet --constraint "$constraints")
# The build backend comes from the pins too (no isolated build environment resolving its own).
"${pip[@]}" setuptools
if [ -n "$deps_only" ]; then
    "$venv/bin/python" -c '
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"][sys.argv[1]] if sys.argv[1] else []
print("\n".join(project["dependencies"] + extras))' "$extra" > "$venv/requirements.txt"
    "${pip[@]}" --requirement "$venv/requirements.txt"
else
    "${pip[@]}" --no-build-isolation --editable ".${extra:+[$extra]}"
fi
echo "$wanted" > "$stamp"
