#!/usr/bin/env bash
# Installs torchtrain into a local virtual environment (.venv) once, and again when pyproject.toml
# changes. Usage: scripts/setup.sh [extra], e.g. "test" for the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TORCHTRAIN_VENV:-.venv}"
extra="${1:-}"
stamp="$venv/.installed${extra:+-$extra}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    if python3 -c "import torch" 2>/dev/null; then
        # A PyTorch image (see Dockerfile): reuse its CUDA build instead of installing another.
        python3 -m venv --system-site-packages "$venv"
    else
        python3 -m venv "$venv"
    fi
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/pip" install --quiet "torch==2.13.0"
fi
"$venv/bin/pip" install --quiet -e ".${extra:+[$extra]}"
touch "$stamp"
